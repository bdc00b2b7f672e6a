"""Readers for dlib's own binary serialization format (the ``.dat`` model files).

dlib writes its models with ``dlib::serialize``; this module decodes the primitives of
that format so model loaders (the ResNet face descriptor, the 5-point shape predictor)
can be written in plain numpy without dlib itself.

Supported encodings (all little-endian):

* integers (``read_int`` / ``read_uint``): one control byte whose low 4 bits give the
  number of magnitude bytes that follow and whose bit 0x80 marks a negative value, then
  the magnitude bytes, least significant first. Zero is ``01 00``.
* floating point (``read_float`` / ``read_double``): two integers, an int64 mantissa
  and an int16 exponent, value = mantissa * 2**exponent; exponents 32000/32001/32002
  encode +inf/-inf/nan. (dlib's pre-2013 ASCII float format is rejected.)
* ``read_string``: unsigned length, then the raw bytes (decoded as latin-1).
* ``read_bool``: one ASCII byte, ``'1'`` or ``'0'``.
* ``read_byte``: one raw byte (``char`` / ``unsigned char``).
* ``read_float_matrix`` / ``read_double_matrix``: ``dlib::matrix``: rows and columns
  (written negated by current dlib, or as columns-then-rows by very old dlib), then
  the elements in row-major order, each a serialized float.
* ``read_float_vector2``: ``dlib::vector<float,2>`` (x then y).
* ``read_tensor``: ``dlib::tensor`` / ``resizable_tensor``: version, num_samples, k,
  nr, nc, then the data as raw float32 (version 2) or as serialized floats (version 1).
* ``read_alias_tensor``: ``dlib::alias_tensor``: version and its 4-d shape only.
* ``read_sequence``: ``std::vector<T>``: unsigned count, then ``count`` items read
  with a caller-supplied reader.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")

_EXP_INF = 32000
_EXP_NINF = 32001
_EXP_NAN = 32002


class DlibSerializationError(ValueError):
    """Raised when the bytes do not follow dlib's serialization format."""


