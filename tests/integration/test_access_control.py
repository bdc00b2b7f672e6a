"""Access control on real gRPC servers on 127.0.0.1: bearer tokens and roles in front of the decision service's real
Review and Audit servicers on SQLite, every refusal audited (repeats aggregated, so that a flood of bad calls cannot
flood the chain); then mutual TLS with certificates made here.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sightline.common.audit import AuditLog, AuditRecord, AuditServicer, principal_of
from sightline.common.auth import AccessPolicy, Denial, Principal, Role, hash_token
from sightline.common.denials import DenialAudit
from sightline.common.rpc import GrpcServer, channel
from sightline.common.tls import TlsSettings, server_credentials
from sightline.decision.review.recorder import AlertRecorder
from sightline.decision.review.servicer import ReviewServicer
from sightline.decision.review.store import ReviewStore
from sightline.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    capture_pb2,
    capture_pb2_grpc,
    events_pb2,
    review_pb2,
    review_pb2_grpc,
)

TOKENS = {
    "rita": "rita-token-0123456789abcdef0123456789",
    "abe": "abe-token-0123456789abcdef0123456789",
    "erin": "erin-token-0123456789abcdef0123456789",
    "otto": "otto-token-0123456789abcdef0123456789",
}
ROLES = {"rita": Role.REVIEWER, "abe": Role.AUDITOR, "erin": Role.ENROLLER, "otto": Role.OPERATOR}


class EchoCapture(capture_pb2_grpc.CaptureServiceServicer):
    """A streaming method that reports, in each response, the principal the servicer sees for the call."""

    def Ingest(
        self, request: capture_pb2.IngestRequest, context: grpc.ServicerContext
    ) -> Iterator[capture_pb2.IngestResponse]:
        for frame in range(3):
            yield capture_pb2.IngestResponse(source_id=principal_of(context), frames_read=frame)


@dataclass
class Decision:
    """A real server with the decision service's review and audit APIs, and what it is built on."""

    address: str
    audit: AuditLog
    store: ReviewStore
    server: GrpcServer
    denials: DenialAudit


def principals(cert_cn: str = "") -> list[Principal]:
    made = [Principal(name, frozenset({ROLES[name]}), hash_token(token)) for name, token in TOKENS.items()]
    if cert_cn:
        made.append(Principal("gate-box", frozenset({Role.AUDITOR}), client_cert_cn=cert_cn))
    return made


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Callable[..., Decision]]:
    """Starts decision-like servers (stopped at the end): ``serve(credentials=None, cert_cn="", window_s=60)``."""
    started: list[Decision] = []

    def start(credentials: grpc.ServerCredentials | None = None, cert_cn: str = "", window_s: float = 60) -> Decision:
        url = f"sqlite:///{tmp_path / f'decision-{len(started)}.db'}"
        audit, store = AuditLog.open(url), ReviewStore.open(url)
        denials = DenialAudit(audit, window_s)
        server = GrpcServer(
            "127.0.0.1",
            0,
            workers=4,
            access=AccessPolicy(principals(cert_cn)),
            on_denied=denials,
            credentials=credentials,
        )
        server.add(ReviewServicer(store, audit, lambda _: None))
        server.add(AuditServicer(audit))
        server.add(EchoCapture())
        server.start()
        decision = Decision(f"127.0.0.1:{server.port}", audit, store, server, denials)
        started.append(decision)
        return decision

    yield start
    for decision in started:
        decision.server.stop(0)
        decision.denials.close()
        decision.store.close()
        decision.audit.close()


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code()


def raise_alert(decision: Decision) -> str:
    alert = events_pb2.Alert(
        alert_id="a1b2c3d4e5f6a7b8",
        decision_id="d1",
        source_id="gate-cam",
        subject_id="obama",
        watchlists=["wl"],
        status=events_pb2.ALERT_STATUS_PENDING_REVIEW,
        policy_version="p1",
    )
    alert.raised_at.GetCurrentTime()
    AlertRecorder(decision.store, decision.audit).record(alert)
    return alert.alert_id


# -- bearer tokens and roles ------------------------------------------------------------------------------------------


