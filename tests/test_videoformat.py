"""Plane layouts of framebus.videoformat against GStreamer's GstVideo.VideoInfo, and custom placements."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framebus.errors import UnsupportedFormatError
from framebus.videoformat import (
    FORMATS,
    MAX_DIMENSION,
    PAGE_SIZE,
    FrameLayout,
    format_spec,
    make_layout,
    slot_size_for,
)

FORMAT_NAMES = sorted(FORMATS)
FIXED_SIZES = [
    (1, 1),
    (1, 2),
    (2, 1),
    (3, 3),
    (5, 7),
    (1278, 718),
    (641, 481),
    (1920, 1080),
    (1920, 1081),
    (3840, 2160),
    (4000, 4000),
    (3999, 3999),
]


@pytest.fixture(scope="module")
def gst_video():
    """GstVideo from Debian's python3-gi; a missing install is a failure, not a skip."""
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstVideo", "1.0")
        from gi.repository import Gst, GstVideo
    except (ImportError, ValueError) as exc:
        pytest.fail(
            f"GStreamer's Python bindings are required to check plane layouts ({exc}); "
            "run `make setup` (needs python3-gi, gir1.2-gst-plugins-base-1.0)",
            pytrace=False,
        )
    Gst.init(None)
    return GstVideo


def gst_layout(gst_video, fmt: str, width: int, height: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    video_format = gst_video.VideoFormat.from_string(fmt)
    assert video_format != gst_video.VideoFormat.UNKNOWN, f"GStreamer does not know format {fmt}"
    vi = gst_video.VideoInfo()
    assert vi.set_format(video_format, width, height), f"GStreamer rejected {fmt} {width}x{height}"
    n = len(FORMATS[fmt].planes)
    assert vi.finfo.n_planes == n, f"{fmt}: GStreamer has {vi.finfo.n_planes} planes, framebus {n}"
    return tuple(vi.stride[:n]), tuple(vi.offset[:n]), vi.size


def assert_matches_gst(gst_video, fmt: str, width: int, height: int) -> None:
    layout = make_layout(fmt, width, height)
    ours = (layout.strides, layout.offsets, layout.size)
    theirs = gst_layout(gst_video, fmt, width, height)
    assert ours == theirs, f"{fmt} {width}x{height}: framebus (strides, offsets, size) {ours} != GStreamer {theirs}"


def assert_consistent(layout: FrameLayout) -> None:
    """Every plane holds its rows, lies inside ``size``, and no two planes share a byte of their span."""
    spec = format_spec(layout.format)
    assert len(layout.planes) == len(spec.planes)
    for plane, ps in zip(layout.planes, spec.planes, strict=True):
        columns = (layout.width + 1) // 2 if ps.x_sub else layout.width
        rows = (layout.height + 1) // 2 if ps.y_sub else layout.height
        assert (plane.columns, plane.rows) == (columns, rows)
        assert (plane.channels, plane.itemsize) == (ps.channels, ps.itemsize)
        assert plane.stride >= plane.row_bytes > 0
        assert plane.offset >= 0
        assert plane.end <= layout.size
    spans = sorted((p.offset, p.offset + p.stride * (p.rows - 1) + p.row_bytes) for p in layout.planes)
    for (_a0, a1), (b0, _b1) in itertools.pairwise(spans):
        assert a1 <= b0, f"planes overlap in {layout}"


# -- agreement with GStreamer


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_fixed_sizes_match_gstreamer(gst_video, fmt):
    for width, height in FIXED_SIZES:
        assert_matches_gst(gst_video, fmt, width, height)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_all_small_sizes_match_gstreamer(gst_video, fmt):
    # Every parity and every residue mod 4 of width and height, where rounding rules differ.
    for width in range(1, 34):
        for height in range(1, 10):
            assert_matches_gst(gst_video, fmt, width, height)


@settings(max_examples=400, deadline=None)
@given(
    fmt=st.sampled_from(FORMAT_NAMES),
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
)
def test_random_sizes_match_gstreamer(gst_video, fmt, width, height):
    assert_matches_gst(gst_video, fmt, width, height)


@settings(max_examples=200, deadline=None)
@given(
    fmt=st.sampled_from(FORMAT_NAMES),
    width=st.integers(1, 2000).map(lambda v: 2 * v - 1),
    height=st.integers(1, 2000).map(lambda v: 2 * v - 1),
)
def test_odd_sizes_match_gstreamer(gst_video, fmt, width, height):
    assert_matches_gst(gst_video, fmt, width, height)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_default_layouts_are_consistent(fmt):
    for width, height in FIXED_SIZES:
        layout = make_layout(fmt, width, height)
        assert (layout.format, layout.width, layout.height) == (fmt, width, height)
        assert_consistent(layout)
        slot = slot_size_for(layout)
        assert slot % PAGE_SIZE == 0 and layout.size <= slot < layout.size + PAGE_SIZE


# -- custom strides and offsets


def test_i420_padded_strides():
    layout = make_layout("I420", 1278, 718, strides=(1280, 640, 640))
    assert layout.strides == (1280, 640, 640)
    assert layout.offsets == (0, 1280 * 718, 1280 * 718 + 640 * 359)
    assert layout.size == 1280 * 718 + 2 * 640 * 359
    assert [(p.rows, p.columns) for p in layout.planes] == [(718, 1278), (359, 639), (359, 639)]
    assert_consistent(layout)


def test_i420_padded_strides_odd_height():
    # 719 rows: luma padded to 720, chroma to 360 rows, as for default strides.
    layout = make_layout("I420", 1278, 719, strides=(1280, 640, 640))
    assert layout.offsets == (0, 1280 * 720, 1280 * 720 + 640 * 360)
    assert [p.rows for p in layout.planes] == [719, 360, 360]
    assert_consistent(layout)


def test_rgb_padded_stride():
    layout = make_layout("RGB", 641, 481, strides=(2048,))
    (plane,) = layout.planes
    assert (plane.offset, plane.stride, plane.rows, plane.columns, plane.channels) == (0, 2048, 481, 641, 3)
    assert plane.row_bytes == 641 * 3
    assert layout.size == 2048 * 481
    assert_consistent(layout)


def test_with_planes_keeps_format_and_size():
    base = make_layout("NV12", 1920, 1080)
    padded = base.with_planes((2048, 2048), (0, 2048 * 1088))
    assert (padded.format, padded.width, padded.height) == ("NV12", 1920, 1080)
    assert padded.strides == (2048, 2048)
    assert padded.offsets == (0, 2048 * 1088)
    assert padded.size == 2048 * 1088 + 2048 * 539 + 1920
    assert_consistent(padded)


def test_custom_offsets_in_swapped_order():
    # U after V is a legal placement: offsets need not follow plane order.
    y = 640 * 480
    c = 320 * 240
    layout = make_layout("I420", 640, 480, offsets=(0, y + c, y))
    assert layout.offsets == (0, y + c, y)
    assert layout.size == y + 2 * c
    assert_consistent(layout)


@settings(max_examples=200, deadline=None)
@given(
    fmt=st.sampled_from(FORMAT_NAMES),
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
    data=st.data(),
)
def test_random_padded_strides_are_consistent(fmt, width, height, data):
    default = make_layout(fmt, width, height)
    extra = [data.draw(st.integers(0, 512), label=f"extra{i}") for i in range(len(default.planes))]
    strides = [p.row_bytes + e for p, e in zip(default.planes, extra, strict=True)]
    layout = make_layout(fmt, width, height, strides=strides)
    assert list(layout.strides) == strides
    assert_consistent(layout)
    # Offsets computed for the padded strides are accepted back as custom offsets.
    again = make_layout(fmt, width, height, strides=strides, offsets=layout.offsets)
    assert again.planes == layout.planes
    assert again.size <= layout.size
    assert_consistent(again)


# -- errors


def test_unknown_format_is_named():
    with pytest.raises(UnsupportedFormatError, match="'FOO42'") as info:
        make_layout("FOO42", 640, 480)
    assert "I420" in str(info.value)  # the message lists what is supported
    with pytest.raises(UnsupportedFormatError, match="'rgba'"):
        make_layout("rgba", 640, 480)  # names are case-sensitive, like GStreamer's


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (0, 480),
        (640, 0),
        (0, 0),
        (-1, 480),
        (640, -16),
        (MAX_DIMENSION + 1, 480),
        (640, MAX_DIMENSION + 1),
        (10**9, 10**9),
    ],
)
def test_bad_sizes_are_named(width, height):
    with pytest.raises(UnsupportedFormatError) as info:
        make_layout("RGBA", width, height)
    assert f"{width}x{height}" in str(info.value)


