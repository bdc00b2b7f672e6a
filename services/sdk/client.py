"""``SightlineClient``: the gRPC APIs an integration calls, with one object per API and typed errors.

    from sightline.sdk import SightlineClient

    with SightlineClient(token=my_token) as client:
        client.watchlists.create("staff", purpose="building access")
        client.gallery.enroll("alice", ["alice1.jpg", "alice2.jpg"], watchlists=["staff"])
        for alert in client.review.alerts("PENDING_REVIEW"):
            ...

``client.gallery`` and ``client.watchlists`` talk to matching, ``client.review`` and ``client.audit`` to decision,
``client.kiosk`` to capture, each at the address its settings give (``ClientSettings``, ``SIGHTLINE_SDK_*``) unless
one is passed. Every channel is Sightline's own (``common/rpc.py``): the bearer token, TLS as ``SIGHTLINE_TLS_*`` say
(or the ``tls`` given), and a refusal to send a token in clear text to another machine (``ConfigurationError``).
Channels are opened on first use and closed by ``close()`` or the ``with`` block. A client is safe to share between
threads.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Self

from sightline.common.tls import TlsSettings
from sightline.sdk.audit import AuditApi
from sightline.sdk.connection import Connection
from sightline.sdk.gallery import GalleryApi
from sightline.sdk.kiosk import KioskApi
from sightline.sdk.review import ReviewApi
from sightline.sdk.settings import ClientSettings
from sightline.sdk.watchlists import WatchlistApi


class SightlineClient:
    """The gallery, watchlist, review, audit and kiosk APIs of one Sightline installation."""

    def __init__(
        self,
        settings: ClientSettings | None = None,
        *,
        token: str | None = None,
        tls: TlsSettings | None = None,
        matching: str | None = None,
        decision: str | None = None,
        capture: str | None = None,
    ) -> None:
        """``token``: the bearer token to send (None: ``$SIGHTLINE_TOKEN``, or this process's own; "": none).
        ``tls``: None reads ``SIGHTLINE_TLS_*``. ``matching``, ``decision``, ``capture``: addresses that override
        the settings'."""
        self.settings = settings or ClientSettings()
        timeout = self.settings.timeout_s
        self._connections = {
            "matching": Connection(matching or self.settings.matching_addr, token, tls, timeout),
            "decision": Connection(decision or self.settings.decision_addr, token, tls, timeout),
            "capture": Connection(capture or self.settings.capture_addr, token, tls, timeout),
        }
        self.gallery = GalleryApi(self._connections["matching"], self.settings.enroll_timeout_s)
        self.watchlists = WatchlistApi(self._connections["matching"])
        self.review = ReviewApi(self._connections["decision"])
        self.audit = AuditApi(self._connections["decision"])
        self.kiosk = KioskApi(self._connections["capture"])

    @classmethod
    def for_local_stack(cls, run_dir: Path | None = None, *, token: str | None = None) -> SightlineClient:
        """A client for the stack ``sightline up`` runs (from ``run_dir``, default the usual run dir), as its local
        administrator unless ``token`` says otherwise; ConfigurationError when no stack runs there."""
        from sightline.sdk.local import local_stack

        endpoints = local_stack(run_dir)
        return cls(
            token=endpoints.token if token is None else token,
            matching=endpoints.addresses.get("matching"),
            decision=endpoints.addresses.get("decision"),
            capture=endpoints.addresses.get("capture"),
        )

    @property
    def addresses(self) -> dict[str, str]:
        """The address each service is called at."""
        return {service: connection.address for service, connection in self._connections.items()}

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
