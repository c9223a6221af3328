"""PHI leak test: canary identifiers go in, and none may come out anywhere.

A CSV whose patient ids and identifier columns hold canaries (names, MRNs, e-mail
addresses, phone numbers, birth dates, a free-text contact note) goes through the whole
product as a user would run it: ``clinml init`` drafts the spec, ``clinml run`` ingests,
materializes, trains, promotes and packages; ``clinml validate`` judges a batch with
canaries in its values and one without its header row; ``bentoml serve`` answers good
and bad requests that carry canaries (in values, in field names, in unknown patient ids,
in a URL, in a header, as an API key); ``clinml labels ingest`` stores outcomes by canary
patient id; ``clinml monitor`` writes drift reports from the prediction log, from a raw
batch that still has its identifier columns, and from a batch with identifiers typed
into its feature and attribute columns; ``clinml models card`` writes the model card.

Then every byte that run left behind is searched: every file under ``CLINML_HOME``
(Feast, MLflow, the BentoML store, prediction and audit logs, drift reports, model
cards, the service log, Prometheus' files), decoded where a format compresses or encodes
text (parquet, SQLite, zip, gzip, recursively), plus every CLI's output and every HTTP
answer (status, headers, body). DESIGN.md: identifier columns never leave ingestion,
patient ids are pseudonymised before they reach logs or reports, and error responses
never echo submitted values.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import FIXTURES, PROJECT_ROOT, make_tiny_frame
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

USECASE = "visits"
PSEUDONYM_KEY = "phi-canary-test-key"
N_ROWS, N_PATIENTS = 400, 320  # rows past N_PATIENTS are second visits

# -- the canaries and the scanner ---------------------------------------------------------

FIRST_NAMES = ("Zebulon", "Philomena", "Ottoline", "Barnabas", "Eglantine", "Thaddeus")
SURNAMES = ("Canaryfield", "Canaryfield-Oakes", "Smythe-Canaryfield", "Canaryfield-Pryce")
MARK = "canaryfield"  # in every name, e-mail address and textual patient id
EMAIL_DOMAIN = "canaryfield-mail.example"

# Candidates found by pattern, then looked up in the canaries' own sets: a chance match
# in a float or a hash must be one of a few hundred exact values.
_DIGIT_RUN = re.compile(rb"(?<![0-9])-?[0-9]{10,19}(?![0-9])")  # MRN, phone, epoch times
_PHONE = re.compile(rb"555\)?[-. ]?([0-9]{3})[-. ]?([0-9]{4})(?![0-9])")
_DATE = re.compile(
    rb"(?<![0-9])(?:19[0-2][0-9]-[0-9]{2}-[0-9]{2}|[0-9]{2}/[0-9]{2}/19[0-2][0-9])(?![0-9])"
)
_CONTEXT = 40


@dataclass(frozen=True)
class Canaries:
    """Every canary written into the data, and how to find any of them in bytes.

    Textual canaries (names, e-mail addresses, textual patient ids, notes) all hold a
    first name or ``MARK``, searched case-insensitively. MRNs, phone numbers and birth
    dates are found by their digits (MRN digits; the phone's digits with or without the
    country code, and formatted; the birth date in ISO and both slashed orders, and as
    epoch seconds to nanoseconds).
    """

    values: dict[str, list[str]]  # kind -> canaries as written in the data
    anchors: tuple[bytes, ...]
    digits: frozenset[bytes]
    phones: frozenset[bytes]  # national digits, 555XXXXXXX
    dates: frozenset[bytes]

    def find(self, data: bytes) -> list[str]:
        """One line per distinct canary found in ``data``: what, how often, where first."""
        matched: dict[str, list[int]] = {}  # what -> [first offset, length, count]
        lowered = data.lower()
        for anchor in self.anchors:
            at = lowered.find(anchor)
            if at >= 0:
                matched[anchor.decode()] = [at, len(anchor), lowered.count(anchor)]
        for match in self._pattern_matches(data):
            what = match.group().decode()
            seen = matched.setdefault(what, [match.start(), len(match.group()), 0])
            seen[2] += 1
        return [
            f"{what!r} x{count}: {_context(data, at, length)}"
            for what, (at, length, count) in matched.items()
        ]

    def _pattern_matches(self, data: bytes) -> Iterator[re.Match[bytes]]:
        for pattern, wanted in ((_DIGIT_RUN, self.digits), (_DATE, self.dates)):
            yield from (m for m in pattern.finditer(data) if m.group() in wanted)
        for match in _PHONE.finditer(data):
            if b"555" + match.group(1) + match.group(2) in self.phones:
                yield match

    def all_values(self) -> Iterator[tuple[str, str]]:
        for kind, values in self.values.items():
            for value in values:
                yield kind, value


def _context(data: bytes, at: int, length: int) -> str:
    piece = data[max(0, at - _CONTEXT) : at + length + _CONTEXT]
    return repr(piece.decode("utf-8", errors="replace"))


def _epochs(day: date) -> list[bytes]:
    seconds = int(datetime.combine(day, time(), tzinfo=UTC).timestamp())
    return [str(seconds * 10**k).encode() for k in (0, 3, 6, 9)]


def make_canaries(seed: int = 20260601) -> tuple[Canaries, pd.DataFrame]:
    """The canaries and the per-patient identifiers that carry them (one row a patient)."""
    rng = np.random.default_rng(seed)
    patients = []
    used_digits: set[str] = set()

    def twelve_digits() -> str:
        while True:
            value = str(int(rng.integers(10**11, 10**12)))
            if value not in used_digits:
                used_digits.add(value)
                return value

    for p in range(N_PATIENTS):
        first = FIRST_NAMES[p % len(FIRST_NAMES)]
        surname = SURNAMES[(p // len(FIRST_NAMES)) % len(SURNAMES)]
        name = f"{first} {surname}"
        if p % 3 == 0:
            patient_id = f"CANARYFIELD-PID-{p:06d}"
        elif p % 3 == 1:
            patient_id = f"MRN{twelve_digits()}"  # looks like an MRN
        else:
            patient_id = f"{surname}, {first} #{p:04d}"  # looks like a name
        birth = date(1901 + int(rng.integers(0, 29)), int(rng.integers(1, 13)), 1) + timedelta(
            days=int(rng.integers(0, 28))
        )
        phone = f"+1-555-{int(rng.integers(100, 1000))}-{int(rng.integers(0, 10000)):04d}"
        email = f"{first}.{surname}.{p:04d}@{EMAIL_DOMAIN}".lower()
        patients.append(
            {
                "patient_id": patient_id,
                "mrn": f"MRN{twelve_digits()}",
                "full_name": name,
                "email": email,
                "phone": phone,
                "date_of_birth": birth.isoformat(),
                "contact_note": f"call {name} on {phone} or {email}",
            }
        )
    frame = pd.DataFrame(patients)
    births = [date.fromisoformat(d) for d in frame["date_of_birth"]]
    phone_digits = [re.sub(r"\D", "", p) for p in frame["phone"]]
    canaries = Canaries(
        values={
            "patient id": list(frame["patient_id"]),
            "name": sorted(set(frame["full_name"])),
            "MRN": list(frame["mrn"]),
            "e-mail": list(frame["email"]),
            "phone": list(frame["phone"]),
            "birth date": list(frame["date_of_birth"]),
            "note": list(frame["contact_note"]),
        },
        anchors=tuple(a.lower().encode() for a in (MARK, *FIRST_NAMES)),
        digits=frozenset(
            [d.encode() for d in used_digits]
            + [d.encode() for d in phone_digits]  # 1555XXXXXXX
            + [d[1:].encode() for d in phone_digits]  # 555XXXXXXX
            + [e for day in births for e in _epochs(day)]
        ),
        phones=frozenset(d[1:].encode() for d in phone_digits),
        dates=frozenset(
            form.encode()
            for day in births
            for form in (
                day.isoformat(),
                day.strftime("%d/%m/%Y"),
                day.strftime("%m/%d/%Y"),
            )
        ),
    )
    return canaries, frame


@dataclass(frozen=True)
class Finding:
    where: str  # a file (and member, for an archive or a decoded table), or a surface
    what: str


def scan_blob(where: str, data: bytes, canaries: Canaries, depth: int = 0) -> list[Finding]:
    """Canaries in ``data``'s raw bytes, and in the text of any format it decodes to."""
    found = [Finding(where, hit) for hit in canaries.find(data)]
    if depth < 5:
        for inner_where, inner in _decoded(where, data):
            found += scan_blob(inner_where, inner, canaries, depth + 1)
    return found


