"""Where each plane of a raw video frame lives inside a slot.

The rules are GStreamer's own (``gst_video_info_set_format``: rows rounded
up to 4 bytes, chroma planes of subsampled formats rounded up to even
sizes), reimplemented here so the Python API works without GStreamer and a
C client can compute the same numbers.  A test checks that they agree with
``GstVideo.VideoInfo`` for every format and many sizes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UnsupportedFormatError
from .protocol import MAX_DIMENSION

PAGE_SIZE = 4096


def _up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _half_up(value: int) -> int:
    return (value + 1) // 2


@dataclass(frozen=True)
class PlaneSpec:
    """One plane of a format: how many pixels per row/column and their byte shape."""

    x_sub: int  # horizontal subsampling shift (1 = half width)
    y_sub: int  # vertical subsampling shift
    channels: int  # numpy channels per element (1 means a 2-D view)
    itemsize: int  # bytes per channel value


@dataclass(frozen=True)
class FormatSpec:
    name: str
    planes: tuple[PlaneSpec, ...]  # in memory order, as GStreamer numbers them (YV12: Y, V, U)


def _packed(name: str, channels: int, itemsize: int = 1) -> FormatSpec:
    return FormatSpec(name, (PlaneSpec(0, 0, channels, itemsize),))


_LUMA = PlaneSpec(0, 0, 1, 1)
_CHROMA = PlaneSpec(1, 1, 1, 1)
_CHROMA_PAIR = PlaneSpec(1, 1, 2, 1)

FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        _packed("RGBA", 4),
        _packed("BGRA", 4),
        _packed("ARGB", 4),
        _packed("ABGR", 4),
        _packed("RGBx", 4),
        _packed("BGRx", 4),
        _packed("xRGB", 4),
        _packed("xBGR", 4),
        _packed("RGB", 3),
        _packed("BGR", 3),
        _packed("GRAY8", 1),
        _packed("GRAY16_LE", 1, 2),
        _packed("YUY2", 2),
        _packed("UYVY", 2),
        FormatSpec("I420", (_LUMA, _CHROMA, _CHROMA)),
        FormatSpec("YV12", (_LUMA, _CHROMA, _CHROMA)),
        FormatSpec("NV12", (_LUMA, _CHROMA_PAIR)),
        FormatSpec("NV21", (_LUMA, _CHROMA_PAIR)),
    )
}


@dataclass(frozen=True)
class Plane:
    """Where one plane sits in a frame, and the numpy shape that views it."""

    offset: int
    stride: int
    rows: int
    columns: int
    channels: int
    itemsize: int

    @property
    def row_bytes(self) -> int:
        """Bytes of pixel data in one row (the stride may add padding after them)."""
        return self.columns * self.channels * self.itemsize

    @property
    def end(self) -> int:
        """One past the last byte of pixel data of this plane."""
        return self.offset + self.stride * (self.rows - 1) + self.row_bytes if self.rows else 0


@dataclass(frozen=True)
class FrameLayout:
    """Format, size and plane placement of one frame; ``size`` is what a slot must hold."""

    format: str
    width: int
    height: int
    planes: tuple[Plane, ...]
    size: int

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(p.stride for p in self.planes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(p.offset for p in self.planes)

    def with_planes(self, strides: Sequence[int], offsets: Sequence[int]) -> FrameLayout:
        """The same frame placed differently (e.g. an upstream element's padded strides)."""
        return make_layout(self.format, self.width, self.height, strides, offsets)


def format_spec(name: str) -> FormatSpec:
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise UnsupportedFormatError(f"video format {name!r} is not supported; use one of {known}") from None


def _default_stride(spec: PlaneSpec, plane_index: int, width: int, strides: list[int]) -> int:
    if plane_index > 0 and spec.channels == 2 and spec.x_sub:
        # NV12/NV21: interleaved chroma rows are as wide as the luma rows.
        return strides[0]
    columns = _half_up(width) if spec.x_sub else width
    return _up(columns * spec.channels * spec.itemsize, 4)


def make_layout(
    format: str,
    width: int,
    height: int,
    strides: Sequence[int] | None = None,
    offsets: Sequence[int] | None = None,
    size: int | None = None,
) -> FrameLayout:
    """Lay out one frame; strides/offsets default to GStreamer's.

    Custom strides are how padded rows (decoders, GPU-friendly alignment)
    travel; they must hold a row, and planes must not overlap.
    """
    spec = format_spec(format)
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise UnsupportedFormatError(
            f"frame size {width}x{height} is out of range; width and height must be between 1 and {MAX_DIMENSION}"
        )
    n = len(spec.planes)
    if strides is not None and len(strides) != n:
        raise UnsupportedFormatError(f"{format} has {n} planes, got {len(strides)} strides")
    if offsets is not None and len(offsets) != n:
        raise UnsupportedFormatError(f"{format} has {n} planes, got {len(offsets)} offsets")
    # Subsampled formats pad the luma plane to an even number of rows, as GStreamer does.
    subsampled = any(p.y_sub for p in spec.planes)
    luma_rows = _up(height, 2) if subsampled else height

    plane_strides: list[int] = []
    geometry: list[tuple[int, int, PlaneSpec]] = []
    for i, ps in enumerate(spec.planes):
        columns = _half_up(width) if ps.x_sub else width
        rows = _half_up(height) if ps.y_sub else height
        stride = strides[i] if strides is not None else _default_stride(ps, i, width, plane_strides)
        if stride < columns * ps.channels * ps.itemsize:
            raise UnsupportedFormatError(
                f"stride {stride} of plane {i} is smaller than a row of {format} at width "
                f"{width} ({columns * ps.channels * ps.itemsize} bytes); pass a larger stride"
            )
        plane_strides.append(stride)
        geometry.append((columns, rows, ps))

    plane_offsets = [0] * n
    cursor = 0
    for i, (_columns, _rows, ps) in enumerate(geometry):
        padded_rows = _half_up(luma_rows) if ps.y_sub else luma_rows
        plane_offsets[i] = cursor
        cursor += plane_strides[i] * padded_rows
    if offsets is None:
        size = cursor
    else:
        plane_offsets = list(offsets)

    planes = tuple(
        Plane(plane_offsets[i], plane_strides[i], rows, columns, ps.channels, ps.itemsize)
        for i, (columns, rows, ps) in enumerate(geometry)
    )
    if offsets is not None:
        minimum = max(p.end for p in planes)
        if size is not None and size < minimum:
            raise UnsupportedFormatError(
                f"frame size {size} of {format} {width}x{height} is smaller than its planes ({minimum} bytes)"
            )
        size = size if size is not None else minimum
        spans = sorted((p.offset, p.offset + p.stride * p.rows) for p in planes)
        for (_a0, a1), (b0, _b1) in itertools.pairwise(spans):
            if b0 < a1:
                raise UnsupportedFormatError(
                    f"planes of {format} {width}x{height} overlap with offsets {list(offsets)}"
                )
        if any(p.offset < 0 or p.stride <= 0 for p in planes):
            raise UnsupportedFormatError(f"negative offset or stride in {list(offsets)}")
    assert size is not None
    return FrameLayout(format, width, height, planes, size)


def slot_size_for(layout: FrameLayout) -> int:
    """Slots are whole pages so every slot starts page-aligned (mmap, DMA, cache lines)."""
    return _up(layout.size, PAGE_SIZE)
