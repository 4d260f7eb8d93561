"""Real pixels through framebussink and framebussrc, between real processes.

Producers run in their own processes (``gst-launch-1.0`` through the
gst-python plugin loader, or a Python process when the test needs the
sink's counters or the Python ``Publisher``); consumers run in this process.
Every frame is compared by a digest per plane computed over the pixel bytes
of each row only, so stride padding (which legitimately differs between a
producer's pool and an appsink's) never matters, while any wrong, stale,
torn, missing, repeated or reordered frame does.

Plane geometry comes from ``GstVideo.VideoInfo`` (format info: subsampling,
pixel strides) and each buffer's ``GstVideoMeta``, not from framebus's own
layout code, so a layout bug in framebus cannot hide itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import gi
import numpy as np
import pytest

gi.require_version("Gst", "1.0")
gi.require_version("GstVideo", "1.0")
gi.require_version("GstApp", "1.0")

from gi.repository import Gst, GstApp, GstVideo  # noqa: E402

import framebus.gst  # noqa: E402  (after the typelib versions)
from framebus import cli  # noqa: E402
from framebus.errors import EndOfStream, ProducerGoneError  # noqa: E402
from framebus.observer import fetch_stats  # noqa: E402
from framebus.subscriber import Subscriber  # noqa: E402

framebus.gst.register()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GST_ENV = {
    **os.environ,
    "GST_PLUGIN_PATH": cli.plugin_dir(),
    "PYTHONPATH": ":".join(cli.python_path()),
}
TIMEOUT = 20.0  # seconds for any one thing to happen; every wait below is bounded by it
FRAME_NS = Gst.SECOND // 30

Digest = tuple[str, ...]  # one digest per plane


class Stamp(NamedTuple):
    pts: int
    duration: int
    offset: int


# ---------------------------------------------------------------------------- pixels


def plane_geometry(info: GstVideo.VideoInfo) -> list[tuple[int, int]]:
    """(rows, bytes of pixels per row) of every plane, from GStreamer's format description."""
    finfo = info.finfo
    geometry = []
    for plane in range(finfo.n_planes):
        comp = next(c for c in range(finfo.n_components) if finfo.plane[c] == plane)
        columns = -(-info.width >> finfo.w_sub[comp])  # GST_VIDEO_SUB_SCALE: rounds up
        rows = -(-info.height >> finfo.h_sub[comp])
        geometry.append((rows, columns * finfo.pixel_stride[comp]))
    return geometry


def digest_rows(rows: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=12).hexdigest()


def buffer_digest(buffer: Gst.Buffer, info: GstVideo.VideoInfo) -> Digest:
    """Digest of each plane's pixel rows, placed by the buffer's GstVideoMeta if it has one."""
    n = info.finfo.n_planes
    meta = GstVideo.buffer_get_video_meta(buffer)
    if meta is not None:
        assert (meta.width, meta.height, meta.n_planes) == (info.width, info.height, n), "video meta disagrees"
        strides, offsets = list(meta.stride[:n]), list(meta.offset[:n])
    else:
        strides, offsets = list(info.stride[:n]), list(info.offset[:n])
    ok, mapped = buffer.map(Gst.MapFlags.READ)
    assert ok, "cannot map a buffer"
    try:
        data = np.frombuffer(mapped.data, dtype=np.uint8)
        digests = []
        for plane, ((rows, row_bytes), stride, offset) in enumerate(
            zip(plane_geometry(info), strides, offsets, strict=True)
        ):
            end = offset + stride * (rows - 1) + row_bytes
            assert stride >= row_bytes and end <= data.size, (
                f"plane {plane}: stride {stride}, offset {offset} need {end} bytes, buffer has {data.size}"
            )
            view = np.lib.stride_tricks.as_strided(data[offset:], shape=(rows, row_bytes), strides=(stride, 1))
            digests.append(digest_rows(view))
            del view
        del data
    finally:
        buffer.unmap(mapped)
    return tuple(digests)


