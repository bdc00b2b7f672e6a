"""Forward confirmed alerts to a webhook: every alert that human review CONFIRMED is POSTed as a CloudEvent.

Subscribes to ``sightline.alerts.v1`` as the consumer group ``--group`` and, for each alert whose status is
CONFIRMED (the two-person rule passed), POSTs the event in the CloudEvents JSON format
(``Content-Type: application/cloudevents+json``) to URL, with ``Idempotency-Key: <ce_id>``. Alerts still pending or
rejected are skipped. Each confirmed alert is sent once: the subscriber skips ids it has handled and resumes where it
stopped; the one alert whose POST was in flight when the forwarder was killed is sent again with the same
idempotency key, which the receiver uses to drop the repeat. A receiver that answers 5xx or cannot be reached is
retried with backoff; a 4xx stops the forwarder (exit 1) without committing that alert, so it comes again on the
next run.

    python examples/forward_alerts_to_webhook.py https://hooks.example.org/sightline --local-stack

It reads the broker only (``--bootstrap`` or ``$SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS``, TLS and SASL as
``SIGHTLINE_KAFKA_*`` say). Alerts hold ids and scores only, no face data.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sightline.common.topics import ALERTS
from sightline.sdk import CLOUDEVENTS_JSON, Event, Subscriber
from sightline.sdk.options import add_connection_options, kafka_from
from sightline.v1 import events_pb2

log = logging.getLogger("forward_alerts_to_webhook")


class ReceiverRefused(RuntimeError):
    """The webhook answered 4xx: sending the same request again would not help."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the webhook: each confirmed alert is POSTed there")
    parser.add_argument("--group", default="alerts-webhook", help="consumer group (default alerts-webhook)")
    parser.add_argument("--store", type=Path, help="handled-id store (default <home>/subscribers/<group>.sqlite)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the webhook (default 10)")
    parser.add_argument("--retries", type=int, default=5, help="tries for a failing webhook (default 5)")
    parser.add_argument("--idle-exit", type=float, metavar="SECONDS", help="exit after this long without an alert")
    add_connection_options(parser, grpc=False)
    return parser.parse_args(argv)


def post(url: str, event: Event, timeout: float) -> None:
    """One POST of the event; ReceiverRefused on 4xx, OSError (URLError, HTTPError 5xx) when worth a retry."""
    request = urllib.request.Request(
        url,
        data=event.to_json().encode(),
        method="POST",
        headers={"Content-Type": CLOUDEVENTS_JSON, "Idempotency-Key": event.id},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as error:
        if 400 <= error.code < 500:
            raise ReceiverRefused(f"{url} refused alert {event.id}: HTTP {error.code}") from None
        raise


def forwarder(url: str, timeout: float, retries: int) -> tuple[dict[str, int], Callable[[Event], None]]:
    """The handler, and its counts of alerts sent and skipped."""
    counts = {"sent": 0, "skipped": 0}

    def forward(event: Event) -> None:
        alert = event.payload(events_pb2.Alert)
        if alert.status != events_pb2.ALERT_STATUS_CONFIRMED:
            counts["skipped"] += 1
            return
        for attempt in range(1, retries + 1):
            try:
                post(url, event, timeout)
                break
            except OSError as error:
                if attempt == retries:
                    raise
                log.warning("webhook failed (%s); try %d of %d in %d s", error, attempt + 1, retries, 2**attempt)
                time.sleep(2**attempt)
        counts["sent"] += 1
        log.info("forwarded confirmed alert %s (subject %s)", alert.alert_id, alert.subject_id)

    return counts, forward


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # the client's connection chatter
    args = parse_args(argv)
    counts, forward = forwarder(args.url, args.timeout, args.retries)
    subscriber = Subscriber([ALERTS.name], args.group, kafka=kafka_from(args), store=args.store)
    signal.signal(signal.SIGTERM, lambda *_: subscriber.stop())  # finish the current alert, commit, leave
    try:
        with subscriber:
            subscriber.run(forward, idle_timeout_s=args.idle_exit)
    except (ReceiverRefused, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    print(f"{counts['sent']} confirmed alert(s) forwarded, {counts['skipped']} other alert update(s) skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
