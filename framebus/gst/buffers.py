"""Between framebus frames and GstBuffers: video meta and buffer flags, on the per-frame path."""

from __future__ import annotations

from typing import Any

from gi.repository import Gst, GstVideo

from .. import protocol as p
from ..videoformat import FrameLayout
from .caps import video_format

_FLAGS = (
    (Gst.BufferFlags.DISCONT, p.FrameFlags.DISCONT),
    (Gst.BufferFlags.DELTA_UNIT, p.FrameFlags.DELTA_UNIT),
    (Gst.BufferFlags.GAP, p.FrameFlags.GAP),
    (Gst.BufferFlags.HEADER, p.FrameFlags.HEADER),
    (Gst.BufferFlags.MARKER, p.FrameFlags.MARKER),
    (Gst.BufferFlags.DROPPABLE, p.FrameFlags.DROPPABLE),
)


_FLAG_INTS = tuple((int(gst_flag), int(ours)) for gst_flag, ours in _FLAGS)
_ANY_FLAG = sum(g for g, _ in _FLAG_INTS)


def frame_flags(buffer: Gst.Buffer) -> p.FrameFlags:
    """Buffer flags consumers need; plain ints on the per-frame path (enum arithmetic is slow in Python)."""
    gst_flags = int(buffer.get_flags())
    if not gst_flags & _ANY_FLAG:
        return p.FrameFlags.NONE
    return p.FrameFlags(sum(ours for gst_flag, ours in _FLAG_INTS if gst_flags & gst_flag))


def set_buffer_flags(buffer: Gst.Buffer, flags: p.FrameFlags) -> None:
    for gst_flag, ours in _FLAGS:
        if flags & ours:
            buffer.set_flags(gst_flag)


_META_ARGS: dict[FrameLayout, tuple[Any, ...]] = {}


def add_video_meta(buffer: Gst.Buffer, layout: FrameLayout) -> None:
    """GstVideoMeta with the layout's real strides; the arguments are built once per layout."""
    args = _META_ARGS.get(layout)
    if args is None:
        n = len(layout.planes)
        args = (
            GstVideo.VideoFrameFlags.NONE,
            video_format(layout.format),
            layout.width,
            layout.height,
            n,
            list(layout.offsets) + [0] * (4 - n),
            list(layout.strides) + [0] * (4 - n),
        )
        if len(_META_ARGS) > 256:
            _META_ARGS.clear()
        _META_ARGS[layout] = args
    GstVideo.buffer_add_video_meta_full(buffer, *args)
