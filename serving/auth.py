"""API keys with roles, and the ASGI middleware that enforces them and caps request bodies.

Applications call the service with an API key; each key carries the roles it may use:

- ``predict``: ``/predict``, ``/predict_patient`` and ``/model``;
- ``explain``: ``/explain``;
- ``admin``: ``/admin/reload`` and any other path the rules do not name.

``admin`` implies nothing else: a key lists every role it holds.

A key's secret is shown once, when it is generated, and never stored: the keys file keeps
only its sha256 (hex). The file (YAML or JSON) and the ``CLINML_API_KEYS`` environment
variable (JSON) both hold ``{"keys": [{"id": ..., "sha256": ..., "roles": [...]}, ...]}``
(an entry may also say when it was ``created``)::

    secret, entry = generate_key("triage-app", ["predict"])  # hand `secret` to the app
    keystore = KeyStore.load(settings.api_keys_path, os.environ.get("CLINML_API_KEYS"))
    app = AuthMiddleware(JsonOnlyMiddleware(BodyLimitMiddleware(app, 1 << 20)), keystore, ...)

``clinml keys create|list|revoke`` (:func:`add_key`, :func:`list_keys`, :func:`revoke_key`)
edit the file; a running service sees the change within about a second
(:class:`LiveKeyStore`), without a restart.

Put ``AuthMiddleware`` outside the others (as above) so that a caller without a key is
turned away from the headers alone, before the service looks at, waits for or buffers
any of its body; open paths (probes, docs, metrics) take no body at all.

Nothing here logs or returns a secret, and a rejected request is answered without echoing
anything it sent. Refusals are reported to :mod:`clinml.serving.refusals` (counted, and logged
and audited in aggregate).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clinml.atomic import write_atomic
from clinml.errors import ClinmlError

ROLES = ("predict", "explain", "admin")
# The role each protected path needs; a path neither here nor exempt needs ``admin``.
DEFAULT_RULES: dict[str, str] = {
    "/predict": "predict",
    "/predict_patient": "predict",
    "/explain": "explain",
    "/model": "predict",
    "/admin/reload": "admin",
}
# Paths served without a key: probes, the API docs, and (unless protected) the metrics. An
# entry ending in "/" (other than "/" itself) exempts everything under it.
DEFAULT_EXEMPT: tuple[str, ...] = (
    "/livez",
    "/readyz",
    "/healthz",
    "/",
    "/docs.json",
    "/docs",
    "/openapi.json",
    "/static_content/",
    "/metrics",
)
METRICS_PATH = "/metrics"
SECRET_PREFIX = "clinml_"
# The name of the environment variable that may hold keys, for error messages.
ENV_SOURCE = "environment variable CLINML_API_KEYS"

# How often a running service looks at the keys file for changes (LiveKeyStore).
KEYS_RECHECK_S = 1.0
# The command that makes a key, for messages that tell a user what to do.
CREATE_HINT = "clinml keys create --id APP --role predict"

# A child of the "bentoml" logger, so `bentoml serve` prints it with its own lines.
log = logging.getLogger("bentoml.clinml.auth")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = frozenset({"id", "sha256", "roles"})
_OPTIONAL_FIELDS = frozenset({"created"})  # when `clinml keys create` made the key
# Ids of new keys: they reach logs and the audit trail, so nothing that could break a line.
_NEW_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AuthConfigError(ClinmlError):
    """The API keys file or environment variable is unreadable or invalid."""


@dataclass(frozen=True)
class ApiKey:
    """An authenticated caller: the key's id (safe to log) and the roles it holds."""

    key_id: str
    roles: frozenset[str]