def test_no_token_is_unauthenticated_and_audited(serve: Callable[..., Decision]) -> None:
    decision = serve()
    reviews = review_pb2_grpc.ReviewServiceStub(channel(decision.address, token=""))
    with pytest.raises(grpc.RpcError) as refused:
        reviews.ListAlerts(review_pb2.ListAlertsRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in refused.value.details()
    unknown = review_pb2_grpc.ReviewServiceStub(channel(decision.address, token="not-a-token"))
    assert (
        code_of(lambda: unknown.ListAlerts(review_pb2.ListAlertsRequest(), timeout=5))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    records = decision.audit.records(action="ACCESS_DENIED")
    assert [(r.principal, r.result, r.details["method"]) for r in records] == [
        ("anonymous", "refused: UNAUTHENTICATED", "/sightline.v1.ReviewService/ListAlerts")
    ] * 2
    assert records[0].details["peer"].startswith("ipv4:127.0.0.1:")
    assert "not-a-token" not in str(records)  # no credentials in the audit trail
    health = health_pb2_grpc.HealthStub(channel(decision.address, token=""))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_wrong_role_is_permission_denied_and_audited_with_the_principal(serve: Callable[..., Decision]) -> None:
    decision = serve()
    as_erin = audit_pb2_grpc.AuditServiceStub(channel(decision.address, token=TOKENS["erin"]))
    with pytest.raises(grpc.RpcError) as refused:
        as_erin.VerifyChain(audit_pb2.VerifyChainRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == (
        "erin may not call sightline.v1.AuditService/VerifyChain: it needs the role auditor (has enroller)"
    )
    as_abe = audit_pb2_grpc.AuditServiceStub(channel(decision.address, token=TOKENS["abe"]))
    listed = as_abe.ListAuditRecords(
        audit_pb2.ListAuditRecordsRequest(action=audit_pb2.AUDIT_ACTION_ACCESS_DENIED), timeout=5
    ).records
    assert [(r.principal, r.result, r.details["method"]) for r in listed] == [
        ("erin", "refused: PERMISSION_DENIED", "/sightline.v1.AuditService/VerifyChain")
    ]
    assert as_abe.VerifyChain(audit_pb2.VerifyChainRequest(), timeout=5).intact


def test_the_right_role_acts_as_its_authenticated_principal(serve: Callable[..., Decision]) -> None:
    decision = serve()
    alert_id = raise_alert(decision)
    as_rita = review_pb2_grpc.ReviewServiceStub(channel(decision.address, token=TOKENS["rita"]))
    confirm = review_pb2.ReviewAlertRequest(alert_id=alert_id, action=review_pb2.REVIEW_ACTION_CONFIRM)
    # A principal claimed in metadata (the old honour system) counts for nothing.
    reviewed = as_rita.ReviewAlert(confirm, metadata=[("x-sightline-principal", "mallory")], timeout=5)
    assert [r.reviewer for r in reviewed.reviews] == ["rita"]
    (record,) = decision.audit.records(action="REVIEW")
    assert record.principal == "rita" and record.result == "PENDING_REVIEW"
    # The operator may not review; the refusal is audited with who tried.
    as_otto = review_pb2_grpc.ReviewServiceStub(channel(decision.address, token=TOKENS["otto"]))
    assert code_of(lambda: as_otto.ReviewAlert(confirm, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    assert [r.principal for r in decision.audit.records(action="ACCESS_DENIED")] == ["otto"]
    assert decision.audit.verify().intact


def test_a_streaming_method_is_guarded_and_sees_its_caller(serve: Callable[..., Decision]) -> None:
    decision = serve()
    as_otto = capture_pb2_grpc.CaptureServiceStub(channel(decision.address, token=TOKENS["otto"]))
    assert [r.source_id for r in as_otto.Ingest(capture_pb2.IngestRequest(), timeout=5)] == ["otto"] * 3
    as_rita = capture_pb2_grpc.CaptureServiceStub(channel(decision.address, token=TOKENS["rita"]))
    assert (
        code_of(lambda: list(as_rita.Ingest(capture_pb2.IngestRequest(), timeout=5)))
        == grpc.StatusCode.PERMISSION_DENIED
    )


# -- refusal flooding -------------------------------------------------------------------------------------------------


def denied(audit: AuditLog) -> list[AuditRecord]:
    return audit.records(action="ACCESS_DENIED")


def wait_for_records(audit: AuditLog, count: int, timeout_s: float = 10.0) -> list[AuditRecord]:
    deadline = time.monotonic() + timeout_s
    while len(records := denied(audit)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return records


def test_repeated_refusals_are_audited_once_then_counted_when_the_window_closes(serve: Callable[..., Decision]) -> None:
    decision = serve(window_s=2.0)
    stolen = review_pb2_grpc.ReviewServiceStub(channel(decision.address, token="guessed-token"))
    for _ in range(25):  # a client hammering the port with a bad token
        assert (
            code_of(lambda: stolen.ListAlerts(review_pb2.ListAlertsRequest(), timeout=5))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    first = denied(decision.audit)
    assert len(first) == 1 and "repeats" not in first[0].details  # the first refusal, at once
    first_record, summary = wait_for_records(decision.audit, 2)
    assert summary.principal == "anonymous" and summary.result == "refused: UNAUTHENTICATED"
    assert summary.details["repeats"] == "24" and summary.details["window_s"] == "2"
    assert summary.details["method"] == first_record.details["method"] == "/sightline.v1.ReviewService/ListAlerts"
    assert summary.details["peer"] == "ipv4:127.0.0.1"  # the client, whatever its connections' ports
    # A new window: the next refusal is audited at once again.
    assert (
        code_of(lambda: stolen.ListAlerts(review_pb2.ListAlertsRequest(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    )
    assert len(denied(decision.audit)) == 3
    assert decision.audit.verify().intact


def test_each_kind_of_refusal_is_audited_and_open_counts_are_written_at_shutdown(
    serve: Callable[..., Decision],
) -> None:
    decision = serve()  # a minute's window: nothing closes during the test
    as_erin = audit_pb2_grpc.AuditServiceStub(channel(decision.address, token=TOKENS["erin"]))
    as_otto = audit_pb2_grpc.AuditServiceStub(channel(decision.address, token=TOKENS["otto"]))
    for _ in range(3):
        for stub in (as_erin, as_otto):
            assert (
                code_of(lambda s=stub: s.VerifyChain(audit_pb2.VerifyChainRequest(), timeout=5))
                == grpc.StatusCode.PERMISSION_DENIED
            )
        assert (
            code_of(lambda: as_erin.ListAuditRecords(audit_pb2.ListAuditRecordsRequest(), timeout=5))
            == grpc.StatusCode.PERMISSION_DENIED
        )
    kinds = [(r.principal, r.details["method"].rsplit("/", 1)[1]) for r in denied(decision.audit)]
    assert kinds == [("erin", "VerifyChain"), ("otto", "VerifyChain"), ("erin", "ListAuditRecords")]
    decision.server.stop(0)
    decision.denials.close()  # as run_service does when the service stops, before the log closes
    counted = {
        (r.principal, r.details["method"].rsplit("/", 1)[1]): r.details["repeats"] for r in denied(decision.audit)[3:]
    }
    assert counted == {("erin", "VerifyChain"): "2", ("otto", "VerifyChain"): "2", ("erin", "ListAuditRecords"): "2"}
    assert decision.audit.verify().intact


def test_too_many_kinds_at_once_are_counted_together(tmp_path: Path) -> None:
    """A client cycling through source addresses cannot write a record per address: past max_kinds, it is counted."""
    with AuditLog.open(f"sqlite:///{tmp_path / 'audit.db'}") as audit:
        denials = DenialAudit(audit, window_s=60, max_kinds=3)
        for host in range(10):
            for port in (40001, 40002):  # two connections from each address: one kind
                denials(
                    Denial(
                        "UNAUTHENTICATED",
                        "",
                        "/sightline.v1.GalleryService/Enroll",
                        "the bearer token is not known here",
                        f"ipv6:[2001:db8::{host}]:{port}",
                    )
                )
        assert [r.details["peer"] for r in denied(audit)] == [f"ipv6:[2001:db8::{h}]:40001" for h in range(3)]
        denials.close()
        repeats = {(r.principal, r.details["peer"]): r.details["repeats"] for r in denied(audit)[3:]}
        assert repeats == {("anonymous", f"ipv6:[2001:db8::{h}]"): "1" for h in range(3)} | {("*", "*"): "14"}
        assert audit.verify().intact


def test_a_service_without_a_trail_of_its_own_audits_refusals_where_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capture, detection and embedding open the audit log only when SIGHTLINE_AUDIT_DATABASE_URL is set."""
    for name in ("SIGHTLINE_AUDIT_DATABASE_URL", "SIGHTLINE_CONFIG_FILE", "SIGHTLINE_SECRETS_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert AuditLog.open_if_configured() is None  # refusals are then logged only
    url = f"sqlite:///{tmp_path / 'shared-audit.db'}"
    monkeypatch.setenv("SIGHTLINE_AUDIT_DATABASE_URL", url)
    audit = AuditLog.open_if_configured()
    assert audit is not None
    denials = DenialAudit(audit)
    server = GrpcServer("127.0.0.1", 0, workers=2, access=AccessPolicy(principals()), on_denied=denials)
    server.add(EchoCapture())
    server.start()
    try:
        as_rita = capture_pb2_grpc.CaptureServiceStub(channel(f"127.0.0.1:{server.port}", token=TOKENS["rita"]))
        assert (
            code_of(lambda: list(as_rita.Ingest(capture_pb2.IngestRequest(), timeout=5)))
            == grpc.StatusCode.PERMISSION_DENIED
        )
    finally:
        server.stop(0)
        denials.close()
        audit.close()
    with AuditLog.open(url, create=False) as shared:  # as matching or decision read it
        assert [(r.principal, r.details["method"]) for r in denied(shared)] == [
            ("rita", "/sightline.v1.CaptureService/Ingest")
        ]


# -- mutual TLS ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the server does not trust
    rogue_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier | None,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(_key_pem(key))
    return path.with_suffix(".crt"), path.with_suffix(".key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a rogue client."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Sightline test CA", ca_key, None, ca_key, None)
    rogue_ca = _certificate("Rogue CA", rogue_ca_key, None, rogue_ca_key, None)
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    server = _certificate("decision", keys[0], ca.subject, ca_key, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client = _certificate("gate-box.example", keys[1], ca.subject, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _certificate("gate-box.example", keys[2], rogue_ca.subject, rogue_ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        folder / "ca.crt",
        *_write(folder / "server", server, keys[0]),
        *_write(folder / "client", client, keys[1]),
        *_write(folder / "rogue", rogue, keys[2]),
    )


@pytest.fixture()
def mtls(serve: Callable[..., Decision], pki: Pki) -> Decision:
    settings = TlsSettings(server_cert_file=pki.server_cert, server_key_file=pki.server_key, client_ca_file=pki.ca)
    return serve(server_credentials(settings), cert_cn="gate-box.example")


def audit_stub(decision: Decision, tls: TlsSettings, token: str = "") -> audit_pb2_grpc.AuditServiceStub:
    return audit_pb2_grpc.AuditServiceStub(channel(decision.address, token=token, tls=tls))


def test_mutual_tls_call_with_a_token_or_by_certificate(mtls: Decision, pki: Pki) -> None:
    client = TlsSettings(ca_file=pki.ca, client_cert_file=pki.client_cert, client_key_file=pki.client_key)
    assert audit_stub(mtls, client, TOKENS["abe"]).VerifyChain(audit_pb2.VerifyChainRequest(), timeout=5).intact
    # Without a token, the verified certificate's common name is the principal (gate-box: auditor).
    assert audit_stub(mtls, client).VerifyChain(audit_pb2.VerifyChainRequest(), timeout=5).intact
    as_certificate = review_pb2_grpc.ReviewServiceStub(channel(mtls.address, token="", tls=client))
    assert (
        code_of(lambda: as_certificate.ReviewAlert(review_pb2.ReviewAlertRequest(), timeout=5))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert [r.principal for r in mtls.audit.records(action="ACCESS_DENIED")] == ["gate-box"]


def test_over_tls_a_token_may_go_to_any_address(pki: Pki) -> None:
    """The clear-text rule is for plaintext channels: over TLS the token is encrypted for the server it names."""
    with channel("decision.sightline.svc:50055", token=TOKENS["abe"], tls=TlsSettings(ca_file=pki.ca)):
        pass


def test_clients_without_a_trusted_certificate_or_without_tls_are_refused(mtls: Decision, pki: Pki) -> None:
    verify = audit_pb2.VerifyChainRequest()
    no_certificate = TlsSettings(ca_file=pki.ca)
    rogue = TlsSettings(ca_file=pki.ca, client_cert_file=pki.rogue_cert, client_key_file=pki.rogue_key)
    distrusting = TlsSettings(client_cert_file=pki.client_cert, client_key_file=pki.client_key)  # system CAs only
    for tls in (no_certificate, rogue, distrusting):
        assert (
            code_of(lambda tls=tls: audit_stub(mtls, tls, TOKENS["abe"]).VerifyChain(verify, timeout=5))
            == grpc.StatusCode.UNAVAILABLE
        )  # the handshake fails: no call reaches the server
    plaintext = TlsSettings()
    assert (
        code_of(lambda: audit_stub(mtls, plaintext, TOKENS["abe"]).VerifyChain(verify, timeout=5))
        == grpc.StatusCode.UNAVAILABLE
    )
    assert mtls.audit.records() == []  # nothing got far enough to be refused by access control
