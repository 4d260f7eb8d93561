"""Bad input, hostile peers and misconfiguration: each gets a clear error, nothing else breaks."""

from __future__ import annotations

import logging
import mmap
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

from framebus import (
    ConsumerTooSlowError,
    FramebusError,
    FrameTooLargeError,
    PeerRejectedError,
    ProducerGoneError,
    UnsupportedFormatError,
    VersionMismatchError,
)
from framebus import protocol as p
from framebus.publisher import Publisher
from framebus.subscriber import Subscriber
from framebus.transport import recv_message, send_message
from framebus.videoformat import make_layout


def _raw_consumer(path: str, **hello: object) -> tuple[socket.socket, p.Connection]:
    """A hand-driven consumer: the real socket, our own protocol state."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.settimeout(5)
    conn = p.Connection(p.Role.CONSUMER)
    fields: dict[str, object] = {"policy": p.Policy.DROP, "max_in_flight": 4, **hello}
    send_message(sock, conn.send(p.Hello(p.Role.CONSUMER, os.getpid(), "raw", **fields)))  # type: ignore[arg-type]
    return sock, conn


def _next(sock: socket.socket, conn: p.Connection) -> p.Event:
    data, fds = recv_message(sock)
    assert data, "the producer hung up"
    return conn.receive_message(data, fds)


def test_received_segment_fd_cannot_be_mapped_writable(sock_path: str) -> None:
    with Publisher(sock_path, "RGBA", 16, 16) as pub:
        pub.publish(np.full((16, 16, 4), 5, np.uint8))
        sock, conn = _raw_consumer(sock_path)
        events = [_next(sock, conn) for _ in range(4)]
        assert [type(e) for e in events] == [p.Hello, p.Caps, p.Segment, p.FrameReady]
        segment = events[2]
        assert isinstance(segment, p.Segment) and len(segment.fds) == 1
        fd = segment.fds[0]
        try:
            assert os.get_blocking(fd) and (os.stat(fd).st_size == pub.slot_size * pub.n_slots)
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # Even reopened read-write through /proc, the memory refuses new writable mappings.
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                with pytest.raises(PermissionError):
                    mmap.mmap(rw, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                with pytest.raises(PermissionError):
                    os.write(rw, b"x")
            finally:
                os.close(rw)
            view = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
            frame = events[3]
            assert isinstance(frame, p.FrameReady)
            start = frame.slot * pub.slot_size
            assert view[start : start + 4] == b"\x05\x05\x05\x05"
            view.close()
        finally:
            os.close(fd)
            sock.close()


def test_a_consumer_sending_garbage_is_disconnected_and_logged_others_unaffected(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="framebus")
    with Publisher(sock_path, "GRAY8", 8, 8) as pub, Subscriber(sock_path) as good:
        sock, conn = _raw_consumer(sock_path)
        assert pub.wait_for_consumers(2, timeout=5)
        sock.send(b"\x05\x00\x00\x00\x0b\x00\x00\x00" + b"\xff" * 11)  # a release one byte too long
        goodbye = None
        while goodbye is None:
            event = _next(sock, conn)
            if isinstance(event, p.Goodbye):
                goodbye = event
        assert goodbye.reason == p.GoodbyeReason.PROTOCOL_ERROR and "trailing" in goodbye.message
        assert sock.recv(100) == b""  # and then hung up
        assert pub.wait_until(lambda s: len(s.consumers) == 1, timeout=5)
        assert any("disconnected" in r.getMessage() and "raw" in r.getMessage() for r in caplog.records)
        pub.publish(np.full((8, 8), 1, np.uint8))
        frame = good.receive(timeout=5)
        assert int(frame.array[0, 0]) == 1
        frame.release()
        sock.close()


def test_a_consumer_releasing_what_it_never_got_is_disconnected(sock_path: str) -> None:
    with Publisher(sock_path, "GRAY8", 8, 8) as pub:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(sock_path)
        sock.settimeout(5)
        hello = p.Hello(p.Role.CONSUMER, 1, "liar", p.Policy.DROP, 2)
        send_message(sock, p.encode(hello) + b"")
        assert pub.wait_for_consumers(1, timeout=5)
        send_message(sock, p.encode(p.Release(3, 99)))
        assert pub.wait_until(lambda s: not s.consumers, timeout=5)
        assert pub.stats.slots_free == pub.n_slots
        sock.close()


def test_version_mismatch_both_ways(sock_path: str) -> None:
    with Publisher(sock_path, "GRAY8", 8, 8):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(sock_path)
        sock.settimeout(5)
        send_message(sock, p.encode(p.Hello(p.Role.CONSUMER, 1, "", p.Policy.DROP, 1, major=99)))
        data, _ = recv_message(sock)
        goodbye = p.decode(p.HEADER.unpack_from(data)[0], data[p.HEADER.size :])
        assert isinstance(goodbye, p.Goodbye) and goodbye.reason == p.GoodbyeReason.VERSION_MISMATCH
        assert "99.0" in goodbye.message and f"{p.PROTOCOL_MAJOR}.{p.PROTOCOL_MINOR}" in goodbye.message
        sock.close()

    # A producer from the future: a hand-made server that says major 2.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(sock_path)
    server.listen(1)
    try:
        sub = Subscriber(sock_path)
        peer, _ = server.accept()
        recv_message(peer)  # the subscriber's hello
        send_message(peer, p.encode(p.Hello(p.Role.PRODUCER, 1, "future", major=2, minor=5)))
        with pytest.raises(VersionMismatchError, match=r"2\.5.*same major version"):
            sub.receive(timeout=5)
        sub.close()
        peer.close()
    finally:
        server.close()
        os.unlink(sock_path)


def test_socket_mode_and_allowed_uids(sock_path: str) -> None:
    with Publisher(sock_path, "GRAY8", 8, 8) as pub:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
        pub.close()
    with Publisher(sock_path, "GRAY8", 8, 8, socket_mode=0o600):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    me = os.getuid()
    with Publisher(sock_path, "GRAY8", 8, 8, allowed_uids={me + 1}) as pub:
        sub = Subscriber(sock_path)
        with pytest.raises(PeerRejectedError, match=f"uid {me} may not read"):
            sub.receive(timeout=5)
        sub.close()
        assert pub.stats.consumers == []
    with Publisher(sock_path, "GRAY8", 8, 8, allowed_uids={me}) as pub, Subscriber(sock_path) as sub:
        pub.publish(np.zeros((8, 8), np.uint8))
        sub.receive(timeout=5).release()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch to another uid")
def test_another_user_is_refused_by_the_socket_mode(sock_path: str, sock_dir: str) -> None:
    os.chmod(sock_dir, 0o755)
    with Publisher(sock_path, "GRAY8", 8, 8, socket_mode=0o600):
        code = (
            "import os, sys; os.setgid(65534); os.setuid(65534)\n"
            "from framebus.subscriber import Subscriber\n"
            "from framebus import FramebusError\n"
            f"try:\n    Subscriber({sock_path!r})\nexcept FramebusError as e:\n    print(e); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 3, out.stderr
    assert "permission denied connecting" in out.stdout


def test_block_policy_consumer_that_stops_releasing_is_cut_off(sock_path: str) -> None:
    with (
        Publisher(sock_path, "GRAY8", 8, 8, consumer_block_timeout=0.2) as pub,
        Subscriber(sock_path, max_in_flight=2, policy="block") as slow,
        Subscriber(sock_path, max_in_flight=8) as other,
    ):
        assert pub.wait_for_consumers(2, timeout=5)
        for _ in range(3):
            pub.publish(np.zeros((8, 8), np.uint8))  # the third waits 0.2 s, then drops 'slow'
        held = [slow.receive(timeout=5), slow.receive(timeout=5)]
        with pytest.raises(ConsumerTooSlowError, match="max_in_flight=2.*policy 'drop'"):
            slow.receive(timeout=5)
        assert [other.receive(timeout=5).seq for _ in range(3)] == [0, 1, 2]
        assert len(pub.stats.consumers) == 1
        del held


def test_missing_directory_non_socket_and_long_paths(sock_dir: str) -> None:
    with pytest.raises(FramebusError, match="does not exist.*mkdir -p"):
        Publisher(os.path.join(sock_dir, "nope", "feed"), "RGBA", 8, 8)
    plain = os.path.join(sock_dir, "file")
    open(plain, "w").close()
    with pytest.raises(FramebusError, match="not a socket; remove it"):
        Publisher(plain, "RGBA", 8, 8)
    with pytest.raises(FramebusError, match="use a shorter path"):
        Publisher(os.path.join(sock_dir, "x" * 120), "RGBA", 8, 8)
    with pytest.raises(ProducerGoneError, match="no producer is serving.*reconnect=True"):
        Subscriber(os.path.join(sock_dir, "absent"))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch to another uid")
def test_permission_denied_names_the_path(sock_dir: str) -> None:
    os.chmod(sock_dir, 0o755)
    path = os.path.join(sock_dir, "feed")
    code = (
        "import os, sys; os.setgid(65534); os.setuid(65534)\n"
        "from framebus.publisher import Publisher\n"
        "from framebus import FramebusError\n"
        f"try:\n    Publisher({path!r}, 'RGBA', 8, 8)\nexcept FramebusError as e:\n    print(e); sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 3, out.stderr
    assert "permission denied" in out.stdout and path in out.stdout


def test_stale_socket_file_is_replaced(sock_path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(sock_path)
    dead.close()  # the file stays, nobody listens: what a crashed producer leaves
    assert os.path.exists(sock_path)
    with Publisher(sock_path, "GRAY8", 8, 8) as pub, Subscriber(sock_path) as sub:
        pub.publish(np.zeros((8, 8), np.uint8))
        assert sub.receive(timeout=5).seq == 0
    assert not os.path.exists(sock_path)


def test_a_foreign_live_socket_is_not_taken_over(sock_path: str) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # say, a shmsink
    other.bind(sock_path)
    other.listen(1)
    try:
        with pytest.raises(FramebusError, match=f"process {os.getpid()}"):
            Publisher(sock_path, "GRAY8", 8, 8)
        assert os.path.exists(sock_path)
    finally:
        other.close()


def test_bad_formats_sizes_and_oversized_frames(sock_path: str) -> None:
    with pytest.raises(UnsupportedFormatError, match="'H264' is not supported; use one of"):
        Publisher(sock_path, "H264", 8, 8)
    with pytest.raises(UnsupportedFormatError, match="0x8 is out of range"):
        Publisher(sock_path, "RGBA", 0, 8)
    with pytest.raises(ValueError, match="slots=1"):
        Publisher(sock_path, "RGBA", 8, 8, slots=1)
    with Publisher(sock_path, "RGBA", 64, 64) as pub:
        with pytest.raises(FrameTooLargeError, match="shape"):
            pub.publish(np.zeros((65, 64, 4), np.uint8))
        too_wide = make_layout("RGBA", 64, 64, strides=[64 * 4 * 2])
        with pub.loan() as frame, pytest.raises(FrameTooLargeError, match="past the slot"):
            frame.publish(layout=too_wide)
        with pub.loan() as frame, pytest.raises(FramebusError, match="metadata is 2000 bytes"):
            frame.publish(meta=b"x" * 2000)
        assert pub.stats.published == 0 and pub.stats.slots_free == pub.n_slots
