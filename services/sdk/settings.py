"""The SDK's settings (``SIGHTLINE_SDK_*``, ``SIGHTLINE_SUBSCRIBER_*``): where the APIs are, timeouts, the subscriber.

Read like every Sightline setting (environment, secret files, the YAML file's ``sdk`` / ``subscriber`` section,
then the defaults below), so an integration is configured the way the services are. Bearer tokens are not settings
of their own: a client sends the token it is given, else ``$SIGHTLINE_TOKEN`` (``auth.outgoing_token``); TLS is
``SIGHTLINE_TLS_*`` (``common/tls.py``); the broker is ``SIGHTLINE_KAFKA_*`` (``common/config.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sightline.common import paths
from sightline.common.config import SightlineSettings
from sightline.common.ports import GRPC_PORTS

LOCALHOST = "127.0.0.1"


class ClientSettings(SightlineSettings):
    """Where ``SightlineClient`` finds the gRPC APIs, and how long it waits for them."""

    config_section: ClassVar[str] = "sdk"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_SDK_", extra="ignore")

    matching_addr: str = Field(
        f"{LOCALHOST}:{GRPC_PORTS['matching']}",
        description="host:port of the gallery and watchlist APIs (the matching service; any shard).",
    )
    decision_addr: str = Field(
        f"{LOCALHOST}:{GRPC_PORTS['decision']}", description="host:port of the review and audit APIs (decision)."
    )
    capture_addr: str = Field(
        f"{LOCALHOST}:{GRPC_PORTS['capture']}", description="host:port of the kiosk API (capture)."
    )
    timeout_s: float = Field(30.0, gt=0, description="Longest wait for one call, seconds (enrolment excepted).")
    enroll_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for one enrolment or 1:1/1:N search call (the images are analysed)."
    )


class SubscriberSettings(SightlineSettings):
    """How a ``Subscriber`` reads its topics and where it keeps the ids it has handled."""

    config_section: ClassVar[str] = "subscriber"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_SUBSCRIBER_", extra="ignore")

    store_dir: Path = Field(
        default_factory=lambda: paths.sightline_home() / "subscribers",
        description="Folder of the handled-id stores, one SQLite file per consumer group (<group>.sqlite) unless a "
        "subscriber names its own store (default <home>/subscribers).",
    )
    start_from: Literal["earliest", "latest"] = Field(
        "earliest",
        description="Where a new consumer group starts reading: everything the topics retain, or only new records "
        "(not reliable on the embedded Tansu broker, whose end offsets are wrong: docs/broker.md). A group that has "
        "committed offsets resumes from them either way.",
    )
    max_poll_records: int = Field(
        100, ge=1, description="Records fetched at once; their offsets are committed once all of them are handled."
    )
    poll_timeout_s: float = Field(0.5, gt=0, description="Longest wait in one fetch for new records, seconds.")
    purge_interval_s: float = Field(
        600.0, gt=0, description="How often handled ids older than their topic's retention are dropped from the store."
    )
