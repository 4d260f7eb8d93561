"""Real processes on real sockets: integrity, fan-out, stalls, kills, restarts."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from framebus import PathInUseError, ProducerGoneError
from framebus.publisher import Publisher
from framebus.subscriber import Subscriber
from tests.patterns import check, fill


def _publish_pattern(pub: Publisher, n: int, fps: float = 0.0) -> None:
    start = time.monotonic()
    for i in range(n):
        with pub.loan() as frame:
            meta = fill(frame.buffer, i)
            frame.publish(pts=i, meta=meta)
        if fps:
            delay = start + (i + 1) / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def test_no_torn_frames_with_consumers_holding_frames_at_random(sock_path: str, spawn) -> None:
    """Thousands of frames, four consumers holding each frame for a random time, every one verified."""
    n_frames = 3000
    consumers = [
        spawn(
            "consumer.py",
            sock_path,
            "--policy",
            "block",
            "--max-in-flight",
            "3",
            "--hold-ms",
            "3",
            "--count",
            str(n_frames),
            "--seed",
            str(i),
        )
        for i in range(2)
    ] + [
        spawn(
            "consumer.py",
            sock_path,
            "--policy",
            "drop",
            "--max-in-flight",
            "4",
            "--hold-ms",
            "5",
            "--timeout",
            "3",
            "--seed",
            str(10 + i),
        )
        for i in range(2)
    ]
    # Few slots, so slots are reused while others are still held: the case that tears frames.
    with Publisher(sock_path, "RGBA", 32, 32, slots=6, on_full="block", consumer_block_timeout=10) as pub:
        for c in consumers:
            c.expect("ATTACHED")
        assert pub.wait_for_consumers(4, timeout=30)
        _publish_pattern(pub, n_frames)
        pub.end_of_stream()
        results = [c.expect_json("RESULT") for c in consumers]
        stats = pub.stats
    for r in results:
        assert r["n_torn"] == 0, r["torn"]
        assert r["in_order"]
    lossless, lossy = results[:2], results[2:]
    for r in lossless:  # policy 'block': every frame, in order, none missed
        assert (r["received"], r["first"], r["last"], r["missed"]) == (n_frames, 0, n_frames - 1, 0)
    for r in lossy:
        # Every frame between the first and last seen was either received or counted as missed.
        assert r["received"] > 0 and r["received"] + r["missed"] == r["last"] - r["first"] + 1
    assert stats.published == n_frames and stats.zero_copy == n_frames


def test_eight_consumer_processes_get_every_frame_intact(sock_path: str, spawn) -> None:
    n_frames = 300
    consumers = [
        spawn(
            "consumer.py",
            sock_path,
            "--policy",
            "block",
            "--max-in-flight",
            "2",
            "--hold-ms",
            "1",
            "--count",
            str(n_frames),
            "--seed",
            str(i),
        )
        for i in range(8)
    ]
    with Publisher(sock_path, "I420", 64, 48, slots=8, on_full="block", consumer_block_timeout=10) as pub:
        assert pub.wait_for_consumers(8, timeout=30)
        _publish_pattern(pub, n_frames)
        results = [c.expect_json("RESULT") for c in consumers]
    for r in results:
        assert (r["received"], r["n_torn"], r["missed"], r["in_order"]) == (n_frames, 0, 0, True)


def test_a_stalled_consumer_does_not_change_what_the_others_see(sock_path: str, spawn) -> None:
    """One consumer attaches and never reads; the others still get every frame at the producer's pace."""
    fps, n_frames = 200.0, 300
    stalled = spawn("consumer.py", sock_path, "--mode", "stall", "--max-in-flight", "4")
    healthy = [
        spawn(
            "consumer.py",
            sock_path,
            "--max-in-flight",
            "8",
            "--hold-ms",
            "0",
            "--count",
            str(n_frames),
            "--seed",
            str(i),
        )
        for i in range(2)
    ]
    with Publisher(sock_path, "RGBA", 64, 64, slots=16) as pub:
        stalled.expect("STALLED")
        assert pub.wait_for_consumers(3, timeout=30)
        start = time.monotonic()
        _publish_pattern(pub, n_frames, fps)
        elapsed = time.monotonic() - start
        results = [c.expect_json("RESULT") for c in healthy]
        by_pid = {c.pid: c for c in pub.stats.consumers}
    assert elapsed < n_frames / fps * 1.5, "the producer was slowed down"
    for r in results:
        assert r["n_torn"] == 0 and r["received"] == n_frames and r["missed"] == 0
    stuck = by_pid[stalled.pid]
    assert stuck.in_flight == 4 and stuck.sent == 4 and stuck.dropped == n_frames - 4


