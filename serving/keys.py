"""API keys with roles: the key store, key hashing and the keys file.

Applications call the service with an API key; each key carries the roles it may use
(``ROLES``); which path needs which role is ``clinml.serving.routes``. ``admin`` implies nothing
else: a key lists every role it holds.

A key's secret is shown once, when it is generated, and never stored: the keys file keeps
only its sha256 (hex). The file (YAML or JSON) and the ``CLINML_API_KEYS`` environment
variable (JSON) both hold ``{"keys": [{"id": ..., "sha256": ..., "roles": [...]}, ...]}``
(an entry may also say when it was ``created``)::

    secret, entry = generate_key("triage-app", ["predict"])  # hand `secret` to the app
    keystore = KeyStore.load(settings.api_keys_path, os.environ.get("CLINML_API_KEYS"))

``clinml keys create|list|revoke`` (:func:`add_key`, :func:`list_keys`, :func:`revoke_key`)
edit the file; a running service sees the change within about a second
(:class:`LiveKeyStore`), without a restart. The service makes its ``LiveKeyStore`` when
first needed (:class:`KeysOnFirstUse`), so importing the service reads no file.

Nothing here logs or returns a secret or a hash. :mod:`clinml.serving.auth` holds the middleware
that checks the keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clinml.atomic import write_atomic
from clinml.errors import ClinmlError

ROLES = ("predict", "explain", "admin")
SECRET_PREFIX = "clinml_"
# The name of the environment variable that may hold keys, for error messages.
ENV_SOURCE = "environment variable CLINML_API_KEYS"

# How often a running service looks at the keys file for changes (LiveKeyStore).
KEYS_RECHECK_S = 1.0
# The command that makes a key, for messages that tell a user what to do.
CREATE_HINT = "clinml keys create --id APP --role predict"
# The start of the not-ready reason when no key exists.
NO_KEYS = "no API keys"

# A child of the "bentoml" logger, so `bentoml serve` prints it with its own lines.
log = logging.getLogger("bentoml.clinml.auth")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = frozenset({"id", "sha256", "roles"})
_OPTIONAL_FIELDS = frozenset({"created"})  # when `clinml keys create` made the key
# Ids of new keys: they reach logs and the audit trail, so nothing that could break a line.
_NEW_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
        """Whether any key exists; without one every call would be refused (401)."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why a service on these keys is not ready, with what to do (one line, no
        secret), or None when a key exists. The service's readiness log
        (:mod:`clinml.serving.readiness`) says it, once."""
        if self._clock() >= self._next_check:
            self.refresh()
        if len(self._store):
            return None
        return (
            f"{NO_KEYS}, so every call would be refused (401); create one with "
            f"`{CREATE_HINT}` (keys file {self.file}); the service picks it up without a restart"
        )

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


class KeysOnFirstUse:
    """The service's :class:`LiveKeyStore`, made when first needed: by the service's
    ``__init__`` (so a broken keys file stops the worker at start) or the first request,
    whichever comes first. Importing the service module reads no file.

    Args:
        file: the keys file (it need not exist).
        env_value: the content of ``CLINML_API_KEYS``.
    """

    def __init__(self, file: Path, env_value: str | None = None) -> None:
        self.file = Path(file)
        self._env_value = env_value
        self._made: LiveKeyStore | None = None
        self._making = threading.Lock()

    def get(self) -> LiveKeyStore:
        """The key store, read from the file on the first call.

        Raises:
            AuthConfigError: the file or ``CLINML_API_KEYS`` is invalid.
        """
        made = self._made
        if made is None:
            with self._making:
                if self._made is None:
                    self._made = LiveKeyStore(self.file, self._env_value)
                made = self._made
        return made

    def authenticate(self, presented: str) -> ApiKey | None:
        """``LiveKeyStore.authenticate``."""
        return self.get().authenticate(presented)

    def not_ready_reason(self) -> str | None:
        """``LiveKeyStore.not_ready_reason``."""
        return self.get().not_ready_reason()


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
