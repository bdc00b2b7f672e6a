"""Access control without a network: token hashing, the tokens file, the role table against the generated protos,
the servicers against the services they implement (names from the descriptors), the admission decisions, the
settings, which token a client sends and where it may go in clear text, and the files and environment the local stack
gives its services."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import logging
import os
import pkgutil
import stat
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from pydantic import ValidationError

import sightline.v1
from sightline.cli import auth as auth_command
from sightline.cli import endpoints
from sightline.common import auth, rpc, runtime
from sightline.common.audit import principal_of
from sightline.common.auth import AccessDenied, AccessPolicy, AuthSettings, Caller, Principal, Role
from sightline.common.tls import PlaintextTokenError, TlsSettings, is_local_address
from sightline.tooling import localstack
from sightline.v1 import capture_pb2_grpc, detection_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
ENROL = "/sightline.v1.GalleryService/Enroll"
LIST = "/sightline.v1.GalleryService/ListSubjects"
REVIEW = "/sightline.v1.ReviewService/ReviewAlert"
AUDIT = "/sightline.v1.AuditService/ListAuditRecords"


def principal(name: str, *roles: Role, token: str = "", cn: str = "") -> Principal:
    return Principal(name, frozenset(roles), auth.hash_token(token) if token else "", cn)


@pytest.fixture()
def policy() -> AccessPolicy:
    return AccessPolicy(
        [
            principal("erin", Role.ENROLLER, token="erin-token"),
            principal("rita", Role.REVIEWER, token="rita-token"),
            principal("gate-3", Role.OPERATOR, cn="gate-3.kiosks.example"),
        ]
    )


def bearer(token: str) -> str:
    return f"Bearer {token}"


# -- tokens ---------------------------------------------------------------------------------------------------------


def test_a_token_is_stored_as_its_sha256() -> None:
    token = auth.new_token()
    assert len(token) == 43 and token != auth.new_token()
    assert auth.hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    assert auth.hash_token(token + "\n") == auth.hash_token(token)  # read from a file or a terminal


def test_tokens_file_round_trip_and_errors() -> None:
    entries = [principal("alice", Role.REVIEWER, Role.AUDITOR, token="t1"), principal("gate", Role.OPERATOR, cn="gate")]
    assert auth.parse_principals(auth.dump_principals(entries)) == entries
    assert auth.parse_principals("") == []
    digest = "a" * 64
    for text, message in (
        ("principal: alice", "expected a list"),
        ("- {principal: alice, roles: [reviewer], token: s3cret}", "plaintext token never goes in this file"),
        (f"- {{principal: alice, roles: [judge], token_sha256: {digest}}}", "unknown role"),
        (f"- {{principal: alice, roles: reviewer, token_sha256: {digest}}}", "roles must be a non-empty list"),
        ("- {principal: alice, roles: [reviewer], token_sha256: abc}", "64 hex characters"),
        ("- {principal: alice, roles: [reviewer]}", "give token_sha256, client_cert_cn, or both"),
        (f"- {{principal: 'al ice', roles: [reviewer], token_sha256: {digest}}}", "must be 1-128 letters"),
        (
            f"- {{principal: a, roles: [reviewer], token_sha256: {digest}}}\n"
            f"- {{principal: b, roles: [auditor], token_sha256: {digest}}}",
            "a and b have the same token",
        ),
        ("- [unclosed", "not valid YAML"),
    ):
        with pytest.raises(auth.TokensFileError, match=message):
            auth.parse_principals(text, "tokens.yaml")


# -- the role table ---------------------------------------------------------------------------------------------------


def generated_services() -> dict[str, object]:
    """Every service of the generated sightline.v1 modules, by full name: its descriptor."""
    services = {}
    for module in pkgutil.iter_modules(sightline.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"sightline.v1.{module.name}").DESCRIPTOR
            services |= {service.full_name: service for service in descriptor.services_by_name.values()}
    return services


def generated_methods() -> set[str]:
    """Every RPC of every service in the generated sightline.v1 modules."""
    return {
        f"/{name}/{method.name}"
        for name, service in generated_services().items()
        for method in service.methods  # type: ignore[attr-defined]
    }


def test_every_rpc_has_roles_and_every_entry_is_an_rpc() -> None:
    methods = generated_methods()
    assert {"/sightline.v1.GalleryService/Enroll", "/sightline.v1.ReviewService/ReviewAlert"} <= methods
    assert not methods - set(auth.METHOD_ROLES), "RPCs without roles: add them to auth._TABLE"
    assert not set(auth.METHOD_ROLES) - methods, "roles for RPCs that do not exist"
    assert all(auth.METHOD_ROLES[m] for m in methods)


def test_roles_follow_the_duties() -> None:
    roles = auth.METHOD_ROLES
    assert roles[ENROL] == roles["/sightline.v1.GalleryService/EraseSubject"] == {Role.ENROLLER}
    assert roles["/sightline.v1.GalleryService/Search"] == {Role.OPERATOR, Role.ENROLLER}
    assert roles[REVIEW] == {Role.REVIEWER}
    assert roles[AUDIT] == roles["/sightline.v1.AuditService/VerifyChain"] == {Role.AUDITOR}
    assert roles["/sightline.v1.DetectionService/Detect"] == {Role.OPERATOR}
    assert auth.is_open("/grpc.health.v1.Health/Check") and auth.is_open(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
    assert not auth.is_open(ENROL)


def test_docs_show_the_role_table() -> None:
    docs = (REPO / "docs" / "security.md").read_text()
    assert auth.method_table_markdown() in docs, "docs/security.md: paste `sightline auth methods` into the table"


# -- servicers and the services they implement --------------------------------------------------------------------

SERVICERS = (  # every servicer the services' main() register
    "sightline.matching.service.GalleryServicer",
    "sightline.matching.watchlists.WatchlistServicer",
    "sightline.decision.review.servicer.ReviewServicer",
    "sightline.common.audit.AuditServicer",
    "sightline.capture.service.CaptureServicer",
    "sightline.capture.kiosk.servicer.KioskServicer",
    "sightline.detection.service.DetectionServicer",
    "sightline.embedding.service.EmbeddingServicer",
    "sightline.matching.shards.ShardServicer",
)


def test_every_service_has_a_servicer_named_and_registered_from_the_generated_code() -> None:
    services = generated_services()
    implemented = {}
    for path in SERVICERS:
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        service = rpc.grpc_service(cls)
        implemented[service.full_name] = cls
        assert service.register.__name__ == f"add_{service.full_name.rsplit('.', 1)[-1]}Servicer_to_server"
        # Subclassing the generated base gives every RPC a stub answering UNIMPLEMENTED: the servicer must override
        # them all itself.
        stubs = [
            m.name
            for m in services[service.full_name].methods  # type: ignore[attr-defined]
            if getattr(cls, m.name).__module__.startswith("sightline.v1.")
        ]
        assert stubs == [], f"{path} leaves {stubs} unimplemented"
    assert set(implemented) == set(services)
    assert "sightline.v1.GalleryService" in implemented and "sightline.v1.AuditService" in implemented


def test_a_servicer_is_named_by_its_one_generated_base_class() -> None:
    class Echo(capture_pb2_grpc.CaptureServiceServicer):
        def Ingest(self, request: object, context: object) -> object:
            return request

    servicer = runtime.Servicer.of(Echo())
    assert servicer.service.full_name == "sightline.v1.CaptureService"
    assert servicer.service.register is capture_pb2_grpc.add_CaptureServiceServicer_to_server

    class Plain:
        pass

    class Both(capture_pb2_grpc.CaptureServiceServicer, detection_pb2_grpc.DetectionServiceServicer):
        pass

    for cls in (Plain, Both):
        with pytest.raises(TypeError, match="exactly one generated sightline.v1"):
            runtime.Servicer.of(cls())

    class Incomplete(capture_pb2_grpc.CaptureServiceServicer):
        pass  # Ingest left to the generated base, which would answer UNIMPLEMENTED: refused at start-up instead

    with pytest.raises(TypeError, match="does not implement Ingest of sightline.v1.CaptureService"):
        runtime.Servicer.of(Incomplete())


# -- admission ----------------------------------------------------------------------------------------------------


def refused(policy: AccessPolicy, method: str, authorization: str | None = None, cn: str = "") -> AccessDenied:
    with pytest.raises(AccessDenied) as caught:
        policy.admit(method, authorization, cn)
    return caught.value


def test_the_right_role_is_admitted_as_its_principal(policy: AccessPolicy) -> None:
    assert policy.admit(ENROL, bearer("erin-token")) == Caller("erin", frozenset({Role.ENROLLER}))
    assert policy.admit(LIST, "bearer   erin-token") == Caller("erin", frozenset({Role.ENROLLER}))
    assert policy.admit("/grpc.health.v1.Health/Check") is None  # open: no credentials, no caller


def test_missing_or_unknown_credentials_are_unauthenticated(policy: AccessPolicy) -> None:
    cases = (
        (None, "needs credentials"),
        (bearer("guess"), "not known here"),
        ("Basic ZXJpbjp4", "must be 'Bearer <token>'"),
        ("Bearer", "'Bearer <token>'"),
    )
    for authorization, message in cases:
        denial = refused(policy, ENROL, authorization)
        assert denial.code == "UNAUTHENTICATED" and denial.principal == "" and message in denial.reason


def test_a_missing_role_is_permission_denied_and_says_which(policy: AccessPolicy) -> None:
    denial = refused(policy, REVIEW, bearer("erin-token"))
    assert denial.code == "PERMISSION_DENIED" and denial.principal == "erin"
    assert "needs the role reviewer" in denial.reason and "(has enroller)" in denial.reason
    assert refused(policy, "/sightline.v1.GalleryService/Nope", bearer("erin-token")).reason.endswith(
        "is not in the role table, so nobody may call it"
    )


def test_a_verified_client_certificate_names_its_principal(policy: AccessPolicy) -> None:
    assert policy.admit("/sightline.v1.KioskService/OpenSession", None, "gate-3.kiosks.example").principal == "gate-3"
    assert refused(policy, ENROL, None, "gate-3.kiosks.example").code == "PERMISSION_DENIED"
    assert "CN=stranger is not mapped" in refused(policy, LIST, None, "stranger").reason
    assert policy.admit(ENROL, bearer("erin-token"), "gate-3.kiosks.example").principal == "erin"  # the token wins


def test_not_required_admits_calls_without_credentials_but_checks_the_others() -> None:
    lenient = AccessPolicy([principal("erin", Role.ENROLLER, token="erin-token")], required=False)
    assert lenient.admit(REVIEW) is None
    assert refused(lenient, REVIEW, bearer("erin-token")).code == "PERMISSION_DENIED"
    assert refused(lenient, REVIEW, bearer("stolen")).code == "UNAUTHENTICATED"


def test_the_tokens_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(auth.dump_principals([principal("erin", Role.ENROLLER, token="old")]))
    policy = AccessPolicy(tokens_file=path, recheck_s=0)
    assert policy.admit(ENROL, bearer("old")).principal == "erin"
    path.write_text(auth.dump_principals([principal("erin", Role.ENROLLER, token="rotated-token")]))
    os.utime(path, ns=(1, 1))  # a new stamp even within the file system's time resolution
    assert policy.admit(ENROL, bearer("rotated-token")).principal == "erin"
    assert refused(policy, ENROL, bearer("old")).code == "UNAUTHENTICATED"  # revoked without a restart
    path.write_text("- {principal: broken")
    os.utime(path, ns=(2, 2))
    assert policy.admit(ENROL, bearer("rotated-token")).principal == "erin"  # a broken edit keeps the last good file


def test_principal_of_names_the_admitted_caller() -> None:
    assert principal_of(None) == ""  # type: ignore[arg-type]  # outside a call
    with auth.authenticated_as(Caller("rita", frozenset({Role.REVIEWER}))):
        assert principal_of(None) == "rita"  # type: ignore[arg-type]
    assert auth.current_caller() is None


# -- settings and outgoing tokens ---------------------------------------------------------------------------------


def test_settings_turn_authentication_on_with_a_tokens_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "SIGHTLINE_AUTH_TOKENS_FILE",
        "SIGHTLINE_AUTH_REQUIRED",
        "SIGHTLINE_AUTH_TOKEN",
        "SIGHTLINE_CONFIG_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not AuthSettings().enforced and AccessPolicy.from_settings() is None
    path = tmp_path / "tokens.yaml"
    path.write_text(auth.dump_principals([principal("erin", Role.ENROLLER, token="t")]))
    monkeypatch.setenv("SIGHTLINE_AUTH_TOKENS_FILE", str(path))
    assert AuthSettings().enforced and AccessPolicy.from_settings().required  # type: ignore[union-attr]
    monkeypatch.setenv("SIGHTLINE_AUTH_REQUIRED", "false")
    assert not AccessPolicy.from_settings().required  # type: ignore[union-attr]
    monkeypatch.delenv("SIGHTLINE_AUTH_TOKENS_FILE")
    monkeypatch.setenv("SIGHTLINE_AUTH_REQUIRED", "true")
    with pytest.raises(ValidationError, match="no SIGHTLINE_AUTH_TOKENS_FILE says who may call"):
        AuthSettings()


def test_outgoing_token_prefers_the_process_then_the_user_then_a_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SIGHTLINE_AUTH_TOKEN", "SIGHTLINE_TOKEN", "SIGHTLINE_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    auth.remember_stack_token(["127.0.0.1:1"], "stack")
    try:
        assert auth.outgoing_token("127.0.0.1:1") == "stack"
        assert auth.outgoing_token("10.0.0.9:1") == ""  # a stack's token never goes elsewhere
        monkeypatch.setenv("SIGHTLINE_TOKEN", "person")
        assert auth.outgoing_token("127.0.0.1:1") == auth.outgoing_token("10.0.0.9:1") == "person"
        monkeypatch.setenv("SIGHTLINE_AUTH_TOKEN", "service")
        assert auth.outgoing_token("127.0.0.1:1") == "service"
    finally:
        auth.forget_stack_token(["127.0.0.1:1"])
    assert auth.outgoing_token("127.0.0.1:1") == "service"


def test_the_process_token_is_read_once_per_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SIGHTLINE_AUTH_REQUIRED", "SIGHTLINE_AUTH_TOKENS_FILE", "SIGHTLINE_TOKEN", "SIGHTLINE_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SIGHTLINE_AUTH_TOKEN", "service")
    auth._own_token.cache_clear()
    assert [auth.outgoing_token(f"10.0.0.{n}:1") for n in range(5)] == ["service"] * 5
    assert auth._own_token.cache_info().misses == 1  # the settings were built once for five channels
    monkeypatch.setenv("SIGHTLINE_AUTH_TOKEN", "rotated")
    assert auth.outgoing_token("10.0.0.1:1") == "rotated"  # a changed environment is read anew


def test_invalid_auth_settings_mean_no_process_token_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("SIGHTLINE_AUTH_TOKENS_FILE", "SIGHTLINE_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    # A server-side setting that makes AuthSettings invalid must not break a command that only makes a channel.
    monkeypatch.setenv("SIGHTLINE_AUTH_REQUIRED", "true")
    monkeypatch.setenv("SIGHTLINE_AUTH_TOKEN", "service-secret")
    monkeypatch.setenv("SIGHTLINE_TOKEN", "person")
    with caplog.at_level(logging.WARNING, logger="sightline.common.auth"):
        assert auth.outgoing_token("127.0.0.1:1") == "person"
        with rpc.channel("127.0.0.1:1"):
            pass
    (warning,) = [r.getMessage() for r in caplog.records if "SIGHTLINE_AUTH_TOKEN" in r.getMessage()]
    assert "no SIGHTLINE_AUTH_TOKENS_FILE says who may call" in warning
    assert "service-secret" not in caplog.text


# -- tokens in clear text -------------------------------------------------------------------------------------------


def test_loopback_targets_are_told_from_the_others() -> None:
    local = [
        "127.0.0.1:50054",
        "127.8.9.10:1",
        "localhost:50054",
        "LOCALHOST",
        "[::1]:50054",
        "::1",
        "dns:///localhost:50054",
        "dns://8.8.8.8/127.0.0.1:1",
        "ipv4:127.0.0.1:1,127.0.0.2:2",
        "ipv6:[::1]:1",
        "[::ffff:127.0.0.1]:1",
        "unix:/run/sightline.sock",
        "unix:///run/sightline.sock",
    ]
    remote = [
        "10.1.2.3:50054",
        "sightline-matching:50054",
        "matching.sightline.svc.cluster.local:50054",
        "localhost.example.org:1",
        "[2001:db8::1]:1",
        "dns:///sightline-detection:50052",
        "ipv4:127.0.0.1:1,10.0.0.1:2",
        "0.0.0.0:50054",
    ]
    assert [t for t in local if not is_local_address(t)] == []
    assert [t for t in remote if is_local_address(t)] == []


def test_a_token_is_not_sent_in_clear_text_to_another_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SIGHTLINE_AUTH_TOKEN", "SIGHTLINE_TOKEN", "SIGHTLINE_CONFIG_FILE", "SIGHTLINE_AUTH_REQUIRED"):
        monkeypatch.delenv(name, raising=False)
    plaintext = TlsSettings()
    with pytest.raises(PlaintextTokenError) as refused:
        rpc.channel("sightline-matching:50054", token="secret-token", tls=plaintext)
    message = str(refused.value)
    assert "sightline-matching:50054" in message and "secret-token" not in message
    assert "SIGHTLINE_TLS_CA_FILE" in message and "SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS=true" in message
    with rpc.channel("127.0.0.1:50054", token="secret-token", tls=plaintext):  # loopback: this machine only
        pass
    with rpc.channel("sightline-matching:50054", token="", tls=plaintext):  # no token, nothing to protect
        pass
    with rpc.channel("sightline-matching:50054", token="secret-token", tls=TlsSettings(allow_plaintext_tokens=True)):
        pass
    # The process's own token is held to the same rule, and the setting comes from the environment too.
    monkeypatch.setenv("SIGHTLINE_AUTH_TOKEN", "service-token")
    with pytest.raises(PlaintextTokenError):
        rpc.channel("10.0.0.9:50052")
    monkeypatch.setenv("SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS", "true")
    with rpc.channel("10.0.0.9:50052"):
        pass


def test_the_cli_says_why_it_will_not_send_a_token_in_clear_text(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "SIGHTLINE_TLS_CA_FILE",
        "SIGHTLINE_TLS_CLIENT_CERT_FILE",
        "SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS",
        "SIGHTLINE_CONFIG_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as stopped:
        endpoints.connect("decision", "decision.example.org:50055", token="alice-token")
    assert str(stopped.value).startswith(
        "error: refusing to send a bearer token in clear text to decision.example.org:50055"
    )


# -- the local stack's files and the CLI ----------------------------------------------------------------------------


def test_the_local_stack_writes_private_tokens(tmp_path: Path) -> None:
    extra = [principal("alice", Role.REVIEWER, token="alice-token")]
    tokens = localstack.write_tokens(tmp_path, extra)
    for name in (localstack.TOKENS_FILE, localstack.CLIENT_TOKEN_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert tokens.admin not in (tmp_path / localstack.TOKENS_FILE).read_text()  # hashes only
    assert localstack.client_token(tmp_path) == tokens.admin
    policy = AccessPolicy(tokens_file=tmp_path / localstack.TOKENS_FILE)
    assert policy.admit(AUDIT, bearer(tokens.admin)).principal == localstack.ADMIN_PRINCIPAL
    matching, capture = tokens.services["matching"], tokens.services["capture"]
    assert policy.admit("/sightline.v1.DetectionService/Detect", bearer(matching)).principal == "service:matching"
    assert refused(policy, ENROL, bearer(matching)).code == "PERMISSION_DENIED"
    assert policy.admit(ENROL, bearer(capture)).principal == "service:capture"  # kiosk session templates
    assert policy.admit(REVIEW, bearer("alice-token")).principal == "alice"
    assert localstack.write_tokens(tmp_path).admin != tokens.admin  # fresh on every start


def test_the_local_stack_gives_every_service_the_one_audit_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIGHTLINE_AUDIT_DATABASE_URL", raising=False)
    stack = localstack.LocalStack(tmp_path, ports="auto")
    stack._tokens = localstack.write_tokens(stack.run_dir)  # as start() does, without starting anything
    urls = {name: stack._service_env(name, "")["SIGHTLINE_AUDIT_DATABASE_URL"] for name in localstack.SERVICES}
    assert set(urls) == {"capture", "detection", "embedding", "matching", "decision"}
    assert set(urls.values()) == {f"sqlite:///{stack.run_dir / localstack.AUDIT_DB}"}  # refusals of all, one chain
    monkeypatch.setenv("SIGHTLINE_AUDIT_DATABASE_URL", "postgresql://audit@db/sightline")
    assert stack._service_env("detection", "")["SIGHTLINE_AUDIT_DATABASE_URL"] == "postgresql://audit@db/sightline"


def auth_cli(argv: list[str]) -> int:
    """``sightline auth ...`` through the command's own parser."""
    parser = argparse.ArgumentParser(prog="sightline")
    auth_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_makes_a_token_and_its_entry_and_hashes_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert auth_cli(["auth", "new-token", "alice", "--role", "reviewer", "--role", "auditor"]) == 0
    token = err.getvalue().split()[-1]
    (entry,) = auth.parse_principals(out.getvalue())
    assert entry == principal("alice", Role.REVIEWER, Role.AUDITOR, token=token) and token not in out.getvalue()
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    hashed = io.StringIO()
    with redirect_stdout(hashed):
        assert auth_cli(["auth", "hash-token"]) == 0
    assert hashed.getvalue().strip() == entry.token_sha256


def test_new_tokens_are_distinct_and_never_look_like_an_option() -> None:
    tokens = {auth.new_token() for _ in range(3000)}  # about 47 would start with "-" by chance
    assert len(tokens) == 3000 and not any(token.startswith("-") for token in tokens)
    assert all(len(token) == 43 for token in tokens)
