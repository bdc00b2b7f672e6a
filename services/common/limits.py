"""How long the strings and lists of a gRPC request may be: one table for every Sightline API.

(What a request may *contain*; what calls may *hold* of a server, threads and streams, is ``serverlimits.py``.)

Every ``rpc.GrpcServer`` checks each request of every method but health and reflection against these limits before
its handler runs, so a 10,000-character subject id or a million-entry list is refused with INVALID_ARGUMENT naming the
field, and the refusal is audited like an access refusal (``denials.py``), instead of reaching a store, a log line or
the audit chain. A servicer calls nothing for this. The limits are outer bounds: a service may check a field more
strictly (an id's characters, how many images one Enroll takes). To check a message that did not come through a
server (an event read from a topic), call ``violation(message)``: None, or the reason to refuse it.

A string's limit is chosen by the field's name (``TEXT_LIMITS``), else ``ID_CHARS``: ids, names, page tokens and
watchlist names are short; free text a person typed (a purpose, a review comment, a reason) may be longer. Every list
and map may hold at most ``MAX_ITEMS`` entries. Bytes fields (images, chips) are bounded by the message size
(``rpc.MAX_MESSAGE_BYTES``), not here. Fields of nested messages are checked too and named by their path
(``watchlist.purpose``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

ID_CHARS = 256  # ids, names, page tokens: anything that is a key somewhere
TEXT_CHARS = 4096  # free text a person wrote
URI_CHARS = 2048  # a source to read (RTSP URLs carry paths and queries)
MAX_ITEMS = 1000  # entries of any repeated or map field

TEXT_LIMITS: dict[str, int] = {
    "purpose": TEXT_CHARS,
    "comment": TEXT_CHARS,
    "reason": TEXT_CHARS,
    "details": TEXT_CHARS,  # the values of a details map
    "reference": TEXT_CHARS,  # an erasure's case reference, often a sentence
    "source_uri": URI_CHARS,
}
"""Strings whose limit is not ``ID_CHARS``, by field name (wherever the field is, nested or not)."""


def violation(message: Message) -> str | None:
    """Why ``message`` is over a limit, naming the field and the limit (never its value); None when it is within.

    The text is the same for every request over the same limit, so that repeated refusals aggregate in the audit.
    """
    return next(_violations(message, ""), None)


def _violations(message: Message, prefix: str) -> Iterator[str]:
    for field, value in message.ListFields():  # only the fields that are set: the cost follows the request
        path = f"{prefix}{field.name}"
        if _is_map(field):
            yield from _map_violations(field, value, path)
        elif field.is_repeated:
            if len(value) > MAX_ITEMS:
                yield f"{path}: more than {MAX_ITEMS} entries"
            for item in value:
                yield from _value_violations(field, item, path)
        else:
            yield from _value_violations(field, value, path)


def _map_violations(field: FieldDescriptor, value: Any, path: str) -> Iterator[str]:
    if len(value) > MAX_ITEMS:
        yield f"{path}: more than {MAX_ITEMS} entries"
    entry = field.message_type
    assert entry is not None  # a map field is a repeated message of its generated entry type, always set
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    for key in value:
        yield from _value_violations(key_field, key, f"{path} key")
        # A map's values take the map's name ("details"), not the entry's generic "value".
        yield from _value_violations(value_field, value[key], path, limit_name=field.name)


def _value_violations(field: FieldDescriptor, value: Any, path: str, limit_name: str = "") -> Iterator[str]:
    if field.type == FieldDescriptor.TYPE_STRING:
        limit = TEXT_LIMITS.get(limit_name or field.name, ID_CHARS)
        if len(value) > limit:
            yield f"{path}: longer than {limit} characters"
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        yield from _violations(value, f"{path}.")


def _is_map(field: FieldDescriptor) -> bool:
    # message_type is set on every message field; the check only tells the type checker so.
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )
