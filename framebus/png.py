"""Writing an RGBA/RGB/GRAY image as PNG with zlib only, so snapshots need neither GStreamer nor Pillow."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str, image: np.ndarray) -> None:
    """``image``: (h, w, 4) RGBA, (h, w, 3) RGB or (h, w) gray, uint8."""
    if image.dtype != np.uint8:
        raise ValueError(f"PNG snapshot needs uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        colour_type, height, width = 0, *image.shape
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        colour_type = 2 if image.shape[2] == 3 else 6
        height, width = image.shape[:2]
    else:
        raise ValueError(f"PNG snapshot needs (h, w), (h, w, 3) or (h, w, 4), got {image.shape}")
    rows = np.ascontiguousarray(image).reshape(height, -1)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes()  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_chunk(b"IHDR", header))
        f.write(_chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(_chunk(b"IEND", b""))