def assert_same_frames(got: Sequence[Digest], expected: Sequence[Digest], what: str) -> None:
    for index, (g, e) in enumerate(zip(got, expected, strict=False)):
        if g != e:
            planes = [i for i, (a, b) in enumerate(zip(g, e, strict=True)) if a != b]
            later = [i for i, d in enumerate(expected) if d == g]
            raise AssertionError(
                f"{what}: frame {index} differs in plane(s) {planes} of {len(e)}"
                + (f"; its pixels are those of expected frame {later[0]}" if later else "")
            )
    assert len(got) == len(expected), f"{what}: received {len(got)} frames, expected {len(expected)}"


# ---------------------------------------------------------------------------- in-process pipelines


class Pipeline:
    """A parsed pipeline in this process whose appsink ``out`` is pulled frame by frame."""

    def __init__(self, description: str) -> None:
        self.pipeline = Gst.parse_launch(description)
        self.sink = self.pipeline.get_by_name("out")
        assert isinstance(self.sink, GstApp.AppSink)
        self.bus = self.pipeline.get_bus()

    def __enter__(self) -> Pipeline:
        result = self.pipeline.set_state(Gst.State.PLAYING)
        assert result != Gst.StateChangeReturn.FAILURE, f"cannot start pipeline: {self.errors()}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.pipeline.set_state(Gst.State.NULL)

    def element(self, name: str) -> Gst.Element:
        element = self.pipeline.get_by_name(name)
        assert element is not None
        return element

    def errors(self) -> str:
        texts = []
        while (msg := self.bus.pop_filtered(Gst.MessageType.ERROR | Gst.MessageType.WARNING)) is not None:
            err, debug = msg.parse_error() if msg.type == Gst.MessageType.ERROR else msg.parse_warning()
            texts.append(f"{msg.src.get_name()}: {err.message} ({debug})")
        return "; ".join(texts) or "no error message"

    def pull(self, timeout: float = TIMEOUT) -> Gst.Sample | None:
        """The next sample; None at end-of-stream; fails on an error or a timeout."""
        sample = self.sink.try_pull_sample(int(timeout * Gst.SECOND))
        if sample is None and not self.sink.is_eos():
            raise AssertionError(f"no frame within {timeout} s and no end-of-stream: {self.errors()}")
        return sample

    def pull_all(self, limit: int = 10_000) -> tuple[list[Digest], list[Stamp]]:
        """Digests and stamps of every frame until end-of-stream (samples are dropped at once: they hold slots)."""
        digests: list[Digest] = []
        stamps: list[Stamp] = []
        while (sample := self.pull()) is not None:
            info = GstVideo.VideoInfo.new_from_caps(sample.get_caps())
            buffer = sample.get_buffer()
            digests.append(buffer_digest(buffer, info))
            stamps.append(Stamp(buffer.pts, buffer.duration, buffer.offset))
            del sample, buffer
            assert len(digests) <= limit, f"more than {limit} frames"
        return digests, stamps


def reference(source: str, caps: str) -> tuple[list[Digest], list[Stamp]]:
    """The same frames generated in this process straight into an appsink."""
    with Pipeline(f"{source} ! {caps} ! appsink name=out sync=false") as pipe:
        return pipe.pull_all()


# ---------------------------------------------------------------------------- other processes


class Launched:
    """A producer process; its output goes to a file (never a pipe that could fill up)."""

    def __init__(self, argv: list[str], log_path: str, env: dict[str, str]) -> None:
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def output(self) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.argv[:2]} did not exit within {timeout} s:\n{self.output()}") from None

    def assert_clean_exit(self) -> str:
        rc = self.finish()
        out = self.output()
        assert rc == 0, f"producer exited with {rc}:\n{out}"
        assert "Traceback" not in out and "ERROR" not in out, f"producer reported a problem:\n{out}"
        return out

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