def hash_secret(secret: str) -> str:
    """The sha256 (hex) of ``secret``, the only form in which a key is stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_key(key_id: str, roles: Iterable[str]) -> tuple[str, dict[str, Any]]:
    """A new random key for ``key_id`` holding ``roles``.

    Returns:
        ``(secret, entry)``: the secret (``clinml_`` + 32 url-safe characters) to hand to
        the caller once, and the keys-file entry, which holds only the secret's hash.

    Raises:
        AuthConfigError: the id is empty or a role is unknown.
    """
    secret = SECRET_PREFIX + secrets.token_urlsafe(24)  # 24 random bytes -> 32 characters
    entry = {"id": key_id, "sha256": hash_secret(secret), "roles": list(roles)}
    _validate_entry(entry, where="the new key")
    return secret, entry


@dataclass(frozen=True)
class _StoredKey:
    key: ApiKey
    digest: bytes  # the sha256 hex, as ASCII bytes


class KeyStore:
    """The known API keys, looked up by the hash of a presented secret.

    Args:
        entries: validated keys-file entries (use ``from_file``, ``from_env`` or ``load``).
    """

    def __init__(self, entries: Iterable[Mapping[str, Any]] = (), *, source: str = "keys") -> None:
        self._keys: list[_StoredKey] = []
        seen: set[str] = set()
        for index, entry in enumerate(entries):
            where = f"{source} entry {index}"
            _validate_entry(entry, where=where)
            if entry["id"] in seen:
                raise AuthConfigError(
                    f"{where}: duplicate key id {entry['id']!r}; each key needs its own id"
                )
            seen.add(entry["id"])
            self._keys.append(
                _StoredKey(
                    ApiKey(entry["id"], frozenset(entry["roles"])),
                    entry["sha256"].encode("ascii"),
                )
            )

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyStore({len(self._keys)} keys: {', '.join(self.key_ids)})"

    @property
    def key_ids(self) -> list[str]:
        return [stored.key.key_id for stored in self._keys]

    @classmethod
    def from_file(cls, path: Path) -> KeyStore:
        """The keys in a YAML or JSON file ``{"keys": [entry, ...]}``.

        Raises:
            AuthConfigError: naming the file (and the entry) when it cannot be read or is
                invalid.
        """
        path = Path(path)
        return cls(_read_entries(path), source=f"API keys file {path}")

    @classmethod
    def from_env(cls, value: str) -> KeyStore:
        """The keys in the JSON text ``value`` (an environment variable's content).

        Raises:
            AuthConfigError: the text is not JSON of the expected shape, or an entry is
                invalid.
        """
        try:
            document = json.loads(value)
        except json.JSONDecodeError as exc:
            raise AuthConfigError(f"{ENV_SOURCE} is not valid JSON (line {exc.lineno})") from None
        return cls(_entries(document, ENV_SOURCE), source=ENV_SOURCE)

    @classmethod
    def load(cls, file: Path | None, env_value: str | None) -> KeyStore:
        """The keys of ``file`` and ``env_value`` together; either may be absent.

        Raises:
            AuthConfigError: either source is invalid, or both define the same key id.
        """
        stores: list[tuple[str, KeyStore]] = []
        if file is not None:
            stores.append((f"API keys file {file}", cls.from_file(file)))
        if env_value is not None and env_value.strip():
            stores.append((ENV_SOURCE, cls.from_env(env_value)))
        merged = cls()
        owner: dict[str, str] = {}
        for source, store in stores:
            for stored in store._keys:
                key_id = stored.key.key_id
                if key_id in owner:
                    raise AuthConfigError(
                        f"key id {key_id!r} is defined in both {owner[key_id]} and {source}; "
                        "remove one of them"
                    )
                owner[key_id] = source
                merged._keys.append(stored)
        return merged

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key whose secret is ``presented``, or None.

        The presented secret's hash is compared with every stored hash, in constant time
        and without stopping at a match, so the time taken does not tell a caller which
        key (if any) it came close to.
        """
        digest = hash_secret(presented).encode("ascii")
        found: ApiKey | None = None
        for stored in self._keys:
            if hmac.compare_digest(digest, stored.digest):
                found = stored.key
        return found


def write_dev_key(path: Path) -> str:
    """Add a development key ``dev`` holding every role to the keys file ``path``.

    The file (created when missing; the keys already in it are kept) and the secret beside
    it (``path.with_suffix(".secret")``) are readable by the owner only (0600). When the
    file has a ``dev`` key already, nothing is written and the stored secret is returned
    again, so ``make demo`` can run repeatedly.

    Returns:
        The development key's secret.

    Raises:
        AuthConfigError: the file has a ``dev`` key but its secret file is missing or does
            not match it, the file is invalid, or a file cannot be written.
    """
    path = Path(path)
    secret_path = path.with_suffix(".secret")
    renew = "revoke it (`clinml keys revoke dev`) to create a new dev key"
    with _locked(path):
        entries = _file_entries(path)
        if any(entry["id"] == "dev" for entry in entries):
            try:
                secret = secret_path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise AuthConfigError(
                    f"API keys file {path} has a 'dev' key but its development secret "
                    f"{secret_path} cannot be read ({exc.strerror}); {renew}"
                ) from exc
            key = KeyStore.from_file(path).authenticate(secret)
            if key is None or key.key_id != "dev":
                raise AuthConfigError(
                    f"the secret in {secret_path} does not match the 'dev' key in {path}; {renew}"
                )
            return secret

        secret, entry = generate_key("dev", ROLES)
        entry["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            # The secret first: a crash before the keys file has the key just makes both anew.
            write_atomic(secret_path, secret + "\n", private=True)
        except OSError as exc:
            raise AuthConfigError(
                f"cannot write development API key to {secret_path}: {exc.strerror}"
            ) from exc
        _write_keys_file(path, [*entries, entry])
    return secret


# -- managing the keys file (`clinml keys`) ---------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """What ``clinml keys list`` shows of a key: never its hash, never its secret."""

    key_id: str
    roles: tuple[str, ...]
    created: str | None  # ISO 8601; None for a key written by hand or by `make demo`
    source: str  # "file" or "env" (CLINML_API_KEYS, which clinml cannot edit)


def list_keys(path: Path, env_value: str | None = None) -> list[KeyInfo]:
    """The keys in the keys file ``path`` (none when it does not exist) and in
    ``env_value`` (the content of ``CLINML_API_KEYS``).

    Raises:
        AuthConfigError: either source is invalid.
    """
    found = [_info(entry, "file") for entry in _file_entries(Path(path))]
    found += [_info(entry, "env") for entry in _env_entries(env_value)]
    return found


def add_key(
    path: Path,
    key_id: str,
    roles: Iterable[str],
    env_value: str | None = None,
    now: datetime | None = None,
) -> tuple[str, dict[str, Any]]:
    """Create a key ``key_id`` holding ``roles`` and add its entry to the keys file ``path``
    (created, owner-only, when missing), keeping the entries already there.

    The file is rewritten atomically (a service reading it sees the old or the new file,
    never half of one), as JSON, which a ``.yaml`` keys file also reads.

    Args:
        path: the keys file (``Settings().api_keys_path``).
        key_id: the new key's id: letters, digits, ``.``, ``_`` and ``-``, up to 64.
        roles: the roles it holds (``ROLES``).
        env_value: the content of ``CLINML_API_KEYS``, whose ids cannot be reused.
        now: the creation time recorded (default: the current time).

    Returns:
        ``(secret, entry)``: the secret, to show once, and the entry stored (its hash only).

    Raises:
        AuthConfigError: the id is invalid or taken, a role is unknown, or the file is
            invalid or cannot be written.
    """
    path = Path(path)
    if not _NEW_KEY_ID.fullmatch(key_id):
        raise AuthConfigError(
            f"invalid key id {key_id!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    roles = list(dict.fromkeys(roles))  # each once, in the order given
    if key_id in {str(entry["id"]) for entry in _env_entries(env_value)}:
        raise AuthConfigError(
            f"key id {key_id!r} is taken by a key in the {ENV_SOURCE}, which clinml cannot "
            "edit; choose another id"
        )
    with _locked(path):
        entries = _file_entries(path)
        if key_id in {entry["id"] for entry in entries}:
            raise AuthConfigError(
                f"a key with id {key_id!r} exists already in {path}; choose another id, or "
                f"revoke it first with `clinml keys revoke {key_id}`"
            )
        secret, entry = generate_key(key_id, roles)
        entry["created"] = (now or datetime.now(UTC)).isoformat(timespec="seconds")
        _write_keys_file(path, [*entries, entry])
    return secret, entry


def revoke_key(path: Path, key_id: str, env_value: str | None = None) -> dict[str, Any]:
    """Remove the key ``key_id`` from the keys file ``path``; the others are kept.

    Returns:
        The entry removed.

    Raises:
        AuthConfigError: no such key in the file (saying so when the key comes from
            ``CLINML_API_KEYS``, which clinml cannot edit), or the file is invalid or
            cannot be written.
    """
    path = Path(path)
    with _locked(path):
        entries = _file_entries(path)
        kept = [entry for entry in entries if entry["id"] != key_id]
        if len(kept) == len(entries):
            if key_id in {str(entry["id"]) for entry in _env_entries(env_value)}:
                raise AuthConfigError(
                    f"key {key_id!r} comes from the {ENV_SOURCE}, which clinml cannot edit: "
                    "remove it where that variable is set (e.g. the Kubernetes Secret) and "
                    "restart the service"
                )
            raise AuthConfigError(
                f"no key with id {key_id!r} in {path}; `clinml keys list` shows the keys"
            )
        _write_keys_file(path, kept)
    return next(entry for entry in entries if entry["id"] == key_id)


def _file_entries(path: Path) -> list[dict[str, Any]]:
    """The validated entries of the keys file ``path``; none when it does not exist."""
    if not path.exists():
        return []
    entries = _read_entries(path)
    KeyStore(entries, source=f"API keys file {path}")  # validates: fields, roles, duplicates
    return [dict(entry) for entry in entries]


def _env_entries(env_value: str | None) -> list[Mapping[str, Any]]:
    if env_value is None or not env_value.strip():
        return []
    try:
        document = json.loads(env_value)
    except json.JSONDecodeError as exc:
        raise AuthConfigError(f"{ENV_SOURCE} is not valid JSON (line {exc.lineno})") from None
    entries = _entries(document, ENV_SOURCE)
    KeyStore(entries, source=ENV_SOURCE)
    return entries


def _info(entry: Mapping[str, Any], source: str) -> KeyInfo:
    created = entry.get("created")
    if isinstance(created, datetime):  # a YAML file's unquoted timestamp
        created = created.isoformat()
    return KeyInfo(str(entry["id"]), tuple(entry["roles"]), created, source)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the keys file's folder while the file is edited, so two
    `clinml keys` commands run at once cannot lose each other's change. Creates the
    folder (owner-only) when missing."""
    import fcntl

    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)  # a folder can be locked; no lock file
    except OSError as exc:
        raise AuthConfigError(f"cannot write API keys file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_keys_file(path: Path, entries: list[dict[str, Any]]) -> None:
    try:
        write_atomic(path, json.dumps({"keys": entries}, indent=2) + "\n", private=True)
    except OSError as exc:
        raise AuthConfigError(f"cannot write API keys file {path}: {exc.strerror}") from exc


# -- the keys of a running service -------------------------------------------------------------


class LiveKeyStore:
    """The keys of a keys file and of ``CLINML_API_KEYS``, reloaded when the file changes,
    so keys created or revoked with ``clinml keys`` take effect without a restart.

    The file is looked at (one ``stat``: device, inode, size, times) at most once every
    ``recheck_s``, by whichever request or readiness probe comes first after that; a
    request in between costs one clock read. A file that changed is read again; one that
    has become invalid is reported in one log line (naming the file, never a secret or a
    hash) and the keys loaded before stay in use until the file is fixed. A missing file
    holds no keys, as at start.

    Args:
        file: the keys file (it need not exist yet).
        env_value: the content of ``CLINML_API_KEYS`` (read once: the environment of a
            running process does not change).
        recheck_s: the longest a change goes unnoticed.
        clock: seconds, monotonic (injected by tests).

    Raises:
        AuthConfigError: at construction, when the file or ``env_value`` is invalid (a
            service must not start on a broken key configuration).
    """

    def __init__(
        self,
        file: Path,
        env_value: str | None = None,
        *,
        recheck_s: float = KEYS_RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.file = Path(file)
        self._env_value = env_value
        self._recheck_s = recheck_s
        self._clock = clock
        self._checking = threading.Lock()
        self._signature = self._stat()
        self._store = self._load()
        self._next_check = clock() + recheck_s
        self._empty_reported = False

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"LiveKeyStore({self.file}: {self._store!r})"

    @property
    def key_ids(self) -> list[str]:
        return self._store.key_ids

    def authenticate(self, presented: str) -> ApiKey | None:
        """``KeyStore.authenticate`` on the current keys."""
        if self._clock() >= self._next_check:
            self.refresh()
        return self._store.authenticate(presented)

    def ready(self) -> bool:
        """Whether any key exists; without one every call would be refused (401). The
        first time there is none (again), one log line says why and what to do."""
        if self._clock() >= self._next_check:
            self.refresh()
        if len(self._store):
            self._empty_reported = False
            return True
        if not self._empty_reported:
            self._empty_reported = True
            log.warning(
                "not ready: no API keys, so every call would be refused (401); create one "
                "with `%s` (keys file %s); the service picks it up without a restart",
                CREATE_HINT,
                self.file,
            )
        return False

    def refresh(self) -> None:
        """Reload the keys if the file changed since it was last read."""
        if not self._checking.acquire(blocking=False):
            return  # another thread is at it; the current keys serve meanwhile
        try:
            self._next_check = self._clock() + self._recheck_s
            signature = self._stat()
            if signature == self._signature:
                return
            # Recorded first: a file that is bad is reported once, not at every check.
            self._signature = signature
            try:
                store = self._load()
            except AuthConfigError as exc:
                log.error(
                    "API keys file changed but cannot be used, keeping the %d key(s) loaded "
                    "before: %s",
                    len(self._store),
                    exc,
                )
                return
            self._store = store
            log.info("API keys reloaded from %s: %d key(s)", self.file, len(store))
        finally:
            self._checking.release()

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _load(self) -> KeyStore:
        file = self.file if self._signature is not None else None
        return KeyStore.load(file, self._env_value)


def _read_entries(path: Path) -> list[Any]:
    """The (not yet validated) entries of the keys file ``path``.

    Raises:
        AuthConfigError: the file cannot be read or parsed, or is not ``{"keys": [...]}``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise AuthConfigError(f"cannot read API keys file {path}: {reason}") from exc
    # Parser messages may quote the file's lines, so only the line number is reported.
    if path.suffix.lower() == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AuthConfigError(
                f"API keys file {path} is not valid JSON (line {exc.lineno})"
            ) from None
    else:
        import yaml

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise AuthConfigError(f"API keys file {path} is not valid YAML{at}") from None
    return _entries(document, f"API keys file {path}")


def _entries(document: Any, source: str) -> list[Any]:
    if not isinstance(document, dict) or set(document) != {"keys"}:
        raise AuthConfigError(f'{source} must be a mapping with one field, "keys"')
    keys = document["keys"]
    if not isinstance(keys, list):
        raise AuthConfigError(f'{source}: "keys" must be a list of key entries')
    return keys


def _validate_entry(entry: Any, *, where: str) -> None:
    """Raise AuthConfigError naming ``where`` unless ``entry`` is a valid key entry.

    Messages name fields, never their values: a misplaced secret must not reach a log.
    """
    if not isinstance(entry, Mapping):
        raise AuthConfigError(f"{where}: must be a mapping with id, sha256 and roles")
    unknown = sorted(str(field) for field in set(entry) - _ENTRY_FIELDS - _OPTIONAL_FIELDS)
    if unknown:
        raise AuthConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; an entry holds only id, sha256, "
            "roles and created (store the sha256 of a secret, never the secret)"
        )
    missing = sorted(_ENTRY_FIELDS - set(entry))
    if missing:
        raise AuthConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    key_id = entry["id"]
    if not isinstance(key_id, str) or not key_id.strip():
        raise AuthConfigError(f"{where}: id must be a non-empty string")
    digest = entry["sha256"]
    if not (isinstance(digest, str) and _SHA256_HEX.fullmatch(digest)):
        raise AuthConfigError(
            f"{where} ({key_id!r}): sha256 must be 64 lowercase hex characters, the hash of "
            "the secret (see generate_key)"
        )
    roles = entry["roles"]
    if not isinstance(roles, list) or not roles:
        raise AuthConfigError(f"{where} ({key_id!r}): roles must be a non-empty list")
    unknown_roles = sorted({str(role) for role in roles if role not in ROLES})
    if unknown_roles:
        raise AuthConfigError(
            f"{where} ({key_id!r}): unknown role(s) {', '.join(unknown_roles)}; "
            f"roles are {', '.join(ROLES)}"
        )
    if "created" in entry and not isinstance(entry["created"], str | datetime):
        raise AuthConfigError(f"{where} ({key_id!r}): created must be a date and time")


# -- ASGI middleware -------------------------------------------------------------------------


async def send_json(
    send: Send,
    status: int,
    payload: Any,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer ``payload`` as a complete JSON response (the ASGI messages, no framework)."""
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _presented_secret(scope: Scope) -> str | None:
    """The secret from ``Authorization: Bearer <secret>`` or ``X-API-Key: <secret>``."""
    bearer = api_key = None
    for name, value in scope.get("headers") or ():
        name = name.lower()
        if name == b"authorization" and bearer is None:
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1").strip() or None
    return bearer or api_key


class OpenPaths:
    """The paths served without a key: ``path in open_paths``.

    Args:
        exempt: paths; an entry ending in "/" (other than "/" itself) opens everything
            under it, except paths with dot segments.
    """

    def __init__(self, exempt: Iterable[str] = DEFAULT_EXEMPT) -> None:
        exempt = set(exempt)
        self._paths = frozenset(p for p in exempt if p == "/" or not p.endswith("/"))
        self._prefixes = tuple(sorted(p for p in exempt if p != "/" and p.endswith("/")))

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        if path in self._paths:
            return True
        if not path.startswith(self._prefixes):
            return False
        # "/static_content/../predict" must not ride on the exemption.
        return not any(part in (".", "..") for part in path.split("/"))


def open_paths(protect_metrics: bool = False, exempt: Iterable[str] | None = None) -> OpenPaths:
    """The paths served without a key: ``exempt`` (default ``DEFAULT_EXEMPT``), less
    ``/metrics`` when it is protected. The one rule for the key check, load shedding and
    the audit trail alike."""
    paths = set(DEFAULT_EXEMPT if exempt is None else exempt)
    if protect_metrics:
        paths.discard(METRICS_PATH)
    return OpenPaths(paths)


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a ``Content-Length`` other than 0, or any
    ``Transfer-Encoding``), judged from the headers alone."""
    for name, value in scope.get("headers") or ():
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class AuthMiddleware:
    """Require an API key holding the right role on every path that is not open; answer
    a request to an open path that carries a body with 413, without reading it.

    Args:
        app: the ASGI application to protect.
        keystore: the known keys (a ``LiveKeyStore`` follows changes to the keys file).
        rules: path -> the role it needs. A path that is neither in ``rules`` nor exempt
            needs ``admin``, so a new endpoint is closed until someone opens it.
        exempt: paths served without a key (default ``DEFAULT_EXEMPT``); an entry ending
            in "/" (other than "/") exempts everything under it.
        protect_metrics: require a key for ``/metrics`` too (role from ``rules``, else
            ``admin``).

    Every refusal is answered from the headers alone, so a caller without a key holds
    no body buffer, no slot and no worker, and is reported to
    :mod:`clinml.serving.refusals` (counted, logged and audited in aggregate).

    On success the key's id is put in ``scope["state"]["clinml_key_id"]`` (``request.state
    .clinml_key_id`` in Starlette) for the audit trail and the per-key limit.
    """

    def __init__(
        self,
        app: ASGIApp,
        keystore: KeyStore | LiveKeyStore,
        rules: Mapping[str, str] | None = None,
        exempt: Iterable[str] | None = None,
        protect_metrics: bool = False,
    ) -> None:
        self.app = app
        self.keystore = keystore
        self.rules = dict(DEFAULT_RULES if rules is None else rules)
        bad = sorted({role for role in self.rules.values() if role not in ROLES})
        if bad:
            raise AuthConfigError(f"auth rules name unknown role(s) {', '.join(bad)}")
        self.open_paths = open_paths(protect_metrics, exempt)

    def is_exempt(self, path: str) -> bool:
        return path in self.open_paths

    def required_role(self, path: str) -> str:
        return self.rules.get(path, "admin")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in self.open_paths:
            if scope["type"] == "http" and has_body(scope):
                await refuse(scope, send, 413, NO_BODY)
                return
            await self.app(scope, receive, send)
            return
        role = self.required_role(path)
        presented = _presented_secret(scope)
        key = self.keystore.authenticate(presented) if presented else None
        if key is None:
            await refuse(scope, send, 401, "missing or invalid API key")
            return
        if role not in key.roles:
            detail = f"API key '{key.key_id}' lacks the '{role}' role"
            await refuse(scope, send, 403, detail, key.key_id)
            return
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["clinml_key_id"] = key.key_id
        await self.app(scope, receive, send)


NO_BODY = "this path takes no request body"


def key_id_of(scope: Scope) -> str | None:
    """The id of the key that authenticated the request, if any."""
    state = scope.get("state")
    return state.get("clinml_key_id") if state else None


async def refuse(
    scope: Scope,
    send: Send,
    status: int,
    detail: str,
    key_id: str | None = None,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Report the refusal (:mod:`clinml.serving.refusals`) and answer it; ``detail`` is clinml's
    own text, never anything the caller sent."""
    from clinml.serving import refusals

    refusals.record(scope.get("path", ""), status, key_id, detail)
    if scope["type"] == "websocket":
        # Closing before accepting turns the handshake into an HTTP 403.
        await send({"type": "websocket.close", "code": 1008, "reason": detail})
        return
    headers = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    await send_json(send, status, {"detail": detail}, [*headers, *extra_headers])


class JsonOnlyMiddleware:
    """Answer 415 to a request that carries a body not declared ``application/json``.

    Every endpoint that takes a body takes JSON; anything else (a pickle, a form, a body
    with no ``Content-Type``) is refused from the headers alone, before any of the body is
    read, so no other parser ever sees it. A request without a body (no
    ``Content-Length``, or 0, and not chunked) passes whatever its headers say.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and has_body(scope) and not is_json(_content_type(scope)):
            detail = "the body must be application/json"
            await refuse(scope, send, 415, detail, key_id_of(scope))
            return
        await self.app(scope, receive, send)


def _content_type(scope: Scope) -> bytes | None:
    """The request's ``Content-Type`` (the last one, when it is sent twice)."""
    found = None
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-type":
            found = value
    return found


def is_json(content_type: bytes | None) -> bool:
    """``application/json``, with or without parameters such as ``charset``."""
    if content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


class BodyLimitMiddleware:
    """Answer 413 to a request whose body is larger than ``max_bytes``, and 408 to one
    whose body does not arrive in full within ``timeout_s``.

    A ``Content-Length`` above the limit is refused before any of the body is read. Other
    bodies (chunked, or a length that lies) are read into memory up to the limit and
    handed to the app only once complete, so the app never sees a body it would have to
    abandon halfway; the first byte past the limit ends reading and answers 413. A body
    that trickles in is cut off at ``timeout_s`` (``CLINML_BODY_TIMEOUT_S``), so a slow
    sender holds its slot no longer than that; the 408 closes the connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 10.0) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body larger than {self.max_bytes} bytes"
        key_id = key_id_of(scope)
        for name, value in scope.get("headers") or ():
            if name.lower() == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await refuse(scope, send, 400, "invalid Content-Length header", key_id)
                    return
                if length > self.max_bytes:
                    await refuse(scope, send, 413, too_large, key_id)
                    return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left; there is nobody to answer
                    if message["type"] != "http.request":
                        continue
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await refuse(scope, send, 413, too_large, key_id)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            detail = f"request body not received within {self.timeout_s:g} s"
            await refuse(scope, send, 408, detail, key_id, [(b"connection", b"close")])
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
