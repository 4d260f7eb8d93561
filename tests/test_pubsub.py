"""Publisher and Subscriber in one process, over a real socket and real shared memory."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from framebus import (
    EndOfStream,
    FrameReleasedError,
    FrameTooLargeError,
    ProducerGoneError,
    ReceiveTimeout,
    SlotsExhaustedError,
)
from framebus.publisher import Publisher
from framebus.subscriber import Subscriber
from framebus.videoformat import make_layout


def _attach(pub: Publisher, **kwargs: object) -> Subscriber:
    before = len(pub.stats.consumers)
    sub = Subscriber(pub.path, **kwargs)  # type: ignore[arg-type]
    assert pub.wait_for_consumers(before + 1, timeout=5)
    return sub


def test_frames_arrive_with_pixels_timestamps_and_metadata(sock_path: str) -> None:
    with Publisher(sock_path, "RGBA", 64, 48, framerate=30) as pub, _attach(pub) as sub:
        for i in range(3):
            with pub.loan() as frame:
                frame.array[:] = np.arange(64 * 48 * 4, dtype=np.uint32).reshape(48, 64, 4) % 256 ^ i
                frame.publish(pts=i * 33_333_333, dts=i, duration=33_333_333, meta=b"m%d" % i)
            got = sub.receive(timeout=5)
            assert got.seq == i
            assert (got.pts, got.dts, got.duration, got.meta) == (i * 33_333_333, i, 33_333_333, b"m%d" % i)
            assert (got.format, got.width, got.height) == ("RGBA", 64, 48)
            assert "format=(string)RGBA" in got.caps
            assert got.info.framerate == 30
            expected = np.arange(64 * 48 * 4, dtype=np.uint32).reshape(48, 64, 4) % 256 ^ i
            assert np.array_equal(got.array, expected)
            assert got.latency_ns >= 0
            got.release()
        stats = pub.stats
        assert (stats.published, stats.zero_copy, stats.copied) == (3, 3, 0)
        assert stats.consumers[0].sent == 3
        assert pub.wait_until(lambda s: s.consumers[0].released == 3 and s.consumers[0].in_flight == 0, 5)


def test_views_are_read_only_zero_copy_and_die_with_release(sock_path: str) -> None:
    with Publisher(sock_path, "GRAY8", 16, 8) as pub, _attach(pub) as sub:
        with pub.loan() as frame:
            frame.array[:] = 7
            frame.publish()
        got = sub.receive(timeout=5)
        view = got.array
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0, 0] = 1
        # Zero-copy: the view's memory is the slot inside this process's mapping of the segment.
        assert view.__array_interface__["data"][0] == got.address
        got.release()
        with pytest.raises(FrameReleasedError, match="released"):
            _ = got.array
        got.release()  # twice is harmless
        assert pub.wait_until(lambda s: s.consumers[0].in_flight == 0, timeout=5)


def test_copying_publish_is_counted_and_checks_shape(sock_path: str) -> None:
    with Publisher(sock_path, "RGB", 641, 481) as pub, _attach(pub) as sub:
        image = np.random.default_rng(1).integers(0, 255, (481, 641, 3), dtype=np.uint8)
        pub.publish(image, pts=5)
        got = sub.receive(timeout=5)
        assert got.layout is not None and got.layout.planes[0].stride == 1924  # rows padded to 4 bytes
        assert np.array_equal(got.array, image)
        got.release()
        assert pub.stats.copied == 1 and pub.stats.zero_copy == 0
        with pytest.raises(FrameTooLargeError, match="does not match"):
            pub.publish(np.zeros((482, 641, 3), np.uint8))


@pytest.mark.parametrize(
    ("fmt", "w", "h", "strides"),
    [
        ("I420", 1278, 718, None),
        ("I420", 1278, 718, (1280, 640, 640)),
        ("NV12", 640, 360, None),
        ("RGB", 641, 481, (2048,)),
        ("YUY2", 33, 17, None),
        ("BGRx", 7, 3, (64,)),
    ],
)
def test_planar_and_padded_layouts_round_trip(
    sock_path: str, fmt: str, w: int, h: int, strides: tuple[int, ...] | None
) -> None:
    rng = np.random.default_rng(2)
    with Publisher(sock_path, fmt, w, h, strides=strides) as pub, _attach(pub) as sub:
        planes = [rng.integers(0, 255, p.shape, dtype=np.uint8) for p in pub.loan().planes]
        pub.publish(planes)
        got = sub.receive(timeout=5)
        assert got.layout == make_layout(fmt, w, h, strides)
        for sent, received in zip(planes, got.planes, strict=True):
            assert np.array_equal(sent, received)
        got.release()


def test_forgotten_frame_is_released_by_gc_but_not_while_a_view_lives(sock_path: str) -> None:
    with Publisher(sock_path, "RGBA", 8, 8) as pub, _attach(pub) as sub:
        pub.publish(np.full((8, 8, 4), 3, np.uint8))
        frame = sub.receive(timeout=5)
        view = frame.array
        del frame
        gc.collect()
        assert pub.stats.consumers[0].in_flight == 1  # the view keeps the frame, so the slot stays held
        assert int(view[0, 0, 0]) == 3
        del view
        gc.collect()
        assert pub.wait_until(lambda s: s.consumers[0].in_flight == 0, timeout=5)


def test_late_joiner_gets_caps_segment_and_newest_frame_at_once(sock_path: str) -> None:
    with Publisher(sock_path, "RGBA", 16, 16) as pub:
        for i in range(5):
            pub.publish(np.full((16, 16, 4), i, np.uint8))
        with _attach(pub) as sub:
            got = sub.receive(timeout=5)
            assert got.seq == 4 and int(got.array[0, 0, 0]) == 4
            got.release()
            with pytest.raises(ReceiveTimeout):
                sub.receive(timeout=0.05)


def test_slots_are_reused_most_recently_released_first(sock_path: str) -> None:
    with Publisher(sock_path, "GRAY8", 8, 8, slots=6) as pub, _attach(pub) as sub:
        used = []
        for _ in range(20):
            with pub.loan() as frame:
                used.append(frame.slot)
                frame.publish()
            sub.receive(timeout=5).release()
            assert pub.wait_until(lambda s: s.consumers[0].in_flight == 0, timeout=5)
        # One slot is written while the newest is kept: two slots alternate, the other four stay cold.
        assert set(used) == {0, 1}


def test_drop_policy_skips_a_full_consumer_and_counts_it(sock_path: str) -> None:
    with Publisher(sock_path, "GRAY8", 8, 8, slots=8) as pub, _attach(pub, max_in_flight=2) as sub:
        for _ in range(6):
            pub.publish(np.zeros((8, 8), np.uint8))
        stats = pub.stats.consumers[0]
        assert (stats.sent, stats.dropped, stats.in_flight) == (2, 4, 2)
        a, b = sub.receive(timeout=5), sub.receive(timeout=5)
        assert (a.seq, b.seq) == (0, 1)
        a.release()
        b.release()
        assert pub.wait_until(lambda s: s.consumers[0].in_flight == 0, timeout=5)
        pub.publish(np.zeros((8, 8), np.uint8))
        c = sub.receive(timeout=5)
        assert c.seq == 6 and sub.stats.missed == 4


def test_latest_policy_returns_the_newest_and_releases_the_rest(sock_path: str) -> None:
    with (
        Publisher(sock_path, "GRAY8", 8, 8, slots=10) as pub,
        _attach(pub, max_in_flight=8, policy="latest") as sub,
    ):
        for i in range(6):
            pub.publish(np.full((8, 8), i, np.uint8))
        got = sub.receive(timeout=5)
        assert got.seq == 5 and int(got.array[0, 0]) == 5
        assert sub.stats.skipped == 5
        assert pub.wait_until(lambda s: s.consumers[0].in_flight == 1, timeout=5)
        got.release()


def test_on_full_drop_never_blocks_and_counts(sock_path: str) -> None:
    with (
        Publisher(sock_path, "GRAY8", 8, 8, slots=3, on_full="drop") as pub,
        _attach(pub, max_in_flight=3) as sub,
    ):
        held = []
        for _ in range(2):
            pub.publish(np.zeros((8, 8), np.uint8))
            held.append(sub.receive(timeout=5))
        # Slots: two held by the consumer (one also the newest), one left to write.
        pub.publish(np.zeros((8, 8), np.uint8))
        held.append(sub.receive(timeout=5))
        with pub.loan() as frame:
            assert frame.dropped
            frame.array[:] = 1  # scratch memory: writing is allowed, nothing is sent
            assert frame.publish() is None
        assert pub.stats.dropped == 1
        for f in held:
            f.release()
        assert pub.wait_until(lambda s: s.consumers[0].in_flight == 0, timeout=5)
        with pub.loan() as frame:
            assert not frame.dropped


def test_on_full_block_times_out_with_a_clear_error(sock_path: str) -> None:
    with (
        Publisher(sock_path, "GRAY8", 8, 8, slots=2, on_full="block", block_timeout=0.2) as pub,
        _attach(pub, max_in_flight=2) as sub,
    ):
        pub.publish(np.zeros((8, 8), np.uint8))
        pub.publish(np.zeros((8, 8), np.uint8))
        first, second = sub.receive(timeout=5), sub.receive(timeout=5)
        with pytest.raises(SlotsExhaustedError, match=r"all 2 slots .* on_full='drop'"):
            pub.loan()
        first.release()
        second.release()
        with pub.loan(timeout=5) as frame:
            assert not frame.dropped


def test_format_change_starts_a_new_generation_and_old_frames_stay_valid(sock_path: str) -> None:
    with Publisher(sock_path, "RGBA", 64, 48) as pub, _attach(pub) as sub:
        pub.publish(np.full((48, 64, 4), 9, np.uint8))
        old = sub.receive(timeout=5)
        pub.set_format("RGBA", 128, 72, framerate=25)
        pub.publish(np.full((72, 128, 4), 4, np.uint8))
        new = sub.receive(timeout=5)
        assert (new.width, new.height, new.generation) == (128, 72, 1)
        assert new.array.shape == (72, 128, 4) and int(new.array[0, 0, 0]) == 4
        assert old.array.shape == (48, 64, 4) and int(old.array[5, 5, 0]) == 9
        old.release()
        new.release()
        assert pub.wait_until(lambda s: s.consumers[0].in_flight == 0, timeout=5)
        assert pub._retiring == []  # the old segment is gone once nobody holds it


def test_end_of_stream_ends_iteration_and_close_reports_gone(sock_path: str) -> None:
    pub = Publisher(sock_path, "GRAY8", 4, 4)
    sub = _attach(pub)
    for i in range(3):
        pub.publish(np.full((4, 4), i, np.uint8))
    pub.end_of_stream()
    seen = []
    for frame in sub:
        seen.append(frame.seq)
        frame.release()
    assert seen == [0, 1, 2]
    pub.publish(np.zeros((4, 4), np.uint8))  # after EOS: a new generation starts
    again = sub.receive(timeout=5)
    assert again.generation == 1
    again.release()
    pub.close()
    assert not os.path.exists(sock_path)
    with pytest.raises(EndOfStream):
        sub.receive(timeout=5)
    with pytest.raises(ProducerGoneError, match="reconnect=True"):
        sub.receive(timeout=5)
    sub.close()


def test_many_pairs_leak_no_file_descriptors(sock_path: str) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def cycle() -> None:
        with Publisher(sock_path, "RGBA", 32, 32) as pub, _attach(pub) as sub:
            pub.publish(np.zeros((32, 32, 4), np.uint8))
            sub.receive(timeout=5).release()

    cycle()
    gc.collect()
    before = fds()
    for _ in range(30):
        cycle()
    gc.collect()
    assert fds() == before


def test_a_kept_slot_stays_mapped_after_close_until_released(sock_path: str) -> None:
    """What framebussink relies on: upstream may still write into a slot while the sink shuts down."""
    pub = Publisher(sock_path, "GRAY8", 64, 64)
    frame = pub.loan(keep=True)
    pub.close()
    frame.buffer[:] = 9  # still mapped: this would crash if close() had unmapped the segment
    assert int(frame.buffer[0]) == 9 and pub._retiring
    frame.release()
    assert pub._retiring == []  # released: now the segment is gone


def test_a_kept_slot_is_not_reused_while_held_locally(sock_path: str) -> None:
    with Publisher(sock_path, "GRAY8", 8, 8, slots=3) as pub, _attach(pub) as sub:
        kept = pub.loan(keep=True)
        kept.publish()
        sub.receive(timeout=5).release()
        assert pub.wait_until(lambda s: s.consumers[0].in_flight == 0, timeout=5)
        pub.publish(np.zeros((8, 8), np.uint8))  # the kept slot is no longer the newest...
        sub.receive(timeout=5).release()
        # Three slots: the newest, the kept one, one free. Only the free one may be lent.
        first, second = pub.loan(), pub.loan()
        assert first.slot is not None and first.slot != kept.slot and second.dropped
        first.cancel()
        second.cancel()
        kept.release()
        with pub.loan() as again:
            assert not again.dropped