def scan_tree(root: Path, canaries: Canaries, prefix: str = "") -> tuple[list[Finding], int]:
    """Every file under ``root`` (its path too); returns the findings and the file count."""
    found: list[Finding] = []
    files = 0
    for path in sorted(root.rglob("*")):
        relative = prefix + path.relative_to(root).as_posix()
        found += [Finding(relative, f"in the path: {h}") for h in canaries.find(relative.encode())]
        if path.is_file() and not path.is_symlink():
            files += 1
            found += scan_blob(relative, path.read_bytes(), canaries)
    return found, files


def _decoded(where: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    """The formats that hide text from a raw byte search: zip (skops, torch, wheels),
    gzip, parquet (dictionary-encoded, compressed) and SQLite (every row, blobs raw)."""
    if data[:4] == b"PK\x03\x04" and zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            yield f"{where}!names", "\n".join(archive.namelist()).encode()
            for info in archive.infolist():
                if not info.is_dir():
                    yield f"{where}!{info.filename}", archive.read(info)
    elif data[:2] == b"\x1f\x8b":
        yield f"{where}!gunzip", gzip.decompress(data)
    elif data[:4] == b"PAR1" and data[-4:] == b"PAR1":
        yield f"{where}!parquet", _parquet_text(data)
    elif data[:16] == b"SQLite format 3\x00":
        yield from _sqlite_parts(where, data)


def _parquet_text(data: bytes) -> bytes:
    """Column names, schema metadata and every cell of a parquet file, as text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data))
    parts = [
        str(table.schema),
        json.dumps({str(k): str(v) for k, v in (table.schema.metadata or {}).items()}),
    ]
    for name, column in zip(table.column_names, table.columns, strict=True):
        parts.append(name)
        parts.extend(str(value) for value in column.to_pylist())
    return "\n".join(parts).encode()


def _sqlite_parts(where: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    """Every table's rows of a SQLite database: its schema and text values as one text,
    and each blob on its own, so that it is searched and decoded in turn."""
    connection = sqlite3.connect(":memory:")
    try:
        connection.deserialize(data)
        text: list[str] = []
        blobs: list[tuple[str, bytes]] = []
        for name, sql in connection.execute("SELECT name, sql FROM sqlite_master"):
            text.append(f"{name}\n{sql}")
        for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            for number, row in enumerate(connection.execute(f'SELECT * FROM "{table}"')):
                for column, value in enumerate(row):
                    if isinstance(value, bytes):
                        blobs.append((f"{where}!sqlite!{table}[{number}][{column}]", value))
                    else:
                        text.append(str(value))
    finally:
        connection.close()
    yield f"{where}!sqlite", "\n".join(text).encode()
    yield from blobs


# -- the scanner can fail -----------------------------------------------------------------


def test_the_scanner_finds_canaries_hidden_in_parquet_sqlite_zip_and_gzip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    canaries, identifiers = make_canaries()
    for kind, value in canaries.all_values():  # each canary on its own is found
        assert canaries.find(value.encode()), (kind, value)
    for kind, value in canaries.all_values():  # also in lower or upper case, in context
        assert canaries.find(f"x {value.upper()} y".encode()), (kind, value)
    assert not canaries.find(b"ps_0123456789abcdef01234567 0.1234567890123 2026-05-01 555")

    mrn, email = identifiers["mrn"].iloc[7], identifiers["email"].iloc[8]
    birth, phone = identifiers["date_of_birth"].iloc[9], identifiers["phone"].iloc[10]
    table = pa.table({"x": [mrn, email, birth, phone] * 50})
    # compressed, dictionary-encoded, and no min/max statistics (they are plain text)
    pq.write_table(table, tmp_path / "t.parquet", compression="zstd", write_statistics=False)
    raw = (tmp_path / "t.parquet").read_bytes()
    assert not canaries.find(raw), "this parquet file hides its text from a raw search"
    found = scan_blob("t.parquet", raw, canaries)
    assert {f.where for f in found} == {"t.parquet!parquet"}
    assert len(found) == 5  # the MRN, the date, the phone, the e-mail's first name and MARK

    database = tmp_path / "t.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (k TEXT, v BLOB)")
        blob = gzip.compress(identifiers["full_name"].iloc[3].encode())
        connection.execute("INSERT INTO t VALUES (?, ?)", ("clean", blob))
    connection.close()
    data = database.read_bytes()
    assert not canaries.find(data)
    found = scan_blob("t.db", data, canaries)
    assert [f.where for f in found] == ["t.db!sqlite!t[0][1]!gunzip"] * 2  # first name, MARK

    archive = tmp_path / "t.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("inner/t.parquet", raw)
        zipped.writestr("note.txt", ("padding " * 100 + identifiers["patient_id"].iloc[0]) * 3)
    data = archive.read_bytes()
    assert not canaries.find(data)
    wheres = {f.where for f in scan_blob("t.zip", data, canaries)}
    assert wheres == {"t.zip!note.txt", "t.zip!inner/t.parquet!parquet"}
    found, files = scan_tree(tmp_path, canaries)
    assert files == 3 and len(found) == 5 + 2 + (1 + 5)


# -- the run ----------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the run produced, and its scan."""

    canaries: Canaries
    raw_csv: Path
    spec_file: Path
    home: Path
    cli: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)  # request -> status, headers, body
    scanned: dict[str, list[Finding]] = field(default_factory=dict)  # root -> findings
    files: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, int] = field(default_factory=dict)  # endpoint -> rows answered


