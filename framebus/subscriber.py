"""The consumer: receives frames as read-only numpy views of the producer's slots.

No background thread: ``receive`` reads the socket in the caller's thread,
so a frame reaches the caller without a thread hop.  A release is sent the
moment ``Frame.release`` is called, from whichever thread calls it (a
GStreamer streaming thread, the garbage collector); a lock serialises
those sends with ``receive``.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from types import TracebackType
from typing import Literal

import numpy as np

from . import protocol as p
from .errors import (
    ConsumerTooSlowError,
    EndOfStream,
    FramebusError,
    FrameReleasedError,
    Interrupted,
    PeerRejectedError,
    ProducerGoneError,
    ReceiveTimeout,
    UnsupportedFormatError,
    VersionMismatchError,
)
from .segment import MappedSegment
from .transport import (
    TruncatedMessage,
    check_socket_path,
    close_gracefully,
    connect,
    recv_message,
    send_message,
)
from .videoformat import FORMATS, FrameLayout, make_layout
from .views import base_address, check_layout_fits, flat_view, frame_image, frame_planes

log = logging.getLogger("framebus")

PolicyName = Literal["drop", "block", "latest"]
_POLICIES = {"drop": p.Policy.DROP, "block": p.Policy.BLOCK, "latest": p.Policy.LATEST}
_RECONNECT_BACKOFF = (0.005, 0.01, 0.02, 0.05, 0.1)


@dataclass
class StreamInfo:
    """What the producer announced for one generation."""

    generation: int
    format: str
    width: int
    height: int
    framerate: Fraction | None
    caps: str
    layout: FrameLayout | None  # None for formats this side has no numpy layout for
    frame_size: int


@dataclass
class SubscriberStats:
    received: int = 0
    released: int = 0
    missed: int = 0  # frames the producer published but did not send us (we were at our bound)
    skipped: int = 0  # frames released unseen because policy 'latest' had a newer one
    reconnects: int = 0


class _Mapping:
    """One generation's segment, mapped once, with the numpy arrays that export it."""

    def __init__(self, segment: MappedSegment, info: StreamInfo) -> None:
        self.segment = segment
        self.info = info
        self.bases = tuple(np.frombuffer(m, dtype=np.uint8) for m in segment.maps)
        self.addresses = tuple(base_address(b) for b in self.bases)
        self.layouts: dict[tuple[tuple[p.PlaneInfo, ...], int], FrameLayout] = {}

    def slot_address(self, slot: int) -> tuple[int, np.ndarray]:
        place = self.segment.placements[slot]
        return self.addresses[place.fd_index] + place.offset, self.bases[place.fd_index]

    def layout_for(self, planes: tuple[p.PlaneInfo, ...], size: int) -> FrameLayout | None:
        """The frame's layout: the caps' default, or per-frame strides (validated once, cached)."""
        if not planes or self.info.layout is None:
            return self.info.layout
        key = (planes, size)
        layout = self.layouts.get(key)
        if layout is None:
            if len(self.layouts) > 64:
                self.layouts.clear()
            info = self.info
            layout = make_layout(
                info.format,
                info.width,
                info.height,
                [pl.stride for pl in planes],
                [pl.offset for pl in planes],
                size or None,
            )
            check_layout_fits(layout, self.segment.slot_size)
            self.layouts[key] = layout
        return layout

    def close(self) -> None:
        del self.bases
        self.segment.close()


