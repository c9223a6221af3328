"""The clinml prediction service (BentoML 1.4, new-style API).

Run it with ``clinml serve USECASE`` (which sets ``BENTOML_HOME`` and ``CLINML_USECASE``)
or directly: ``bentoml serve serving.service:ClinicalService``. The use case comes from
``CLINML_USECASE``; its spec generates the request schema, and the model is the
``champion`` imported into the BentoML store by ``clinml package``.

Endpoints: ``POST /predict`` plus BentoML's ``/livez``, ``/readyz``, ``/metrics``, and
the API docs page (Swagger UI) at ``/`` with the OpenAPI document at ``/docs.json``.
"""

from __future__ import annotations

import logging
import uuid

import bentoml
import pandas as pd

from clinml.settings import Settings
from clinml.spec import load_spec
from serving import redaction, schemas

# A child of the "bentoml" logger, so `bentoml serve` prints it with its own lines.
log = logging.getLogger("bentoml.clinml")

# The request schema is generated from the spec, so it must exist when the class is
# defined. Reading settings and the spec touches no state.
_settings = Settings()
SPEC = load_spec(_settings.usecase, _settings.config_dir)
SCHEMAS = schemas.build(SPEC, _settings.max_records_per_request)
Records = SCHEMAS.records


@bentoml.service(name="clinml", traffic={"timeout": 30})
class ClinicalService:
    """Predicts the spec's positive class for records of features."""

    # Resolved lazily on first access; `bentoml build` packs the model it points at.
    bento_model = bentoml.models.BentoModel(f"{SPEC.name}:latest")

    def __init__(self) -> None:
        redaction.install()
        stored = self.bento_model
        meta = stored.info.metadata
        self.model = bentoml.mlflow.load_model(stored)
        self.model_ref = schemas.ModelRef(
            name=str(meta["registered_model"]),
            version=str(meta["version"]),
            alias=str(meta["alias"]),
        )
        self.threshold = float(meta["operating_threshold"])
        self.features = SPEC.feature_names
        log.info(
            "loaded %s version %s (%s) from %s",
            self.model_ref.name,
            self.model_ref.version,
            self.model_ref.alias,
            stored.tag,
        )

    @bentoml.api
    def predict(self, records: Records) -> schemas.PredictResponse:  # type: ignore[valid-type]
        """Probability and label for each record, in request order."""
        frame = pd.DataFrame([r.model_dump() for r in records], columns=self.features)
        probability = self.model.predict(frame)["probability"].to_numpy()
        positive, negative = SPEC.label.positive_class, SPEC.label.negative_class
        predictions = [
            schemas.Prediction(
                probability=float(p), label=positive if p >= self.threshold else negative
            )
            for p in probability
        ]
        return schemas.PredictResponse(
            request_id=uuid.uuid4().hex,
            model=self.model_ref,
            operating_threshold=self.threshold,
            predictions=predictions,
        )
