"""TLS and mutual TLS for gRPC: which certificates a server presents and asks for, and which a client trusts and shows.

Every Sightline process is a server, and some are clients too (matching calls detection and embedding; the CLI calls
everything), so one settings class (``SIGHTLINE_TLS_*``) describes both sides. A server with a certificate speaks
TLS only; with a client CA as well, it requires and verifies a client certificate on every connection (mutual TLS).
A client uses TLS when it has a CA bundle or a client certificate. Files are PEM, read when a server starts or a
channel is made, so a renewed certificate is picked up by the next restart (servers) or channel (clients).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import grpc
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from sightline.common.config import SightlineSettings


class TlsError(ValueError):
    """A configured certificate, key or CA bundle cannot be read; the message names the setting and the file."""


class TlsSettings(SightlineSettings):
    """TLS of the gRPC servers and clients (``SIGHTLINE_TLS_*``); the same for every service and the CLI."""

    config_section: ClassVar[str] = "tls"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_TLS_", extra="ignore")

    server_cert_file: Path | None = Field(
        None, description="PEM certificate chain the gRPC server presents; with server_key_file the server speaks "
        "TLS only. Its names must cover the addresses clients dial (and 127.0.0.1 for the container health probe).",
    )  # fmt: skip
    server_key_file: Path | None = Field(None, description="PEM private key of server_cert_file.")
    client_ca_file: Path | None = Field(
        None, description="PEM CA bundle that signs client certificates. Set: every connection must present a "
        "certificate it verifies (mutual TLS). Needs server_cert_file.",
    )  # fmt: skip
    ca_file: Path | None = Field(
        None, description="PEM CA bundle this process trusts for the servers it calls. Set (or client_cert_file "
        "set): outgoing calls use TLS.",
    )  # fmt: skip
    client_cert_file: Path | None = Field(
        None, description="PEM certificate this process presents on its outgoing calls (for servers that require "
        "mutual TLS); with client_key_file.",
    )  # fmt: skip
    client_key_file: Path | None = Field(None, description="PEM private key of client_cert_file.")

    @model_validator(mode="after")
    def _pairs_complete(self) -> TlsSettings:
        for cert, key in (("server_cert_file", "server_key_file"), ("client_cert_file", "client_key_file")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(f"SIGHTLINE_TLS_{cert.upper()} and SIGHTLINE_TLS_{key.upper()} go together: set both")
        if self.client_ca_file is not None and self.server_cert_file is None:
            raise ValueError("SIGHTLINE_TLS_CLIENT_CA_FILE needs SIGHTLINE_TLS_SERVER_CERT_FILE: mutual TLS is TLS first")
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


def _read(path: Path, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TlsError(f"SIGHTLINE_TLS_{setting.upper()}: cannot read {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"SIGHTLINE_TLS_{setting.upper()}: {path} is not PEM (no -----BEGIN line)")
    return data