class Frame:
    """One received frame: read-only views of a slot, valid until ``release()``.

    Holding a view (``array``, ``planes``) after ``release()`` is an error:
    the producer may already be writing the next frame into that memory.
    ``array`` and ``planes`` raise once released; a frame that is simply
    forgotten (no references, no views left) is released by the garbage
    collector.
    """

    __slots__ = (
        "__weakref__",
        "_address",
        "_base",
        "_epoch",
        "_layout",
        "_released",
        "_sub",
        "dts",
        "duration",
        "flags",
        "generation",
        "info",
        "meta",
        "pts",
        "publish_ns",
        "receive_ns",
        "seq",
        "size",
        "slot",
    )

    def __init__(
        self,
        sub: Subscriber,
        epoch: int,
        event: p.FrameReady,
        mapping: _Mapping,
        layout: FrameLayout | None,
    ) -> None:
        self._sub = sub
        self._epoch = epoch
        self._released = False
        self.generation = event.generation
        self.slot = event.slot
        self.seq = event.seq
        self.pts = None if event.pts == p.NO_TIME else event.pts
        self.dts = None if event.dts == p.NO_TIME else event.dts
        self.duration = None if event.duration == p.NO_TIME else event.duration
        self.publish_ns = event.publish_ns
        self.receive_ns = time.monotonic_ns()
        self.flags = event.flags
        self.size = event.size
        self.meta = event.meta
        self.info = mapping.info
        self._layout = layout
        self._address, self._base = mapping.slot_address(event.slot)

    # -- what the frame is

    @property
    def format(self) -> str:
        return self.info.format

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def height(self) -> int:
        return self.info.height

    @property
    def caps(self) -> str:
        return self.info.caps

    @property
    def layout(self) -> FrameLayout | None:
        return self._layout

    @property
    def latency_ns(self) -> int:
        """Publish to receive, both stamped with CLOCK_MONOTONIC."""
        return self.receive_ns - self.publish_ns

    @property
    def address(self) -> int:
        """Where the slot starts in this process's mapping (for wrapping it in other libraries)."""
        self._check()
        return self._address

    # -- pixels

    @property
    def array(self) -> np.ndarray:
        """The image as one read-only array; see ``views.frame_image`` for planar formats."""
        return frame_image(self._address, self._require_layout(), False, self)

    @property
    def planes(self) -> tuple[np.ndarray, ...]:
        return frame_planes(self._address, self._require_layout(), False, self)

    @property
    def buffer(self) -> np.ndarray:
        """The frame's bytes in the slot as a flat read-only array (any format)."""
        self._check()
        return flat_view(self._address, self.size, False, self)

    def _require_layout(self) -> FrameLayout:
        self._check()
        if self._layout is None:
            raise UnsupportedFormatError(
                f"format {self.info.format} has no numpy layout in framebus; use frame.buffer "
                f"(raw bytes) or one of {', '.join(sorted(FORMATS))}"
            )
        return self._layout

    def _check(self) -> None:
        if self._released:
            raise FrameReleasedError(
                f"frame seq {self.seq} was released; its slot may hold another frame now. "
                "Copy what you need before release()"
            )

    # -- lifecycle

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the slot back to the producer now.  Safe to call twice."""
        if not self._released:
            self._released = True
            self._sub._release(self)

    def __enter__(self) -> Frame:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __del__(self) -> None:
        if not self._released:
            self._released = True
            self._sub._release(self)

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        info = self.info
        return f"<Frame seq={self.seq} {info.format} {info.width}x{info.height} pts={self.pts} {state}>"


class _End:
    """Queued marker: end-of-stream after the frames before it."""


class Subscriber:
    """Receive frames from the producer at ``path``.

    ``max_in_flight`` bounds the frames this consumer holds (received and
    queued, not yet released); ``policy`` is what the producer does when
    that bound is reached: ``drop`` (skip us, count it), ``block`` (wait
    for our release, lossless, with the producer's timeout) or ``latest``
    (like drop, and ``receive`` always returns the newest frame queued,
    releasing older ones unseen).  With ``reconnect`` a missing or vanished
    producer is waited for, and a new one at the same path is attached.
    """

    def __init__(
        self,
        path: str,
        max_in_flight: int = 4,
        policy: PolicyName = "drop",
        reconnect: bool = False,
        name: str | None = None,
    ) -> None:
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {sorted(_POLICIES)}, got {policy!r}")
        if not 1 <= max_in_flight <= p.MAX_IN_FLIGHT:
            raise ValueError(f"max_in_flight must be 1..{p.MAX_IN_FLIGHT}, got {max_in_flight}")
        check_socket_path(path)
        self.path = path
        self.max_in_flight = max_in_flight
        self.policy = policy
        self.reconnect = reconnect
        self.name = name or f"pid{os.getpid()}"
        self.stats = SubscriberStats()
        self.producer_pid: int | None = None
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._conn: p.Connection | None = None
        self._epoch = 0
        self._mappings: dict[int, _Mapping] = {}
        self._pending_info: StreamInfo | None = None
        self._info: StreamInfo | None = None
        self._queue: collections.deque[Frame | _End] = collections.deque()
        self._last_seq = -1
        self._closed = False
        self._interrupted = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if not self._try_connect() and not reconnect:
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise ProducerGoneError(
                f"no producer is serving {path!r}; start the producer first, or pass reconnect=True to wait"
            )

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def info(self) -> StreamInfo | None:
        """The current stream's format (None before the first caps arrive)."""
        return self._info

    def receive(self, timeout: float | None = None) -> Frame:
        """The next frame, waiting up to ``timeout`` seconds (None: forever).

        Raises ``ReceiveTimeout``, ``EndOfStream`` (the producer ended the
        stream; with ``reconnect`` you may call ``receive`` again to wait for
        the next one) or ``ProducerGoneError`` (disconnected, no reconnect).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = 0
        while True:
            item = self._pop()
            if item is not None:
                if isinstance(item, _End):
                    raise EndOfStream(f"producer at {self.path!r} ended the stream")
                return item
            if self._closed:
                raise FramebusError(f"subscriber of {self.path!r} is closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                # Out of time, but what has already arrived still counts (receive(timeout=0) polls).
                if self._sock is not None and self._wait_readable(self._sock, 0):
                    self._read_one()
                    continue
                raise ReceiveTimeout(f"no frame from {self.path!r} within {timeout} s")
            sock = self._sock
            if sock is None:
                if self._try_connect():
                    backoff = 0
                    continue
                # No producer yet: try again after a short pause (there is no event for "a socket appeared").
                pause = _RECONNECT_BACKOFF[min(backoff, len(_RECONNECT_BACKOFF) - 1)]
                backoff += 1
                self._wait_readable(None, pause if remaining is None else min(pause, remaining))
                self._check_interrupted()
                continue
            if self._wait_readable(sock, remaining):
                self._check_interrupted()
                self._read_one()
                if self.policy == "latest":
                    self._drain()
            self._check_interrupted()

    def interrupt(self) -> None:
        """Make a blocked (and every later) ``receive`` raise ``Interrupted`` until ``clear_interrupt``.

        Safe from any thread: what a GStreamer element's unlock needs.
        """
        self._interrupted = True
        os.write(self._wake_w, b"x")

    def clear_interrupt(self) -> None:
        self._interrupted = False
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass  # drained

    def _check_interrupted(self) -> None:
        if self._interrupted:
            raise Interrupted(f"receive from {self.path!r} was interrupted")

    def __iter__(self) -> Iterator[Frame]:
        """Frames until end-of-stream (and, without reconnect, until the producer goes)."""
        while True:
            try:
                yield self.receive()
            except EndOfStream:
                return

    def close(self) -> None:
        """Say goodbye and unmap; frames still held keep their mapping alive until released."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._sock is not None and self._conn is not None:
                try:
                    send_message(self._sock, self._conn.send(p.Goodbye(p.GoodbyeReason.NORMAL, "closing")))
                except OSError as exc:
                    log.debug("%s: goodbye not delivered: %s", self.path, exc)
            self._drop_connection()
            for m in self._mappings.values():
                m.close()
            self._mappings.clear()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _pop(self) -> Frame | _End | None:
        with self._lock:
            if not self._queue:
                return None
            if self.policy == "latest":
                # Keep only the newest frame before the first end marker.
                while len(self._queue) > 1 and isinstance(self._queue[0], Frame) and isinstance(self._queue[1], Frame):
                    old = self._queue.popleft()
                    assert isinstance(old, Frame)
                    self.stats.skipped += 1
                    old.release()
            return self._queue.popleft()

    def _drain(self) -> None:
        """Read everything already waiting, so 'latest' can pick the newest."""
        while self._sock is not None and self._wait_readable(self._sock, 0):
            self._read_one()

    def _wait_readable(self, sock: socket.socket | None, timeout: float | None) -> bool:
        """Wait for the socket (if any) or an interrupt; True if the socket is readable."""
        poller = select.poll()
        if sock is not None:
            poller.register(sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
        return any(fd != self._wake_r for fd, _ in ready)

    def _try_connect(self) -> bool:
        with self._lock:
            try:
                sock = connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                return False
            conn = p.Connection(p.Role.CONSUMER)
            hello = p.Hello(
                p.Role.CONSUMER,
                os.getpid(),
                self.name[: p.MAX_NAME],
                _POLICIES[self.policy],
                self.max_in_flight,
            )
            try:
                send_message(sock, conn.send(hello))
            except OSError as exc:
                sock.close()
                log.debug("%s: producer went away during hello: %s", self.path, exc)
                return False
            self._sock, self._conn = sock, conn
            self._epoch += 1
            self._last_seq = -1
            return True

    def _read_one(self) -> None:
        with self._lock:
            sock, conn = self._sock, self._conn
            if sock is None or conn is None:
                return
            try:
                data, fds = recv_message(sock)
            except (ConnectionResetError, BrokenPipeError):
                data, fds = b"", []
            except TruncatedMessage as exc:
                self._protocol_failure(str(exc))
                return
            if not data:
                self._producer_gone("the producer hung up")
                return
            try:
                event = conn.receive_message(data, fds)
            except p.VersionError as exc:
                self._close_fds(conn)
                self._drop_connection()
                raise VersionMismatchError(f"{self.path!r}: {exc}") from None
            except p.ProtocolError as exc:
                self._close_fds(conn)
                self._protocol_failure(str(exc))
                return
            self._handle(event)

    def _handle(self, event: p.Event) -> None:
        if isinstance(event, p.FrameReady):
            mapping = self._mappings.get(event.generation)
            assert mapping is not None  # the protocol guarantees caps and segment came first
            try:
                layout = mapping.layout_for(event.planes, event.size)
            except UnsupportedFormatError as exc:
                self._protocol_failure(f"frame seq {event.seq} has a bad plane layout: {exc}")
                return
            if self._last_seq >= 0 and event.seq > self._last_seq + 1:
                self.stats.missed += event.seq - self._last_seq - 1
            self._last_seq = event.seq
            self.stats.received += 1
            self._queue.append(Frame(self, self._epoch, event, mapping, layout))
        elif isinstance(event, p.Caps):
            layout = None
            if event.format in FORMATS:
                try:
                    layout = make_layout(
                        event.format,
                        event.width,
                        event.height,
                        [pl.stride for pl in event.planes],
                        [pl.offset for pl in event.planes],
                        event.frame_size,
                    )

                except UnsupportedFormatError as exc:
                    self._protocol_failure(f"caps with a bad layout: {exc}")
                    return
            fps = Fraction(event.fps_n, event.fps_d) if event.fps_n else None
            self._pending_info = StreamInfo(
                event.generation,
                event.format,
                event.width,
                event.height,
                fps,
                event.caps,
                layout,
                event.frame_size,
            )
        elif isinstance(event, p.Segment):
            info = self._pending_info
            assert info is not None and info.generation == event.generation
            try:
                segment = MappedSegment.map_fds(event.generation, event.slot_size, event.fds, event.slots)
                if info.layout is not None:
                    check_layout_fits(info.layout, event.slot_size)
            except (FramebusError, OSError) as exc:
                self._protocol_failure(f"unusable segment: {exc}")
                return
            self._mappings[event.generation] = _Mapping(segment, info)
            self._info = info
            self._unmap_unused()
        elif isinstance(event, p.Eos):
            self._queue.append(_End())
        elif isinstance(event, p.Hello):
            # Counted at the producer's hello, not at connect: a connect can land in the backlog of a
            # producer that is closing and never answer.
            if self.producer_pid is not None:
                self.stats.reconnects += 1
                log.info("%s: re-attached to a producer (pid %d)", self.path, event.pid)
            self.producer_pid = event.pid
        elif isinstance(event, p.Goodbye):
            reason = event.reason
            message = event.message or reason.name.lower()
            if reason == p.GoodbyeReason.TOO_SLOW:
                self._drop_connection()
                raise ConsumerTooSlowError(f"producer at {self.path!r} disconnected this consumer: {message}")
            if reason == p.GoodbyeReason.VERSION_MISMATCH:
                self._drop_connection()
                raise VersionMismatchError(f"producer at {self.path!r}: {message}")
            if reason in (p.GoodbyeReason.NOT_ALLOWED, p.GoodbyeReason.PROTOCOL_ERROR):
                self._drop_connection()
                raise PeerRejectedError(f"producer at {self.path!r} refused this consumer: {message}")
            self._producer_gone(f"the producer said goodbye ({message})")

    def _producer_gone(self, why: str) -> None:
        self._drop_connection()
        if self.reconnect:
            log.info("%s: %s; waiting for a producer to return", self.path, why)
            return
        raise ProducerGoneError(
            f"producer at {self.path!r} is gone: {why}; pass reconnect=True to wait for it to come back"
        )

    def _protocol_failure(self, why: str) -> None:
        log.warning("%s: disconnecting from a misbehaving producer: %s", self.path, why)
        if self._sock is not None and self._conn is not None:
            try:
                send_message(self._sock, self._conn.send(p.Goodbye(p.GoodbyeReason.PROTOCOL_ERROR, why[:1000])))
            except OSError as exc:
                log.debug("%s: goodbye not delivered: %s", self.path, exc)
        self._producer_gone(f"protocol error: {why}")

    @staticmethod
    def _close_fds(conn: p.Connection) -> None:
        for fd in conn.take_unclaimed_fds():
            os.close(fd)

    def _drop_connection(self) -> None:
        """Forget the connection; frames still held stay readable, their releases go nowhere."""
        if self._sock is not None:
            close_gracefully(self._sock)
        self._sock = self._conn = None
        # Frames queued but never handed out are released locally (nothing to tell a dead producer).
        for item in self._queue:
            if isinstance(item, Frame):
                item._released = True
        self._queue = collections.deque(i for i in self._queue if isinstance(i, _End))
        self._pending_info = None
        # A new producer numbers its generations afresh; held frames keep their own mapping alive.
        for m in self._mappings.values():
            m.close()
        self._mappings.clear()
        self._info = None

    def _release(self, frame: Frame) -> None:
        with self._lock:
            self.stats.released += 1
            if frame._epoch != self._epoch or self._sock is None or self._conn is None:
                return  # its producer is gone: nothing to give back
            try:
                data = self._conn.send(p.Release(frame.slot, frame.seq))
            except p.LocalProtocolError as exc:
                log.error("%s: framebus bug releasing seq %d: %s", self.path, frame.seq, exc)
                return
            try:
                send_message(self._sock, data)
            except OSError as exc:
                # The producer vanished; receive() will see the hang-up and report it.
                log.debug("%s: release of seq %d not delivered: %s", self.path, frame.seq, exc)
            self._unmap_unused()

    def _unmap_unused(self) -> None:
        """Unmap old generations nobody holds a frame of any more."""
        if self._conn is None or len(self._mappings) < 2:
            return

        live = {gen for gen, _slot in self._conn.in_flight_frames().values()}
        current = self._info.generation if self._info else None
        for gen in [g for g in self._mappings if g != current and g not in live]:
            self._mappings.pop(gen).close()