def _raw_frame(identifiers: pd.DataFrame, now: datetime) -> pd.DataFrame:
    frame = make_tiny_frame(n=N_ROWS, seed=41, now=now).drop(columns=["patient_id", "mrn"])
    patient = [i if i < N_PATIENTS else i - N_PATIENTS for i in range(N_ROWS)]
    people = identifiers.iloc[patient].reset_index(drop=True)
    # distinct times, so a patient's two visits never share a timestamp
    frame["event_timestamp"] = frame["event_timestamp"] - pd.to_timedelta(range(N_ROWS), "min")
    columns = ["patient_id", "mrn", "full_name", "email", "phone", "date_of_birth"]
    return pd.concat([people[columns], frame, people[["contact_note"]]], axis=1)


def _clinml(run: Run, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "clinml"), *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={
            **os.environ,
            "CLINML_HOME": str(run.home),
            "CLINML_CONFIG_DIR": str(run.spec_file.parent),
            "CLINML_PSEUDONYM_KEY": PSEUDONYM_KEY,
            "CLINML_ACTOR": "phi-canary-test",
        },
        timeout=1800,  # a deadline for a busy machine, not a speed check
    )
    run.cli[name] = result
    return result


def _answer_text(response) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    return f"{response.status_code}\n{headers}\n\n{response.text}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("phi")
    canaries, identifiers = make_canaries()
    now = datetime.now(UTC).replace(microsecond=0)
    raw = _raw_frame(identifiers, now)
    data = root / "data" / f"{USECASE}.csv"
    data.parent.mkdir()
    raw.to_csv(data, index=False)
    result = Run(canaries, data, root / "configs" / f"{USECASE}.yaml", root / "home")

    _draft(result)
    ran = _clinml(result, "run", "run", USECASE)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"registered {USECASE} version 1 as 'challenger'" in ran.stdout
    _bad_batches(result, raw)
    request_ids, served_patients = _serve(result, raw, identifiers)
    _labels_and_monitor(result, raw, request_ids, served_patients)
    card = _clinml(result, "card", "models", "card", USECASE, "champion")
    assert card.returncode == 0, card.stdout + card.stderr

    roots = {"home/": result.home}
    prometheus = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if prometheus:
        roots["prometheus (tests)/"] = Path(prometheus)
    session_model = Path(os.environ["BENTOML_HOME"]) / "models" / USECASE
    if session_model.is_dir():
        roots["bentoml (tests)/"] = session_model
    for prefix, directory in roots.items():
        found, files = scan_tree(directory, canaries, prefix)
        result.scanned[prefix], result.files[prefix] = found, files
    return result


