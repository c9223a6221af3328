"""Serving stage: the BentoML prediction service and the packaging of its model.

Modules:
    schemas  request/response models generated from the spec
    package  import the MLflow champion into the BentoML store; build the bento
    service  the ``@bentoml.service`` class (``bentoml serve serving.service:ClinicalService``)
"""