def test_largest_size_is_accepted():
    layout = make_layout("GRAY8", MAX_DIMENSION, MAX_DIMENSION)
    assert layout.size == MAX_DIMENSION * MAX_DIMENSION


@pytest.mark.parametrize(
    ("fmt", "width", "strides", "bad"),
    [
        ("RGB", 641, (1922,), 1922),
        ("RGBA", 640, (0,), 0),
        ("RGBA", 640, (-2560,), -2560),
        ("GRAY16_LE", 101, (201,), 201),
        ("I420", 1278, (1276, 640, 640), 1276),
        ("I420", 1278, (1280, 638, 640), 638),
        ("NV12", 641, (644, 641), 641),
    ],
)
def test_stride_smaller_than_a_row(fmt, width, strides, bad):
    with pytest.raises(UnsupportedFormatError, match=rf"stride {bad} of plane \d") as info:
        make_layout(fmt, width, 10, strides=strides)
    assert str(width) in str(info.value)


def test_wrong_number_of_strides_or_offsets():
    with pytest.raises(UnsupportedFormatError, match="3 planes, got 2 strides"):
        make_layout("I420", 640, 480, strides=(640, 320))
    with pytest.raises(UnsupportedFormatError, match="1 planes, got 2 offsets"):
        make_layout("RGBA", 640, 480, offsets=(0, 0))