def _draft(run: Run) -> None:
    """``clinml init`` drafts the spec; the tiny fixture's small training budget keeps
    the run short (a reviewer edits the draft the same way)."""
    drafted = _clinml(
        run, "init", "init", "--data", str(run.raw_csv), "--name", USECASE, "--out",
        str(run.spec_file),
    )  # fmt: skip
    assert drafted.returncode == 0, drafted.stdout + drafted.stderr
    spec = yaml.safe_load(run.spec_file.read_text())
    tiny = yaml.safe_load((FIXTURES / "tiny.yaml").read_text())
    spec["training"], spec["evaluation"] = tiny["training"], tiny["evaluation"]
    run.spec_file.write_text(run.spec_file.read_text().split("\n\n", 1)[0] + "\n\n"
                             + yaml.safe_dump(spec, sort_keys=False))  # fmt: skip


def _bad_batches(run: Run, raw: pd.DataFrame) -> None:
    """The quality gate on a batch whose bad values are canaries, and on one without its
    header row (the first row's identifiers become the column names)."""
    bad = raw.head(60).astype(object)
    bad.loc[3, "ward"] = bad.loc[3, "full_name"]
    bad.loc[4, "heart_rate"] = float(re.sub(r"\D", "", bad.loc[4, "phone"]))
    bad.loc[5, "event_timestamp"] = bad.loc[5, "date_of_birth"]
    bad.loc[6, "outcome"] = bad.loc[6, "email"]
    bad_file = run.raw_csv.with_name("bad.csv")
    bad.to_csv(bad_file, index=False)
    checked = _clinml(run, "validate bad values", "validate", USECASE, "--data", str(bad_file))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    headless = run.raw_csv.with_name("headless.csv")
    raw.head(60).to_csv(headless, index=False, header=False)
    checked = _clinml(run, "validate no header", "validate", USECASE, "--data", str(headless))
    assert checked.returncode in (1, 2), checked.stdout + checked.stderr


