"""TLS and mutual TLS for gRPC: which certificates a server presents and asks for, and which a client trusts and shows.

Every Sightline process is a server, and some are clients too (matching calls detection and embedding; the CLI calls
everything), so one settings class (``SIGHTLINE_TLS_*``) describes both sides. A server with a certificate speaks
TLS only; with a client CA as well, it requires and verifies a client certificate on every connection (mutual TLS).
A client uses TLS when it has a CA bundle or a client certificate. Files are PEM, read when a server starts or a
channel is made, so a renewed certificate is picked up by the next restart (servers) or channel (clients).

A bearer token is a password: ``refuse_plaintext_token`` keeps a client from sending one in clear text to anything but
this machine (loopback), unless ``allow_plaintext_tokens`` says the network in between is trusted.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import ClassVar

import grpc
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from sightline.common.config import SightlineSettings


class TlsError(ValueError):
    """A channel or server cannot be made as the TLS settings say: a certificate, key or CA bundle cannot be read (the
    message names the setting and the file), or a token would go unencrypted (``PlaintextTokenError``)."""


class PlaintextTokenError(TlsError):
    """A bearer token would travel in clear text to another machine; the message names the address and the fixes."""


class TlsSettings(SightlineSettings):
    """TLS of the gRPC servers and clients (``SIGHTLINE_TLS_*``); the same for every service and the CLI."""

    config_section: ClassVar[str] = "tls"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_TLS_", extra="ignore")

    server_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain the gRPC server presents; with server_key_file the server speaks "
        "TLS only. Its names must cover the addresses clients dial (and 127.0.0.1 for the container health probe).",
    )
    server_key_file: Path | None = Field(None, description="PEM private key of server_cert_file.")
    client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle that signs client certificates. Set: every connection must present a "
        "certificate it verifies (mutual TLS). Needs server_cert_file.",
    )
    ca_file: Path | None = Field(
        None,
        description="PEM CA bundle this process trusts for the servers it calls. Set (or client_cert_file "
        "set): outgoing calls use TLS.",
    )
    client_cert_file: Path | None = Field(
        None,
        description="PEM certificate this process presents on its outgoing calls (for servers that require "
        "mutual TLS); with client_key_file.",
    )
    client_key_file: Path | None = Field(None, description="PEM private key of client_cert_file.")
    allow_plaintext_tokens: bool = Field(
        False,
        description="Send bearer tokens over plaintext (non-TLS) channels to other machines too. Only inside a "
        "network you trust, e.g. a cluster with NetworkPolicies: anyone who can read the traffic can replay the "
        "tokens. false: a token goes in clear text to loopback addresses only (127.0.0.0/8, ::1, localhost).",
    )

    @model_validator(mode="after")
    def _pairs_complete(self) -> TlsSettings:
        for cert, key in (("server_cert_file", "server_key_file"), ("client_cert_file", "client_key_file")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(f"SIGHTLINE_TLS_{cert.upper()} and SIGHTLINE_TLS_{key.upper()} go together: set both")
        if self.client_ca_file is not None and self.server_cert_file is None:
            raise ValueError(
                "SIGHTLINE_TLS_CLIENT_CA_FILE needs SIGHTLINE_TLS_SERVER_CERT_FILE: mutual TLS is TLS first"
            )
        return self

    @property
    def server_tls(self) -> bool:
        return self.server_cert_file is not None

    @property
    def client_tls(self) -> bool:
        return self.ca_file is not None or self.client_cert_file is not None


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials (client certificates required when a client CA is set); None for plaintext."""
    if settings.server_cert_file is None or settings.server_key_file is None:
        return None
    pair = (_read(settings.server_key_file, "server_key_file"), _read(settings.server_cert_file, "server_cert_file"))
    client_ca = _read(settings.client_ca_file, "client_ca_file") if settings.client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """A client's TLS credentials (the system's trust store when no CA bundle is set); None for plaintext."""
    if not settings.client_tls:
        return None
    ca = _read(settings.ca_file, "ca_file") if settings.ca_file else None
    key = _read(settings.client_key_file, "client_key_file") if settings.client_key_file else None
    cert = _read(settings.client_cert_file, "client_cert_file") if settings.client_cert_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def refuse_plaintext_token(address: str, settings: TlsSettings) -> None:
    """Raise PlaintextTokenError unless a token may go to ``address`` over a plaintext channel: the address is on
    this machine (loopback or a Unix socket), or ``allow_plaintext_tokens`` is set."""
    if settings.allow_plaintext_tokens or is_local_address(address):
        return
    raise PlaintextTokenError(
        f"refusing to send a bearer token in clear text to {address}: configure TLS for the call "
        "(SIGHTLINE_TLS_CA_FILE, and the server's SIGHTLINE_TLS_SERVER_CERT_FILE/KEY_FILE), or, only inside a network "
        "you trust (e.g. a cluster with NetworkPolicies), set SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS=true"
    )


def is_local_address(address: str) -> bool:
    """Whether a gRPC target stays on this machine: every host it names is loopback (127.0.0.0/8, ::1, localhost),
    or it is a Unix socket. Understands ``host:port``, ``[v6]:port``, ``dns:``, ``ipv4:`` and ``ipv6:`` targets."""
    target = address.strip()
    scheme, _, rest = target.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme in ("ipv4", "ipv6"):
        return all(_is_loopback_host(_host_of(part)) for part in rest.split(","))
    if scheme == "dns":
        target = rest.split("/")[-1] if rest.startswith("//") else rest
    return _is_loopback_host(_host_of(target))


def _host_of(target: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (a bare IPv6 address is its own host)."""
    if target.startswith("["):
        return target[1:].split("]", 1)[0]
    return target.rsplit(":", 1)[0] if target.count(":") == 1 else target


def _is_loopback_host(host: str) -> bool:
    host = host.strip().rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # any other name may resolve anywhere
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _read(path: Path, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TlsError(f"SIGHTLINE_TLS_{setting.upper()}: cannot read {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"SIGHTLINE_TLS_{setting.upper()}: {path} is not PEM (no -----BEGIN line)")
    return data