@pytest.fixture
def launch(tmp_path: Any) -> Iterator[Callable[..., Launched]]:
    """Start producer processes; every one still running is killed after the test."""
    started: list[Launched] = []

    def _launch(*argv: str, python: bool = False) -> Launched:
        command = [sys.executable, "-c", argv[0], *argv[1:]] if python else ["gst-launch-1.0", *argv]
        proc = Launched(command, str(tmp_path / f"producer{len(started)}.log"), GST_ENV)
        started.append(proc)
        return proc

    yield _launch
    for proc in started:
        proc.stop()


def gst_launch(launch: Callable[..., Launched], description: str) -> Launched:
    return launch(*description.split())


def wait_for_producer(path: str, proc: Launched) -> dict[str, Any]:
    """Until the producer process serves ``path`` (it exists only after its caps are set)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return fetch_stats(path)
        except ProducerGoneError:
            if proc.popen.poll() is not None:
                raise AssertionError(f"producer exited ({proc.popen.returncode}):\n{proc.output()}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing served {path} within {TIMEOUT} s:\n{proc.output()}") from None
            time.sleep(0.01)


# A producer process running a pipeline in Python, to report the framebussink counters at end-of-stream.
RUN_PIPELINE = """
import json, sys
import framebus.gst
framebus.gst.register()
from gi.repository import Gst
pipe = Gst.parse_launch(sys.argv[1])
pipe.set_state(Gst.State.PLAYING)
msg = pipe.get_bus().timed_pop_filtered(60 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
sink = pipe.get_by_name("sink")
names = ("frames-zero-copy", "frames-copied", "frames-dropped")
print("stats", json.dumps({name: sink.get_property(name) for name in names}), flush=True)
if msg is None or msg.type != Gst.MessageType.EOS:
    print("ERROR", msg.parse_error() if msg else "timeout", flush=True)
pipe.set_state(Gst.State.NULL)
sys.exit(0 if msg is not None and msg.type == Gst.MessageType.EOS else 1)
"""


def producer_stats(output: str) -> dict[str, int]:
    """The framebussink counters a RUN_PIPELINE producer printed at end-of-stream."""
    line = next((line for line in output.splitlines() if line.startswith("stats ")), None)
    assert line is not None, f"the producer printed no counters:\n{output}"
    stats: dict[str, int] = json.loads(line[len("stats ") :])
    return stats


def assert_distinct(digests: Sequence[Digest]) -> None:
    """A reference whose frames all differ: a repeated, stale or reordered frame cannot pass."""
    assert len(set(digests)) == len(digests), "the reference frames repeat; the test could not see a stale frame"


# ---------------------------------------------------------------------------- 1. gst-launch producer -> framebussrc

N_FRAMES = 30

PRODUCER_CASES = [
    # format, width, height, videotestsrc pattern, producer at live rate (sync=true) or as fast as it can
    ("RGBA", 320, 240, "pattern=ball", True),
    ("I420", 1278, 718, "pattern=smpte horizontal-speed=7", False),
    ("NV12", 640, 360, "pattern=ball", False),
    ("NV12", 641, 361, "pattern=smpte horizontal-speed=-5", False),
    ("RGB", 641, 481, "pattern=ball", False),
    ("GRAY8", 333, 97, "pattern=smpte horizontal-speed=3", False),
    ("GRAY8", 1, 1, "pattern=snow", False),
    ("GRAY8", 7, 3, "pattern=snow", False),
]


@pytest.mark.parametrize(("fmt", "width", "height", "pattern", "live_rate"), PRODUCER_CASES)
def test_framebussrc_receives_every_frame_of_a_gst_launch_producer(
    sock_path: str, launch: Callable[..., Launched], fmt: str, width: int, height: int, pattern: str, live_rate: bool
) -> None:
    caps = f"video/x-raw,format={fmt},width={width},height={height},framerate=30/1"
    source = f"videotestsrc num-buffers={N_FRAMES} {pattern}"
    expected, expected_stamps = reference(source, caps)
    assert len(expected) == N_FRAMES
    if width * height > 1:
        assert_distinct(expected)

    producer = gst_launch(
        launch,
        f"{source} ! {caps} ! framebussink socket-path={sock_path} wait-for-connection=true "
        f"sync={'true' if live_rate else 'false'}",
    )
    wait_for_producer(sock_path, producer)
    # max-in-flight 4 (the default) leaves the sink's 8 slots room for the newest frame and upstream's
    # buffers; max-in-flight 8 loses frames silently (see the test after this one).
    with Pipeline(
        f"framebussrc name=src socket-path={sock_path} policy=block max-in-flight=4 reconnect=false "
        "! appsink name=out sync=false"
    ) as consumer:
        got, stamps = consumer.pull_all()
        src = consumer.element("src")
        received, missed = src.get_property("frames-received"), src.get_property("frames-missed")
    producer.assert_clean_exit()

    assert_same_frames(got, expected, f"{fmt} {width}x{height}")
    assert (received, missed) == (N_FRAMES, 0)
    assert [s.offset for s in stamps] == list(range(N_FRAMES)), "buffer offsets are the producer's sequence"
    assert [s.duration for s in stamps] == [s.duration for s in expected_stamps], "durations pass through"


def test_block_consumer_holding_as_many_frames_as_the_sink_has_slots_loses_no_frame(
    sock_path: str, launch: Callable[..., Launched]
) -> None:
    """policy=block is documented as lossless, and the producer accepts max-in-flight up to its slot count.

    A consumer slower than the producer with max-in-flight=8 on a framebussink with its default 8 slots
    must still get every frame (the producer waits for its releases); dropping frames would at least
    have to show in frames-missed.
    """
    caps = "video/x-raw,format=I420,width=320,height=240,framerate=30/1"
    source = f"videotestsrc num-buffers={N_FRAMES} pattern=ball"
    expected, _ = reference(source, caps)
    producer = launch(
        RUN_PIPELINE,
        f"{source} ! {caps} ! framebussink name=sink socket-path={sock_path} wait-for-connection=true sync=false",
        python=True,
    )
    wait_for_producer(sock_path, producer)
    got: list[Digest] = []
    with Pipeline(
        f"framebussrc name=src socket-path={sock_path} policy=block max-in-flight=8 reconnect=false "
        "! appsink name=out sync=false"
    ) as consumer:
        while (sample := consumer.pull()) is not None:
            got.append(buffer_digest(sample.get_buffer(), GstVideo.VideoInfo.new_from_caps(sample.get_caps())))
            del sample
            time.sleep(0.02)  # the consumer's own work: it is slower than the producer, nothing is awaited
        src = consumer.element("src")
        received, missed = src.get_property("frames-received"), src.get_property("frames-missed")
    out = producer.assert_clean_exit()
    stats = producer_stats(out)

    assert (len(got), stats["frames-dropped"]) == (N_FRAMES, 0), (
        f"policy=block max-in-flight=8: received {len(got)} of {N_FRAMES} frames; the sink dropped "
        f"{stats['frames-dropped']}, the consumer counted {missed} missed of {received} received"
    )
    assert_same_frames(got, expected, "slow block consumer")


# ---------------------------------------------------------------------------- 2. the copy path

# Encoder settings that make the stream (and so the decoded frames) identical in every run.
H264 = (
    "videotestsrc num-buffers=30 pattern=ball ! video/x-raw,format=I420,width=320,height=240,framerate=30/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=5 threads=1 ! h264parse ! avdec_h264"
)
# identity drop-allocation=true hides the sink's pool from upstream: every frame must take the copy path.
NO_POOL = (
    "videotestsrc num-buffers=30 pattern=smpte horizontal-speed=5 "
    "! video/x-raw,format=NV12,width=322,height=242,framerate=30/1 ! identity drop-allocation=true"
)


@pytest.mark.parametrize(("upstream", "all_copied"), [(H264, None), (NO_POOL, True)], ids=["avdec_h264", "no-pool"])
def test_frames_written_outside_the_pool_are_copied_exactly(
    sock_path: str,
    launch: Callable[..., Launched],
    record_property: Callable[[str, object], None],
    upstream: str,
    all_copied: bool | None,
) -> None:
    """Upstream that ignores the offered pool: the sink copies each frame into a slot, pixels unchanged.

    avdec_h264 may or may not take the pool (GStreamer/libav decide); its counters are recorded
    (``record_property``, and printed: ``pytest -s``).
    """
    expected, _ = reference(upstream, "video/x-raw")
    assert len(expected) == 30
    assert_distinct(expected)

    producer = launch(
        RUN_PIPELINE,
        f"{upstream} ! framebussink name=sink socket-path={sock_path} wait-for-connection=true sync=false",
        python=True,
    )
    wait_for_producer(sock_path, producer)
    with Pipeline(
        f"framebussrc socket-path={sock_path} policy=block max-in-flight=4 reconnect=false "
        "! appsink name=out sync=false"
    ) as consumer:
        got, _ = consumer.pull_all()
    out = producer.assert_clean_exit()

    stats = producer_stats(out)
    for name, value in stats.items():
        record_property(name, value)
    print(f"{upstream.rsplit('!', 1)[-1].strip()} ! framebussink: {stats}")
    assert_same_frames(got, expected, f"{upstream.rsplit('!', 1)[-1].strip()} ! framebussink")
    assert stats["frames-dropped"] == 0
    assert stats["frames-zero-copy"] + stats["frames-copied"] == 30
    if all_copied:
        assert stats["frames-copied"] == 30


# ---------------------------------------------------------------------------- 3. Python Publisher -> framebussrc

PTS0 = 5 * Gst.SECOND  # the publisher's first timestamp; not 0, so "the producer's PTS" is visible


def known_plane(index: int, plane: int, rows: int, row_bytes: int) -> np.ndarray:
    """Frame ``index``'s ``plane``: random bytes, reproducible from the two numbers."""
    return np.random.default_rng((index, plane)).integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)


def publisher_main(argv: Sequence[str]) -> None:
    """Run in a producer process: publish frames of known content, half copied in, half written in place."""
    from framebus.publisher import Publisher

    path, fmt, width, height, n, strides = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5]
    with Publisher(
        path,
        fmt,
        width,
        height,
        framerate=(30, 1),
        on_full="block",
        strides=[int(s) for s in strides.split(",")] if strides else None,
    ) as pub:
        assert pub.wait_for_consumers(1, timeout=TIMEOUT), "no consumer came"
        for i in range(n):
            pts = PTS0 + i * FRAME_NS
            if i % 2:
                with pub.loan() as frame:
                    for p, dst in enumerate(frame.planes):
                        dst[...] = known_plane(i, p, dst.shape[0], dst[0].size).reshape(dst.shape)
                    seq = frame.publish(pts=pts, duration=FRAME_NS)
            else:
                planes = [
                    known_plane(i, p, pl.rows, pl.row_bytes).reshape(
                        (pl.rows, pl.columns) + ((pl.channels,) if pl.channels > 1 else ())
                    )
                    for p, pl in enumerate(pub.layout.planes)
                ]
                seq = pub.publish(planes, pts=pts, duration=FRAME_NS)
            assert seq == i, f"frame {i} published as {seq}"
        pub.end_of_stream()
        print("published", json.dumps(pub.stats.to_dict()), flush=True)


PUBLISH_SCRIPT = "import sys; from tests.test_gst_pixels import publisher_main; publisher_main(sys.argv[1:])"

PUBLISHER_CASES = [
    ("RGB", 333, 197, "1024"),  # rows padded by the publisher: only GstVideoMeta says where they are
    ("I420", 321, 241, ""),
    ("NV12", 64, 48, "128,128"),
    ("GRAY8", 99, 51, ""),
]


def expected_known(fmt: str, width: int, height: int, n: int) -> list[Digest]:
    info = GstVideo.VideoInfo.new_from_caps(
        Gst.Caps.from_string(f"video/x-raw,format={fmt},width={width},height={height}")
    )
    geometry = plane_geometry(info)
    return [tuple(digest_rows(known_plane(i, p, *g)) for p, g in enumerate(geometry)) for i in range(n)]


@pytest.mark.parametrize(("fmt", "width", "height", "strides"), PUBLISHER_CASES)
@pytest.mark.parametrize("is_live", [False, True])
def test_python_publisher_feeds_framebussrc_byte_exact(
    sock_path: str, launch: Callable[..., Launched], fmt: str, width: int, height: int, strides: str, is_live: bool
) -> None:
    """A Publisher in another process, half its frames copied in (publish), half written in place (loan).

    Observed and asserted: buffer offset = the publisher's sequence number; duration = the publisher's.
    is-live=false: PTS = the publisher's PTS, unchanged.  is-live=true: PTS = the moment of publishing as
    this pipeline's running time (both sides use CLOCK_MONOTONIC), so it follows the publisher's real
    pace (here ~1 ms apart, as fast as it publishes) rather than its 33 ms PTS steps; non-decreasing,
    clamped at 0 for frames published before the pipeline started playing.
    """
    n = 12
    producer = launch(PUBLISH_SCRIPT, sock_path, fmt, str(width), str(height), str(n), strides, python=True)
    wait_for_producer(sock_path, producer)
    with Pipeline(
        f"framebussrc name=src socket-path={sock_path} policy=block max-in-flight=4 reconnect=false "
        f"is-live={str(is_live).lower()} ! appsink name=out sync=false"
    ) as consumer:
        start = consumer.pipeline.get_base_time()
        got, stamps = consumer.pull_all()
        running_at_end = consumer.pipeline.get_clock().get_time() - start
        caps = consumer.sink.get_static_pad("sink").get_current_caps()
    producer.assert_clean_exit()

    structure = caps.get_structure(0)
    assert (structure.get_string("format"), structure.get_int("width")[1], structure.get_int("height")[1]) == (
        fmt,
        width,
        height,
    )
    assert structure.get_fraction("framerate")[1:] == (30, 1)
    assert_same_frames(got, expected_known(fmt, width, height, n), f"Publisher {fmt} {width}x{height}")
    assert [s.offset for s in stamps] == list(range(n))
    assert [s.duration for s in stamps] == [FRAME_NS] * n, "the publisher's durations pass through"
    pts = [s.pts for s in stamps]
    if not is_live:
        assert pts == [PTS0 + i * FRAME_NS for i in range(n)], "non-live: the publisher's PTS unchanged"
    else:
        # Live: the moment of publishing on this pipeline's clock (running time), never the publisher's PTS.
        assert all(0 <= t <= running_at_end for t in pts), (pts, running_at_end)
        assert pts == sorted(pts), f"live PTS go backwards: {pts}"
        assert pts[-1] > pts[0], f"live PTS do not advance: {pts}"


# ---------------------------------------------------------------------------- 4. framebussink -> Python Subscriber


@pytest.mark.parametrize(
    ("fmt", "width", "height", "pattern"),
    [("I420", 641, 361, "pattern=ball"), ("BGRx", 320, 240, "pattern=smpte horizontal-speed=4")],
)
def test_python_subscriber_reads_framebussink_pixels(
    sock_path: str, launch: Callable[..., Launched], fmt: str, width: int, height: int, pattern: str
) -> None:
    caps = f"video/x-raw,format={fmt},width={width},height={height},framerate=30/1"
    source = f"videotestsrc num-buffers={N_FRAMES} {pattern}"
    expected, _ = reference(source, caps)
    assert_distinct(expected)
    info = GstVideo.VideoInfo.new_from_caps(Gst.Caps.from_string(caps))
    geometry = plane_geometry(info)

    producer = gst_launch(
        launch, f"{source} ! {caps} ! framebussink socket-path={sock_path} wait-for-connection=true sync=false"
    )
    wait_for_producer(sock_path, producer)
    got: list[Digest] = []
    seqs = []
    with Subscriber(sock_path, max_in_flight=4, policy="block") as sub:
        while True:
            try:
                frame = sub.receive(timeout=TIMEOUT)
            except EndOfStream:
                break
            with frame:
                assert (frame.format, frame.width, frame.height) == (fmt, width, height)
                planes = frame.planes
                assert len(planes) == len(geometry)
                got.append(
                    tuple(
                        digest_rows(np.ascontiguousarray(plane).reshape(rows, row_bytes))
                        for plane, (rows, row_bytes) in zip(planes, geometry, strict=True)
                    )
                )
                seqs.append(frame.seq)
                del planes
            assert len(got) <= N_FRAMES, "more frames than the producer sent"
        missed = sub.stats.missed
    producer.assert_clean_exit()

    assert_same_frames(got, expected, f"Subscriber {fmt} {width}x{height}")
    assert seqs == list(range(N_FRAMES)) and missed == 0


# ---------------------------------------------------------------------------- 5. compositor over four processes

QUADRANTS = [  # pattern, sink pad position, RGBA the quadrant must hold
    ("red", (0, 0), (255, 0, 0, 255)),
    ("green", (160, 0), (0, 255, 0, 255)),
    ("blue", (0, 120), (0, 0, 255, 255)),
    ("white", (160, 120), (255, 255, 255, 255)),
]
BACKGROUND = (0, 0, 0, 255)


def test_compositor_mixes_four_producer_processes(sock_dir: str, launch: Callable[..., Launched]) -> None:
    paths = [os.path.join(sock_dir, f"feed{i}") for i in range(4)]
    pads = " ".join(f"sink_{i}::xpos={x} sink_{i}::ypos={y}" for i, (_, (x, y), _) in enumerate(QUADRANTS))
    feeds = " ".join(f"framebussrc socket-path={path} ! mix.sink_{i}" for i, path in enumerate(paths))
    description = (
        f"compositor name=mix background=black {pads} ! video/x-raw,format=RGBA,width=320,height=240 "
        f"! appsink name=out sync=false max-buffers=2 drop=true {feeds}"
    )
    # The mixer starts first: its framebussrc elements (reconnect=true) wait for the producers to appear.
    with Pipeline(description) as mixer:
        producers = [
            gst_launch(
                launch,
                f"videotestsrc is-live=true pattern={pattern} "
                f"! video/x-raw,format=RGBA,width=160,height=120,framerate=30/1 ! framebussink socket-path={path}",
            )
            for (pattern, _, _), path in zip(QUADRANTS, paths, strict=True)
        ]
        deadline = time.monotonic() + TIMEOUT
        quadrants: list[np.ndarray] = []
        while not quadrants:
            for proc in producers:
                assert proc.popen.poll() is None, f"a producer exited:\n{proc.output()}"
            assert time.monotonic() < deadline, f"no frame with all four feeds within {TIMEOUT} s: {mixer.errors()}"
            sample = mixer.pull()
            assert sample is not None, "the mixer ended"
            info = GstVideo.VideoInfo.new_from_caps(sample.get_caps())
            assert (info.finfo.name, info.width, info.height) == ("RGBA", 320, 240)
            buffer = sample.get_buffer()
            ok, mapped = buffer.map(Gst.MapFlags.READ)
            assert ok
            try:
                rows = np.lib.stride_tricks.as_strided(
                    np.frombuffer(mapped.data, dtype=np.uint8), shape=(240, 320 * 4), strides=(info.stride[0], 1)
                )
                frame = rows.reshape(240, 320, 4).copy()
                del rows
            finally:
                buffer.unmap(mapped)
            del sample, buffer
            candidate = [frame[y : y + 120, x : x + 160] for _, (x, y), _ in QUADRANTS]
            if all((q != BACKGROUND).any() for q in candidate):
                quadrants = candidate  # every feed has arrived

    for (pattern, (x, y), rgba), quadrant in zip(QUADRANTS, quadrants, strict=True):
        colours, counts = np.unique(quadrant.reshape(-1, 4), axis=0, return_counts=True)
        assert [tuple(int(v) for v in c) for c in colours] == [rgba], (
            f"{pattern} quadrant at ({x},{y}) holds {len(colours)} colours, the most common "
            f"{tuple(colours[counts.argmax()])} ({counts.max()} of {quadrant.shape[0] * quadrant.shape[1]} pixels)"
        )
