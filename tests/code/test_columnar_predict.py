"""/predict column by column (issue 22): a body parsed once and checked whole columns at a
time (serving/columns.py), encoded from columns (``encode_columns``), answered from arrays
(``schemas.Answering``), must give what the record path gives: the same refusals, the
same matrix bit for bit, the same probabilities, labels, bands and answer bytes.

The HTTP side (status codes, the audit trail, the prediction log) is in
tests/integration/test_end_to_end.py and test_v2_protocol.py."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from clinml.serving import columns, protocol, schemas
from clinml.serving.coalesce import Coalescer
from clinml.serving.columns import Batch
from clinml.serving.fastpath import compile_model
from clinml.serving.requestlog import PredictionLog
from clinml.spec import UseCaseSpec
from clinml.training.candidates import build_pipeline
from tests.conftest import make_tiny_frame

GOOD = {"heart_rate": 88.0, "creatinine": 1.1, "ward": "icu"}
MAX = 3


@pytest.fixture(autouse=True, params=["few", "many"])
def regime(request, monkeypatch) -> str:
    """Every test twice: a request's records checked and answered value by value in
    Python (at most ``columns.SMALL_ROWS`` of them), and with numpy (more)."""
    monkeypatch.setattr(columns, "SMALL_ROWS", 10**9 if request.param == "few" else 0)
    return str(request.param)


def nullable(spec: UseCaseSpec) -> UseCaseSpec:
    """tiny with creatinine nullable (a None is "not measured")."""
    features = [
        f.model_copy(update={"nullable": True}) if f.name == "creatinine" else f
        for f in spec.features
    ]
    return spec.model_copy(update={"features": features})


@pytest.fixture(scope="module")
def specs(tiny_spec: UseCaseSpec) -> dict[str, UseCaseSpec]:
    return {"plain": tiny_spec, "nullable": nullable(tiny_spec)}


def body_of(document: Any) -> bytes:
    return document if isinstance(document, bytes) else json.dumps(document).encode()


BODIES: list[Any] = [
    {"records": [GOOD]},
    {"records": [GOOD, {**GOOD, "heart_rate": 90}]},  # an int for a float
    {"records": [{**GOOD, "creatinine": None}]},  # null: only where nullable
    {"records": [{**GOOD, "heart_rate": "88"}]},
    {"records": [{**GOOD, "heart_rate": True}]},
    {"records": [{**GOOD, "heart_rate": 10.0}, {**GOOD, "ward": "SECRET"}]},
    {"records": [{**GOOD, "heart_rate": 250.0000001}]},
    {"records": [{**GOOD, "heart_rate": 250}, {**GOOD, "creatinine": 0.1}]},  # the bounds
    {"records": [{**GOOD, "heart_rate": 10**400}]},
    {"records": [{**GOOD, "heart_rate": 2**60}]},
    {"records": [{**GOOD, "ward": 1}]},
    {"records": [{**GOOD, "ward": None}]},
    {"records": [{**GOOD, "blood_group": "O"}]},
    {"records": [{k: v for k, v in GOOD.items() if k != "creatinine"}]},
    {"records": [GOOD, 7]},
    {"records": [GOOD, [1, 2]]},
    {"records": []},
    {"records": [GOOD] * (MAX + 1)},
    {"records": [GOOD] * MAX},
    {"records": [GOOD], "extra": 1},
    {"records": "SECRET"},
    {"records": {"0": GOOD}},
    {},
    ["SECRET"],
    7,
    b"",
    b"{",
    b'{"records": [{"heart_rate": NaN, "creatinine": 1.1, "ward": "icu"}]}',
    b'{"records": [{"heart_rate": Infinity, "creatinine": 1.1, "ward": "icu"}]}',
    b'{"records": [{"heart_rate": 1e400, "creatinine": 1.1, "ward": "icu"}]}',
    b'{"records": [{"heart_rate": 80, "heart_rate": 90.5, "creatinine": 1.1, "ward": "icu"}]}',
    b'{"records": [{"heart_rate": 80, "creatinine": 1.1, "ward": "icu"}], "records": []}',
    b'{"records": [{"heart_rate": 80, "creatinine": 1.1, "ward": "icu"}]} trailing',
    b'{"records": [{"heart_rate": 80, "creatinine": 1.1, "ward": "ic\\u0075"}]}',
    b'\xff{"records": []}',
    b'{"records": [{"heart_rate": 80, "creatinine": 1.1, "ward": "\xff\xfe"}]}',  # not UTF-8
]


@pytest.mark.parametrize("kind", ["plain", "nullable"])
@pytest.mark.parametrize("document", BODIES, ids=range(len(BODIES)))
def test_the_column_check_never_accepts_what_the_record_schema_refuses(
    specs, kind: str, document: Any
) -> None:
    """Where the fast path takes a body, the record schema takes it too, with the same
    values; where it does not, the service asks the record schema, whose errors are the
    answer (so /predict's refusals are what they always were)."""
    spec = specs[kind]
    raw = body_of(document)
    fast = columns.predict_batch(spec, raw, MAX)
    try:
        records = schemas.build(spec, MAX).predict_dicts.model_validate_json(raw).records
    except ValidationError:
        assert fast is None
        return
    assert fast is not None or document == {"records": [{**GOOD, "heart_rate": 2**60}]}
    if fast is not None:
        slow = Batch.of_records(spec, records)
        assert fast.rows == slow.rows == len(records)
        for name in spec.feature_names:  # the values the log gets are the record's
            values = columns._plain(fast.columns[name])  # a NaN logged as a null: None
            assert values == slow.columns[name], name
            assert list(map(type, values)) == list(map(type, slow.columns[name])), name


def test_a_checked_batch_holds_arrays_for_numbers_or_lists_for_a_few(tiny_spec, regime) -> None:
    batch = columns.predict_batch(
        tiny_spec, body_of({"records": [GOOD, {**GOOD, "heart_rate": 61}]}), MAX
    )
    assert batch is not None and len(batch) == 2
    rates = batch.columns["heart_rate"]
    if regime == "many":
        assert rates.dtype == np.float64 and rates.tolist() == [88.0, 61.0]
    else:
        assert rates == [88.0, 61.0] and list(map(type, rates)) == [float, float]
    assert batch.columns["ward"] == ["icu", "icu"]


def test_an_int_feature_is_an_int_column_and_null_stays_null(tiny_spec) -> None:
    features = [
        f.model_copy(update={"type": "int", "nullable": True}) if f.name == "heart_rate" else f
        for f in tiny_spec.features
    ]
    spec = tiny_spec.model_copy(update={"features": features})
    whole = columns.checked_batch(
        spec, {"heart_rate": [88, 61], "creatinine": [1.0, 2], "ward": ["icu", "icu"]}, 2
    )
    assert whole is not None and whole.columns["heart_rate"].dtype == np.int64
    with_null = columns.checked_batch(
        spec, {"heart_rate": [88, None], "creatinine": [1.0, 2], "ward": ["icu", "icu"]}, 2
    )
    assert with_null is not None and with_null.columns["heart_rate"] == [88, None]
    for refused in ([88.0, 61], [True, 61], [88, 999]):
        cols = {"heart_rate": refused, "creatinine": [1.0, 2], "ward": ["icu", "icu"]}
        assert columns.checked_batch(spec, cols, 2) is None
        assert columns.check_columns(spec, cols, 2)  # ... and the value check says why


def test_nulls_are_logged_as_nulls_not_nan(specs, regime, tmp_path: Path) -> None:
    spec = specs["nullable"]
    raw = body_of({"records": [GOOD, {**GOOD, "creatinine": None}]})
    batch = columns.predict_batch(spec, raw, MAX)
    assert batch is not None
    missing = batch.columns["creatinine"][1]
    assert np.isnan(missing) if regime == "many" else missing is None
    log = PredictionLog(tmp_path / "predictions")
    try:  # the columns as the service hands them to the log
        log.record_columns({**batch.columns, "time": datetime.now(UTC)}, batch.rows)
        assert log.flush(timeout=60)
    finally:
        log.close()
    (file,) = (tmp_path / "predictions").rglob("*.parquet")
    logged = pq.read_table(file).column("creatinine")
    assert logged.to_pylist() == [1.1, None] and logged.null_count == 1
    assert batch.plain()["columns"]["creatinine"] == [1.1, None]
    assert json.loads(json.dumps(batch.plain())) == batch.plain()  # what BentoML sends


# -- the encoded matrix and the model's answer -------------------------------------------

CANDIDATES = {
    "gbm": ("gbm", {"max_iter": 20}),
    "rf": ("rf", {"n_estimators": 10}),
    "svm": ("svm", {}),
    "mlp": ("mlp", {"hidden_units": [8], "epochs": 5}),
}


@pytest.fixture(scope="module")
def compiled(specs):
    """(candidate, spec kind) -> compiled model, fitted on tiny rows on first use."""
    cache: dict[tuple[str, str], Any] = {}
    frame = make_tiny_frame(n=300, seed=5)
    y = (frame["outcome"] == "yes").to_numpy(dtype=int)

    def get(candidate: str, kind: str) -> Any:
        if (candidate, kind) not in cache:
            name, params = CANDIDATES[candidate]
            x = frame[["heart_rate", "creatinine", "ward"]].copy()
            if kind == "nullable":
                x.loc[x.index[::6], "creatinine"] = np.nan
            pipeline = build_pipeline(name, specs[kind], params, seed=0, n_rows=len(x))
            cache[candidate, kind] = compile_model(pipeline.fit(x, y), device="cpu")
        return cache[candidate, kind]

    return get


def held_out(n: int = 40, seed: int = 9, missing: bool = False) -> list[dict[str, Any]]:
    frame = make_tiny_frame(n=n, seed=seed)
    records = frame[["heart_rate", "creatinine", "ward"]].to_dict("records")
    records[0]["heart_rate"] = 90  # an int
    if missing:
        for i in (1, 5, 17):
            records[i]["creatinine"] = None
    return records


@pytest.mark.parametrize("kind", ["plain", "nullable"])
@pytest.mark.parametrize("candidate", list(CANDIDATES))
def test_encode_columns_is_encode_records_bit_for_bit(compiled, candidate, kind) -> None:
    model = compiled(candidate, kind)
    records = held_out(missing=kind == "nullable")
    records[2]["ward"] = "maternity"  # unknown to the encoder: all zeros
    expected = model.encode_records(records)
    as_lists = {name: [r.get(name) for r in records] for name in model.features}
    as_arrays = {
        name: np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        if name != "ward"
        else np.array(values, dtype=object)
        for name, values in as_lists.items()
    }
    for given in (as_lists, as_arrays):
        encoded = model.encode_columns(given)
        assert encoded.dtype == expected.dtype and encoded.shape == expected.shape
        assert encoded.tobytes() == expected.tobytes()
    assert encoded[2][[n.startswith("ward") for n in model.encoded_features]].sum() == 0


def test_a_feature_left_out_is_missing_in_every_row(compiled) -> None:
    model = compiled("gbm", "nullable")
    records = [{k: v for k, v in r.items() if k != "creatinine"} for r in held_out(5)]
    columns_without = {name: [r[name] for r in records] for name in ("heart_rate", "ward")}
    assert model.encode_columns(columns_without).tobytes() == (
        model.encode_records(records).tobytes()
    )


def test_columns_of_different_lengths_are_refused(compiled) -> None:
    with pytest.raises(ValueError, match="same number"):
        compiled("gbm", "plain").encode_columns(
            {"heart_rate": [80.0], "creatinine": [1.0, 2.0], "ward": ["icu"]}
        )


def record_answer(spec: UseCaseSpec, probabilities: list[float], threshold: float) -> list[dict]:
    """What ClinicalService.answer gave per record before issue 22."""
    positive, negative = spec.label.positive_class, spec.label.negative_class
    return [
        {
            "probability": p,
            "label": positive if p >= threshold else negative,
            "risk_band": schemas.risk_band(p, threshold, spec.serving.risk_bands),
        }
        for p in probabilities
    ]


@pytest.mark.parametrize("kind", ["plain", "nullable"])
@pytest.mark.parametrize("candidate", list(CANDIDATES))
def test_the_columnar_path_answers_what_the_record_path_did(
    specs, compiled, candidate: str, kind: str
) -> None:
    spec = specs[kind]
    model = compiled(candidate, kind)
    records = held_out(missing=kind == "nullable")
    raw = json.dumps({"records": records}).encode()
    threshold = 0.3
    ref = schemas.ModelRef(name=spec.name, version="7", alias="champion")

    # before: validated into dicts, encoded record by record, answered per record
    validated = schemas.build(spec, 100).predict_dicts.model_validate_json(raw).records
    before = model.predict_proba(model.encode_records(validated))
    before_body = json.dumps(
        {
            "request_id": "r1",
            "model": {"name": ref.name, "version": ref.version, "alias": ref.alias},
            "operating_threshold": threshold,
            "predictions": record_answer(spec, [float(p) for p in before], threshold),
        },
        separators=(",", ":"),
    ).encode()

    # now: parsed once, checked and encoded by column, answered from arrays
    batch = columns.predict_batch(spec, raw, 100)
    assert batch is not None
    after = model.predict_proba(model.encode_columns(batch.columns))
    answer = schemas.Answering(spec).answer(after, threshold, ref)

    assert after.tobytes() == before.tobytes()
    assert schemas.Answering(spec).body("r1", answer) == before_body
    assert answer.predictions() == record_answer(spec, before.tolist(), threshold)
    labels = [p["label"] for p in answer.predictions()]
    assert answer.label_counts() == {label: labels.count(label) for label in set(labels)}
    # and the Open Inference Protocol's tensors of the same rows: the same matrix
    tensors = {
        "inputs": [
            {
                "name": name,
                "shape": [len(records)],
                "datatype": "BYTES" if name == "ward" else "FP64",
                "data": [r[name] for r in records],
            }
            for name in spec.feature_names
        ]
    }
    v2 = protocol.batch(spec, protocol.parse(json.dumps(tensors).encode()), 100)
    assert (
        model.encode_columns(v2.columns).tobytes() == model.encode_columns(batch.columns).tobytes()
    )


@pytest.mark.parametrize(
    "bands", [None, [("low", 0.1), ("medium", 0.3), ("high", 1.0)], [("all", 1.0)]]
)
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 1.0])
def test_risk_band_codes_are_risk_band_for_every_value(bands, threshold) -> None:
    edges = [0.0, 0.05, 0.1, 0.1 - 1e-17, 0.25, 0.3, 0.5, 0.9999999, 1.0, math.nan]
    values = np.array([*edges, threshold, threshold / 2, *np.linspace(0, 1, 101)])
    names = schemas.band_names(bands)
    codes = schemas.risk_band_codes(values, threshold, bands)
    expected = [schemas.risk_band(float(v), threshold, bands) for v in values]
    assert [names[c] for c in codes] == expected
    assert [names[schemas.risk_band_code(v, threshold, bands)] for v in values.tolist()] == expected


