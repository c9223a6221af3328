"""Training stage: point-in-time training frame -> candidates -> MLflow runs -> registry.

Modules:
    train         ``run``: the stage itself (search, fit, evaluate, register the best)
    assignment    which rows a model may train on (a keyed hash of the patient) and which
                  rows two models can be compared on
    candidates    the CANDIDATES registry (svm, rf, gbm, mlp; logreg as the reference) and
                  the shared preprocessing
    search        hyperparameter search with patient-grouped cross-validation, on a budget
    mlp           the PyTorch MLP as a scikit-learn estimator
    evaluate      clinical evaluation of one model on held-out rows (``Evaluation``)
    metrics       the metrics, bootstrap intervals and operating-threshold choice
    calibration   calibration (intercept, slope, O:E, curves) and decision curves
    card          the model card: JSON and HTML
    governance    the promotion gate, promote, rollback and the alias audit log
    model_io      saving and loading a fitted model without pickle (skops + allow-list)
    pyfunc        the MLflow pyfunc wrapper every candidate is logged as
    mlflow_entry  the "models from code" file MLflow runs when it loads that pyfunc
    tracking      the MLflow tracker/registry handed to the stage
    reference     the columns training adds to its reference snapshot for the monitor
"""
