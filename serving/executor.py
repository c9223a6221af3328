"""Model execution: the BentoML service that holds the champion and runs it.

:class:`ModelExecutor` loads the model the bento carries (``ClinicalService.bento_model``),
compiles its fast path on the chosen device (CUDA when available, otherwise the CPU, said
in the log), follows the registry's ``champion`` alias when asked, and scores records.

The API service (:mod:`clinml.serving.service`) reaches it in one of two ways, chosen by
``CLINML_EXECUTION``:

``inline``  the API worker creates a ModelExecutor in its own process and calls it
            directly: no hop between processes.
``split``   ``bentoml.depends(ModelExecutor)``: ``bentoml serve`` runs the executor as its
            own service (resources from ``CLINML_GPU``; one worker) and the API calls it
            over a Unix socket. The API sends each request's checked columns to
            ``predict_columns``, which batches adaptively across concurrent requests
            (``CLINML_BATCHING``, ``CLINML_MAX_BATCH_SIZE``, which counts requests there,
            ``CLINML_MAX_BATCH_LATENCY_MS``). ``predict`` takes records, for a client of
            the executor alone; the API does not call it. With ``CLINML_EXECUTOR_URL`` the executor
            runs on its own (``bentoml serve clinml.serving.executor:ModelExecutor``, e.g. on a
            GPU node) and the API calls it over HTTP; its endpoints have no
            authentication, so only the API may reach them (docs/deployment.md).

Either way every answer says which version produced it: a batch is scored by one model,
taken once, so a champion change mid-flight never mixes versions within a request or
labels a probability with the wrong version's threshold.

With inline execution the executor also follows the registry's ``shadow`` alias
(``clinml shadow start``) in the same checks as ``champion``: it holds that version in a
slot of its own (``shadow``; None when nothing is shadowed) and scores it for the API's
shadow worker (``score_shadow``, :mod:`clinml.serving.shadow`). A shadow version that
fails its checks or its load is logged and left out; it never touches the champion. With
split execution the shadow alias is not followed (the service logs that it is ignored).

The ``canary`` alias (``clinml canary start``) is followed the same way, inline only, into
a slot of its own: ``canary``, a (model, percent) pair replaced in one step (None when
there is no canary), the percent read from the version's ``clinml.canary_percent`` tag.
The service routes a share of requests to it (:mod:`clinml.serving.canary`) and scores
them with ``score_canary``, never through the champion's batches.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from pydantic import ValidationError

from clinml.errors import ClinmlError, SettingsError
from clinml.serving.columns import Batch
from clinml.serving.runtime import ServedModel, load_from_bento, starting_holder
from clinml.settings import Settings
from clinml.spec import UseCaseSpec, load_spec

log = logging.getLogger("bentoml.clinml")


def _configuration() -> tuple[Settings, UseCaseSpec]:
    """The settings and the served use case's spec, read once when ``bentoml serve``
    imports the service; a refusal to start is one line (logged, and on stderr) and exit
    status 2, not a traceback (a validation error's traceback would quote the settings)."""
    try:
        try:
            settings = Settings()
        except ValidationError as exc:
            raise SettingsError.from_validation(exc) from None
        _data_directory_given()
        return settings, load_spec(settings.usecase, settings.spec_dir)
    except ClinmlError as exc:
        line = "error: " + " ".join(str(exc).split())
        log.error(line)
        if not _logged_to_stderr(log):
            print(line, file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _data_directory_given() -> None:
    """A built bento carries the code, the specs and the model, not the state: the API
    keys, the online store, the audit trail and the prediction log live under
    ``CLINML_HOME``. ``bentoml serve`` runs a bento from inside it, where the default
    ``./.clinml`` would be an empty directory written into the bento itself, so serving
    a bento needs ``CLINML_HOME`` named.

    Raises:
        ClinmlError: served from a bento without ``CLINML_HOME``.
    """
    in_bento = (Path(__file__).resolve().parents[2] / "bento.yaml").is_file()
    if in_bento and not os.environ.get("CLINML_HOME"):
        raise ClinmlError(
            "this bento is served without CLINML_HOME: set it to clinml's data directory "
            "(the API keys, the online store and the audit trail live there; "
            "docs/serving.md, 'The immutable path')"
        )


def _logged_to_stderr(logger: logging.Logger) -> bool:
    """Whether a record on ``logger`` reaches stderr (so printing the line too would show
    it twice): through a handler writing there, or, with no handler at all, through
    logging's last resort, which writes there."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    if not handlers:
        return logging.lastResort is not None
    return any(getattr(handler, "stream", None) is sys.stderr for handler in handlers)


SETTINGS, SPEC = _configuration()

# One scored record: (probability, version, alias, operating threshold).
Scored = tuple[float, str, str, float]


@dataclass(frozen=True)
class ColumnScores:
    """A batch's probabilities (float64, in row order) and the one model version that
    produced them. Sliced by rows (``scores[start:stop]``), so that the coalescer can
    hand each request of a joined batch its own part."""

    probability: np.ndarray
    version: str
    alias: str
    threshold: float

    def __len__(self) -> int:
        return len(self.probability)

    def __getitem__(self, rows: slice) -> ColumnScores:
        return ColumnScores(self.probability[rows], self.version, self.alias, self.threshold)

    def plain(self) -> dict[str, Any]:
        """As JSON-able values, for an answer of the split executor."""
        return {
            "probability": self.probability.tolist(),
            "version": self.version,
            "alias": self.alias,
            "threshold": self.threshold,
        }

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> ColumnScores:
        return cls(
            np.asarray(plain["probability"], dtype=np.float64),
            str(plain["version"]),
            str(plain["alias"]),
            float(plain["threshold"]),
        )


def resources(settings: Settings) -> dict[str, Any]:
    """BentoML resources for model execution: GPUs when asked for, else one CPU."""
    return {"gpu": settings.gpu} if settings.gpu else {"cpu": "1"}


def model_tag() -> bentoml.models.BentoModel:
    """The champion imported by ``clinml package``; ``bentoml build`` packs it."""
    return bentoml.models.BentoModel(f"{SPEC.name}:latest")


@bentoml.service(
    name="clinml-model",
    resources=resources(SETTINGS),
    workers=1,
    traffic={"timeout": 30},
    # BentoML 1.4.31+ closes the caller's client session every `max_requests` calls or
    # `max_age` seconds, and closing it fails the calls still in flight on it
    # (ServerDisconnectedError under concurrent load; bentoml/BentoML#5540, #5522).
    # One long-lived session avoids that.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0 * 365 * 24 * 3600},
)
class ModelExecutor:
    """Holds the served model version; scores, explains, describes and reloads it."""

    bento_model = model_tag()

    def __init__(self) -> None:
        if SETTINGS.device != "cuda":
            import torch

            # Small per-request work: one thread is as fast and does not fight the API
            # workers for the cores (measured in tests/model/test_fastpath.py).
            torch.set_num_threads(1)
        from clinml.training.tracking import Tracker

        # The bento's model, checked against the hashes recorded at registration (and
        # those against the registry's when it answers). A refused model leaves the
        # executor running without one: not ready, `last_error` saying why.
        self.models = starting_holder(
            lambda: load_from_bento(
                str(self.bento_model.tag),
                SPEC,
                Tracker.from_settings(SETTINGS),
                SETTINGS.device,
            )
        )
        if self.models.loaded:
            model = self.models.current
            device = getattr(model.compiled, "device", "cpu")
            fallback = SETTINGS.device == "auto" and not device.startswith("cuda")
            log.info(
                "model execution: %s version %s (%s) on %s%s",
                model.name,
                model.version,
                "compiled fast path" if model.fast else "scikit-learn pipeline",
                device,
                "; CUDA is not available, falling back to the CPU" if fallback else "",
            )
        # The shadow version (clinml.serving.shadow), replaced in one step like the
        # champion; None when the registry names none.
        self.shadow: ServedModel | None = None
        self._shadow_problem: str | None = None  # the last failure logged, once
        self._shadow_lock = threading.Lock()  # one check at a time (polling, admin reload)
        # The canary version and its share (clinml.serving.canary); None when none.
        self.canary: tuple[ServedModel, float] | None = None
        self._canary_problem: str | None = None
        self._canary_lock = threading.Lock()
        self._stop = threading.Event()
        if SETTINGS.reload_interval_s > 0 or SETTINGS.execution == "inline":
            threading.Thread(target=self._follow_alias, daemon=True).start()

    def __is_ready__(self) -> bool:
        """Ready while a model is loaded: served on its own (``CLINML_EXECUTOR_URL``), a
        model refused at start is a 503 on this service's ``/readyz``."""
        return self.models.loaded

    @bentoml.api(
        batchable=SETTINGS.batching,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_batch_latency_ms,
    )
    def predict(self, records: list[dict[str, Any]]) -> list[Scored]:
        """One (probability, version, alias, threshold) per record, in order."""
        model = self.models.current  # one model for the whole batch
        probabilities = model.predict_records(records)
        return [(float(p), model.version, model.alias, model.threshold) for p in probabilities]

    def score_columns(self, batch: Batch) -> ColumnScores:
        """The probabilities of a batch of columns, from one model (called in-process:
        inline execution, the coalescer, and :meth:`predict_columns`)."""
        model = self.models.current  # one model for the whole batch
        probability = np.asarray(model.predict_columns(batch.columns), dtype=np.float64)
        if len(probability) != batch.rows:
            raise RuntimeError(
                f"the model returned {len(probability)} probabilities for {batch.rows} rows"
            )
        return ColumnScores(probability, model.version, model.alias, model.threshold)

    def score_shadow(self, batch: Batch) -> ColumnScores | None:
        """The shadow version's probabilities of a batch of columns (called in-process by
        the shadow worker); None when no version is shadowed, or when the shadow is the
        version now serving (a model never shadows itself)."""
        shadow = self.shadow  # one model for the whole batch
        if shadow is None:
            return None
        champion = self.models.current if self.models.loaded else None
        if champion is not None and champion.version == shadow.version:
            return None
        probability = np.asarray(shadow.predict_columns(batch.columns), dtype=np.float64)
        if len(probability) != batch.rows:
            raise RuntimeError(
                f"the shadow model returned {len(probability)} probabilities for {batch.rows} rows"
            )
        return ColumnScores(probability, shadow.version, shadow.alias, shadow.threshold)

    def score_canary(self, model: ServedModel, batch: Batch) -> ColumnScores:
        """The probabilities of a batch of columns from the canary version ``model`` (the
        service took it, with its share, from ``canary`` when it routed the request)."""
        probability = np.asarray(model.predict_columns(batch.columns), dtype=np.float64)
        if len(probability) != batch.rows:
            raise RuntimeError(
                f"the canary model returned {len(probability)} probabilities for {batch.rows} rows"
            )
        return ColumnScores(probability, model.version, model.alias, model.threshold)

    @bentoml.api(
        batchable=SETTINGS.batching,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_batch_latency_ms,
    )
    def predict_columns(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Column batches (``columns.Batch.plain()``: ``{"columns": {feature: values},
        "rows": n}``) -> per batch ``ColumnScores.plain()``, in order. The split API
        sends one batch per request; BentoML's adaptive batching joins the concurrent
        ones (so ``max_batch_size`` counts requests here), and they are scored in one
        model call, by one version."""
        parts = [Batch.from_plain(plain) for plain in batches]
        scores = self.score_columns(Batch.join(parts))
        out, start = [], 0
        for part in parts:
            out.append(scores[start : start + part.rows].plain())
            start += part.rows
        return out

    @bentoml.api
    def explain(self, records: list[dict[str, Any]], top_k: int) -> dict[str, Any]:
        """Probabilities and each record's top-k contributions, from one model."""
        model = self.models.current
        try:
            contributions = model.explain(records, top_k)
        except ClinmlError as exc:
            return {"error": str(exc)}
        probabilities = model.predict_records(records)
        return {
            "scored": [
                (float(p), model.version, model.alias, model.threshold) for p in probabilities
            ],
            "method": model.explain_method,
            "contributions": [[(f, float(c)) for f, c in row] for row in contributions],
        }

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` reports, or ``{"loaded": False}``."""
        if not self.models.loaded:
            return {"loaded": False, "last_error": self.models.last_error}
        return {"loaded": True, **self.models.current.describe()}

    @bentoml.api
    def card(self) -> str:
        """The served version's model card as HTML ("" when it has none)."""
        return self.models.current.card_html or ""

    @bentoml.api
    def reload(self) -> dict[str, Any]:
        """Switch to the registry's current champion; a model that fails to load is
        refused and the old one keeps serving (``error`` says why). Without a model (the
        bento's was refused at start) a champion that passes its checks is loaded.

        With inline execution the ``shadow`` and ``canary`` aliases are followed too
        (``shadow``, ``canary``: the version named now, or None), whatever happens to the
        champion."""
        inline = SETTINGS.execution == "inline"
        shadow = self.reload_shadow() if inline else None
        canary = self.reload_canary() if inline else None
        return {**self._reload_champion(), "shadow": shadow, "canary": canary}

    def _reload_champion(self) -> dict[str, Any]:
        old = self.models.current.version if self.models.loaded else None
        try:
            new = self._load_champion()
        except Exception as exc:  # a tampered file, an unreachable registry: keep serving
            error = str(exc) if isinstance(exc, ClinmlError) else f"{type(exc).__name__}: {exc}"
            return {"previous_version": old, "version": old, "error": error}
        if new.version != old:
            self.models.swap(new)
            self.models.last_error = None
        return {"previous_version": old, "version": new.version, "error": None}

    def reload_shadow(self) -> str | None:
        """Follow the registry's ``shadow`` alias: load the version it names when that
        changed, drop the slot when it is gone. A version that fails to load (its checks,
        the registry) is logged once and left out, and the next check tries again.
        Never raises. Returns the version shadowed now, or None."""
        with self._shadow_lock:
            return self._reload_shadow()

    def _reload_shadow(self) -> str | None:
        from clinml.serving.runtime import load_from_registry
        from clinml.training.tracking import SHADOW, Tracker

        current = self.shadow
        try:
            tracker = Tracker.from_settings(SETTINGS)
            wanted = _aliased_version(tracker, SPEC.name, SHADOW)
            if wanted is None:
                if current is not None:
                    log.info("shadow version %s stopped", current.version)
                self.shadow, self._shadow_problem = None, None
                return None
            if current is not None and current.version == wanted:
                return wanted
            loaded = load_from_registry(SPEC, tracker, alias=SHADOW, device=SETTINGS.device)
        except Exception as exc:  # a tampered file, an unreachable registry: no shadow
            problem = str(exc) if isinstance(exc, ClinmlError) else type(exc).__name__
            if problem != self._shadow_problem:
                log.warning("shadow version not loaded; the champion is unaffected: %s", problem)
            self._shadow_problem = problem
            self.shadow = None
            return None
        self.shadow, self._shadow_problem = loaded, None
        log.info(
            "shadow version %s scored beside the champion%s",
            loaded.version,
            f", replacing version {current.version}" if current is not None else "",
        )
        return loaded.version

    def reload_canary(self) -> str | None:
        """Follow the registry's ``canary`` alias and its share: load the version it names
        when that changed, drop the slot when it is gone. A version that fails to load is
        logged once and left out (the champion answers everyone); the next check tries
        again. Never raises. Returns the canary version now, or None."""
        with self._canary_lock:
            return self._reload_canary()

    def _reload_canary(self) -> str | None:
        from clinml.errors import NotReadyError
        from clinml.serving.runtime import load_from_registry
        from clinml.training.tracking import CANARY, Tracker, canary_percent

        current = self.canary
        try:
            tracker = Tracker.from_settings(SETTINGS)
            try:
                named = tracker.version_by_alias(SPEC.name, CANARY)
                wanted = (str(named.version), canary_percent(named.tags or {}))
            except NotReadyError:
                wanted = None
            if wanted is None:
                if current is not None:
                    log.info("canary version %s stopped", current[0].version)
                self.canary, self._canary_problem = None, None
                return None
            version, percent = wanted
            if current is not None and current[0].version == version:
                if current[1] != percent:
                    log.info("canary version %s now answers %g%% of requests", version, percent)
                self.canary = (current[0], percent)
                return version
            loaded = load_from_registry(SPEC, tracker, alias=CANARY, device=SETTINGS.device)
        except Exception as exc:  # a tampered file, an unreachable registry: no canary
            problem = str(exc) if isinstance(exc, ClinmlError) else type(exc).__name__
            if problem != self._canary_problem:
                log.warning(
                    "canary version not loaded; the champion answers every request: %s", problem
                )
            self._canary_problem = problem
            self.canary = None
            return None
        self.canary, self._canary_problem = (loaded, percent), None
        log.info("canary version %s answers %g%% of requests", loaded.version, percent)
        return loaded.version

    def _load_champion(self) -> ServedModel:
        from clinml.serving.runtime import load_from_registry
        from clinml.training.tracking import Tracker

        return load_from_registry(SPEC, Tracker.from_settings(SETTINGS), device=SETTINGS.device)

    def _follow_alias(self) -> None:
        """Follow the aliases every ``reload_interval_s``; inline, first take up the shadow
        version named at start (off the start-up path: the registry may be slow to answer,
        and a bento serves without it)."""
        if SETTINGS.execution == "inline":
            self.reload_shadow()
            self.reload_canary()
        if SETTINGS.reload_interval_s <= 0:
            return
        while not self._stop.wait(SETTINGS.reload_interval_s):
            result = self.reload()
            if result["error"]:
                self.models.last_error = result["error"]
                log.warning(
                    "champion check failed; still serving the current model: %s", result["error"]
                )
            elif result["previous_version"] != result["version"]:
                log.info(
                    "champion changed from version %s to %s",
                    result["previous_version"],
                    result["version"],
                )


def _aliased_version(tracker: Any, model: str, alias: str) -> str | None:
    """The version an alias names in the registry, or None when it names none."""
    from clinml.errors import NotReadyError

    try:
        return str(tracker.version_by_alias(model, alias).version)
    except NotReadyError:
        return None
