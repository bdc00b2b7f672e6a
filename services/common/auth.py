"""Who may call which gRPC method: bearer tokens mapped to principals and roles, and the one table of roles.

A caller sends ``authorization: Bearer <token>`` metadata. The server knows tokens only by their SHA-256 (the tokens
file, ``SIGHTLINE_AUTH_TOKENS_FILE``: a YAML list of ``{principal, roles, token_sha256}``), so the file holds nothing
that can be replayed. Each gRPC method needs one of the roles ``METHOD_ROLES`` names for it; health and reflection
are open (probes and ``grpcurl`` need them). ``AccessPolicy.admit`` decides, and the server interceptor in
``rpc.py`` runs it before every call, so that a servicer only ever sees authorised calls and ``current_caller()``
(``audit.principal_of``) names who made them.

Tokens are random (``new_token``: 256 bits), so a plain SHA-256 is enough: there is nothing to guess that a slow
hash would protect. A principal may also be named by the common name of its verified client certificate
(``client_cert_cn``) when the servers require mutual TLS: a call without a token then gets that principal's roles.

With no tokens file and ``SIGHTLINE_AUTH_REQUIRED`` unset, authentication is off: every caller may call every method
and the server says so loudly when it starts. See docs/security.md.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from sightline.common.config import SightlineSettings, parse_yaml
from sightline.v1 import (
    audit_pb2,
    capture_pb2,
    detection_pb2,
    embedding_pb2,
    gallery_pb2,
    review_pb2,
    session_pb2,
    shard_pb2,
)

log = logging.getLogger(__name__)

CLI_TOKEN_ENV = "SIGHTLINE_TOKEN"  # the command line's token, for people; services use SIGHTLINE_AUTH_TOKEN
AUTHORIZATION_KEY = "authorization"
_BEARER = re.compile(r"^Bearer[ ]+(\S+)$", re.IGNORECASE)
_PRINCIPAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class Role(StrEnum):
    """What a principal may do. A principal has any number of roles; a method needs one of its table entry."""

    ENROLLER = "enroller"  # manages the gallery and watchlists: enrol, delete, erase
    REVIEWER = "reviewer"  # reviews alerts (two-person rule)
    AUDITOR = "auditor"  # reads and verifies the audit trail
    OPERATOR = "operator"  # runs the pipeline: ingest, kiosks, 1:1 and 1:N searches, detection and embedding


# -- the role table -----------------------------------------------------------------------------------------------

_ENROL = frozenset({Role.ENROLLER})
_GALLERY_READ = frozenset({Role.OPERATOR, Role.ENROLLER})
_OPERATE = frozenset({Role.OPERATOR})
_REVIEW = frozenset({Role.REVIEWER})
_ALERT_READ = frozenset({Role.REVIEWER, Role.AUDITOR})
_AUDIT = frozenset({Role.AUDITOR})


def _service(messages: Any, name: str) -> str:
    """A service's full name (``sightline.v1.GalleryService``) from its generated module's descriptor: a KeyError
    at import for a service the protos do not have."""
    return str(messages.DESCRIPTOR.services_by_name[name].full_name)


_TABLE: dict[str, dict[str, frozenset[Role]]] = {
    _service(gallery_pb2, "GalleryService"): {
        "Enroll": _ENROL,
        "DeleteSubject": _ENROL,
        "EraseSubject": _ENROL,
        "ListSubjects": _GALLERY_READ,
        "GetSubject": _GALLERY_READ,
        "Verify": _GALLERY_READ,
        "Search": _GALLERY_READ,
    },
    _service(gallery_pb2, "WatchlistService"): {
        "CreateWatchlist": _ENROL,
        "UpdateWatchlist": _ENROL,
        "DeleteWatchlist": _ENROL,
        "AddMembers": _ENROL,
        "RemoveMembers": _ENROL,
        "GetWatchlist": _GALLERY_READ,
        "ListWatchlists": _GALLERY_READ,
        "ListMembers": _GALLERY_READ,
    },
    _service(review_pb2, "ReviewService"): {
        "ListAlerts": _ALERT_READ,
        "GetAlert": _ALERT_READ,
        "ReviewAlert": _REVIEW,
        "ListFeedback": _ALERT_READ,
    },
    _service(audit_pb2, "AuditService"): {"ListAuditRecords": _AUDIT, "VerifyChain": _AUDIT},
    _service(capture_pb2, "CaptureService"): {"Ingest": _OPERATE},
    _service(session_pb2, "KioskService"): {
        "OpenSession": _OPERATE,
        "SendFrame": _OPERATE,
        "CloseSession": _OPERATE,
        "CancelSession": _OPERATE,
        "WatchSession": _OPERATE,
    },
    _service(detection_pb2, "DetectionService"): {"Detect": _OPERATE},
    _service(embedding_pb2, "EmbeddingService"): {"Embed": _OPERATE},
    # Matching's shards call each other; ShardServicer further admits only matching's own principal.
    _service(shard_pb2, "ShardService"): {"SearchShard": _OPERATE, "VerifyShard": _OPERATE, "SyncSubjects": _OPERATE},
}

METHOD_ROLES: Mapping[str, frozenset[Role]] = {
    f"/{service}/{method}": roles for service, methods in _TABLE.items() for method, roles in methods.items()
}
"""Every Sightline RPC (``/package.Service/Method``) and the roles that may call it (any one of them suffices)."""

SERVICE_CALLER_ROLES: Mapping[str, frozenset[Role]] = {
    "capture": frozenset({Role.OPERATOR, Role.ENROLLER}),  # kiosk sessions: check claims, enrol session templates
    "matching": frozenset({Role.OPERATOR}),  # detection and embedding, for enrolments and probes
}
"""The services that call other services' gRPC APIs, and the roles their own principals (``service:<name>``) need."""


