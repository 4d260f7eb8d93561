"""numpy views of frames in place: no pixel is copied to make them.

Each view is built from a raw pointer through ``__array_interface__`` on a
small owner object.  The owner keeps alive what the pointer needs: the
array that exports the mapping (so the mapping cannot be unmapped under
the view) and, on the consumer side, the ``Frame`` itself, so a frame whose
views are still in use is never released by the garbage collector.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import UnsupportedFormatError
from .videoformat import FrameLayout, Plane


class _Owner:
    __slots__ = ("__array_interface__", "keep")

    def __init__(self, interface: dict[str, Any], keep: object) -> None:
        self.__array_interface__ = interface
        self.keep = keep


def base_address(base: np.ndarray) -> int:
    return int(base.ctypes.data)


def plane_view(address: int, plane: Plane, writable: bool, keep: object) -> np.ndarray:
    """A numpy view of one plane whose first row starts at ``address``."""
    typestr = "|u1" if plane.itemsize == 1 else f"<u{plane.itemsize}"
    if plane.channels == 1:
        shape: tuple[int, ...] = (plane.rows, plane.columns)
        strides: tuple[int, ...] = (plane.stride, plane.itemsize)
    else:
        shape = (plane.rows, plane.columns, plane.channels)
        strides = (plane.stride, plane.channels * plane.itemsize, plane.itemsize)
    interface = {
        "version": 3,
        "shape": shape,
        "typestr": typestr,
        "strides": strides,
        "data": (address + plane.offset, not writable),
    }
    return np.asarray(_Owner(interface, keep))


def frame_planes(address: int, layout: FrameLayout, writable: bool, keep: object) -> tuple[np.ndarray, ...]:
    return tuple(plane_view(address, p, writable, keep) for p in layout.planes)


def frame_image(address: int, layout: FrameLayout, writable: bool, keep: object) -> np.ndarray:
    """The single array a user of OpenCV expects.

    Packed formats: (height, width, channels), or (height, width) for gray.
    Planar 4:2:0 formats: the (height * 3 / 2, width) array that OpenCV's
    ``cvtColor(..., COLOR_YUV2BGR_I420/NV12)`` takes, which only exists when
    rows are unpadded and planes contiguous.
    """
    if len(layout.planes) == 1:
        return plane_view(address, layout.planes[0], writable, keep)
    w, h = layout.width, layout.height
    tight = w % 2 == 0 and h % 2 == 0 and layout.planes[0].stride == w and layout.planes[0].offset == 0
    if tight:
        expected = 0
        for p in layout.planes:
            tight = tight and p.offset == expected and p.stride * p.rows == p.row_bytes * p.rows
            expected += p.stride * p.rows
    if not tight:
        raise UnsupportedFormatError(
            f"a {layout.format} {w}x{h} frame with padded rows has no single-array view; use frame.planes"
        )
    interface = {
        "version": 3,
        "shape": (h * 3 // 2, w),
        "typestr": "|u1",
        "strides": (w, 1),
        "data": (address, not writable),
    }
    return np.asarray(_Owner(interface, keep))


def check_layout_fits(layout: FrameLayout, slot_size: int) -> None:
    """A frame's planes must lie inside its slot, or a view would read past it."""
    for i, p in enumerate(layout.planes):
        if p.offset < 0 or p.end > slot_size:
            raise UnsupportedFormatError(
                f"plane {i} of a {layout.format} {layout.width}x{layout.height} frame ends at byte "
                f"{p.end}, past the slot of {slot_size} bytes"
            )


def flat_view(address: int, size: int, writable: bool, keep: object) -> np.ndarray:
    """``size`` bytes from ``address`` as a flat uint8 array (any format)."""
    interface = {"version": 3, "shape": (size,), "typestr": "|u1", "data": (address, not writable)}
    return np.asarray(_Owner(interface, keep))