def _serve(run: Run, raw: pd.DataFrame, identifiers: pd.DataFrame) -> tuple[list[str], list[str]]:
    """A real ``bentoml serve``: good calls (to fill the prediction log) and bad ones that
    carry canaries. Returns the single-record request ids and the patients predicted."""
    import httpx

    from clinml.serving.keys import write_dev_key
    from clinml.serving.launch import ServiceProcess, free_port
    from clinml.settings import Settings
    from clinml.spec import load_spec

    spec = load_spec(run.spec_file)
    features = spec.feature_names
    settings = Settings(home=run.home, config_dir=run.spec_file.parent, pseudonym_key=PSEUDONYM_KEY)
    key = write_dev_key(settings.api_keys_path)
    records = raw[features].to_dict("records")
    known = list(identifiers["patient_id"])
    name, mrn = identifiers["full_name"].iloc[0], identifiers["mrn"].iloc[4]
    bad = _bad_requests(records[0], features, known, identifiers)
    served_patients = [p for p in known if "MRN" in p or "#" in p][:40] + known[::3][:40]
    request_ids: list[str] = []
    log_file = run.home / "logs" / "serve.log"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CLINML_PSEUDONYM_KEY", PSEUDONYM_KEY)  # the served process reads it
        with (
            ServiceProcess(settings, USECASE, free_port(), log_file) as served,
            httpx.Client(
                base_url=served.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
            ) as http,
        ):

            def call(label: str, method: str, path: str, body=None, **extra) -> httpx.Response:
                if isinstance(body, bytes):  # malformed JSON, sent as JSON
                    extra["headers"] = {**extra.get("headers", {}), "Content-Type": JSON}
                    response = http.request(method, path, content=body, **extra)
                else:
                    response = http.request(method, path, json=body, **extra)
                run.answers[label] = _answer_text(response)
                endpoint = path.split("?")[0]
                if response.status_code == 200 and endpoint in ("/predict", "/predict_patient"):
                    rows = len(response.json()["predictions"])
                    run.predicted[endpoint] = run.predicted.get(endpoint, 0) + rows
                return response

            for i in range(0, 150, 50):
                answer = call(f"predict {i}", "POST", "/predict", {"records": records[i : i + 50]})
                assert answer.status_code == 200, answer.text
            for i in range(150, 190):
                answer = call(f"predict one {i}", "POST", "/predict", {"records": [records[i]]})
                assert answer.status_code == 200, answer.text
                request_ids.append(answer.json()["request_id"])
            for i in range(0, len(served_patients), 20):
                ids = served_patients[i : i + 20]
                answer = call(
                    f"predict_patient {i}", "POST", "/predict_patient", {"patient_ids": ids}
                )
                assert answer.status_code == 200, answer.text  # fmt: skip
            answer = call("explain", "POST", "/explain", {"records": records[:5], "top_k": 2})
            assert answer.status_code == 200, answer.text
            for label, method, path, body, expected in bad:
                answer = call(label, method, path, body, headers={"X-Patient-Name": name})
                assert answer.status_code in expected, (label, answer.status_code, answer.text)
            canary_key = {"Authorization": f"Bearer {name}", "X-API-Key": mrn}
            body = {"records": records[:1]}
            refused = call("a canary as the API key", "POST", "/predict", body, headers=canary_key)
            assert refused.status_code == 401
            no_key = {"Authorization": ""}
            path = f"/patients/{known[9]}"
            refused = call("a patient id in the URL, no key", "GET", path, headers=no_key)
            assert refused.status_code in (401, 404)
            for path in ("/metrics", "/model", "/model/card", "/readyz"):
                assert call(f"GET {path}", "GET", path).status_code == 200, path
            _wait_for_the_prediction_log(run, sum(run.predicted.values()))
    return request_ids, served_patients


JSON = "application/json"


