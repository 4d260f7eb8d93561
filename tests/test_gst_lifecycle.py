"""framebussink and framebussrc in real GStreamer pipelines: zero-copy, release exactness, lifecycle, errors.

Every wait is on an event (a bus message, an appsink pull, a pad probe,
``Publisher.wait_until``), never on a sleep.

Release exactness is read on both ends: ``Publisher.stats`` (asynchronous,
through the socket, so waited on) and the subscriber's own in-flight set
(``held``), which changes synchronously the moment the last reference to
a buffer is dropped, so "still held" can be asserted without waiting.

Python publishers here use ``on_full="block"``: a release is sent the moment a buffer dies but reaches the
producer's IO thread a little later, and a 'drop' producer would drop a frame whose slot is only "in the
post" (seen on a loaded 2-CPU machine); 'block' waits for it, so every frame published is delivered.

One GStreamer 1.22 behaviour shapes these tests: appsink keeps the buffer
of the sample pulled last in its cached ``GstSample`` until the next pull
or until the appsink starts again (NULL -> PLAYING); dropping every sample
in Python therefore leaves exactly that one slot held.  The tests account
for it exactly (``restart_appsink``), they do not tolerate it loosely.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import framebus.gst
from framebus.errors import EndOfStream, ReceiveTimeout
from framebus.gst import ffi
from framebus.protocol import FrameFlags
from framebus.publisher import ConsumerStats, Publisher, PublisherStats
from framebus.subscriber import Subscriber

framebus.gst.register()

from gi.repository import GLib, Gst, GstVideo  # noqa: E402

APPSINK = "appsink sync=false enable-last-sample=false"
MSG_END = Gst.MessageType.EOS | Gst.MessageType.ERROR
TIMEOUT = 10.0


# ---------------------------------------------------------------------------------------------- helpers


class Pipelines:
    """Pipelines a test launched; the fixture sets every one still known to NULL, even after a failure."""

    def __init__(self) -> None:
        self.live: list[Gst.Element] = []

    def launch(self, description: str) -> Gst.Element:
        pipeline = Gst.parse_launch(description)
        self.live.append(pipeline)
        return pipeline

    def forget(self, pipeline: Gst.Element) -> None:
        """Stop and drop our reference (leak tests need the pipeline really gone)."""
        stop(pipeline)
        self.live.remove(pipeline)


@pytest.fixture
def pipelines() -> Iterator[Pipelines]:
    made = Pipelines()
    yield made
    for pipeline in made.live:
        pipeline.set_state(Gst.State.NULL)
    made.live.clear()
    gc.collect()


def describe(msg: Gst.Message | None) -> str:
    if msg is None:
        return "no message"
    if msg.type == Gst.MessageType.ERROR:
        err, debug = msg.parse_error()
        return f"ERROR from {msg.src.get_name()}: {err.message} ({debug})"
    return f"{msg.type.first_value_nick} from {msg.src.get_name()}"


def wait_message(pipeline: Gst.Element, types: Gst.MessageType, timeout: float = TIMEOUT) -> Gst.Message:
    msg = pipeline.get_bus().timed_pop_filtered(int(timeout * Gst.SECOND), types)
    assert msg is not None, f"no {types!r} message within {timeout} s"
    return msg


def expect_eos(pipeline: Gst.Element) -> None:
    msg = wait_message(pipeline, MSG_END)
    assert msg.type == Gst.MessageType.EOS, describe(msg)


def expect_no_end(pipeline: Gst.Element) -> None:
    """Neither an error nor EOS has been posted so far (checked after an event proved the flow is alive)."""
    msg = pipeline.get_bus().pop_filtered(MSG_END)
    assert msg is None, describe(msg)


def start_publishing(pipeline: Gst.Element, sink: str = "s") -> None:
    """PLAYING, and wait until the first buffer reaches the framebussink: by then it has caps and a socket.

    (With wait-for-connection the sink holds that buffer, even at preroll, until a consumer attaches.)
    """
    arrived = threading.Event()

    def probe(_pad: Gst.Pad, _info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        arrived.set()
        return Gst.PadProbeReturn.REMOVE

    pipeline.get_by_name(sink).get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, probe)
    assert pipeline.set_state(Gst.State.PLAYING) != Gst.StateChangeReturn.FAILURE
    assert arrived.wait(TIMEOUT), describe(pipeline.get_bus().pop_filtered(MSG_END))


def stop(pipeline: Gst.Element) -> None:
    assert pipeline.set_state(Gst.State.NULL) == Gst.StateChangeReturn.SUCCESS


def pull(appsink: Gst.Element, timeout: float = TIMEOUT) -> Gst.Sample:
    sample = appsink.emit("try-pull-sample", int(timeout * Gst.SECOND))
    assert sample is not None, f"{appsink.get_name()}: no sample within {timeout} s"
    return sample


def restart_appsink(appsink: Gst.Element) -> None:
    """Drop appsink's cached last sample: it is cleared when the appsink starts again (see module docstring)."""
    assert appsink.set_state(Gst.State.NULL) == Gst.StateChangeReturn.SUCCESS
    assert appsink.sync_state_with_parent()


def caps_size(sample: Gst.Sample) -> tuple[int, int]:
    s = sample.get_caps().get_structure(0)
    return s.get_value("width"), s.get_value("height")


def held(src: Gst.Element) -> list[int]:
    """Sequence numbers framebussrc received and has not released (its subscriber's own bookkeeping)."""
    conn = src._sub._conn
    return sorted(conn.in_flight_frames()) if conn is not None else []


def only_consumer(stats: PublisherStats) -> ConsumerStats | None:
    return stats.consumers[0] if len(stats.consumers) == 1 else None


def wait_consumer(pub: Publisher, in_flight: int, released: int | None = None, timeout: float = TIMEOUT) -> None:
    def done(stats: PublisherStats) -> bool:
        c = only_consumer(stats)
        return c is not None and c.in_flight == in_flight and (released is None or c.released == released)

    assert pub.wait_until(done, timeout), f"want in_flight={in_flight} released={released}, have {pub.stats.consumers}"


def publish(pub: Publisher, value: int, pts: int | None = None) -> None:
    with pub.loan() as frame:
        frame.buffer[:] = value
        frame.publish(pts=pts)


def on_buffer(pad: Gst.Pad, offset: int) -> threading.Event:
    """An event set when the buffer with this offset (framebussrc: the frame's seq) passes ``pad``."""
    seen = threading.Event()

    def probe(_pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        buf = info.get_buffer()
        if buf is not None and buf.offset == offset:
            seen.set()
        return Gst.PadProbeReturn.OK

    pad.add_probe(Gst.PadProbeType.BUFFER, probe)
    return seen


def data_address(buffer: Gst.Buffer) -> tuple[int, int]:
    """Where the buffer's bytes are in this process, and how many (mapped READ, unmapped again)."""
    ok, info = buffer.map(Gst.MapFlags.READ)
    assert ok
    try:
        data = np.frombuffer(info.data, np.uint8)
        return int(data.ctypes.data), int(data.size)
    finally:
        del data
        buffer.unmap(info)


def rgba_pixels(sample: Gst.Sample) -> np.ndarray:
    """The sample's RGBA image as (height, width, 4), copied out, honouring the stride."""
    info = GstVideo.VideoInfo.new_from_caps(sample.get_caps())
    assert info.finfo.name == "RGBA"
    buf = sample.get_buffer()
    ok, mapped = buf.map(Gst.MapFlags.READ)
    assert ok
    try:
        rows = np.frombuffer(mapped.data, np.uint8)[: info.stride[0] * info.height].reshape(info.height, -1)
        return rows[:, : info.width * 4].reshape(info.height, info.width, 4).copy()
    finally:
        del rows
        buf.unmap(mapped)


def mapping_of(address: int) -> tuple[str, str]:
    """(permissions, pathname) of the /proc/self/maps entry containing ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[1], fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"address {address:#x} is not mapped")


def framebus_mappings(name: str = "framebus") -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if name in line)


def run_or_hang(what: str, action: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Run ``action`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(action()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"{what} still blocked after {timeout} s"
    return result[0]


def resources(sock_dir: str) -> dict[str, Any]:
    gc.collect()
    shm = os.listdir("/dev/shm")
    fds = os.listdir("/proc/self/fd")
    fd_targets = []
    for fd in fds:
        try:
            fd_targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own descriptor is gone already
    return {
        "fds": len(fds),
        "fds in /dev/shm": sorted(t for t in fd_targets if t.startswith("/dev/shm")),
        "framebus mappings": framebus_mappings(),
        "python threads": threading.active_count(),
        "tasks": len(os.listdir("/proc/self/task")),
        "pending callbacks": ffi.pending_callbacks(),
        "socket files": sorted(os.listdir(sock_dir)),
        "framebus /dev/shm entries": sorted(e for e in shm if "framebus" in e),
    }


# GStreamer's task pool is a shared GLib thread pool: a stopping streaming thread that has not yet gone back to
# the pool when the next task starts makes the pool start another, and GLib keeps up to this many idle ones
# (g_thread_pool_get_max_unused_threads(), default 2).  A leak of one thread per cycle would be 50.
IDLE_POOL_THREADS = 2


def assert_no_growth(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Everything identical, except native threads, which may differ by GLib's idle pool threads."""
    assert after["tasks"] <= before["tasks"] + IDLE_POOL_THREADS, (before, after)
    assert {k: v for k, v in after.items() if k != "tasks"} == {k: v for k, v in before.items() if k != "tasks"}


# ------------------------------------------------------------------------ 1. zero-copy upstream (framebussink)

N_FRAMES = 5
UPSTREAMS = {
    "caps": (
        "videotestsrc num-buffers={n} pattern=ball ! video/x-raw,format=RGBA,width=64,height=48,framerate=30/1",
        (64, 48),
    ),
    "videoconvert": (
        "videotestsrc num-buffers={n} pattern=ball ! video/x-raw,format=I420,width=64,height=48,framerate=30/1 "
        "! videoconvert ! video/x-raw,format=RGBA",
        (64, 48),
    ),
    "videoscale": (
        "videotestsrc num-buffers={n} pattern=ball ! video/x-raw,format=RGBA,width=64,height=48,framerate=30/1 "
        "! videoscale ! video/x-raw,width=40,height=30",
        (40, 30),
    ),
}


def reference_frames(pipelines: Pipelines, upstream: str, n: int) -> list[np.ndarray]:
    """What the same upstream produces into a plain appsink: the pixels the slots must hold."""
    pipeline = pipelines.launch(f"{upstream} ! {APPSINK} name=ref")
    appsink = pipeline.get_by_name("ref")
    pipeline.set_state(Gst.State.PLAYING)
    frames = [rgba_pixels(pull(appsink)) for _ in range(n)]
    expect_eos(pipeline)
    del appsink
    pipelines.forget(pipeline)
    return frames


@pytest.mark.parametrize("queue", [False, True], ids=["direct", "queue"])
@pytest.mark.parametrize("upstream", sorted(UPSTREAMS))
def test_upstream_writes_into_slots_and_subscriber_gets_the_pixels(
    pipelines: Pipelines, sock_path: str, upstream: str, queue: bool
) -> None:
    description, (width, height) = UPSTREAMS[upstream]
    description = description.format(n=N_FRAMES)
    expected = reference_frames(pipelines, description, N_FRAMES)
    assert not all(np.array_equal(expected[0], e) for e in expected[1:]), "the pattern should move"

    pipeline = pipelines.launch(
        f"{description} {'! queue ' if queue else ''}! framebussink name=s socket-path={sock_path} "
        "wait-for-connection=true sync=false"
    )
    start_publishing(pipeline)
    received = []
    with Subscriber(sock_path, policy="block", max_in_flight=4) as sub:
        while True:
            try:
                frame = sub.receive(timeout=TIMEOUT)
            except EndOfStream:
                break
            received.append((frame.seq, frame.format, frame.width, frame.height, frame.array.copy()))
            frame.release()
        missed = sub.stats.missed
    expect_eos(pipeline)
    sink = pipeline.get_by_name("s")
    counters = [sink.get_property(name) for name in ("frames-zero-copy", "frames-copied", "frames-dropped")]
    assert counters == [N_FRAMES, 0, 0]
    assert missed == 0
    assert [r[:4] for r in received] == [(i, "RGBA", width, height) for i in range(N_FRAMES)]
    for i, (*_, pixels) in enumerate(received):
        assert np.array_equal(pixels, expected[i]), f"frame {i} differs from what {upstream} produced"


# ---------------------------------------------------------------------- 2. zero-copy downstream (framebussrc)


def test_src_buffers_are_read_only_views_of_the_producers_slots(pipelines: Pipelines, sock_path: str) -> None:
    pending = ffi.pending_callbacks()
    with Publisher(sock_path, "RGBA", 32, 24, framerate=30, slots=4, on_full="block") as pub:
        pipeline = pipelines.launch(
            f"framebussrc name=src socket-path={sock_path} policy=block max-in-flight=3 ! {APPSINK} name=a"
        )
        src, appsink = pipeline.get_by_name("src"), pipeline.get_by_name("a")
        pipeline.set_state(Gst.State.PLAYING)
        assert pub.wait_for_consumers(1, TIMEOUT)
        for i in range(3):
            publish(pub, 10 + i)
        samples = [pull(appsink) for _ in range(3)]
        assert ffi.pending_callbacks() == pending + 3

        mapping = src._sub._mappings[pub.generation]
        slot_starts = {mapping.addresses[p.fd_index] + p.offset for p in mapping.segment.placements}
        assert len(slot_starts) == 4
        addresses = []
        for i, sample in enumerate(samples):
            buf = sample.get_buffer()
            assert buf.offset == i and buf.n_memory() == 1
            mem = buf.peek_memory(0)
            assert mem.mini_object.flags & Gst.MemoryFlags.READONLY
            ok, _info = mem.map(Gst.MapFlags.WRITE)
            assert not ok, "a slot of the producer must not be writable downstream"
            address, size = data_address(buf)
            assert address in slot_starts, f"buffer data at {address:#x} is not a slot start {slot_starts}"
            assert size == pub.layout.size <= mapping.segment.slot_size
            perms, path = mapping_of(address)
            assert perms == "r--s" and "memfd:framebus" in path, (perms, path)
            assert np.array_equal(rgba_pixels(sample), np.full((24, 32, 4), 10 + i, np.uint8))
            addresses.append(address)
        assert len(set(addresses)) == 3, "three held frames are three different slots"
        del samples, sample, buf, mem, _info
        restart_appsink(appsink)  # its cached sample held the last one
        wait_consumer(pub, in_flight=0, released=3)
        assert ffi.pending_callbacks() == pending
        expect_no_end(pipeline)
        del src, appsink


# ------------------------------------------------------------------------------------- 3. release exactness


def _src_pipeline(pipelines: Pipelines, path: str, tail: str, max_in_flight: int) -> Gst.Element:
    pipeline = pipelines.launch(
        f"framebussrc name=src socket-path={path} policy=block max-in-flight={max_in_flight} ! {tail}"
    )
    pipeline.set_state(Gst.State.PLAYING)
    return pipeline


def test_appsink_samples_hold_their_slots_until_dropped(pipelines: Pipelines, sock_path: str) -> None:
    n = 4
    with Publisher(sock_path, "RGBA", 32, 24, framerate=30, slots=8, on_full="block") as pub:
        pipeline = _src_pipeline(pipelines, sock_path, f"{APPSINK} name=a", max_in_flight=n + 1)
        src, appsink = pipeline.get_by_name("src"), pipeline.get_by_name("a")
        assert pub.wait_for_consumers(1, TIMEOUT)
        for i in range(n + 1):
            publish(pub, i)
        samples = [pull(appsink) for _ in range(n + 1)]
        assert [s.get_buffer().offset for s in samples] == list(range(n + 1))
        wait_consumer(pub, in_flight=n + 1, released=0)
        assert held(src) == list(range(n + 1))

        samples.pop()  # the newest: appsink's cached sample still references it
        assert held(src) == list(range(n + 1))
        for i in range(n):
            del samples[0]  # the last reference to frame i: released on the spot, and only it
            assert held(src) == list(range(i + 1, n + 1))
            wait_consumer(pub, in_flight=n - i, released=i + 1)

        restart_appsink(appsink)
        assert held(src) == []
        wait_consumer(pub, in_flight=0, released=n + 1)

        publish(pub, 99)  # still flowing after all that
        assert pull(appsink).get_buffer().offset == n + 1
        expect_no_end(pipeline)
        del src, appsink


def test_frames_waiting_in_a_queue_hold_slots(pipelines: Pipelines, sock_path: str) -> None:
    n = 5
    with Publisher(sock_path, "RGBA", 32, 24, framerate=30, slots=8, on_full="block") as pub:
        # appsink max-buffers=1: one frame in appsink, one blocked in its render, the rest in the queue.
        pipeline = _src_pipeline(pipelines, sock_path, f"queue ! {APPSINK} name=a max-buffers=1", max_in_flight=n + 1)
        src, appsink = pipeline.get_by_name("src"), pipeline.get_by_name("a")
        last_out = on_buffer(src.get_static_pad("src"), n - 1)
        assert pub.wait_for_consumers(1, TIMEOUT)
        for i in range(n):
            publish(pub, i)
        assert last_out.wait(TIMEOUT)
        assert held(src) == list(range(n))
        wait_consumer(pub, in_flight=n, released=0)

        for i in range(n):
            sample = pull(appsink)
            assert sample.get_buffer().offset == i
            del sample  # appsink's cache keeps frame i; pulling it released frame i - 1
            assert held(src) == list(range(i, n))
        wait_consumer(pub, in_flight=1, released=n - 1)
        restart_appsink(appsink)
        assert held(src) == []
        wait_consumer(pub, in_flight=0, released=n)
        expect_no_end(pipeline)
        del src, appsink


@pytest.mark.parametrize("first", ["a1", "a2"])
def test_tee_releases_a_slot_only_after_both_branches_dropped_it(
    pipelines: Pipelines, sock_path: str, first: str
) -> None:
    with Publisher(sock_path, "RGBA", 32, 24, framerate=30, slots=8, on_full="block") as pub:
        pipeline = _src_pipeline(
            pipelines,
            sock_path,
            f"tee name=t ! queue ! {APPSINK} name=a1  t. ! queue ! {APPSINK} name=a2",
            max_in_flight=4,
        )
        src = pipeline.get_by_name("src")
        sinks = {name: pipeline.get_by_name(name) for name in ("a1", "a2")}
        assert pub.wait_for_consumers(1, TIMEOUT)
        publish(pub, 1)
        publish(pub, 2)
        kept = {name: pull(sink) for name, sink in sinks.items()}
        addresses = {data_address(s.get_buffer())[0] for s in kept.values()}
        assert len(addresses) == 1, "tee passes the same slot to both branches, no copy"
        for sink in sinks.values():
            assert pull(sink).get_buffer().offset == 1  # moves appsink's cache to frame 1
        assert [s.get_buffer().offset for s in kept.values()] == [0, 0]
        assert held(src) == [0, 1]

        del kept[first]
        assert held(src) == [0, 1], "one branch still holds frame 0"
        kept.clear()
        assert held(src) == [1]
        wait_consumer(pub, in_flight=1, released=1)

        for sink in sinks.values():
            restart_appsink(sink)
        wait_consumer(pub, in_flight=0, released=2)
        expect_no_end(pipeline)
        del src, sinks


def test_videoconvert_releases_the_slot_right_after_converting(pipelines: Pipelines, sock_path: str) -> None:
    n = 3
    with Publisher(sock_path, "RGBA", 32, 24, framerate=30, slots=4, on_full="block") as pub:
        pipeline = _src_pipeline(
            pipelines, sock_path, f"videoconvert ! video/x-raw,format=I420 ! {APPSINK} name=a", max_in_flight=n
        )
        src, appsink = pipeline.get_by_name("src"), pipeline.get_by_name("a")
        assert pub.wait_for_consumers(1, TIMEOUT)
        for i in range(n):
            publish(pub, 50 + i)
        samples = [pull(appsink) for _ in range(n)]  # every converted frame kept...
        wait_consumer(pub, in_flight=0, released=n)  # ...yet no slot is held
        assert held(src) == []
        mapping = src._sub._mappings[pub.generation]
        segment_start = min(mapping.addresses)
        segment_end = max(a + len(m) for a, m in zip(mapping.addresses, mapping.segment.maps, strict=True))
        for sample in samples:
            address, size = data_address(sample.get_buffer())
            assert not segment_start <= address < segment_end, "videoconvert's output is its own memory"
            assert size == 32 * 24 * 3 // 2
        expect_no_end(pipeline)
        del samples, sample, src, appsink


def test_compositor_keeps_only_the_newest_frame_of_the_src(pipelines: Pipelines, sock_path: str) -> None:
    n = 6
    pending = ffi.pending_callbacks()
    with Publisher(sock_path, "RGBA", 32, 24, framerate=30, slots=8, on_full="block") as pub:
        pipeline = pipelines.launch(
            f"framebussrc name=src socket-path={sock_path} policy=block max-in-flight=2 ! compositor name=c "
            f"! video/x-raw,format=RGBA,width=32,height=24 ! {APPSINK} name=a max-buffers=1 drop=true  "
            "videotestsrc is-live=true pattern=black ! video/x-raw,format=RGBA,width=32,height=24,framerate=30/1 ! c."
        )
        pipeline.set_state(Gst.State.PLAYING)
        src, appsink = pipeline.get_by_name("src"), pipeline.get_by_name("a")
        assert pub.wait_for_consumers(1, TIMEOUT)
        for i in range(n):
            publish(pub, 100 + i)  # blocks while the compositor holds two: it must let go to go on
        # The compositor repeats the newest frame of each input, so it keeps exactly that one.
        wait_consumer(pub, in_flight=1, released=n - 1)
        assert held(src) == [n - 1]
        pull(appsink)  # and it is producing output
        expect_no_end(pipeline)
        del src, appsink
        pipelines.forget(pipeline)
        assert ffi.pending_callbacks() == pending
        assert pub.wait_until(lambda s: not s.consumers, TIMEOUT)


# ------------------------------------------------------------------------ 4. NULL -> PLAYING -> NULL, 50 times

CYCLES = 50


def test_sink_pipeline_cycles_leak_nothing(pipelines: Pipelines, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "feed")
    before_pipeline = resources(sock_dir)
    pipeline = pipelines.launch(
        "videotestsrc num-buffers=3 ! video/x-raw,format=RGBA,width=32,height=24,framerate=30/1 "
        f"! framebussink name=s socket-path={path} wait-for-connection=true sync=false"
    )

    def cycle(pipeline: Gst.Element) -> None:
        start_publishing(pipeline)
        with Subscriber(path, policy="block", max_in_flight=2) as sub:
            seqs = []
            while True:
                try:
                    with sub.receive(timeout=TIMEOUT) as frame:
                        seqs.append(frame.seq)
                except EndOfStream:
                    break
        expect_eos(pipeline)
        assert seqs == [0, 1, 2]
        assert pipeline.get_by_name("s").get_property("frames-zero-copy") == 3
        stop(pipeline)
        assert os.listdir(sock_dir) == [], "the sink removes its socket when stopped"

    cycle(pipeline)  # warm-up: GStreamer's thread pools, caches, plugin loading
    baseline = resources(sock_dir)
    for _ in range(CYCLES):
        cycle(pipeline)
    assert_no_growth(baseline, resources(sock_dir))
    pipelines.forget(pipeline)
    del pipeline
    after = resources(sock_dir)
    assert after["tasks"] <= baseline["tasks"] + IDLE_POOL_THREADS
    assert {k: v for k, v in after.items() if k != "tasks"} == {
        k: v for k, v in before_pipeline.items() if k != "tasks"
    }


def test_src_pipeline_cycles_leak_nothing(pipelines: Pipelines, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "feed")
    before_publisher = resources(sock_dir)
    with Publisher(path, "RGBA", 32, 24, framerate=30, slots=4, on_full="block") as pub:
        before_pipeline = resources(sock_dir)
        pipeline = pipelines.launch(f"framebussrc socket-path={path} policy=block max-in-flight=2 ! {APPSINK} name=a")
        seq = [0]

        def cycle(pipeline: Gst.Element) -> None:
            pipeline.set_state(Gst.State.PLAYING)
            assert pub.wait_for_consumers(1, TIMEOUT)
            publish(pub, seq[0] % 256)
            appsink = pipeline.get_by_name("a")
            # A consumer that attaches is offered the producer's newest frame first: pull until ours.
            offsets = [pull(appsink).get_buffer().offset]
            if offsets[0] != seq[0]:
                offsets.append(pull(appsink).get_buffer().offset)
            assert offsets[-1] == seq[0] and len(offsets) <= 2, offsets
            del appsink
            stop(pipeline)
            assert pub.wait_until(lambda s: not s.consumers, TIMEOUT)
            seq[0] += 1

        cycle(pipeline)  # warm-up; from now on appsink's cached sample holds one slot buffer in every NULL state
        baseline = resources(sock_dir)
        assert baseline["pending callbacks"] == before_pipeline["pending callbacks"] + 1
        for _ in range(CYCLES):
            cycle(pipeline)
        assert_no_growth(baseline, resources(sock_dir))
        assert pub.stats.published == CYCLES + 1
        pipelines.forget(pipeline)
        del pipeline
        after = resources(sock_dir)
        assert after["tasks"] <= baseline["tasks"] + IDLE_POOL_THREADS
        assert {k: v for k, v in after.items() if k != "tasks"} == {
            k: v for k, v in before_pipeline.items() if k != "tasks"
        }
    after = resources(sock_dir)
    assert {k: v for k, v in after.items() if k != "tasks"} == {
        k: v for k, v in before_publisher.items() if k != "tasks"
    }


# ---------------------------------------------------------------------------------------- 5. seeks, flushes


def test_flushing_seek_on_the_sink_side_keeps_publishing_and_leaks_nothing(pipelines: Pipelines, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "feed")
    before = resources(sock_dir)

    def ts(n: int) -> int:
        return int(Gst.util_uint64_scale(n, Gst.SECOND, 30))  # videotestsrc's timestamp of frame n

    pipeline = pipelines.launch(
        "videotestsrc ! video/x-raw,format=RGBA,width=32,height=24,framerate=30/1 "
        f"! framebussink name=s socket-path={path} wait-for-connection=true"
    )
    start_publishing(pipeline)
    received: list[tuple[int, bool]] = []
    with Subscriber(path, policy="block", max_in_flight=8) as sub:

        def take() -> None:
            with sub.receive(timeout=TIMEOUT) as frame:
                assert frame.pts is not None
                received.append((frame.pts, bool(frame.flags & FrameFlags.DISCONT)))

        for _ in range(3):
            take()
        seek_to, seek_stop = ts(60), ts(69)
        assert pipeline.seek(
            1.0,
            Gst.Format.TIME,
            Gst.SeekFlags.FLUSH | Gst.SeekFlags.ACCURATE,
            Gst.SeekType.SET,
            seek_to,
            Gst.SeekType.SET,
            seek_stop,
        )
        while True:
            try:
                take()
            except EndOfStream:
                break
        missed = sub.stats.missed
    expect_eos(pipeline)
    sink = pipeline.get_by_name("s")
    zero_copy, copied = sink.get_property("frames-zero-copy"), sink.get_property("frames-copied")

    before_seek = [pts for pts, _ in received if pts < seek_to]
    after_seek = [(pts, discont) for pts, discont in received if pts >= seek_to]
    assert before_seek == [ts(i) for i in range(len(before_seek))] and len(before_seek) >= 3
    assert [pts for pts, _ in after_seek] == [ts(i) for i in range(60, 69)]
    assert after_seek[0][1], "the first frame after a flushing seek is DISCONT"
    assert [pts for pts, _ in received] == sorted(pts for pts, _ in received)
    assert missed == 0
    assert (zero_copy, copied) == (len(received), 0)
    del sink
    pipelines.forget(pipeline)
    del pipeline
    assert_no_growth(before, resources(sock_dir))


def test_flush_and_pause_interrupt_a_blocked_framebussrc(pipelines: Pipelines, sock_path: str) -> None:
    with Publisher(sock_path, "RGBA", 32, 24, framerate=30, slots=4, on_full="block") as pub:
        pipeline = pipelines.launch(f"framebussrc name=src socket-path={sock_path} reconnect=false ! {APPSINK} name=a")
        src, appsink = pipeline.get_by_name("src"), pipeline.get_by_name("a")
        pipeline.set_state(Gst.State.PLAYING)
        assert pub.wait_for_consumers(1, TIMEOUT)
        publish(pub, 1)
        assert pull(appsink).get_buffer().offset == 0
        # The streaming thread is now blocked in receive(), no frame coming.  flush-stop takes the
        # stream lock: it returns only if flush-start's unlock interrupted that receive.
        assert run_or_hang("flush-start", lambda: src.send_event(Gst.Event.new_flush_start()))
        assert run_or_hang("flush-stop", lambda: src.send_event(Gst.Event.new_flush_stop(True)))
        publish(pub, 2)
        assert pull(appsink).get_buffer().offset == 1
        # A live source going to PAUSED must also get out of receive() (the live lock is held there).
        paused = run_or_hang("PLAYING -> PAUSED", lambda: pipeline.set_state(Gst.State.PAUSED))
        assert paused != Gst.StateChangeReturn.FAILURE
        assert run_or_hang("get_state", lambda: pipeline.get_state(5 * Gst.SECOND)[0]) != Gst.StateChangeReturn.FAILURE
        assert pipeline.set_state(Gst.State.PLAYING) != Gst.StateChangeReturn.FAILURE
        publish(pub, 3)
        assert pull(appsink).get_buffer().offset == 2
        # A seek from downstream is refused (not seekable); one sent to the element itself makes basesrc
        # flush and restart its task: neither may hang, and frames keep coming.
        assert not run_or_hang("pipeline seek", lambda: pipeline.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH, 0))
        publish(pub, 4)
        assert pull(appsink).get_buffer().offset == 3
        run_or_hang("element seek", lambda: src.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH, 0))
        publish(pub, 5)
        assert pull(appsink).get_buffer().offset == 4
        expect_no_end(pipeline)
        assert src.get_property("frames-received") == 5
        assert run_or_hang("-> NULL", lambda: pipeline.set_state(Gst.State.NULL)) == Gst.StateChangeReturn.SUCCESS


BLOCKING_SINK = (
    "videotestsrc name=up ! video/x-raw,format=RGBA,width=32,height=24,framerate=30/1 ! framebussink name=s "
    "socket-path={path} slots=3 on-full=block block-timeout={timeout} sync=false wait-for-connection=true"
)


def hold_every_slot(pipeline: Gst.Element, sub: Subscriber) -> tuple[list[Any], threading.Event]:
    """Receive and keep the sink's three frames; the event is set once upstream asks for a fourth slot.

    The wrapper only watches the sink's (private) publisher: it sets the event when a slot is asked for
    while none is free, i.e. right before the streaming thread starts waiting in ``loan``.
    """
    pub = pipeline.get_by_name("s")._pub
    original = pub.loan
    starved = threading.Event()

    def loan(*args: Any, **kwargs: Any) -> Any:
        if pub.stats.slots_free == 0:
            starved.set()
        return original(*args, **kwargs)

    pub.loan = loan
    held = [sub.receive(timeout=TIMEOUT) for _ in range(3)]
    assert [f.seq for f in held] == [0, 1, 2]
    return held, starved


@pytest.mark.parametrize("action", ["flushing-seek", "stop"])
def test_a_sink_waiting_for_a_free_slot_is_interrupted(pipelines: Pipelines, sock_path: str, action: str) -> None:
    """on-full=block waits up to block-timeout for a slot; a flush or a state change must not wait that long."""
    pipeline = pipelines.launch(BLOCKING_SINK.format(path=sock_path, timeout=8))
    start_publishing(pipeline)
    with Subscriber(sock_path, policy="drop", max_in_flight=3) as sub:
        held, starved = hold_every_slot(pipeline, sub)
        try:
            assert starved.wait(TIMEOUT), "upstream never asked for a fourth slot"
            if action == "stop":
                stopped = run_or_hang("-> NULL", lambda: pipeline.set_state(Gst.State.NULL), 2.0)
                assert stopped == Gst.StateChangeReturn.SUCCESS
                return
            seek = lambda: pipeline.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH, 0)  # noqa: E731
            assert run_or_hang("flushing seek", seek, 2.0)
        finally:
            for frame in held:
                frame.release()
        with sub.receive(timeout=TIMEOUT) as frame:  # and it goes on once slots come back
            assert frame.seq >= 3
        expect_no_end(pipeline)


def test_a_sink_that_times_out_waiting_for_a_slot_does_not_stall_silently(pipelines: Pipelines, sock_path: str) -> None:
    """After block-timeout either an element error names the path, or the stream goes on once slots free up."""
    pipeline = pipelines.launch(BLOCKING_SINK.format(path=sock_path, timeout=0.5))
    start_publishing(pipeline)
    with Subscriber(sock_path, policy="drop", max_in_flight=3) as sub:
        held, starved = hold_every_slot(pipeline, sub)
        assert starved.wait(TIMEOUT)
        msg = pipeline.get_bus().timed_pop_filtered(3 * Gst.SECOND, Gst.MessageType.ERROR)
        for frame in held:
            frame.release()
        if msg is not None:
            err, _debug = msg.parse_error()
            assert sock_path in err.message, describe(msg)
            return
        try:
            with sub.receive(timeout=3.0) as frame:
                assert frame.seq >= 3
        except ReceiveTimeout:
            src_pad = pipeline.get_by_name("up").get_static_pad("src")
            pytest.fail(
                "block-timeout expired with no error on the bus, and no frame came after every slot was released: "
                f"the pipeline stalled silently (upstream task {src_pad.get_task_state().value_nick})"
            )


# ------------------------------------------------------------------------------------ 6. caps change mid-stream


