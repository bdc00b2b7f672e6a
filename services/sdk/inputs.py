"""What the SDK accepts where the APIs take an image: the encoded bytes (JPEG, PNG...) or the path of a file."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from sightline.sdk.errors import SightlineError

Image = bytes | str | os.PathLike[str]


def image_bytes(image: Image) -> bytes:
    """The encoded image: bytes as they are, a path read; SightlineError naming the file when it cannot be read."""
    if isinstance(image, bytes):
        return image
    path = Path(image)
    try:
        return path.read_bytes()
    except OSError as error:
        raise SightlineError(f"cannot read the image {path}: {error.strerror}") from None


def timestamp(at: datetime) -> Timestamp:
    """A protobuf timestamp; a naive datetime is taken as UTC."""
    stamp = Timestamp()
    stamp.FromDatetime(at if at.tzinfo is not None else at.replace(tzinfo=UTC))
    return stamp
