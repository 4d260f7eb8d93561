"""Between GStreamer caps and framebus layouts."""

from __future__ import annotations

import functools
from fractions import Fraction

from gi.repository import Gst, GstVideo

from ..errors import UnsupportedFormatError
from ..videoformat import FORMATS, FrameLayout, make_layout

# Negotiation prefers the first format: RGBA first, the mixer's format of choice.
_PREFERRED = ("RGBA", "BGRA", "RGBx", "BGRx", "I420", "NV12", "YUY2", "RGB", "BGR", "GRAY8")
_ORDER = [*_PREFERRED, *sorted(set(FORMATS) - set(_PREFERRED))]
RAW_CAPS = "video/x-raw, format=(string){{ {formats} }}, width=(int)[ 1, 16384 ], height=(int)[ 1, 16384 ]".format(
    formats=", ".join(_ORDER)
)


def template_caps() -> Gst.Caps:
    return Gst.Caps.from_string(RAW_CAPS)


def video_info(caps: Gst.Caps) -> GstVideo.VideoInfo:
    info = GstVideo.VideoInfo.new_from_caps(caps)
    if info is None:
        raise UnsupportedFormatError(f"caps {caps.to_string()!r} are not raw video framebus can carry")
    return info


def layout_from_info(info: GstVideo.VideoInfo) -> FrameLayout:
    """The layout GStreamer itself uses for these caps (strides and offsets from VideoInfo)."""
    name = info.finfo.name
    if name not in FORMATS:
        raise UnsupportedFormatError(
            f"video format {name} is not supported by framebus; put videoconvert before the sink and use one of "
            f"{', '.join(sorted(FORMATS))}"
        )
    n = info.finfo.n_planes
    return make_layout(name, info.width, info.height, list(info.stride[:n]), list(info.offset[:n]), info.size)


def framerate(info: GstVideo.VideoInfo) -> Fraction | None:
    return Fraction(info.fps_n, info.fps_d) if info.fps_n and info.fps_d else None


def layout_from_meta(meta: GstVideo.VideoMeta, base: FrameLayout, shift: int = 0) -> FrameLayout:
    """A frame's real placement from its GstVideoMeta (``shift``: where the buffer starts in the slot)."""
    n = meta.n_planes
    strides = tuple(int(s) for s in meta.stride[:n])
    offsets = tuple(int(o) + shift for o in meta.offset[:n])
    if strides == base.strides and offsets == base.offsets:
        return base
    return _placed(base, strides, offsets)


@functools.lru_cache(maxsize=64)
def _placed(base: FrameLayout, strides: tuple[int, ...], offsets: tuple[int, ...]) -> FrameLayout:
    # Per frame when upstream pads its rows: computed once per distinct placement, not per frame.
    return make_layout(base.format, base.width, base.height, strides, offsets)


def video_format(name: str) -> GstVideo.VideoFormat:
    return GstVideo.VideoFormat.from_string(name)