@pytest.mark.parametrize(
    "offsets",
    [
        (0, 0, 0),
        (0, 100, 200),
        (0, 640 * 480 - 1, 640 * 480 + 320 * 240),  # U starts on the last luma row
        (0, 640 * 480, 640 * 480 + 320 * 240 - 320),  # V starts on the last U row
        (640 * 480, 0, 640 * 480 + 1),  # planes swapped and overlapping
    ],
)
def test_overlapping_offsets(offsets):
    with pytest.raises(UnsupportedFormatError, match="overlap"):
        make_layout("I420", 640, 480, offsets=offsets)


def test_overlapping_offsets_nv12_with_padded_stride():
    with pytest.raises(UnsupportedFormatError, match="overlap"):
        make_layout("NV12", 1920, 1080, strides=(2048, 2048), offsets=(0, 2048 * 1079))


def test_negative_offset():
    with pytest.raises(UnsupportedFormatError):
        make_layout("RGBA", 64, 64, offsets=(-4,))
    with pytest.raises(UnsupportedFormatError):
        make_layout("NV12", 64, 64, offsets=(0, -64 * 64))


def test_explicit_frame_size_with_offsets():
    # A producer may announce a frame larger than its planes (trailing padding); never smaller.
    layout = make_layout("I420", 640, 480, offsets=(0, 640 * 480, 640 * 480 + 320 * 240), size=1 << 20)
    assert layout.size == 1 << 20
    assert_consistent(layout)
    tight = 640 * 480 * 3 // 2
    assert make_layout("I420", 640, 480, offsets=(0, 640 * 480, 640 * 480 + 320 * 240), size=tight).size == tight
    with pytest.raises(UnsupportedFormatError, match=f"frame size {tight - 1} of I420 640x480"):
        make_layout("I420", 640, 480, offsets=(0, 640 * 480, 640 * 480 + 320 * 240), size=tight - 1)