def _bad_requests(
    record: dict, features: list[str], known: list[str], identifiers: pd.DataFrame
) -> list[tuple[str, str, str, object, set[int]]]:
    """(label, method, path, body, statuses expected) of requests that carry canaries
    where they do not belong: in values, in field names, in unknown patient ids, in the
    URL. The statuses show that each request reached the check meant to refuse it."""
    name, email = identifiers["full_name"].iloc[0], identifiers["email"].iloc[1]
    phone, birth = identifiers["phone"].iloc[2], identifiers["date_of_birth"].iloc[3]
    mrn = identifiers["mrn"].iloc[4]
    phone_number = int(re.sub(r"\D", "", identifiers["phone"].iloc[5]))
    unknown = ["CANARYFIELD-PID-999999", "MRN999999999999", "Canaryfield, Zebulon #9999"]
    predict, patients, explain = "/predict", "/predict_patient", "/explain"

    def one(**changes: object) -> dict:
        return {"records": [{**record, **changes}]}

    def extra(field_name: str, value: object) -> dict:
        return {"records": [{**record, field_name: value}]}

    def ids(patient_ids: list, **more: object) -> dict:
        return {"patient_ids": patient_ids, **more}

    invalid, unknown_ids = {400, 422}, {404, 422}  # 404: no problem but unknown ids
    return [
        # canaries as values
        ("a canary in a numeric field", "POST", predict, one(**{features[0]: name}), invalid),
        ("a canary in a category field", "POST", predict, one(ward=email), invalid),
        ("phone digits as a number", "POST", predict, one(**{features[0]: phone_number}), invalid),
        ("a canary in every field", "POST", predict, one(**dict.fromkeys(features, mrn)), invalid),
        ("explain: a canary value", "POST", explain, one(ward=phone), invalid),
        ("known and unknown patients", "POST", patients, ids([known[0], *unknown]), unknown_ids),
        ("unknown patients", "POST", patients, ids(unknown), unknown_ids),
        ("a patient id too long", "POST", patients, ids([name * 20]), invalid),
        ("a patient id not text", "POST", patients, ids([phone_number]), invalid),
        # 200 today: the online value, recorded after as_of, is served (not a leak)
        ("a birth date as as_of", "POST", patients, ids([known[3]], as_of=birth), {200, 422}),
        ("a name as as_of", "POST", patients, ids([known[3]], as_of=name), invalid),
        ("malformed JSON", "POST", predict, f'{{"records": [{{"{name}'.encode(), invalid),
        ("explain: malformed JSON", "POST", explain, f'{{"records": [{name}'.encode(), invalid),
        # canaries as field names
        ("a field named after a name", "POST", predict, extra(name, 1.0), invalid),
        ("a field named after an e-mail", "POST", predict, extra(email, "x"), invalid),
        ("a top-level field named after a patient", "POST", predict, {**one(), known[0]: 1}, {422}),
        ("a field named after an MRN", "POST", patients, {**ids(known[:1]), mrn: 1}, invalid),
        ("explain: a field named after a phone", "POST", explain, extra(phone, 1), invalid),
        # canaries elsewhere in the request
        ("a patient id in the URL", "GET", f"/patients/{known[0]}?mrn={mrn}", None, {404}),
        ("a patient id in the query", "POST", f"{predict}?patient_id={known[3]}", one(), {200}),
        ("a patient id, wrong method", "GET", f"{patients}?patient_id={known[6]}", None, {405}),
    ]  # fmt: skip


def _wait_for_the_prediction_log(run: Run, rows: int, timeout: float = 120.0) -> None:
    """The prediction log is written in batches, off the request path."""
    from clinml.predictionlog import read_predictions

    wait_for(
        lambda: len(read_predictions(run.home / USECASE / "predictions")) >= rows,
        f"{rows} rows in the prediction log",
        timeout,
        every_s=0.5,
    )