def test_each_model_and_threshold_gets_its_own_answer_head(tiny_spec) -> None:
    """The part of the body between the request id and the predictions is made once per
    model and threshold: answers of models in turn each name their own."""
    answering = schemas.Answering(tiny_spec)
    refs = [
        schemas.ModelRef(name="tiny", version="1", alias="champion"),
        schemas.ModelRef(name="tiny", version="2", alias="challenger"),
    ]
    for ref, threshold, request_id in [
        (refs[0], 0.5, "a"), (refs[1], 0.5, 'quote"d'), (refs[0], 0.25, "c"), (refs[0], 0.5, "d")
    ]:  # fmt: skip
        answer = answering.answer([0.3, 0.7], threshold, ref)
        expected = {
            "request_id": request_id,
            "model": {"name": ref.name, "version": ref.version, "alias": ref.alias},
            "operating_threshold": threshold,
            "predictions": record_answer(tiny_spec, [0.3, 0.7], threshold),
        }
        assert (
            answering.body(request_id, answer)
            == json.dumps(expected, separators=(",", ":")).encode()
        )


def test_an_answer_with_a_non_finite_probability_is_written_as_json_writes_it(tiny_spec) -> None:
    ref = schemas.ModelRef(name="tiny", version="1", alias="champion")
    answering = schemas.Answering(tiny_spec)
    answer = answering.answer([0.25, math.nan], 0.5, ref)
    expected = {
        "request_id": "r",
        "model": {"name": "tiny", "version": "1", "alias": "champion"},
        "operating_threshold": 0.5,
        "predictions": record_answer(tiny_spec, [0.25, math.nan], 0.5),
    }
    assert answering.body("r", answer) == json.dumps(expected, separators=(",", ":")).encode()


# -- the coalescer joins batches of columns ---------------------------------------------


class Scores:
    """A ColumnScores stand-in: sliced by rows."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, rows: slice) -> Scores:
        return Scores(self.values[rows])


def test_concurrent_batches_share_one_call_and_get_their_own_rows(tiny_spec) -> None:
    calls: list[int] = []

    def score(batch: Batch) -> Scores:
        calls.append(batch.rows)
        return Scores(np.asarray(batch.columns["heart_rate"], dtype=np.float64) * 2)

    coalescer = Coalescer(score, max_records=256, join=Batch.join)
    first = columns.predict_batch(tiny_spec, body_of({"records": [GOOD, GOOD]}), MAX)
    second = Batch.of_records(tiny_spec, [{**GOOD, "heart_rate": 61}])  # lists, as patients'
    assert first is not None

    async def main() -> list[Scores]:
        return await asyncio.gather(coalescer(first), coalescer(second))

    one, two = asyncio.run(main())
    assert calls == [3]
    assert one.values.tolist() == [176.0, 176.0] and two.values.tolist() == [122.0]
    joined = Batch.join([first, second])
    assert joined.rows == 3 and joined.columns["ward"] == ["icu", "icu", "icu"]