def test_sigkilled_consumer_gives_its_slots_back_and_others_carry_on(sock_path: str, spawn) -> None:
    with Publisher(sock_path, "RGBA", 32, 32, slots=8) as pub:
        victim = spawn("consumer.py", sock_path, "--mode", "hold", "--count", "4", "--max-in-flight", "4")
        with Subscriber(sock_path, max_in_flight=4) as other:
            assert pub.wait_for_consumers(2, timeout=30)
            _publish_pattern(pub, 4)
            victim.expect("HOLDING 4")
            held = [other.receive(timeout=5) for _ in range(4)]
            for f in held:
                f.release()
            assert pub.stats.slots_free <= 4
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            assert pub.wait_until(lambda s: len(s.consumers) == 1, timeout=5)
            back = time.monotonic() - killed_at
            assert pub.wait_until(lambda s: s.slots_free == 7, timeout=5)  # all but the newest frame
            _publish_pattern(pub, 3)
            for _ in range(3):
                f = other.receive(timeout=5)
                assert check(f.buffer, f.meta) is None
                f.release()
    assert back < 1.0, f"slots came back {back * 1000:.0f} ms after SIGKILL"


def test_producer_killed_consumer_is_told_and_reconnects_to_a_new_one(sock_path: str, spawn) -> None:
    first = spawn("producer.py", sock_path, "--size", "32x32", "--frames", "5", "--hold-open", "--wait-consumers", "2")
    first_pid = int(first.expect("READY"))
    plain = Subscriber(sock_path)
    waiting = Subscriber(sock_path, reconnect=True)
    first.expect("PUBLISHED")
    for sub in (plain, waiting):
        for _ in range(4):
            sub.receive(timeout=10).release()
    os.kill(first_pid, signal.SIGKILL)
    with pytest.raises(ProducerGoneError, match="reconnect=True"):
        while True:
            plain.receive(timeout=10).release()
    assert os.path.exists(sock_path)  # the killed producer left its socket file behind
    second = spawn("producer.py", sock_path, "--size", "64x48", "--frames", "3", "--hold-open", "--wait-consumers", "1")
    second.expect("READY")  # the stale file was replaced
    frames = []
    while len(frames) < 3:
        f = waiting.receive(timeout=10)
        if f.width == 64:
            frames.append(f)
        else:
            f.release()
    assert [(f.width, f.height) for f in frames] == [(64, 48)] * 3
    assert all(check(f.buffer, f.meta) is None for f in frames)
    assert waiting.stats.reconnects == 1 and waiting.producer_pid == second.pid
    for f in frames:
        f.release()
    plain.close()
    waiting.close()


def test_a_live_producer_is_never_stolen_from(sock_path: str, spawn) -> None:
    owner = spawn("producer.py", sock_path, "--frames", "1", "--hold-open")
    pid = int(owner.expect("READY"))
    with pytest.raises(PathInUseError, match=f"process {pid}"):
        Publisher(sock_path, "RGBA", 8, 8)
    with Subscriber(sock_path) as sub:  # and the owner still serves
        assert sub.receive(timeout=10).seq == 0


def test_publisher_pixels_survive_a_consumer_process_exactly(sock_path: str, spawn) -> None:
    """Checksums across processes for a padded planar layout."""
    consumer = spawn("consumer.py", sock_path, "--policy", "block", "--count", "50", "--hold-ms", "1")
    with Publisher(sock_path, "NV12", 1278, 718, strides=(1280, 1280), on_full="block") as pub:
        assert pub.wait_for_consumers(1, timeout=30)
        _publish_pattern(pub, 50)
        r = consumer.expect_json("RESULT")
    assert (r["received"], r["n_torn"]) == (50, 0)


def test_numpy_image_content_checked_in_another_process(sock_path: str, spawn) -> None:
    """Fixed content through a separate producer process, verified pixel for pixel here."""
    producer = spawn(
        "producer.py",
        sock_path,
        "--format",
        "GRAY8",
        "--size",
        "40x30",
        "--frames",
        "3",
        "--wait-consumers",
        "1",
        "--hold-open",
    )
    producer.expect("READY")
    with Subscriber(sock_path, max_in_flight=4, policy="block") as sub:
        frames = [sub.receive(timeout=10) for _ in range(3)]
        for i, f in enumerate(frames):
            expected = np.zeros(40 * 30, np.uint8)
            fill(expected, i)
            assert np.array_equal(f.buffer[: 40 * 30], expected)
            f.release()