def _labels_and_monitor(
    run: Run,
    raw: pd.DataFrame,
    request_ids: list[str],
    patients: list[str],
) -> None:
    """Outcomes by canary patient id and by request id, then the monitor on the
    prediction log's window, on a raw batch that still has its identifier columns, and on
    a batch with identifiers typed into feature and attribute columns."""
    outcome = dict(zip(raw["patient_id"], raw["outcome"], strict=False))
    labels = pd.DataFrame(
        {
            "patient_id": [*patients, *[None] * len(request_ids)],
            "request_id": [*[None] * len(patients), *request_ids],
            "outcome": [outcome[p] for p in patients] + ["yes", "no"] * (len(request_ids) // 2),
            "time": datetime.now(UTC).isoformat(),
        }
    )
    labels_file = run.raw_csv.with_name("outcomes.csv")
    labels.to_csv(labels_file, index=False)
    stored = _clinml(run, "labels ingest", "labels", "ingest", USECASE, str(labels_file))
    assert stored.returncode == 0, stored.stdout + stored.stderr
    monitored = _clinml(run, "monitor window", "monitor", USECASE, "--window", "1d")
    assert monitored.returncode in (0, 1), monitored.stdout + monitored.stderr
    batch_dir = run.home / USECASE / "monitoring" / "raw-batch"
    monitored = _clinml(
        run, "monitor raw batch", "monitor", USECASE, "--batch", str(run.raw_csv), "--out",
        str(batch_dir),
    )  # fmt: skip
    assert monitored.returncode in (0, 1), monitored.stdout + monitored.stderr
    assert (batch_dir / "drift.html").is_file()
    # A batch with data-entry errors: identifiers typed into feature and attribute columns.
    garbled = raw.astype(object)
    garbled.loc[:3, "ward"] = garbled.loc[:3, "full_name"]
    garbled.loc[4:5, "site"] = garbled.loc[4:5, "email"]
    garbled.loc[6, "heart_rate"] = float(re.sub(r"\D", "", garbled.loc[6, "phone"]))
    garbled.loc[7, "creatinine"] = float(garbled.loc[7, "mrn"].removeprefix("MRN"))
    garbled_file = run.raw_csv.with_name("garbled.csv")
    garbled.to_csv(garbled_file, index=False)
    garbled_dir = run.home / USECASE / "monitoring" / "garbled-batch"
    monitored = _clinml(
        run, "monitor garbled batch", "monitor", USECASE, "--batch", str(garbled_file), "--out",
        str(garbled_dir),
    )  # fmt: skip
    assert monitored.returncode == 1, monitored.stdout + monitored.stderr  # quality alerts
    assert (garbled_dir / "drift.html").is_file()


# -- where nothing may appear ---------------------------------------------------------------


def _report(found: list[Finding], limit: int = 25) -> str:
    lines = [f"{f.where}: {f.what}" for f in found[:limit]]
    more = f"\n... and {len(found) - limit} more" if len(found) > limit else ""
    return f"{len(found)} canary hit(s):\n" + "\n".join(lines) + more


def test_the_input_carries_every_canary_and_the_draft_declares_the_identifiers(run: Run) -> None:
    """The scanner's sanity: the input it starts from is full of canaries."""
    from clinml.spec import load_spec

    csv = run.raw_csv.read_bytes()
    assert len(run.canaries.find(csv)) >= len(run.canaries.anchors)
    text = csv.decode()
    for kind, value in run.canaries.all_values():
        assert value in text, (kind, value)
    spec = load_spec(run.spec_file)
    assert spec.entity.key == "patient_id"
    identifiers = {"mrn", "full_name", "email", "phone", "date_of_birth"}
    assert set(spec.identifier_columns) >= identifiers
    # free text with repeats (a patient's two visits) is not identifier-like by its
    # counts: the draft leaves it out, so ingestion drops it as undeclared
    assert "contact_note" not in {c.name for c in spec.columns}
    assert not run.canaries.find(run.spec_file.read_bytes()), "the drafted spec"


def test_cli_output_holds_no_canary(run: Run) -> None:
    assert {"init", "run", "validate bad values", "labels ingest", "monitor window"} <= set(run.cli)
    assert f"passed on {N_ROWS} rows" in run.cli["run"].stdout
    found = [
        Finding(f"clinml {name} ({stream})", hit)
        for name, result in run.cli.items()
        for stream, text in (("stdout", result.stdout), ("stderr", result.stderr))
        for hit in run.canaries.find(text.encode())
    ]
    assert not found, _report(found)


def test_service_answers_hold_no_canary(run: Run) -> None:
    """Status, headers and body of every answer, good and bad: error responses never
    echo submitted values. (/metrics is checked with the metrics below.)"""
    assert len(run.answers) > 30
    found = [
        Finding(f"answer to {label}", hit)
        for label, text in run.answers.items()
        if label != "GET /metrics"
        for hit in run.canaries.find(text.encode())
    ]
    # This found that a 422 for an unexpected field named it in "loc" (pydantic's loc ends
    # with the submitted key): clinml.serving.schemas.error_location now replaces it.
    assert not found, _report(found)


def _under(run: Run, *prefixes: str) -> tuple[list[Finding], list[Path]]:
    found = [
        f for f in run.scanned["home/"] if f.where.startswith(tuple(f"home/{p}" for p in prefixes))
    ]
    files = [p for prefix in prefixes for p in (run.home / prefix).rglob("*") if p.is_file()]
    return found, files


def test_service_log_holds_no_canary(run: Run) -> None:
    found, files = _under(run, "logs/")
    assert files and (run.home / "logs" / "serve.log").stat().st_size > 0
    assert not found, _report(found)


def test_prediction_log_and_labels_hold_only_pseudonyms(run: Run) -> None:
    from clinml.predictionlog import read_predictions

    found, files = _under(run, f"{USECASE}/predictions/", f"{USECASE}/labels/")
    assert files
    logged = read_predictions(run.home / USECASE / "predictions")
    assert run.predicted["/predict"] >= 190 and run.predicted["/predict_patient"] >= 80
    assert len(logged) == sum(run.predicted.values())
    assert logged["patient"].notna().sum() == run.predicted["/predict_patient"]
    assert logged["patient"].dropna().str.fullmatch(r"ps_[0-9a-f]{24}").all()
    assert not found, _report(found)


def test_audit_logs_hold_no_canary(run: Run) -> None:
    found, _ = _under(run, "audit/")
    requests = (run.home / "audit" / "requests.jsonl").read_text()
    assert '"/predict_patient"' in requests and '"patient":"ps_' in requests
    assert (run.home / "audit" / "model_registry.jsonl").is_file()
    assert not found, _report(found)


def test_drift_reports_hold_no_canary(run: Run) -> None:
    found, files = _under(run, f"{USECASE}/monitoring/", f"{USECASE}/evidently/")
    names = {p.name for p in files}
    assert {"drift.html", "drift.json", "verdict.json"} <= names
    # the garbled batch's identifiers are counted as quality problems, not shown
    garbled = json.loads(
        (run.home / USECASE / "monitoring" / "garbled-batch" / "drift.json").read_text()
    )
    out_of_range = {q["feature"]: q["out_of_range"] for q in garbled["quality"]}
    assert out_of_range == {"ward": 4, "site": 2, "heart_rate": 1, "creatinine": 1}
    assert any(s.startswith("site=(undeclared value)") for s in garbled["skipped_subgroups"])
    assert not found, _report(found)


def test_mlflow_artifacts_and_model_cards_hold_no_canary(run: Run) -> None:
    found, files = _under(run, "mlflow/", f"{USECASE}/reports/")
    names = {p.name for p in files}
    assert {"mlflow.db", "model_card.html", "model_card.json"} <= names
    assert any(p.suffix == ".skops" for p in files)
    assert not found, _report(found)


def test_bentoml_store_holds_no_canary(run: Run) -> None:
    found, files = _under(run, "bentoml/models/")
    assert any(p.name == "model.yaml" for p in files), "the packaged model"
    found += run.scanned.get("bentoml (tests)/", [])
    assert not found, _report(found)


def test_metrics_hold_no_canary(run: Run) -> None:
    """GET /metrics and the Prometheus multiprocess files behind it."""
    metrics = run.answers["GET /metrics"]
    assert "clinml_predictions_total" in metrics
    found = [Finding("answer to GET /metrics", hit) for hit in run.canaries.find(metrics.encode())]
    found += run.scanned.get("prometheus (tests)/", [])
    found += [f for f in run.scanned["home/"] if "prometheus" in f.where]
    files = run.files.get("prometheus (tests)/", 0) + sum(
        1 for p in run.home.rglob("*") if p.is_file() and "prometheus" in str(p)
    )
    assert files, "no Prometheus multiprocess files were written"
    # This found that BentoML's HTTP metrics middleware labelled its series with the raw
    # path of any path it does not skip, so GET /patients/<patient id> put the id into
    # /metrics and the Prometheus files: clinml.serving.framework.service_config now skips all.
    assert not found, _report(found)


def test_nothing_under_the_data_directory_holds_a_canary(run: Run) -> None:
    """The whole of CLINML_HOME: the above plus the offline and online feature stores,
    the Feast registry, validation reports, the quality profile, secrets and the rest."""
    assert run.files["home/"] > 50
    for expected in ("offline", "feast", "reports/validation", "quality", "predictions"):
        assert (run.home / USECASE / expected).is_dir(), expected
    found = run.scanned["home/"]
    # (The Prometheus files held the metrics leak above, now fixed.)
    assert not found, _report(found, limit=60)
