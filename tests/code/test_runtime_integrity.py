"""Every artifact the service trusts is checked against the hash recorded at registration.

One small model is trained and registered in a temporary MLflow registry, promoted, and
imported into the session's BentoML store (tests/conftest.py) as ``clinml package`` does;
each test then tampers with a fresh import, or with the registry's copy, and loads it the
way the service does (``load_from_bento`` at start, ``load_from_registry`` on reload).
"""

from __future__ import annotations

import hashlib
import logging
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from clinml.serving import runtime
from clinml.spec import CandidateSpec, UseCaseSpec
from clinml.training import model_io
from clinml.training.card import CARD_HTML, CARD_JSON
from clinml.training.tracking import CHAMPION, Tracker
from tests.conftest import make_tiny_frame

pytestmark = pytest.mark.slow

TAMPERED_THRESHOLD = 0.0001


@pytest.fixture(scope="module")
def spec(tiny_spec: UseCaseSpec) -> UseCaseSpec:
    """The tiny use case with one small candidate (and the reference, always fitted)."""
    candidates = {"gbm": CandidateSpec(params={"max_iter": 20}, search={})}
    training = tiny_spec.training.model_copy(update={"candidates": candidates})
    return tiny_spec.model_copy(update={"training": training})


@pytest.fixture(scope="module")
def tracker(spec: UseCaseSpec, tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    """A registry holding one trained version of ``spec``, as its champion."""
    from clinml.training.train import fit_candidates, register

    root = tmp_path_factory.mktemp("integrity")
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", create=True)
    result = register(spec, fit_candidates(spec, make_tiny_frame(n=400), n_boot=100), tracker)
    tracker.client.set_registered_model_alias(spec.name, CHAMPION, result.version)
    return tracker


@pytest.fixture
def bento(spec: UseCaseSpec, tracker: Tracker) -> tuple[str, Path]:
    """A fresh import of the champion into the BentoML store: (tag, stored directory)."""
    import bentoml

    from clinml.serving.package import import_champion

    tag = import_champion(spec, tracker).tag
    return tag, Path(bentoml.models.get(tag).path)


def _edit_metadata(root: Path, **changes: object) -> None:
    """Rewrite the stored model's metadata in its model.yaml, as someone with disk access
    to the BentoML store could (None removes a key)."""
    model_yaml = root / "model.yaml"
    info = yaml.safe_load(model_yaml.read_text())
    for key, value in changes.items():
        if value is None:
            info["metadata"].pop(key, None)
        else:
            info["metadata"][key] = value
    model_yaml.write_text(yaml.safe_dump(info, sort_keys=False))


def _metadata(root: Path) -> dict:
    return yaml.safe_load((root / "model.yaml").read_text())["metadata"]


def _unreachable(tmp_path: Path) -> Tracker:
    """A registry that is not there (its volume not mounted)."""
    return Tracker(f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}", tmp_path / "artifacts")


def _registry_card(tracker: Tracker, spec: UseCaseSpec) -> Path:
    """The champion's card directory in the registry's artifact store."""
    version = tracker.version_by_alias(spec.name)
    artifacts = tracker.client.get_run(version.run_id).info.artifact_uri
    return Path(urlparse(artifacts).path) / "model_card"


def _refused(call, match: str) -> str:
    with pytest.raises(model_io.ModelLoadError, match=match) as refused:
        call()
    message = str(refused.value)
    assert str(TAMPERED_THRESHOLD) not in message and "<script>" not in message  # no values
    return message


# --- registration ------------------------------------------------------------------------------


def test_registration_records_a_hash_of_every_artifact_the_service_trusts(
    spec: UseCaseSpec, tracker: Tracker
) -> None:
    version = tracker.version_by_alias(spec.name)
    tags = version.tags
    card = _registry_card(tracker, spec)
    assert tags["card_json_sha256"] == model_io.sha256_of(card / CARD_JSON)
    assert tags["card_html_sha256"] == model_io.sha256_of(card / CARD_HTML)
    assert tags["serving_spec_sha256"] == model_io.spec_contract_digest(spec)
    assert tags["serving_sha256"] == model_io.serving_digest(
        registered_model=spec.name,
        run_id=version.run_id,
        candidate=tags["candidate"],
        operating_threshold=float(tags["operating_threshold"]),
        feature_service=spec.feature_service,
        features=spec.feature_names,
    )
    assert len(tags["model_sha256"]) == 64
    assert tags["spec_sha256"] == spec.fingerprint()  # the whole spec, for provenance


# --- what loads --------------------------------------------------------------------------------


def test_an_unchanged_model_loads_from_the_bento_and_the_registry_without_warnings(
    spec: UseCaseSpec, tracker: Tracker, bento, caplog: pytest.LogCaptureFixture
) -> None:
    tag, root = bento
    tags = tracker.version_by_alias(spec.name).tags
    carried = _metadata(root)  # import_champion carries every recorded hash
    assert {t: carried.get(t) for t in model_io.INTEGRITY_TAGS} == {
        t: tags[t] for t in model_io.INTEGRITY_TAGS
    }
    recorded = float(tags["operating_threshold"])
    with caplog.at_level(logging.WARNING, logger="bentoml.clinml"):
        from_bento = runtime.load_from_bento(tag, spec, tracker, device="cpu")
        from_registry = runtime.load_from_registry(spec, tracker, device="cpu")
    for model in (from_bento, from_registry):
        assert model.threshold == recorded
        assert model.card_html and "<style>" in model.card_html
        assert model.card and model.card["model"]["run_id"] == model.run_id
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_bento_serves_without_the_registry_on_its_own_hashes(
    spec: UseCaseSpec, bento, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tag, root = bento
    with caplog.at_level(logging.WARNING, logger="bentoml.clinml"):
        model = runtime.load_from_bento(tag, spec, _unreachable(tmp_path), device="cpu")
    assert model.version == "1"
    assert "could not be asked (RegistryUnavailable)" in caplog.text
    # and its own hashes are still checked
    _edit_metadata(root, operating_threshold=TAMPERED_THRESHOLD)
    _refused(
        lambda: runtime.load_from_bento(tag, spec, _unreachable(tmp_path), device="cpu"),
        "serving metadata",
    )


def test_a_version_registered_before_the_hashes_loads_with_a_warning_per_artifact(
    spec: UseCaseSpec, bento, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the model file's hash is required (as before); the others are checked when
    recorded, and their absence is said."""
    tag, root = bento
    _edit_metadata(
        root, **{t: None for t in model_io.INTEGRITY_TAGS if t != model_io.MODEL_SHA_TAG}
    )
    with caplog.at_level(logging.WARNING, logger="bentoml.clinml"):
        model = runtime.load_from_bento(tag, spec, None, device="cpu")
    assert model.card_html
    for unchecked in ("model_card.json", "model_card.html", "serving_sha256", "serving_spec"):
        assert unchecked in caplog.text
    assert "unchecked" in caplog.text


# --- what is refused: the BentoML store --------------------------------------------------------


def test_a_threshold_edited_in_the_bento_is_refused(spec: UseCaseSpec, tracker, bento) -> None:
    """The red-team finding: `operating_threshold: 0.0001` in model.yaml made every record
    positive with /readyz 200."""
    tag, root = bento
    _edit_metadata(root, operating_threshold=TAMPERED_THRESHOLD)
    for registry in (None, tracker):
        message = _refused(
            lambda r=registry: runtime.load_from_bento(tag, spec, r, device="cpu"),
            "serving metadata .* differs from the one recorded at registration",
        )
        assert str(root) in message


@pytest.mark.parametrize("edit", ["script in the page", "page removed", "card JSON edited"])
def test_a_card_edited_in_the_bento_is_refused(spec: UseCaseSpec, bento, edit: str) -> None:
    tag, root = bento
    card = root / runtime.CARD_SUBDIR
    page, data = card / CARD_HTML, card / CARD_JSON
    if edit == "script in the page":
        page.write_text(page.read_text().replace("</h1>", "</h1><script>alert(1)</script>"))
        match = "model_card.html differs from the one recorded at registration"
    elif edit == "page removed":
        page.unlink()
        match = "model_card.html is missing, but its hash was recorded"
    else:
        data.write_text(data.read_text().replace('"tiny"', '"tiny (validated)"', 1))
        match = "model_card.json differs"
    _refused(lambda: runtime.load_from_bento(tag, spec, None, device="cpu"), match)


def test_hashes_rewritten_with_the_value_are_caught_by_the_registry(
    spec: UseCaseSpec, tracker: Tracker, bento
) -> None:
    """An insider with disk access edits the threshold and its recorded hash together:
    consistent on its own, so only the registry's record can tell."""
    tag, root = bento
    metadata = _metadata(root)
    forged = model_io.serving_digest(
        registered_model=metadata["registered_model"],
        run_id=metadata["run_id"],
        candidate=metadata["candidate"],
        operating_threshold=TAMPERED_THRESHOLD,
        feature_service=metadata["feature_service"],
        features=spec.feature_names,
    )
    _edit_metadata(root, operating_threshold=TAMPERED_THRESHOLD, serving_sha256=forged)
    message = _refused(
        lambda: runtime.load_from_bento(tag, spec, tracker, device="cpu"),
        r"hashes recorded in its model.yaml \(serving_sha256\) differ from the registry's",
    )
    assert forged not in message
    # Without a registry to ask, the bento's own (forged) hashes are all there is: the
    # residual docs/security.md section 3.1 states.
    served = runtime.load_from_bento(tag, spec, None, device="cpu")
    assert served.threshold == TAMPERED_THRESHOLD


def test_a_card_and_its_hash_rewritten_together_are_caught_by_the_registry(
    spec: UseCaseSpec, tracker: Tracker, bento
) -> None:
    tag, root = bento
    page = root / runtime.CARD_SUBDIR / CARD_HTML
    page.write_text(page.read_text().replace("</h1>", "</h1><script>alert(1)</script>"))
    _edit_metadata(root, card_html_sha256=hashlib.sha256(page.read_bytes()).hexdigest())
    _refused(
        lambda: runtime.load_from_bento(tag, spec, tracker, device="cpu"),
        r"\(card_html_sha256\) differ from the registry's",
    )


@pytest.mark.parametrize("edit", ["hashes removed", "another version named", "no version"])
def test_a_bento_cannot_dodge_the_registry_check(
    spec: UseCaseSpec, tracker: Tracker, bento, edit: str
) -> None:
    """Stripping the recorded hashes, or naming a version the registry does not have, is
    not a way around the cross-check."""
    tag, root = bento
    if edit == "hashes removed":
        _edit_metadata(
            root,
            operating_threshold=TAMPERED_THRESHOLD,
            serving_sha256=None,
            card_html_sha256=None,
        )
        match = r"\(card_html_sha256, serving_sha256\) differ from the registry's"
    elif edit == "another version named":
        _edit_metadata(root, operating_threshold=TAMPERED_THRESHOLD, version="99")
        match = "has no version 99 of model 'tiny'"
    else:
        _edit_metadata(root, operating_threshold=TAMPERED_THRESHOLD, version="latest")
        match = "has no version latest of model 'tiny'"
    _refused(lambda: runtime.load_from_bento(tag, spec, tracker, device="cpu"), match)


# --- what is refused: the spec and the registry -----------------------------------------------


def test_a_changed_serving_contract_of_the_spec_is_refused(
    spec: UseCaseSpec, tracker: Tracker, bento
) -> None:
    tag, _ = bento
    first = spec.features[0]
    widened = spec.model_copy(
        update={"features": [first.model_copy(update={"max": 400.0}), *spec.features[1:]]}
    )
    relabelled = spec.model_copy(
        update={"label": spec.label.model_copy(update={"positive_class": "readmitted"})}
    )
    for changed in (widened, relabelled):
        for load in (
            lambda s=changed: runtime.load_from_bento(tag, s, tracker, device="cpu"),
            lambda s=changed: runtime.load_from_registry(s, tracker, device="cpu"),
        ):
            _refused(load, "serving contract of spec 'tiny' .* changed since this version was")
    # Monitoring and descriptions may change after training: still the same contract.
    retuned = spec.model_copy(
        update={
            "description": "reworded",
            "monitoring": spec.monitoring.model_copy(update={"numeric_floor": 0.3}),
            "features": [first.model_copy(update={"drift_floor": 0.5}), *spec.features[1:]],
        }
    )
    assert runtime.load_from_bento(tag, retuned, tracker, device="cpu").version == "1"


def test_a_card_changed_in_the_registry_is_refused_on_reload(
    spec: UseCaseSpec, tracker: Tracker
) -> None:
    page = _registry_card(tracker, spec) / CARD_HTML
    original = page.read_bytes()
    try:
        page.write_bytes(original.replace(b"</h1>", b"</h1><script>alert(1)</script>"))
        _refused(
            lambda: runtime.load_from_registry(spec, tracker, device="cpu"),
            "registered model tiny version 1: model_card.html differs",
        )
    finally:
        page.write_bytes(original)


# --- start-up ---------------------------------------------------------------------------------


def test_a_model_refused_at_start_leaves_the_service_running_and_not_ready(
    spec: UseCaseSpec, tracker: Tracker, bento
) -> None:
    tag, root = bento
    _edit_metadata(root, operating_threshold=TAMPERED_THRESHOLD)
    holder = runtime.starting_holder(
        lambda: runtime.load_from_bento(tag, spec, tracker, device="cpu")
    )
    assert not holder.loaded
    assert holder.last_error and "serving metadata" in holder.last_error
    good = runtime.starting_holder(lambda: runtime.load_from_registry(spec, tracker, device="cpu"))
    assert good.loaded and good.last_error is None


# --- the card's Content-Security-Policy -------------------------------------------------------


class _Page(HTMLParser):
    """Tags, attributes and inline styles of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes += [(tag, name, value or "") for name, value in attrs]


def test_the_card_needs_nothing_its_content_security_policy_refuses(
    spec: UseCaseSpec, tracker: Tracker
) -> None:
    """The registered card renders under ``CARD_CONTENT_SECURITY_POLICY``: inline <style>
    elements (style-src 'unsafe-inline') and PNG data: images (img-src data:), and
    nothing else it would have to fetch or run."""
    policy = runtime.CARD_CONTENT_SECURITY_POLICY
    directives = {
        name: value for name, _, value in (d.strip().partition(" ") for d in policy.split(";"))
    }
    assert directives["default-src"] == "'none'"
    assert directives["style-src"] == "'unsafe-inline'" and directives["img-src"] == "data:"
    assert "script-src" not in directives and "sandbox" in directives

    page = _Page()
    page.feed((_registry_card(tracker, spec) / CARD_HTML).read_text())
    assert "style" in page.tags and "img" in page.tags  # what the policy lets through
    fetching = {"script", "link", "iframe", "object", "embed", "form", "base", "frame", "svg"}
    assert not page.tags & fetching
    for tag, name, value in page.attributes:
        assert not name.startswith("on") and name != "style", (tag, name)
        if name in {"src", "href", "srcset", "action", "data", "poster"}:
            assert tag == "img" and value.startswith("data:image/png;base64,"), (tag, name)
