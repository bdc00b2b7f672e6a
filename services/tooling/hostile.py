"""Hostile input for fuzzing: broken and bomb images, protobuf messages with every field set to something nasty, and
corrupted records, all drawn from a ``random.Random`` so that one seed always gives the same inputs.

Used by the fuzz tests (tests/fuzz/): in-process with a Random that hypothesis drives (``st.randoms()``), so a
failure shrinks and replays; against a running stack with a seeded Random, for thousands of inputs. What it makes:

- ``HostileImages``: valid tiny images of many formats and modes, the same bytes mutated (bytes flipped, cut,
  repeated, 32-bit fields set to extremes), headers claiming huge sizes (decompression bombs), random bytes, nothing.
- ``hostile_message``: a protobuf message of any type with fields drawn from edge values: empty, very long, control
  characters and path or URL tricks for strings; boundaries for integers; NaN, infinities, -0 for floats; unknown
  values for enums; invalid timestamps; hostile images for image-like bytes fields; nested messages to a depth.
- ``corrupt``: serialized bytes truncated, flipped, with unknown fields appended, or replaced by garbage.
- ``hostile_headers``: Kafka record headers with broken trace context, capture times and CloudEvents attributes.

Nothing here talks to a service; the generators only make values.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import yaml
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from PIL import Image

from sightline.common.codec import TIMESTAMP_MAX_SECONDS, TIMESTAMP_MIN_SECONDS

# Strings that have broken parsers, paths, queries and logs elsewhere.
NASTY_STRINGS = (
    "",
    " ",
    "\x00",
    "\n",
    "a\nb",
    "\r\n\t",
    "\u202e",  # right-to-left override
    "\ufeff",
    "é",
    "ß",
    "٣",  # an Arabic-Indic digit: isdigit() is true
    "😀",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/dev/zero",
    "/dev/urandom",
    "file:///etc/shadow",
    "rtsp://169.254.169.254/latest/meta-data",
    "http://127.0.0.1:9101/metrics",
    "%s%s%n%x",
    "{0}{1}",
    "' OR 1=1 --",
    '"; DROP TABLE templates; --',
    "*",
    "<script>",
    "NaN",
    "-1",
    "0",
    "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<",
    "Bearer ",
    "a:b:c",
    "demo-camera:0a0a03ad:x",
)
# Integer edge values per protobuf type (a value outside the type's range cannot be set).
_INT_EDGES = {
    "int32": (0, 1, -1, 2**31 - 1, -(2**31)),
    "int64": (0, 1, -1, 2**63 - 1, -(2**63), 2**53 + 1),
    "uint32": (0, 1, 2**32 - 1, 2**31),
    "uint64": (0, 1, 2**64 - 1, 2**63),
}
_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
_FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 3.4e38, -3.4e38, float("nan"), float("inf"), float("-inf"))
_DOUBLE_EDGES = (*_FLOAT_EDGES, 1e308, -1e308, 5e-324)
_IMAGE_FIELDS = ("image", "photo", "portrait", "document", "page", "frame_bytes")
_T = FieldDescriptor


# --- images ---------------------------------------------------------------------------------------------------------


def _encoded(mode: str, size: tuple[int, int], fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 7).save(buffer, fmt, **options)
    return buffer.getvalue()


def _seed_images() -> list[bytes]:
    """Tiny valid images of every format and mode decode_image accepts (and a few it must refuse cleanly)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: exercises the EXIF transpose
    made = [
        _encoded("RGB", (17, 9), "PNG"),
        _encoded("RGBA", (9, 17), "PNG"),
        _encoded("LA", (5, 5), "PNG"),
        _encoded("1", (33, 3), "PNG"),
        _encoded("P", (8, 8), "GIF"),
        _encoded("RGB", (16, 16), "JPEG", exif=exif),
        _encoded("L", (16, 8), "JPEG", progressive=True),
        _encoded("CMYK", (8, 8), "JPEG"),
        _encoded("I;16", (8, 4), "TIFF"),
        _encoded("I", (4, 4), "TIFF"),
        _encoded("F", (4, 4), "TIFF"),
        _encoded("RGB", (6, 6), "TIFF", compression="tiff_lzw", exif=exif),
        _encoded("RGB", (6, 6), "BMP"),
        _encoded("RGB", (6, 6), "WEBP", lossless=True),
        _encoded("RGB", (6, 6), "PPM"),
        _encoded("RGBA", (16, 16), "ICO"),
    ]
    animated = io.BytesIO()
    Image.new("P", (8, 8)).save(animated, "GIF", save_all=True, append_images=[Image.new("P", (8, 8), 3)])
    return [*made, animated.getvalue()]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (valid CRCs) over a few bytes of data: refused from the header
    alone when over the pixel limit, never decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = zlib.compress(b"\x00" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


@dataclass
class HostileImages:
    """Image-like bytes: valid tiny images, mutations of them, bombs, random bytes and nothing.

    ``extra_seeds`` adds real photos (say, a face) to mutate: mutations of a real JPEG reach deeper into a decoder
    than those of an 8x8 one.
    """

    extra_seeds: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        self.seeds = [*_seed_images(), *self.extra_seeds]

    def image(self, rng: random.Random) -> bytes:
        kind = rng.random()
        if kind < 0.15:
            return rng.choice(self.seeds)
        if kind < 0.75:
            return mutate(rng.choice(self.seeds), rng)
        if kind < 0.82:
            return png_bomb(rng.choice((0, 1, 65_535, 2**31 - 1, 2**32 - 1)), rng.choice((0, 1, 40_000, 2**31 - 1)))
        if kind < 0.97:
            return random_bytes(rng, rng.choice((1, 4, 16, 300)))
        return b""


def random_bytes(rng: random.Random, max_size: int) -> bytes:
    return rng.randbytes(rng.randint(0, max_size))


_EXTREMES = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x01\x00\x00")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-8 mutations of ``data``: a byte set, the tail cut, random bytes inserted, a 32-bit field set to an extreme,
    a run repeated."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        operation = rng.randrange(5)
        if operation == 0 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif operation == 1 and out:
            del out[rng.randrange(len(out)) :]
        elif operation == 2:
            at = rng.randrange(len(out) + 1)
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif operation == 3 and len(out) > 4:
            at = rng.randrange(len(out) - 4)
            out[at : at + 4] = rng.choice(_EXTREMES)
        elif operation == 4 and out:
            at = rng.randrange(len(out))
            out[at:at] = out[at : at + rng.randint(1, 64)]
    return bytes(out)


# --- strings and numbers --------------------------------------------------------------------------------------------


def hostile_text(rng: random.Random, max_length: int = 300) -> str:
    """A nasty string: one of NASTY_STRINGS, random code points (no surrogates: they cannot travel as UTF-8), a long
    run, or a mix."""
    kind = rng.random()
    if kind < 0.45:
        return rng.choice(NASTY_STRINGS)
    if kind < 0.8:
        return "".join(_code_point(rng) for _ in range(rng.randint(1, 24)))
    if kind < 0.9:
        return rng.choice("a<0 é") * rng.randint(1, max_length)
    return rng.choice(NASTY_STRINGS) + "".join(_code_point(rng) for _ in range(rng.randint(0, 8)))


def _code_point(rng: random.Random) -> str:
    limit = rng.choice((0x7F, 0xFF, 0xFFFF, 0x10FFFF))
    point = rng.randint(0, limit)
    return chr(point) if not 0xD800 <= point <= 0xDFFF else "?"


def _integer(rng: random.Random, kind: str) -> int:
    if rng.random() < 0.6:
        return rng.choice(_INT_EDGES[kind])
    low, high = _INT_RANGES[kind]
    return rng.randint(max(low, -1000), min(high, 100_000))


def _float(rng: random.Random, double: bool) -> float:
    if rng.random() < 0.6:
        return rng.choice(_DOUBLE_EDGES if double else _FLOAT_EDGES)
    return rng.uniform(-2.0, 2.0) * rng.choice((1.0, 100.0, 1e6))


# --- protobuf messages ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageShape:
    """How full a hostile message is: the chance each field is set, repeated field lengths, nesting depth."""

    fill: float = 0.6
    max_repeated: int = 4
    max_depth: int = 4


def hostile_message(
    message_type: type[Message],
    rng: random.Random,
    images: HostileImages | None = None,
    shape: MessageShape = MessageShape(),
    known: Mapping[str, Sequence[object]] | None = None,
) -> Message:
    """A message of ``message_type`` whose set fields hold hostile values (see the module docstring).

    ``known``: real values by field name (a subject that exists, a session that is open, a folder capture may read),
    used for half of the fields of that name, so that calls get past "not found" into the code behind it.
    """
    message = message_type()
    _fill(message, _Draw(rng, images or _default_images(), shape, known or {}), shape.max_depth)
    return message


@dataclass(frozen=True)
class _Draw:
    """What drawing one message needs."""

    rng: random.Random
    images: HostileImages
    shape: MessageShape
    known: Mapping[str, Sequence[object]]


_images_cache: list[HostileImages] = []


def _default_images() -> HostileImages:
    if not _images_cache:  # the seed images are encoded once per process
        _images_cache.append(HostileImages())
    return _images_cache[0]


def _fill(message: Message, draw: _Draw, depth: int) -> None:
    descriptor: Descriptor = message.DESCRIPTOR
    if descriptor.full_name == "google.protobuf.Timestamp":
        seconds, nanos = hostile_timestamp(draw.rng)
        message.seconds, message.nanos = seconds, nanos  # type: ignore[attr-defined]
        return
    for field in descriptor.fields:
        if draw.rng.random() > draw.shape.fill:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _fill_map(message, field, draw)
        elif field.is_repeated:
            for _ in range(draw.rng.randint(0, draw.shape.max_repeated)):
                _append(message, field, draw, depth)
        elif field.type == _T.TYPE_MESSAGE:
            if depth > 0:
                _fill(getattr(message, field.name), draw, depth - 1)
        else:
            setattr(message, field.name, _scalar(field, draw))


def _append(message: Message, field: FieldDescriptor, draw: _Draw, depth: int) -> None:
    values = getattr(message, field.name)
    if field.type == _T.TYPE_MESSAGE:
        if depth > 0:
            _fill(values.add(), draw, depth - 1)
    else:
        values.append(_scalar(field, draw))


def _fill_map(message: Message, field: FieldDescriptor, draw: _Draw) -> None:
    entry = field.message_type
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    mapping = getattr(message, field.name)
    for _ in range(draw.rng.randint(0, draw.shape.max_repeated)):
        key = _scalar(key_field, draw)
        if value_field.type == _T.TYPE_MESSAGE:
            _fill(mapping[key], draw, 0)
        else:
            mapping[key] = _scalar(value_field, draw)


def _scalar(field: FieldDescriptor, draw: _Draw) -> object:
    rng, kind = draw.rng, field.type
    known = draw.known.get(field.name)
    if known and rng.random() < 0.5:
        return rng.choice(known)
    make = _SCALARS.get(kind)
    if make is not None:
        return make(rng)
    if kind == _T.TYPE_ENUM:
        values = [value.number for value in field.enum_type.values]
        return rng.choice(values) if rng.random() < 0.7 else rng.choice((-1, 99, 2**31 - 1))
    if kind == _T.TYPE_BYTES:
        if any(part in field.name for part in _IMAGE_FIELDS):
            return draw.images.image(rng)
        return random_bytes(rng, rng.choice((0, 16, 512)))
    if kind == _T.TYPE_STRING:
        return hostile_text(rng)
    raise TypeError(f"no hostile values for field {field.full_name} of type {kind}")


_SCALARS: dict[int, Callable[[random.Random], object]] = {
    _T.TYPE_INT32: lambda rng: _integer(rng, "int32"),
    _T.TYPE_SINT32: lambda rng: _integer(rng, "int32"),
    _T.TYPE_SFIXED32: lambda rng: _integer(rng, "int32"),
    _T.TYPE_INT64: lambda rng: _integer(rng, "int64"),
    _T.TYPE_SINT64: lambda rng: _integer(rng, "int64"),
    _T.TYPE_SFIXED64: lambda rng: _integer(rng, "int64"),
    _T.TYPE_UINT32: lambda rng: _integer(rng, "uint32"),
    _T.TYPE_FIXED32: lambda rng: _integer(rng, "uint32"),
    _T.TYPE_UINT64: lambda rng: _integer(rng, "uint64"),
    _T.TYPE_FIXED64: lambda rng: _integer(rng, "uint64"),
    _T.TYPE_FLOAT: lambda rng: _float(rng, double=False),
    _T.TYPE_DOUBLE: lambda rng: _float(rng, double=True),
    _T.TYPE_BOOL: lambda rng: rng.random() < 0.5,
}


def hostile_timestamp(rng: random.Random) -> tuple[int, int]:
    """(seconds, nanos): mostly valid (now-ish, the epoch, the range's ends), sometimes outside the valid range."""
    kind = rng.random()
    if kind < 0.5:
        return rng.randint(1_600_000_000, 1_900_000_000), rng.randint(0, 999_999_999)
    if kind < 0.7:
        return rng.choice((0, 1, TIMESTAMP_MIN_SECONDS, TIMESTAMP_MAX_SECONDS)), rng.choice((0, 999_999_999))
    return rng.choice((TIMESTAMP_MAX_SECONDS + 1, TIMESTAMP_MIN_SECONDS - 1, 2**62, -(2**62), 0)), rng.choice(
        (0, -1, 1_000_000_000, 2**31 - 1)
    )


# --- records --------------------------------------------------------------------------------------------------------


def corrupt(data: bytes, rng: random.Random) -> bytes:
    """Serialized bytes damaged the way a broken producer or a bit-rotten log damages them."""
    kind = rng.random()
    if kind < 0.3 and data:
        return data[: rng.randrange(len(data))]  # truncated
    if kind < 0.55:
        return mutate(data, rng)
    if kind < 0.7:  # an unknown field appended: a newer producer, or smuggled content
        return data + bytes([rng.choice((0xF8, 0xFA, 0x7A)), 0x01]) + rng.randbytes(4)
    if kind < 0.8:  # a length-delimited field claiming more bytes than follow
        return data + b"\x0a\xff\xff\xff\x0f"
    if kind < 0.9:  # nested far past the parser's recursion limit
        return b"\x0a\x02" * 200 + b"\x0a\x00"
    return random_bytes(rng, 64)


def hostile_headers(rng: random.Random) -> list[tuple[str, bytes]]:
    """Record headers a broken or hostile producer sends: bad trace context, capture times, CloudEvents attributes."""
    choices: list[tuple[str, bytes]] = [
        ("traceparent", rng.choice((b"", b"00-zz-zz-01", b"\xff\xfe", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01"))),
        ("tracestate", random_bytes(rng, 40)),
        ("sightline-captured-at", rng.choice((b"", b"0", b"-5", b"9" * 40, b"1e9", b"\x00", b"1700000000000"))),
        ("ce_specversion", rng.choice((b"1.0", b"\xff", b""))),
        ("ce_id", random_bytes(rng, 30)),
        ("ce_time", rng.choice((b"not a time", b"9999-99-99T00:00:00Z", b""))),
        ("content-type", rng.choice((b"application/json", b"\x00"))),
        (hostile_text(rng, 20), random_bytes(rng, 20)),
    ]
    return rng.sample(choices, rng.randint(0, 3))


# --- YAML configuration ---------------------------------------------------------------------------------------------


def hostile_yaml(rng: random.Random, sections: Sequence[str], names: Sequence[str]) -> str:
    """A YAML document as a typo, the wrong file or an attacker makes one: ``sections`` holding settings ``names``
    with hostile values, sections that are not mappings, broken syntax, nesting thousands deep, an alias bomb."""
    kind = rng.random()
    if kind < 0.05:
        return "[" * rng.choice((50, 1000)) + "]" * rng.choice((0, 50))
    if kind < 0.1:
        return alias_bomb(rng.choice(sections) if sections else "kafka", rng.choice(names) if names else "x")
    document: object
    if kind < 0.8:
        document = {
            section: {name: _yaml_value(rng, 2) for name in rng.sample(list(names), min(len(names), 3))}
            if rng.random() < 0.8
            else _yaml_value(rng, 1)
            for section in rng.sample(list(sections), min(len(sections), 3))
        }
    else:
        document = _yaml_value(rng, 3)
    text = yaml.safe_dump(document, allow_unicode=True)
    if rng.random() < 0.2:  # cut anywhere and finished with something that breaks the parse
        broken = rng.choice(("{", ": [", "&a", "*b", "\t", "!!python/object:os.system", "%YAML 9", "\x00", "'"))
        text = text[: rng.randrange(len(text) + 1)] + broken
    return text


def alias_bomb(section: str, name: str, levels: int = 9) -> str:
    """A few lines of YAML whose anchors expand to 9**levels strings (the "billion laughs")."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"{section}: {{{name}: *l{levels - 1}}}"]) + "\n"


def _yaml_value(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(8 if depth > 0 else 6)
    if kind == 0:
        return rng.choice((0, 1, -1, 2**31, 2**63, 2**70, -(2**70)))
    if kind == 1:
        return rng.choice((0.0, -0.0, 1e308, -1e-308, float("nan"), float("inf"), 0.5))
    if kind == 2:
        return hostile_text(rng, 80)
    if kind == 3:
        return rng.choice((True, False, None, "true", "null", "", "~", "0x10", "1e999", "2020-01-01", "/tmp"))
    if kind == 4:
        return rng.choice((b"\xff\x00", "sqlite:///x.db", "postgresql://u:p@h/db", "127.0.0.1:0", "*"))
    if kind == 5:
        return rng.choice(NASTY_STRINGS)
    if kind == 6:
        return [_yaml_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(("a", "version", "echannel", 1, None, True)): _yaml_value(rng, depth - 1) for _ in range(2)}
