"""Training stage: point-in-time training frame -> candidates -> MLflow runs -> registry.

Modules:
    candidates  the CANDIDATES registry (svm, rf, gbm, mlp) and the shared preprocessing
    mlp         the PyTorch MLP as a scikit-learn estimator
    evaluate    held-out metrics
    model_io    saving and loading a fitted model without pickle (skops + allow-list)
    pyfunc      the MLflow pyfunc wrapper every candidate is logged as
    tracking    the MLflow tracker/registry handed to the stage
    train       ``run``: the stage itself
"""