def test_publisher_format_change_reaches_downstream_through_videoconvert(pipelines: Pipelines, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "caps-change")  # a name of its own: its memfds are looked up in /proc/self/maps
    with Publisher(path, "RGBA", 640, 480, framerate=30, slots=3, on_full="block") as pub:
        pipeline = _src_pipeline(
            pipelines, path, f"videoconvert ! video/x-raw,format=I420 ! {APPSINK} name=a", max_in_flight=2
        )
        src, appsink = pipeline.get_by_name("src"), pipeline.get_by_name("a")
        assert pub.wait_for_consumers(1, TIMEOUT)
        sizes = []
        for i in range(2):
            publish(pub, i)
            sample = pull(appsink)
            sizes.append((caps_size(sample), sample.get_buffer().get_size()))
        pub.set_format("RGBA", 1280, 720, framerate=30)
        for i in range(2):
            publish(pub, 10 + i)
            sample = pull(appsink)
            sizes.append((caps_size(sample), sample.get_buffer().get_size()))
        del sample
        small, large = ((640, 480), 640 * 480 * 3 // 2), ((1280, 720), 1280 * 720 * 3 // 2)
        assert sizes == [small, small, large, large]
        expect_no_end(pipeline)
        wait_consumer(pub, in_flight=0, released=4)
        assert set(src._sub._mappings) == {1}, "the consumer unmapped the old generation"
        assert framebus_mappings("framebus:caps-change:0") == 0, "generation 0 is unmapped on both sides"
        assert framebus_mappings("framebus:caps-change:1") == 2, "generation 1: the producer's and the consumer's"
        del src, appsink


def test_caps_change_upstream_of_the_sink_starts_a_new_generation(pipelines: Pipelines, sock_path: str) -> None:
    pipeline = pipelines.launch(
        "videotestsrc ! capsfilter name=f caps=video/x-raw,format=RGBA,width=32,height=24,framerate=30/1 "
        f"! framebussink name=s socket-path={sock_path} wait-for-connection=true"
    )
    start_publishing(pipeline)
    seen = []
    with Subscriber(sock_path, policy="block", max_in_flight=8) as sub:
        for _ in range(3):
            with sub.receive(timeout=TIMEOUT) as frame:
                seen.append((frame.seq, frame.generation, frame.width, frame.height))
        pipeline.get_by_name("f").set_property(
            "caps", Gst.Caps.from_string("video/x-raw,format=RGBA,width=48,height=40,framerate=30/1")
        )
        new = 0
        while new < 3:
            with sub.receive(timeout=TIMEOUT) as frame:
                seen.append((frame.seq, frame.generation, frame.width, frame.height))
                assert frame.array.shape == (frame.height, frame.width, 4)
                new += frame.width == 48
        missed = sub.stats.missed
    sink = pipeline.get_by_name("s")
    counters = [sink.get_property(name) for name in ("frames-zero-copy", "frames-copied", "frames-dropped")]
    expect_no_end(pipeline)

    old = [s for s in seen if s[1] == 0]
    assert [s[2:] for s in old] == [(32, 24)] * len(old)
    assert seen[len(old) :] == [(s[0], 1, 48, 40) for s in seen[len(old) :]], seen
    assert [s[0] for s in seen] == list(range(len(seen))) and missed == 0
    # Every frame so far was written in place, the new generation's too (no copies, nothing dropped).
    assert counters[1:] == [0, 0]
    assert counters[0] >= len(seen)
    del sink


# --------------------------------------------------------------------------------------------- 7. bad input


def test_encoded_video_is_refused(pipelines: Pipelines, sock_dir: str) -> None:
    if Gst.ElementFactory.find("x264enc") is None:
        pytest.skip("x264enc (gst-plugins-ugly) is not installed")
    path = os.path.join(sock_dir, "feed")
    with pytest.raises(GLib.Error, match="could not link"):
        Gst.parse_launch(f"videotestsrc num-buffers=3 ! x264enc ! framebussink socket-path={path}")

    # Linked by force, past the template check: negotiation itself must fail, with an error on the bus.
    pipeline = pipelines.launch(f"videotestsrc num-buffers=3 ! x264enc name=enc framebussink name=s socket-path={path}")
    enc, sink = pipeline.get_by_name("enc"), pipeline.get_by_name("s")
    assert (
        enc.get_static_pad("src").link_full(sink.get_static_pad("sink"), Gst.PadLinkCheck.NOTHING)
        == Gst.PadLinkReturn.OK
    )
    pipeline.set_state(Gst.State.PLAYING)
    msg = wait_message(pipeline, MSG_END)
    assert msg.type == Gst.MessageType.ERROR, describe(msg)
    _err, debug = msg.parse_error()
    assert "not-negotiated" in debug, describe(msg)
    assert sink.get_property("frames-zero-copy") == 0 and sink._pub is None
    assert os.listdir(sock_dir) == [], "nothing was published"
    del enc, sink


def test_src_without_a_producer_names_the_path(pipelines: Pipelines, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "missing")
    pipeline = pipelines.launch(f"framebussrc name=src socket-path={path} reconnect=false ! fakesink")
    assert pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE
    msg = wait_message(pipeline, MSG_END)
    assert msg.type == Gst.MessageType.ERROR and msg.src.get_name() == "src", describe(msg)
    err, _debug = msg.parse_error()
    assert err.matches(Gst.ResourceError.quark(), Gst.ResourceError.NOT_FOUND), describe(msg)
    assert path in err.message, err.message


@pytest.mark.parametrize("element", ["framebussink", "framebussrc"])
def test_missing_socket_path_is_named(pipelines: Pipelines, element: str) -> None:
    description = (
        "videotestsrc num-buffers=1 ! framebussink name=e"
        if element == "framebussink"
        else "framebussrc name=e ! fakesink"
    )
    pipeline = pipelines.launch(description)
    assert pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE
    msg = wait_message(pipeline, MSG_END)
    assert msg.type == Gst.MessageType.ERROR and msg.src.get_name() == "e", describe(msg)
    err, _debug = msg.parse_error()
    assert err.matches(Gst.ResourceError.quark(), Gst.ResourceError.SETTINGS), describe(msg)
    assert "socket-path" in err.message, err.message


# ------------------------------------------------------------------------------------ 8. the producer goes away


def test_closed_producer_without_reconnect_ends_the_stream(pipelines: Pipelines, sock_path: str) -> None:
    with Publisher(sock_path, "RGBA", 32, 24, framerate=30, slots=4, on_full="block") as pub:
        pipeline = pipelines.launch(f"framebussrc name=src socket-path={sock_path} reconnect=false ! {APPSINK} name=a")
        pipeline.set_state(Gst.State.PLAYING)
        assert pub.wait_for_consumers(1, TIMEOUT)
        publish(pub, 1)
        assert pull(pipeline.get_by_name("a")).get_buffer().offset == 0
        expect_no_end(pipeline)
    # A producer that closes sends end-of-stream first: the pipeline ends with EOS, not an error.  (EOS
    # carries no text, so there is no path to check; a producer that dies is the error case, below.)
    msg = wait_message(pipeline, MSG_END)
    assert msg.type == Gst.MessageType.EOS, describe(msg)


def test_crashed_producer_without_reconnect_is_an_error_naming_the_path(
    pipelines: Pipelines, sock_path: str, spawn: Any
) -> None:
    producer = spawn("producer.py", sock_path, "--frames", "0", "--fps", "60", "--size", "32x24")
    producer.expect("READY")
    pipeline = pipelines.launch(
        f"framebussrc name=src socket-path={sock_path} reconnect=false ! {APPSINK} name=a max-buffers=1 drop=true"
    )
    pipeline.set_state(Gst.State.PLAYING)
    pull(pipeline.get_by_name("a"))
    producer.popen.send_signal(signal.SIGKILL)
    producer.popen.wait(TIMEOUT)
    msg = wait_message(pipeline, MSG_END)
    assert msg.type == Gst.MessageType.ERROR and msg.src.get_name() == "src", describe(msg)
    err, _debug = msg.parse_error()
    assert err.matches(Gst.ResourceError.quark(), Gst.ResourceError.READ), describe(msg)
    assert sock_path in err.message, err.message


@pytest.mark.parametrize("how", ["close", "kill"])
def test_reconnecting_src_survives_the_producer_and_follows_a_new_one(
    pipelines: Pipelines, sock_path: str, spawn: Any, how: str
) -> None:
    pipeline = pipelines.launch(
        f"framebussrc name=src socket-path={sock_path} reconnect=true ! {APPSINK} name=a max-buffers=1 drop=true"
    )
    src, appsink = pipeline.get_by_name("src"), pipeline.get_by_name("a")
    pipeline.set_state(Gst.State.PLAYING)
    if how == "close":
        with Publisher(sock_path, "RGBA", 32, 24, framerate=30, slots=4, on_full="block") as pub:
            assert pub.wait_for_consumers(1, TIMEOUT)
            publish(pub, 1)
            assert caps_size(pull(appsink)) == (32, 24)
    else:
        producer = spawn("producer.py", sock_path, "--frames", "0", "--fps", "60", "--size", "32x24")
        assert caps_size(pull(appsink)) == (32, 24)
        producer.popen.send_signal(signal.SIGKILL)
        producer.popen.wait(TIMEOUT)

    with Publisher(sock_path, "BGRA", 48, 16, framerate=15, slots=4, on_full="block") as pub:
        assert pub.wait_for_consumers(1, TIMEOUT)
        publish(pub, 7)
        sample = pull(appsink)
        if caps_size(sample) == (32, 24):  # appsink (max-buffers=1) may still have the old producer's last frame
            sample = pull(appsink)
        structure = sample.get_caps().get_structure(0)
        assert (caps_size(sample), structure.get_value("format")) == ((48, 16), "BGRA")
        assert np.array_equal(np.frombuffer(sample.get_buffer().extract_dup(0, 48 * 16 * 4), np.uint8), [7] * 3072)
        expect_no_end(pipeline)
        # At least this re-attachment; a connection that raced into the dying producer's listen backlog
        # may be counted too (see the report: reconnects counts connect(), not an answered hello).
        assert src._sub.stats.reconnects >= 1
        del sample
    del src, appsink