class DlibDeserializer:
    """Sequential reader over a bytes object holding dlib-serialized data."""

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self._data = memoryview(data).cast("B")
        self._pos = offset

    @property
    def offset(self) -> int:
        """Current read position in bytes."""
        return self._pos

    @property
    def remaining(self) -> int:
        """Number of bytes not yet consumed."""
        return len(self._data) - self._pos

    def at_end(self) -> bool:
        """True when every byte has been consumed."""
        return self._pos >= len(self._data)

    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if end > len(self._data):
            raise DlibSerializationError(f"unexpected end of data at offset {self._pos} (need {n} bytes)")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def peek_byte(self) -> int:
        """Return the next byte without consuming it (-1 at the end of data)."""
        return int(self._data[self._pos]) if self._pos < len(self._data) else -1

    # -- integers -----------------------------------------------------------------
    def read_int(self) -> int:
        """Read a signed integer of any C++ integer type."""
        data, pos = self._data, self._pos
        if pos >= len(data):
            raise DlibSerializationError(f"unexpected end of data at offset {pos}")
        ctrl = data[pos]
        size = ctrl & 0x0F
        if size > 8 or ctrl & 0x70:
            raise DlibSerializationError(f"bad integer control byte 0x{ctrl:02x} at offset {pos}")
        end = pos + 1 + size
        if end > len(data):
            raise DlibSerializationError(f"truncated integer at offset {pos}")
        value = int.from_bytes(data[pos + 1 : end], "little")
        self._pos = end
        return -value if ctrl & 0x80 else value

    def read_uint(self) -> int:
        """Read an unsigned integer; a negative encoding is an error."""
        start = self._pos
        value = self.read_int()
        if value < 0:
            raise DlibSerializationError(f"expected unsigned integer at offset {start}, got {value}")
        return value

    # -- floating point -------------------------------------------------------------
    def read_double(self) -> float:
        """Read a float/double/long double written as mantissa/exponent integers."""
        data = self._data
        if self._pos < len(data) and data[self._pos] & 0x70:
            # dlib's pre-2013 text format; no model we ship uses it.
            raise DlibSerializationError(f"ASCII float encoding at offset {self._pos} is not supported")
        mantissa = self.read_int()
        exponent = self.read_int()
        if exponent < _EXP_INF:
            return math.ldexp(mantissa, exponent)
        if exponent == _EXP_INF:
            return math.inf
        if exponent == _EXP_NINF:
            return -math.inf
        if exponent == _EXP_NAN:
            return math.nan
        raise DlibSerializationError(f"bad float exponent {exponent} at offset {self._pos}")

    def read_float(self) -> float:
        """Read a ``float``; returned as a Python float exactly representable in float32."""
        return float(np.float32(self.read_double()))

    def read_floats(self, count: int) -> np.ndarray:
        """Read ``count`` consecutive serialized floats into a float32 array."""
        # Inlined decoding: model files hold millions of floats and the generic
        # read_int/read_double path is several times slower.
        data, pos, n = self._data, self._pos, len(self._data)
        values = [0.0] * count
        ldexp, from_bytes = math.ldexp, int.from_bytes
        try:
            for i in range(count):
                start = pos
                ctrl = data[pos]
                size = ctrl & 0x0F
                if ctrl & 0x70 or size > 8:
                    raise DlibSerializationError(f"bad float mantissa byte 0x{ctrl:02x} at offset {pos}")
                mantissa = from_bytes(data[pos + 1 : pos + 1 + size], "little")
                if ctrl & 0x80:
                    mantissa = -mantissa
                pos += 1 + size
                ctrl = data[pos]
                size = ctrl & 0x0F
                exponent = from_bytes(data[pos + 1 : pos + 1 + size], "little")
                if ctrl & 0x80:
                    exponent = -exponent
                pos += 1 + size
                if exponent >= _EXP_INF or ctrl & 0x70 or size > 8:
                    # Rare special values: fall back to the careful path.
                    self._pos = start
                    values[i] = self.read_double()
                    pos = self._pos
                    continue
                values[i] = ldexp(mantissa, exponent)
        except IndexError:
            raise DlibSerializationError(f"unexpected end of data while reading {count} floats") from None
        if pos > n:
            raise DlibSerializationError(f"unexpected end of data while reading {count} floats")
        self._pos = pos
        return np.asarray(values, dtype=np.float64).astype(np.float32)

    # -- scalars --------------------------------------------------------------------
    def read_bool(self) -> bool:
        """Read a bool (ASCII '1' / '0')."""
        start = self._pos
        ch = self._take(1)[0]
        if ch == ord("1"):
            return True
        if ch == ord("0"):
            return False
        raise DlibSerializationError(f"bad bool byte 0x{ch:02x} at offset {start}")

    def read_byte(self) -> int:
        """Read one raw byte (dlib's char / unsigned char encoding)."""
        return int(self._take(1)[0])

    def read_string(self) -> str:
        """Read a std::string (length then raw bytes)."""
        n = self.read_uint()
        return bytes(self._take(n)).decode("latin-1")

    def expect_string(self, *allowed: str) -> str:
        """Read a string and check it is one of ``allowed`` (dlib's type/version tags)."""
        start = self._pos
        value = self.read_string()
        if value not in allowed:
            raise DlibSerializationError(f"expected one of {allowed} at offset {start}, got {value!r}")
        return value

    # -- containers -----------------------------------------------------------------
    def read_sequence(self, reader: Callable[[], T]) -> list[T]:
        """Read a std::vector whose items are decoded by ``reader``."""
        return [reader() for _ in range(self.read_uint())]

    def _read_matrix_shape(self) -> tuple[int, int]:
        nr = self.read_int()
        nc = self.read_int()
        if nr < 0 or nc < 0:
            return -nr, -nc
        # Very old dlib wrote columns first and unnegated.
        return nc, nr

    def read_float_matrix(self) -> np.ndarray:
        """Read a ``dlib::matrix<float>`` as a float32 array of shape (rows, cols)."""
        nr, nc = self._read_matrix_shape()
        return self.read_floats(nr * nc).reshape(nr, nc)

    def read_double_matrix(self) -> np.ndarray:
        """Read a ``dlib::matrix<double>`` as a float64 array of shape (rows, cols)."""
        nr, nc = self._read_matrix_shape()
        read = self.read_double
        return np.array([read() for _ in range(nr * nc)], dtype=np.float64).reshape(nr, nc)

    def read_float_vector2(self) -> tuple[float, float]:
        """Read a ``dlib::vector<float,2>`` (a 2-d point) as (x, y)."""
        return self.read_float(), self.read_float()

    # -- dnn tensors ----------------------------------------------------------------
    def read_tensor(self) -> np.ndarray:
        """Read a dnn ``tensor`` as float32 of shape (num_samples, k, nr, nc)."""
        start = self._pos
        version = self.read_int()
        if version not in (1, 2):
            raise DlibSerializationError(f"unsupported tensor version {version} at offset {start}")
        shape = tuple(self.read_int() for _ in range(4))
        if min(shape) < 0:
            raise DlibSerializationError(f"negative tensor shape {shape} at offset {start}")
        count = int(np.prod(shape))
        if version == 1:
            return self.read_floats(count).reshape(shape)
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def read_alias_tensor(self) -> tuple[int, int, int, int]:
        """Read a dnn ``alias_tensor`` (only its shape is serialized)."""
        start = self._pos
        version = self.read_int()
        if version != 1:
            raise DlibSerializationError(f"unsupported alias_tensor version {version} at offset {start}")
        n, k, nr, nc = (self.read_int() for _ in range(4))
        return n, k, nr, nc
