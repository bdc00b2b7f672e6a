"""Typed configuration shared by every Sightline process.

Each settings class reads, in order of precedence: environment variables (``SIGHTLINE_<SECTION>_<FIELD>``), secret
files in ``$SIGHTLINE_SECRETS_DIR`` (one file per field, named like its environment variable, e.g.
``SIGHTLINE_MATCHING_TEMPLATE_KEY``, as Kubernetes mounts a Secret's keys), the
section of the YAML file named by ``$SIGHTLINE_CONFIG_FILE``, and the documented defaults. Values are validated when
a service starts, so a typo fails fast with the field's name instead of misbehaving later.

Every YAML file Sightline reads (this one, the decision policy, the tokens file) goes through ``parse_yaml``, so a
broken file fails the same way everywhere: a ``ValueError`` naming the file, never a parser's own exception, a
recursion error from a file nested thousands deep, or minutes spent on an alias bomb (a few lines whose anchors expand
to millions of values).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SecretsSettingsSource, SettingsConfigDict

from sightline.common import paths

# A YAML document with more values than this (counting every alias where it is used) is refused: real configuration
# has hundreds.
MAX_YAML_VALUES = 100_000
# libyaml's parser when PyYAML has it (the wheels do): the same safe constructors, and a nesting limit that refuses a
# document nested thousands deep in milliseconds (the pure-Python parser takes seconds to hit the recursion limit).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str, where: str) -> Any:
    """The YAML document in ``text`` (safe_load); ValueError naming ``where`` when it is not YAML, nests too deep to
    read, or expands (through aliases) to more than MAX_YAML_VALUES values."""
    try:
        document = yaml.load(text, Loader=_SAFE_LOADER)  # a safe loader: plain data, never objects
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: not valid YAML: {error}") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to read") from None
    if _exceeds(document, MAX_YAML_VALUES):
        raise ValueError(f"{where}: more than {MAX_YAML_VALUES} values once its aliases are expanded")
    return document


def _exceeds(document: Any, limit: int) -> bool:
    """Whether the document holds more than ``limit`` values; stops counting there (an alias bomb is never walked)."""
    pending, count = [document], 0
    while pending:
        value = pending.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


class _YamlSection(PydanticBaseSettingsSource):
    """Reads one section of the YAML file named by ``$SIGHTLINE_CONFIG_FILE``."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._values = self._load(getattr(settings_cls, "config_section", ""))

    @staticmethod
    def _load(section: str) -> dict[str, Any]:
        path = os.environ.get("SIGHTLINE_CONFIG_FILE")
        if not path or not section:
            return {}
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"cannot read SIGHTLINE_CONFIG_FILE {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"SIGHTLINE_CONFIG_FILE {path} is not UTF-8 text") from None
        document = parse_yaml(text, path) or {}
        if not isinstance(document, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
        values = document.get(section) or {}
        # Settings are keyword arguments: a list, a number or a key that is not a name cannot be one.
        if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
            raise ValueError(f"{path}: section {section!r} must be a mapping of setting names to values")
        return dict(values)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class SightlineSettings(BaseSettings):
    """Base of every settings class: env vars, then secret files, then the YAML file section, then defaults."""

    config_section: ClassVar[str] = ""
    model_config = SettingsConfigDict(extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        secrets_dir = os.environ.get("SIGHTLINE_SECRETS_DIR")
        secrets = SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir) if secrets_dir else file_secret_settings
        return init_settings, env_settings, secrets, _YamlSection(settings_cls)


class KafkaSettings(SightlineSettings):
    """How every service reaches the Kafka cluster (``SIGHTLINE_KAFKA_*``); configured once for all services."""

    config_section: ClassVar[str] = "kafka"
    model_config = SettingsConfigDict(env_prefix="SIGHTLINE_KAFKA_", extra="ignore")

    bootstrap_servers: str = Field("127.0.0.1:19092", description="Comma-separated host:port list of brokers.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when the protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (prefer a secret file).")
    ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers' certificates.")
    session_timeout_ms: int = Field(
        6000, ge=1000, description="Consumer group session timeout. Small values make group joins fast on Tansu."
    )
    heartbeat_interval_ms: int = Field(1500, ge=100, description="Consumer heartbeat interval.")
    fetch_max_wait_ms: int = Field(
        500,
        ge=1,
        le=5000,
        description="Longest a stream consumer's fetch waits for data. Kafka answers as soon as data arrives, so "
        "this only bounds idle polling; Tansu holds every fetch this long, so the local stack sets 25.",
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024 * 1024, description="Largest event a producer may send (frames are the largest)."
    )
    stall_exit_s: float = Field(
        90.0,
        ge=0,
        description="A stream service exits (to be restarted by its supervisor or Kubernetes) when its consumer "
        "group has committed nothing for this long while records wait on its input topic: a consumer that lost its "
        "group to a broker outage may never rejoin (common/stall.py). 0: never.",
    )
    default_partitions: int = Field(4, ge=1, description="Partitions of each topic when created by Sightline.")
    replication_factor: int = Field(1, ge=1, description="Replication factor of topics created by Sightline.")

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]


class ServiceSettings(SightlineSettings):
    """What every service process has: its gRPC and metrics ports, logging, and where the models are."""

    grpc_host: str = Field("0.0.0.0", description="Address the gRPC server binds to.")
    grpc_port: int = Field(50050, ge=1, le=65535, description="gRPC port (API and health).")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus metrics port; 0 disables metrics.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(True, description="Log JSON lines (one object per line) instead of plain text.")
    grpc_workers: int = Field(8, ge=1, description="Threads serving gRPC requests.")
    # Server limits (common/serverlimits.py): long-lived streams may never take the threads unary calls need.
    grpc_reserved_workers: int = Field(
        2,
        ge=1,
        description="Worker threads kept for unary calls (health Check, the APIs): at most grpc_workers "
        "minus this many streams that hold a thread (reflection, Ingest, WatchSession) are open at once (at least "
        "one), a third of them (at least one) for reflection, which needs no credentials; more are refused with "
        "RESOURCE_EXHAUSTED.",
    )
    grpc_max_watch_streams: int = Field(
        100,
        ge=1,
        description="Health Watch streams open at once (they hold no thread, and need no credentials); "
        "more are refused with RESOURCE_EXHAUSTED.",
    )
    grpc_max_concurrent_rpcs: int | None = Field(
        None,
        ge=1,
        description="Calls running on or waiting for a worker thread at once; more are refused with "
        "RESOURCE_EXHAUSTED. Unset: four per worker thread.",
    )
    grpc_stream_idle_s: float = Field(
        300.0,
        gt=0,
        description="A stream without a message either way for this long is cancelled (its slot freed), "
        "and a connection without calls for this long is closed.",
    )
    grpc_max_connection_age_s: float = Field(
        0.0,
        ge=0,
        description="A connection older than this is asked to reconnect; calls still open on it get "
        "grpc_stream_idle_s more, then it is closed (this ends an Ingest of a live camera too). 0: no limit.",
    )
    models_dir: Path = Field(
        default_factory=paths.models_dir,
        description="Converted face models (default: $SIGHTLINE_MODELS_DIR, else <home>/models).",
    )
    inference_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads per model session.")
