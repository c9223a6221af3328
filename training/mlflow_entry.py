"""MLflow "models from code" entry point: MLflow copies this file into every logged model
and runs it at load time instead of unpickling an object."""

from mlflow.models import set_model

from clinml.training.pyfunc import ClinicalPyfunc

set_model(ClinicalPyfunc())