def service_principal(service: str) -> str:
    return f"service:{service}"


OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


def is_open(method: str) -> bool:
    """Health and reflection: callable without credentials (Kubernetes probes, ``grpcurl``)."""
    return method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES


def method_table_markdown() -> str:
    """The role table as the Markdown table of docs/security.md (a test keeps the two equal)."""
    lines = ["| service | method | roles (any one) |", "|---|---|---|"]
    for service, methods in _TABLE.items():
        for method, roles in methods.items():
            names = ", ".join(role.value for role in Role if role in roles)
            lines.append(f"| `{service.rsplit('.', 1)[-1]}` | `{method}` | {names} |")
    return "\n".join(lines) + "\n"


# -- tokens and the tokens file -----------------------------------------------------------------------------------


def new_token() -> str:
    """A fresh bearer token: 32 random bytes, URL-safe base64 (43 characters), never starting with "-" (it would
    read as an option after ``--token`` on a command line)."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


def hash_token(token: str) -> str:
    """What the tokens file stores for a token: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(token.strip().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """One entry of the tokens file: a name, its roles, and how it proves who it is (a token, a certificate, both)."""

    name: str
    roles: frozenset[Role]
    token_sha256: str = ""
    client_cert_cn: str = ""

    def to_yaml(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"principal": self.name, "roles": sorted(role.value for role in self.roles)}
        if self.token_sha256:
            entry["token_sha256"] = self.token_sha256
        if self.client_cert_cn:
            entry["client_cert_cn"] = self.client_cert_cn
        return entry


class TokensFileError(ValueError):
    """The tokens file cannot be read or is wrong; the message names the file, the entry and the fix."""


def parse_principals(text: str, where: str = "tokens file") -> list[Principal]:
    """The entries of a tokens file's text, validated (names, roles, hashes; no token or certificate twice)."""
    try:
        document = parse_yaml(text, where)
    except ValueError as error:
        raise TokensFileError(str(error)) from None
    if document is None:
        return []
    if not isinstance(document, list):
        raise TokensFileError(f"{where}: expected a list of {{principal, roles, token_sha256}} entries")
    principals = [_principal(entry, f"{where}, entry {index + 1}") for index, entry in enumerate(document)]
    _refuse_duplicates(principals, where)
    return principals


def load_principals(path: Path) -> list[Principal]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise TokensFileError(f"cannot read the tokens file {path}: {error.strerror}") from None
    return parse_principals(text, str(path))


def dump_principals(principals: Iterable[Principal]) -> str:
    return yaml.safe_dump([p.to_yaml() for p in principals], sort_keys=False)


def _principal(entry: Any, where: str) -> Principal:
    if not isinstance(entry, dict):
        raise TokensFileError(f"{where}: expected a mapping with principal, roles and token_sha256")
    unknown = set(entry) - {"principal", "roles", "token_sha256", "client_cert_cn"}
    if unknown:
        raise TokensFileError(
            f"{where}: unknown keys {sorted(str(key)[:40] for key in unknown)}; a plaintext token never goes in this "
            "file, only its token_sha256 (`sightline auth hash-token`)"
        )
    name = _scalar_text(entry.get("principal"))
    if not _PRINCIPAL_NAME.fullmatch(name):
        raise TokensFileError(f"{where}: principal {name[:40]!r} must be 1-128 letters, digits and . _ : @ + -")
    roles = entry.get("roles") or []
    if isinstance(roles, str) or not isinstance(roles, list) or not roles:
        raise TokensFileError(f"{where} ({name}): roles must be a non-empty list of {', '.join(r.value for r in Role)}")
    try:
        granted = frozenset(Role(_scalar_text(role).lower()) for role in roles)
    except ValueError:
        shown = ", ".join(repr(_scalar_text(role)[:20]) for role in roles[:8])
        raise TokensFileError(
            f"{where} ({name}): unknown role in [{shown}]; roles are {', '.join(r.value for r in Role)}"
        ) from None
    digest = _scalar_text(entry.get("token_sha256")).lower()
    if digest and not _SHA256_HEX.fullmatch(digest):
        raise TokensFileError(f"{where} ({name}): token_sha256 must be 64 hex characters (the SHA-256 of the token)")
    common_name = _scalar_text(entry.get("client_cert_cn"))
    if not digest and not common_name:
        raise TokensFileError(f"{where} ({name}): give token_sha256, client_cert_cn, or both")
    return Principal(name, granted, digest, common_name)


def _scalar_text(value: Any) -> str:
    """A YAML scalar as text ("" for none, false or 0); a list or mapping is not a name, and is never turned into one
    (its text could be any size: an alias bomb's is billions of characters)."""
    if not value or isinstance(value, list | dict):
        return ""
    return str(value)


def _refuse_duplicates(principals: Sequence[Principal], where: str) -> None:
    for attribute, what in (("token_sha256", "token"), ("client_cert_cn", "client certificate name")):
        seen: dict[str, str] = {}
        for principal in principals:
            value = getattr(principal, attribute)
            if value and value in seen:
                raise TokensFileError(f"{where}: {seen[value]} and {principal.name} have the same {what}")
            seen[value] = principal.name


# -- settings -----------------------------------------------------------------------------------------------------


class AuthSettings(SightlineSettings):
    """Bearer-token authentication of gRPC calls (``SIGHTLINE_AUTH_*``); the same for every service and the CLI."""

    config_section: ClassVar[str] = "auth"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_AUTH_", extra="ignore")

    tokens_file: Path | None = Field(
        None,
        description="YAML list of {principal, roles, token_sha256} naming who may call the gRPC APIs "
        "(docs/security.md). Re-read when it changes. Unset: authentication is off unless required is true.",
    )
    required: bool | None = Field(
        None,
        description="Refuse calls without credentials (UNAUTHENTICATED). Unset: true when tokens_file is "
        "set. false with a tokens file admits calls without a token (checking those that carry one): a migration aid.",
    )
    token: SecretStr | None = Field(
        None,
        description="Bearer token this process sends on its own gRPC calls (e.g. matching to detection). "
        "The CLI also reads $SIGHTLINE_TOKEN. Prefer a secret file.",
    )

    @model_validator(mode="after")
    def _required_needs_principals(self) -> AuthSettings:
        if self.required and self.tokens_file is None:
            raise ValueError("SIGHTLINE_AUTH_REQUIRED is true but no SIGHTLINE_AUTH_TOKENS_FILE says who may call")
        return self

    @property
    def enforced(self) -> bool:
        return self.tokens_file is not None if self.required is None else self.required


# -- deciding -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of the current gRPC call."""

    principal: str
    roles: frozenset[Role]


RefusalCode = Literal["UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"]
"""The statuses of refused calls: by the access policy, or by the request and stream limits (``rpc.py``)."""


@dataclass(frozen=True)
class Denial:
    """A refused call, as the server reports it (to the log and, where there is one, to the audit trail)."""

    code: RefusalCode
    principal: str  # "" when the caller could not be authenticated
    method: str
    reason: str
    peer: str = ""


class AccessDenied(Exception):
    """A call refused by the access policy: the gRPC status, who (if known), and why, in words for the caller."""

    def __init__(self, code: Literal["UNAUTHENTICATED", "PERMISSION_DENIED"], principal: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.principal = principal
        self.reason = reason


class AccessPolicy:
    """Authenticates a call's credentials against the principals and checks the method's roles; thread-safe.

    Built from a list of principals, or from a tokens file that is re-read (at most every ``recheck_s`` seconds)
    when it changes, so that adding or revoking a token needs no restart. A file that became invalid is refused
    with an error in the log and the last good principals stay in force.
    """

    def __init__(
        self,
        principals: Iterable[Principal] = (),
        *,
        required: bool = True,
        tokens_file: Path | None = None,
        recheck_s: float = 5.0,
    ) -> None:
        self.required = required
        self._file = Path(tokens_file) if tokens_file else None
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._stamp: tuple[int, int] | None = None
        if self._file is not None:
            self._stamp = _stamp(self._file)
            principals = load_principals(self._file)
        self._index(list(principals))

    @classmethod
    def from_settings(cls, settings: AuthSettings | None = None) -> AccessPolicy | None:
        """The policy the settings describe; None when authentication is off."""
        settings = settings or AuthSettings()
        if settings.tokens_file is None:
            return None
        return cls(required=settings.enforced, tokens_file=settings.tokens_file)

    def admit(self, method: str, authorization: str | None = None, certificate_cn: str = "") -> Caller | None:
        """The caller allowed to call ``method``; None for an open method or, when not required, no credentials.

        Raises AccessDenied: UNAUTHENTICATED without usable credentials, PERMISSION_DENIED without a needed role.
        """
        if is_open(method):
            return None
        self._reload_if_changed()
        caller = self._authenticate(authorization, certificate_cn)
        if caller is None:
            return None
        needed = METHOD_ROLES.get(method)
        if needed is None:
            raise AccessDenied(
                "PERMISSION_DENIED", caller.principal, f"{method} is not in the role table, so nobody may call it"
            )
        if not needed & caller.roles:
            held = ", ".join(sorted(caller.roles)) or "none"
            raise AccessDenied(
                "PERMISSION_DENIED",
                caller.principal,
                f"{caller.principal} may not call {method.lstrip('/')}: it needs the role "
                f"{' or '.join(sorted(needed))} (has {held})",
            )
        return caller

    def _authenticate(self, authorization: str | None, certificate_cn: str) -> Caller | None:
        if authorization is not None:
            match = _BEARER.match(authorization.strip())
            if not match:
                raise AccessDenied("UNAUTHENTICATED", "", "the authorization metadata must be 'Bearer <token>'")
            principal = self._by_token.get(hash_token(match.group(1)))
            if principal is None:
                raise AccessDenied(
                    "UNAUTHENTICATED",
                    "",
                    "the bearer token is not known here (mistyped, revoked, or from another deployment)",
                )
            return Caller(principal.name, principal.roles)
        if certificate_cn:
            principal = self._by_cert.get(certificate_cn)
            if principal is None:
                raise AccessDenied(
                    "UNAUTHENTICATED",
                    "",
                    f"the client certificate CN={certificate_cn[:64]} is not "
                    "mapped to a principal (client_cert_cn in the tokens file)",
                )
            return Caller(principal.name, principal.roles)
        if self.required:
            raise AccessDenied(
                "UNAUTHENTICATED",
                "",
                "this method needs credentials: send the metadata "
                "'authorization: Bearer <token>' (the CLI: --token or $SIGHTLINE_TOKEN)",
            )
        return None

    def _index(self, principals: list[Principal]) -> None:
        self._by_token = {p.token_sha256: p for p in principals if p.token_sha256}
        self._by_cert = {p.client_cert_cn: p for p in principals if p.client_cert_cn}

    def _reload_if_changed(self) -> None:
        if self._file is None or time.monotonic() - self._checked_at < self._recheck_s:
            return
        with self._lock:
            self._checked_at = time.monotonic()
            stamp = _stamp(self._file)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                principals = load_principals(self._file)
            except TokensFileError as error:
                log.error("keeping the previous principals: %s", error)
                return
            self._index(principals)
            log.info("tokens file reloaded", extra={"principals": len(principals)})


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()  # follows the symlink Kubernetes swaps when a mounted Secret changes
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def bearer_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The value of the call's ``authorization`` metadata, if any."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


# -- the caller of the current call -------------------------------------------------------------------------------

_current: ContextVar[Caller | None] = ContextVar("sightline_caller", default=None)


def current_caller() -> Caller | None:
    """Who made the gRPC call being served on this thread, once the server admitted it; None otherwise."""
    return _current.get()


@contextmanager
def authenticated_as(caller: Caller | None) -> Iterator[None]:
    """Run a block as the given caller (the server interceptor does this around each admitted call)."""
    token = _current.set(caller)
    try:
        yield
    finally:
        _current.reset(token)


# -- outgoing calls -----------------------------------------------------------------------------------------------

_stack_tokens: dict[str, str] = {}
_stack_lock = threading.Lock()


def remember_stack_token(addresses: Iterable[str], token: str) -> None:
    """Use ``token`` on this process's calls to these addresses: a local stack's own services
    (see tooling/localstack.py)."""
    with _stack_lock:
        _stack_tokens.update(dict.fromkeys(addresses, token))


def forget_stack_token(addresses: Iterable[str]) -> None:
    with _stack_lock:
        for address in addresses:
            _stack_tokens.pop(address, None)


def outgoing_token(address: str) -> str:
    """The bearer token for a call to ``address`` ("" for none).

    This process's own token (``SIGHTLINE_AUTH_TOKEN``), else the user's (``$SIGHTLINE_TOKEN``), else the token of a
    local stack this process started, for that stack's addresses only (a token never goes anywhere else).
    """
    if own := _own_token(_settings_environment()):
        return own
    if user := os.environ.get(CLI_TOKEN_ENV, "").strip():
        return user
    with _stack_lock:
        return _stack_tokens.get(address, "")


_SETTINGS_SOURCES = ("SIGHTLINE_SECRETS_DIR", "SIGHTLINE_CONFIG_FILE")


def _settings_environment() -> tuple[tuple[str, str], ...]:
    """The variables ``AuthSettings`` is read from: the cache key of ``_own_token``, so a changed one is read anew."""
    return tuple(
        sorted(
            (name, value)
            for name, value in os.environ.items()
            if name.startswith("SIGHTLINE_AUTH_") or name in _SETTINGS_SOURCES
        )
    )


@functools.lru_cache(maxsize=4)
def _own_token(environment: tuple[tuple[str, str], ...]) -> str:
    """This process's own token, read once per environment (every channel asks). Invalid auth settings (say a
    server-side SIGHTLINE_AUTH_REQUIRED without a tokens file) mean no own token, with a warning, rather than a
    failure of every call this process makes."""
    try:
        own = AuthSettings().token
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'auth'}: {problem['msg']}"
            for problem in error.errors(include_input=False)
        )
        log.warning(
            "this process sends no token of its own (SIGHTLINE_AUTH_TOKEN): its auth settings are invalid (%s)",
            problems,
        )
        return ""
    return own.get_secret_value().strip() if own is not None else ""
