"""Frame contents that prove integrity: a counter and a CRC inside the pixels.

The producer writes its own frame counter into the first 8 bytes, a CRC32
of the rest into the next 4, and a counter-dependent pattern after that;
it also sends the counter in the frame's metadata.  A consumer that finds a
different counter in the pixels than in the metadata, or a bad CRC, has
seen a slot rewritten while it held it: a torn frame.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_HEAD = struct.Struct("<QI")
_BASE: dict[int, np.ndarray] = {}


def _base(n: int) -> np.ndarray:
    if n not in _BASE:
        _BASE[n] = (np.arange(n, dtype=np.uint32) * 7 % 251).astype(np.uint8)
    return _BASE[n]


def fill(buf: np.ndarray, counter: int) -> bytes:
    """Write frame ``counter`` into ``buf`` (flat uint8); returns the metadata to publish with it."""
    body = buf[_HEAD.size :]
    np.add(_base(body.size), np.uint8(counter & 0xFF), out=body)
    buf[: _HEAD.size] = np.frombuffer(_HEAD.pack(counter, zlib.crc32(body)), dtype=np.uint8)
    return struct.pack("<Q", counter)


def check(buf: np.ndarray, meta: bytes) -> str | None:
    """None if the frame is intact, else what is wrong with it."""
    (expected,) = struct.unpack("<Q", meta)
    counter, crc = _HEAD.unpack(buf[: _HEAD.size].tobytes())
    if counter != expected:
        return f"pixels hold frame {counter}, metadata says {expected}"
    if zlib.crc32(buf[_HEAD.size :]) != crc:
        return f"frame {counter}: CRC mismatch"
    return None
