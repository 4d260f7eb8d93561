"""The producer: owns the slots, lends them out for writing, publishes them to consumers.

Threads: the caller's thread loans and publishes (and sends the frame
messages itself, so a frame reaches consumers without a thread hop); one
background thread accepts consumers and reads their releases, hellos and
stats requests.  Both work under one lock; nothing under it blocks except
the explicit waits of ``on_full='block'`` and the ``block`` policy, which
wait on a condition that releases the lock.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from types import TracebackType
from typing import Any, Literal

import numpy as np

from . import protocol as p
from .errors import FramebusError, FrameTooLargeError, Interrupted, SlotsExhaustedError, UnsupportedFormatError
from .segment import ProducerSegment
from .slot import SlotTable
from .transport import (
    Listener,
    PeerCred,
    TruncatedMessage,
    close_gracefully,
    peer_cred,
    recv_message,
    send_message,
)
from .videoformat import FrameLayout, make_layout, slot_size_for
from .views import base_address, check_layout_fits, flat_view, frame_image, frame_planes

log = logging.getLogger("framebus")

OnFull = Literal["drop", "block"]
LOCAL = "local"  # slot holder: memory of the slot still referenced in this process

_POLICY_NAMES = {p.Policy.DROP: "drop", p.Policy.BLOCK: "block", p.Policy.LATEST: "latest"}


@dataclass
class ConsumerStats:
    id: int
    pid: int
    uid: int
    name: str
    policy: str
    max_in_flight: int
    in_flight: int
    sent: int
    dropped: int
    released: int


@dataclass
class PublisherStats:
    path: str
    pid: int
    format: str
    width: int
    height: int
    framerate: str
    caps: str
    generation: int
    slots: int
    slots_free: int
    slot_size: int
    published: int
    zero_copy: int
    copied: int
    dropped: int
    consumers: list[ConsumerStats] = field(default_factory=list)
    uptime_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Consumer:
    id: int
    sock: socket.socket
    cred: PeerCred
    conn: p.Connection
    name: str = ""
    policy: p.Policy = p.Policy.DROP
    max_in_flight: int = 1
    ready: bool = False  # hello answered, caps and segment sent
    last_seq: int = -1  # newest frame sent, so a frame is never offered twice
    sent: int = 0
    dropped: int = 0
    released: int = 0
    observer: bool = False


class _Generation:
    """One format and its segment; replaced on a caps change, freed when nobody holds a slot."""

    def __init__(
        self,
        number: int,
        layout: FrameLayout,
        framerate: Fraction | None,
        caps: str,
        n_slots: int,
        name: str,
    ) -> None:
        self.number = number
        self.layout = layout
        self.framerate = framerate
        self.slot_size = slot_size_for(layout)
        self.segment = ProducerSegment(f"{name}:{number}", n_slots, self.slot_size)
        self.table = SlotTable(n_slots)
        self.base = np.frombuffer(self.segment.map, dtype=np.uint8)
        self.address = base_address(self.base)
        fps = framerate or Fraction(0, 1)
        self.caps_event = p.Caps(
            generation=number,
            format=layout.format,
            width=layout.width,
            height=layout.height,
            fps_n=fps.numerator,
            fps_d=fps.denominator,
            planes=tuple(p.PlaneInfo(pl.offset, pl.stride) for pl in layout.planes),
            frame_size=layout.size,
            caps=caps,
        )
        self.segment_event = p.Segment(number, self.slot_size, self.segment.placements, n_fds=1)
        self.latest_frame: p.FrameReady | None = None

    def close(self) -> None:
        del self.base
        self.segment.close()


def default_caps(layout: FrameLayout, framerate: Fraction | None) -> str:
    fps = framerate or Fraction(0, 1)
    return (
        f"video/x-raw, format=(string){layout.format}, width=(int){layout.width}, "
        f"height=(int){layout.height}, framerate=(fraction){fps.numerator}/{fps.denominator}"
    )


def _as_fraction(framerate: float | Fraction | tuple[int, int] | None) -> Fraction | None:
    if framerate is None:
        return None
    if isinstance(framerate, tuple):
        return Fraction(framerate[0], framerate[1])
    return Fraction(framerate).limit_denominator(1001)


class LoanedFrame:
    """A slot lent to the producer: write the pixels through ``planes``/``array``, then publish.

    Leaving the ``with`` block without publishing gives the slot back unused.
    When every slot is held and ``on_full='drop'``, the frame is a scratch
    buffer (``dropped`` is True) and publishing it only counts a drop.
    """

    def __init__(
        self, pub: Publisher, gen: _Generation, slot: int | None, scratch: np.ndarray | None, keep: bool = False
    ) -> None:
        self._pub = pub
        self._gen = gen
        self.slot = slot
        self._scratch = scratch
        self._done = False
        self.layout = gen.layout
        self.keep = keep and slot is not None
        self._local_released = False
        self.seq: int | None = None

    @property
    def dropped(self) -> bool:
        return self.slot is None

    @property
    def published(self) -> bool:
        return self.seq is not None

    @property
    def address(self) -> int:
        """Where the slot starts in this process (for elements that write through a pointer)."""
        if self._scratch is not None:
            return base_address(self._scratch)
        assert self.slot is not None
        return self._gen.address + self._gen.segment.slot_offset(self.slot)

    @property
    def planes(self) -> tuple[np.ndarray, ...]:
        self._check_open()
        return frame_planes(self.address, self.layout, True, self._keep)

    @property
    def array(self) -> np.ndarray:
        self._check_open()
        return frame_image(self.address, self.layout, True, self._keep)

    @property
    def buffer(self) -> np.ndarray:
        """The frame's bytes (``layout.size`` of them) as one flat writable array, any format."""
        self._check_open()
        return flat_view(self.address, self.layout.size, True, self._keep)

    @property
    def memory(self) -> memoryview:
        """The whole slot as writable bytes."""
        self._check_open()
        if self._scratch is not None:
            return self._scratch.data

        assert self.slot is not None
        start = self._gen.segment.slot_offset(self.slot)
        return memoryview(self._gen.segment.map)[start : start + self._gen.slot_size]

    @property
    def _keep(self) -> object:
        return self._scratch if self._scratch is not None else self._gen.base

    def publish(
        self,
        pts: int | None = None,
        dts: int | None = None,
        duration: int | None = None,
        flags: p.FrameFlags = p.FrameFlags.NONE,
        meta: bytes = b"",
        layout: FrameLayout | None = None,
    ) -> int | None:
        """Hand the frame to every consumer; returns its sequence number (None if dropped).

        ``layout`` overrides strides/offsets for this frame only (a GStreamer
        upstream that wrote with its own padding).
        """
        return self._publish(pts, dts, duration, flags, meta, layout, copied=False)

    def _publish(
        self,
        pts: int | None,
        dts: int | None,
        duration: int | None,
        flags: p.FrameFlags,
        meta: bytes,
        layout: FrameLayout | None,
        copied: bool,
    ) -> int | None:
        self._check_open()
        try:
            seq = self._pub._publish_loaned(self, pts, dts, duration, flags, meta, layout, copied)
        except BaseException:
            self.cancel()  # a refused frame gives its slot back
            raise
        self._done = True
        self.seq = seq
        return seq

    def cancel(self) -> None:
        """Give the slot back unpublished (a kept frame still holds it until ``release``)."""
        if not self._done:
            self._done = True
            self._pub._cancel_loan(self)

    def release(self) -> None:
        """For ``loan(keep=True)``: the local user of the slot (a GstBuffer) is gone.

        Until then the slot is never rewritten, even after it was published
        and every consumer released it: something in this process may still
        read it.
        """
        self.cancel()
        if self.keep and not self._local_released:
            self._local_released = True
            self._pub._release_local(self)

    def _check_open(self) -> None:
        if self._done:
            raise FramebusError("this loaned frame was already published or cancelled; loan a new one")

    def __enter__(self) -> LoanedFrame:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class Publisher:
    """Serve frames of one format at a Unix socket path.

    ``slots`` bounds the shared memory: each slot holds one frame.  The
    producer keeps the newest frame (for consumers that join late) and one
    slot it writes into; the rest are what consumers can hold at once.
    ``on_full`` says what ``loan`` does when every slot is held: ``drop``
    (never block: the frame is written to scratch memory and counted as
    dropped) or ``block`` (wait up to ``block_timeout`` seconds, then raise).
    ``consumer_block_timeout`` bounds how long a ``block``-policy consumer
    may stall the producer before it is disconnected.
    """

    def __init__(
        self,
        path: str,
        format: str,
        width: int,
        height: int,
        framerate: float | Fraction | tuple[int, int] | None = None,
        slots: int = 8,
        on_full: OnFull = "drop",
        block_timeout: float = 5.0,
        consumer_block_timeout: float = 2.0,
        socket_mode: int = 0o660,
        allowed_uids: Iterable[int] | None = None,
        strides: Sequence[int] | None = None,
        caps: str | None = None,
        name: str | None = None,
    ) -> None:
        if on_full not in ("drop", "block"):
            raise ValueError(f"on_full must be 'drop' or 'block', got {on_full!r}")
        if not 2 <= slots <= p.MAX_SLOTS:
            raise ValueError(f"slots={slots}: a publisher needs 2..{p.MAX_SLOTS} slots (one to write, one newest)")
        self.path = path
        self.name = name or os.path.basename(path)
        self.n_slots = slots
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.consumer_block_timeout = consumer_block_timeout
        self.allowed_uids = frozenset(allowed_uids) if allowed_uids is not None else None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._consumers: dict[int, _Consumer] = {}
        self._ids = itertools.count(1)
        self._seq = 0
        self._published = self._zero_copy = self._copied = self._dropped = 0
        self._started = time.monotonic()
        self._retiring: list[_Generation] = []
        self._scratch: np.ndarray | None = None
        self._closed = False
        self._ended = False
        self._interrupts = 0  # bumped by interrupt_waits(); a wait that sees it change gives up

        layout = make_layout(format, width, height, strides)
        fps = _as_fraction(framerate)
        self._gen = _Generation(0, layout, fps, caps or default_caps(layout, fps), slots, self.name)
        try:
            self._listener = Listener(path, socket_mode)
        except BaseException:
            self._gen.close()
            raise
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._listener.sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._serve, name=f"framebus-pub:{self.name}", daemon=True)
        self._thread.start()
        log.info(
            "publishing %s %dx%d at %s (%d slots of %d bytes)",
            format,
            width,
            height,
            path,
            slots,
            self._gen.slot_size,
        )

    # ------------------------------------------------------------------ public API

    @property
    def layout(self) -> FrameLayout:
        return self._gen.layout

    @property
    def generation(self) -> int:
        return self._gen.number

    @property
    def slot_size(self) -> int:
        return self._gen.slot_size

    def loan(self, timeout: float | None = None, keep: bool = False) -> LoanedFrame:
        """A free slot to write the next frame into (most recently released first).

        ``keep=True`` is for memory that outlives the publish in this process
        (a GstBuffer): the slot stays held until ``frame.release()``.
        """
        with self._lock:
            self._check_open()
            if self._ended:
                # Publishing after end-of-stream: consumers see a fresh start (new generation).
                old = self._gen
                self._start_generation(old.layout, old.framerate, old.caps_event.caps)
            gen = self._gen
            slot = gen.table.loan()
            if slot is None:
                self._absorb(self._consumers.values())
                slot = gen.table.loan()
            interrupts = self._interrupts
            if slot is None and self.on_full == "block":
                limit = self.block_timeout if timeout is None else timeout
                deadline = time.monotonic() + limit
                while slot is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._changed.wait(remaining):
                        raise SlotsExhaustedError(self._exhausted_message(limit))
                    self._check_interrupted(interrupts)
                    self._check_open()
                    gen = self._gen
                    slot = gen.table.loan()
            if slot is None and self._lossless_holders(gen):
                # A 'block' consumer asked for every frame: wait for its releases as its own bound would,
                # and cut it off after consumer_block_timeout rather than drop behind its back.
                deadline = time.monotonic() + self.consumer_block_timeout
                while slot is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        for c in self._lossless_holders(gen):
                            self._disconnect(
                                c,
                                p.GoodbyeReason.TOO_SLOW,
                                f"consumer held {c.conn.in_flight} of the {self.n_slots} slots for "
                                f"{self.consumer_block_timeout:.1f} s with policy 'block'; release frames sooner, "
                                "lower max_in_flight, or use policy 'drop'",
                                log_level=logging.WARNING,
                            )
                        slot = gen.table.loan()
                        break
                    self._changed.wait(remaining)
                    self._check_interrupted(interrupts)
                    self._check_open()
                    gen = self._gen
                    slot = gen.table.loan()
            if slot is None:
                return LoanedFrame(self, gen, None, self._scratch_for(gen))
            if keep:
                gen.table.hold(slot, LOCAL)
            return LoanedFrame(self, gen, slot, None, keep)

    def publish(
        self,
        data: np.ndarray | Sequence[np.ndarray],
        pts: int | None = None,
        dts: int | None = None,
        duration: int | None = None,
        flags: p.FrameFlags = p.FrameFlags.NONE,
        meta: bytes = b"",
        timeout: float | None = None,
    ) -> int | None:
        """Copy an existing image (or one array per plane) into a slot and publish it.

        This is the copying path, counted in ``stats.copied``: write into
        ``loan()`` instead to avoid the copy.
        """
        arrays = list(data) if isinstance(data, (list, tuple)) else None
        with self.loan(timeout) as frame:
            if frame.dropped:
                return frame.publish(pts, dts, duration, flags, meta)
            if arrays is not None:
                targets = frame.planes
                if len(arrays) != len(targets):
                    raise FrameTooLargeError(
                        f"{self.layout.format} has {len(targets)} planes, got {len(arrays)} arrays"
                    )
                for dst, src in zip(targets, arrays, strict=True):
                    _copy_plane(dst, np.asarray(src))
            else:
                assert isinstance(data, np.ndarray)
                _copy_plane(frame.array, data)
            return frame._publish(pts, dts, duration, flags, meta, None, copied=True)

    def set_format(
        self,
        format: str,
        width: int,
        height: int,
        framerate: float | Fraction | tuple[int, int] | None = None,
        strides: Sequence[int] | None = None,
        caps: str | None = None,
    ) -> None:
        """Start a new generation with another format; consumers get new caps and segment.

        Frames of the old generation stay valid until every consumer releases them.
        """
        layout = make_layout(format, width, height, strides)
        fps = _as_fraction(framerate)
        with self._lock:
            self._check_open()
            self._start_generation(layout, fps, caps or default_caps(layout, fps))
        log.info("%s: new format %s %dx%d (generation %d)", self.path, format, width, height, self._gen.number)

    def end_of_stream(self) -> None:
        """Tell consumers the stream ended; publishing again starts a new generation."""
        with self._lock:
            self._check_open()
            self._gen.table.let_go_of_latest()
            self._gen.latest_frame = None
            self._ended = True
            for c in list(self._consumers.values()):
                if c.ready and not c.observer:
                    self._send(c, p.Eos())
            self._changed.notify_all()

    def interrupt_waits(self) -> None:
        """Make every wait in progress (``loan``, a 'block' consumer) give up with ``Interrupted``.

        For a GStreamer flush or state change: a streaming thread must never
        stay blocked in a wait nobody will end.  Waits that start later are
        not affected.
        """
        with self._lock:
            self._interrupts += 1
            self._changed.notify_all()

    def _check_interrupted(self, seen: int) -> None:
        if self._interrupts != seen:
            raise Interrupted(f"wait for a slot of {self.path!r} was interrupted")

    @property
    def consumer_count(self) -> int:
        """Consumers attached now (cheap: for per-frame checks)."""
        return sum(1 for c in self._consumers.values() if c.ready and not c.observer)

    @property
    def stats(self) -> PublisherStats:
        with self._lock:
            return self._stats_locked()

    def wait_for_consumers(self, n: int = 1, timeout: float | None = None) -> bool:
        """Block until ``n`` consumers are attached (their hello answered)."""
        return self.wait_until(lambda s: len(s.consumers) >= n, timeout)

    def wait_until(self, predicate: Callable[[PublisherStats], bool], timeout: float | None = None) -> bool:
        """Block until ``predicate(stats)`` holds; re-checked on every attach, release and hang-up.

        For tools and tests that must react to consumers without polling.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not predicate(self._stats_locked()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def close(self) -> None:
        """End of stream, goodbye to every consumer, socket file removed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Stop accepting first: a consumer that reconnects must find no socket, not a dying backlog.
            self._selector.unregister(self._listener.sock)
            self._listener.close()
            for c in list(self._consumers.values()):
                if c.ready and not c.observer and not self._ended:
                    self._send(c, p.Eos())
                self._disconnect(c, p.GoodbyeReason.SHUTDOWN, "producer closed", log_level=logging.DEBUG)
            self._changed.notify_all()
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with self._lock:
            # A slot still referenced in this process (a GstBuffer upstream of framebussink that is still
            # being written, a loaned frame) keeps its segment mapped until it is released; unmapping it
            # now would pull the memory from under that writer.  The rest is unmapped at once.
            generations, self._retiring = [self._gen, *self._retiring], []
            for gen in generations:
                gen.table.let_go_of_latest()
                gen.latest_frame = None
                self._retiring.append(gen)
            self._collect_retired()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ publishing (caller's thread)

    def _publish_loaned(
        self,
        frame: LoanedFrame,
        pts: int | None,
        dts: int | None,
        duration: int | None,
        flags: p.FrameFlags,
        meta: bytes,
        layout: FrameLayout | None,
        copied: bool,
    ) -> int | None:
        if len(meta) > p.MAX_META:
            raise FramebusError(f"frame metadata is {len(meta)} bytes, the limit is {p.MAX_META}")
        with self._lock:
            self._check_open()
            gen = frame._gen
            if frame.slot is None:
                self._dropped += 1
                self._seq += 1  # a gap in the sequence tells consumers a frame was lost
                return None
            if gen is not self._gen or self._ended:
                # The format changed or the stream ended while this frame was being written.
                gen.table.cancel_loan(frame.slot)
                self._collect_retired()
                self._dropped += 1
                self._seq += 1
                return None
            planes: tuple[p.PlaneInfo, ...] = ()
            size = gen.layout.size
            if layout is not None and layout != gen.layout:
                try:
                    check_layout_fits(layout, gen.slot_size)
                except UnsupportedFormatError as exc:
                    raise FrameTooLargeError(str(exc)) from None

                planes = tuple(p.PlaneInfo(pl.offset, pl.stride) for pl in layout.planes)
                size = layout.size
            gen.table.publish(frame.slot)
            seq = self._seq
            self._seq += 1
            event = p.FrameReady(
                generation=gen.number,
                slot=frame.slot,
                seq=seq,
                pts=p.NO_TIME if pts is None else pts,
                dts=p.NO_TIME if dts is None else dts,
                duration=p.NO_TIME if duration is None else duration,
                publish_ns=time.monotonic_ns(),
                flags=flags,
                size=size,
                planes=planes,
                meta=meta,
            )
            gen.latest_frame = event
            self._published += 1
            if copied:
                self._copied += 1
            else:
                self._zero_copy += 1
            for c in list(self._consumers.values()):
                if c.ready and not c.observer:
                    self._offer(c, gen, event)
            return seq

    def _offer(self, c: _Consumer, gen: _Generation, event: p.FrameReady) -> None:
        """Send one frame to one consumer, following its policy when it is at its bound."""
        if event.seq <= c.last_seq:
            return  # already offered (it joined while a 'block' consumer made us wait)
        if c.conn.in_flight >= c.max_in_flight:
            self._absorb((c,))
            if c.id not in self._consumers:
                return  # it said goodbye or hung up meanwhile
        if c.conn.in_flight >= c.max_in_flight:
            if c.policy != p.Policy.BLOCK:
                c.dropped += 1
                return
            deadline = time.monotonic() + self.consumer_block_timeout
            interrupts = self._interrupts
            while c.id in self._consumers and c.conn.in_flight >= c.max_in_flight:
                remaining = deadline - time.monotonic()
                if self._interrupts != interrupts:
                    c.dropped += 1  # a flush: this frame is being thrown away anyway
                    return
                if remaining <= 0:
                    self._disconnect(
                        c,
                        p.GoodbyeReason.TOO_SLOW,
                        f"consumer held {c.conn.in_flight} frames (max_in_flight={c.max_in_flight}) for "
                        f"{self.consumer_block_timeout:.1f} s with policy 'block'; release frames sooner, "
                        "raise max_in_flight, or use policy 'drop'",
                        log_level=logging.WARNING,
                    )
                    return
                self._changed.wait(remaining)
            if c.id not in self._consumers or gen is not self._gen or event.seq <= c.last_seq:
                return
        self._send(c, event)
        if c.id in self._consumers:
            gen.table.hold(event.slot, c.id)
            c.last_seq = event.seq
            c.sent += 1

    def _cancel_loan(self, frame: LoanedFrame) -> None:
        if frame.slot is None:
            return
        with self._lock:
            frame._gen.table.cancel_loan(frame.slot)
            self._collect_retired()
            self._changed.notify_all()

    def _release_local(self, frame: LoanedFrame) -> None:
        assert frame.slot is not None
        with self._lock:
            frame._gen.table.release(frame.slot, LOCAL)
            self._collect_retired()
            self._changed.notify_all()

    def _start_generation(self, layout: FrameLayout, fps: Fraction | None, caps: str) -> None:
        old = self._gen
        self._gen = _Generation(old.number + 1, layout, fps, caps, self.n_slots, self.name)
        self._retire(old)
        self._ended = False
        for c in list(self._consumers.values()):
            if c.ready and not c.observer:
                self._send_stream_start(c)

    def _scratch_for(self, gen: _Generation) -> np.ndarray:
        if self._scratch is None or self._scratch.size < gen.slot_size:
            self._scratch = np.zeros(gen.slot_size, dtype=np.uint8)
        return self._scratch

    def _lossless_holders(self, gen: _Generation) -> list[_Consumer]:
        """'block' consumers holding frames of this generation."""
        return [
            c
            for c in self._consumers.values()
            if c.policy == p.Policy.BLOCK and any(g == gen.number for g, _slot in c.conn.in_flight_frames().values())
        ]

    def _exhausted_message(self, waited: float) -> str:
        holders: dict[int, int] = {}
        for c in self._consumers.values():
            holders[c.cred.pid] = c.conn.in_flight
        held = ", ".join(f"pid {pid}: {n}" for pid, n in holders.items()) or "none"
        return (
            f"all {self.n_slots} slots of {self.path!r} stayed held for {waited:.1f} s (frames held by "
            f"consumers: {held}); raise slots=, make consumers release sooner, or use on_full='drop'"
        )

    # ------------------------------------------------------------------ consumer handling (IO thread)

    def _serve(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            for key, _mask in self._selector.select():
                if key.fileobj is self._listener.sock:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    try:
                        os.read(self._wake_r, 64)
                    except BlockingIOError:
                        pass  # another wake-up already drained it
                else:
                    consumer_id = key.data
                    assert isinstance(consumer_id, int)
                    try:
                        self._readable(consumer_id)
                    except Exception as exc:
                        # A framebus bug must cost one consumer, never the whole producer.
                        log.exception("%s: internal error serving consumer %d", self.path, consumer_id)
                        with self._lock:
                            c = self._consumers.get(consumer_id)
                            if c is not None:
                                self._disconnect(c, p.GoodbyeReason.INTERNAL_ERROR, repr(exc), logging.ERROR)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("%s: accept failed (closing?): %s", self.path, exc)
            return
        sock.setblocking(False)
        cred = peer_cred(sock)
        with self._lock:
            c = _Consumer(next(self._ids), sock, cred, p.Connection(p.Role.PRODUCER))
            self._consumers[c.id] = c
            self._selector.register(sock, selectors.EVENT_READ, c.id)
        log.debug("%s: connection from pid %d uid %d", self.path, cred.pid, cred.uid)

    def _readable(self, consumer_id: int) -> None:
        with self._lock:
            c = self._consumers.get(consumer_id)
            if c is not None:
                self._read_one(c)

    def _read_one(self, c: _Consumer) -> bool:
        """Handle one waiting message from ``c`` (lock held); False if none was waiting."""
        try:
            data, fds = recv_message(c.sock)
        except BlockingIOError:
            return False
        except (ConnectionResetError, TruncatedMessage, OSError) as exc:
            self._disconnect(c, p.GoodbyeReason.PROTOCOL_ERROR, str(exc), log_level=logging.WARNING)
            return False
        if not data:
            self._disconnect(c, None, "hung up", log_level=logging.DEBUG)
            return False
        try:
            event = c.conn.receive_message(data, fds)
        except p.VersionError as exc:
            for fd in c.conn.take_unclaimed_fds():
                os.close(fd)
            self._disconnect(c, p.GoodbyeReason.VERSION_MISMATCH, str(exc), log_level=logging.WARNING)
            return False
        except p.ProtocolError as exc:
            for fd in c.conn.take_unclaimed_fds():
                os.close(fd)
            self._disconnect(c, p.GoodbyeReason.PROTOCOL_ERROR, str(exc), log_level=logging.WARNING)
            return False
        self._handle(c, event)
        return True

    def _absorb(self, consumers: Iterable[_Consumer]) -> None:
        """Handle releases already sent but not yet read by the IO thread (lock held).

        Before declaring every slot held, or a consumer at its bound, what is
        waiting in the sockets counts: a consumer that released in time must
        not miss a frame because the IO thread had not run yet.
        """
        for c in list(consumers):
            for _ in range(p.MAX_SLOTS + 8):
                if c.id not in self._consumers or not self._read_one(c):
                    break

    def _handle(self, c: _Consumer, event: p.Event) -> None:
        if isinstance(event, p.Hello):
            self._welcome(c, event)
        elif isinstance(event, p.Release):
            generation, slot = c.conn.last_released
            c.released += 1
            gen = self._generation(generation)
            if gen is not None and gen.table.release(slot, c.id) and gen is not self._gen:
                self._collect_retired()
            self._changed.notify_all()
        elif isinstance(event, p.StatsRequest):
            self._send(c, p.Stats(event.request_id, _stats_json(self._stats_locked().to_dict())))
        elif isinstance(event, p.Goodbye):
            self._disconnect(c, None, f"said goodbye ({event.message or event.reason.name})", log_level=logging.DEBUG)

    def _welcome(self, c: _Consumer, hello: p.Hello) -> None:
        if self.allowed_uids is not None and c.cred.uid not in self.allowed_uids:
            self._disconnect(
                c,
                p.GoodbyeReason.NOT_ALLOWED,
                f"uid {c.cred.uid} may not read {self.path!r}; the producer allows uids {sorted(self.allowed_uids)}",
                log_level=logging.WARNING,
            )
            return
        c.name = hello.name
        c.policy = hello.policy
        c.observer = hello.role == p.Role.OBSERVER
        # A consumer can never hold more frames than there are slots.
        c.max_in_flight = max(1, min(hello.max_in_flight, self.n_slots))
        self._send(c, p.Hello(p.Role.PRODUCER, os.getpid(), self.name))
        if c.observer:
            c.ready = True
            return
        self._send_stream_start(c)
        c.ready = True
        gen = self._gen
        latest = gen.latest_frame
        if latest is not None and not self._ended and c.id in self._consumers:
            self._offer(c, gen, latest)
        log.info(
            "%s: consumer %d attached (pid %d, %s, policy %s, max %d in flight)",
            self.path,
            c.id,
            c.cred.pid,
            c.name or "unnamed",
            _POLICY_NAMES.get(c.policy, "?"),
            c.max_in_flight,
        )
        self._changed.notify_all()

    def _send_stream_start(self, c: _Consumer) -> None:
        gen = self._gen
        self._send(c, gen.caps_event)
        if c.id in self._consumers:
            self._send(c, gen.segment_event, (gen.segment.consumer_fd,))

    def _send(self, c: _Consumer, event: p.Event, fds: Sequence[int] = ()) -> None:
        """Send one message; a consumer whose socket is gone or full is disconnected."""
        try:
            data = c.conn.send(event)
        except p.LocalProtocolError as exc:
            log.error("%s: framebus bug, refusing to send %r to consumer %d: %s", self.path, event, c.id, exc)
            self._disconnect(c, p.GoodbyeReason.INTERNAL_ERROR, str(exc), log_level=logging.ERROR)
            return
        try:
            send_message(c.sock, data, fds)
        except BlockingIOError:
            self._disconnect(
                c,
                p.GoodbyeReason.TOO_SLOW,
                "consumer stopped reading its socket; call receive() regularly",
                log_level=logging.WARNING,
            )
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                log.warning("%s: send to consumer %d failed: %s", self.path, c.id, exc)
            self._disconnect(c, None, "hung up", log_level=logging.DEBUG)

    def _disconnect(self, c: _Consumer, reason: p.GoodbyeReason | None, message: str, log_level: int) -> None:
        """Drop one consumer and give back every slot it held; nothing else changes."""
        if self._consumers.pop(c.id, None) is None:
            return
        log.log(
            log_level,
            "%s: consumer %d (pid %d %s) disconnected: %s",
            self.path,
            c.id,
            c.cred.pid,
            c.name or "unnamed",
            message,
        )
        if reason is not None:
            try:
                send_message(c.sock, c.conn.send(p.Goodbye(reason, message[: p.MAX_REASON])))
            except OSError as exc:
                log.debug("%s: goodbye to consumer %d not delivered: %s", self.path, c.id, exc)
        try:
            self._selector.unregister(c.sock)
        except (KeyError, ValueError):
            log.debug("%s: consumer %d was not registered", self.path, c.id)
        close_gracefully(c.sock)
        by_generation: dict[int, list[int]] = {}
        for generation, slot in c.conn.in_flight_frames().values():
            by_generation.setdefault(generation, []).append(slot)
        for generation, slots in by_generation.items():
            gen = self._generation(generation)
            if gen is not None:
                gen.table.drop_consumer(c.id, slots)
        self._collect_retired()
        self._changed.notify_all()

    # ------------------------------------------------------------------ generations

    def _generation(self, number: int) -> _Generation | None:
        if number == self._gen.number:
            return self._gen
        for gen in self._retiring:
            if gen.number == number:
                return gen
        return None

    def _retire(self, gen: _Generation) -> None:
        gen.table.let_go_of_latest()
        gen.latest_frame = None
        self._retiring.append(gen)
        self._collect_retired()

    def _collect_retired(self) -> None:
        for gen in [g for g in self._retiring if g.table.all_free]:
            self._retiring.remove(gen)
            gen.close()

    def _stats_locked(self) -> PublisherStats:
        gen = self._gen
        fps = gen.framerate or Fraction(0, 1)
        return PublisherStats(
            path=self.path,
            pid=os.getpid(),
            format=gen.layout.format,
            width=gen.layout.width,
            height=gen.layout.height,
            framerate=f"{fps.numerator}/{fps.denominator}",
            caps=gen.caps_event.caps,
            generation=gen.number,
            slots=self.n_slots,
            slots_free=gen.table.n_free,
            slot_size=gen.slot_size,
            published=self._published,
            zero_copy=self._zero_copy,
            copied=self._copied,
            dropped=self._dropped,
            consumers=[
                ConsumerStats(
                    id=c.id,
                    pid=c.cred.pid,
                    uid=c.cred.uid,
                    name=c.name,
                    policy=_POLICY_NAMES.get(c.policy, "observer"),
                    max_in_flight=c.max_in_flight,
                    in_flight=c.conn.in_flight,
                    sent=c.sent,
                    dropped=c.dropped,
                    released=c.released,
                )
                for c in self._consumers.values()
                if c.ready and not c.observer
            ],
            uptime_s=round(time.monotonic() - self._started, 3),
        )

    def _check_open(self) -> None:
        if self._closed:
            raise FramebusError(f"publisher at {self.path!r} is closed")


def _stats_json(stats: dict[str, Any]) -> str:
    """Stats as JSON within the protocol's limit: with very many consumers, the list is shortened
    (``consumers_omitted`` says by how many) rather than the text cut into invalid JSON."""
    text = json.dumps(stats)
    consumers = stats["consumers"]
    keep = len(consumers)
    while len(text.encode()) > p.MAX_STATS and keep:
        keep = keep * 3 // 4
        text = json.dumps({**stats, "consumers": consumers[:keep], "consumers_omitted": len(consumers) - keep})
    return text


def _copy_plane(dst: np.ndarray, src: np.ndarray) -> None:
    if src.shape != dst.shape:
        raise FrameTooLargeError(
            f"array of shape {src.shape} does not match the frame's {dst.shape}; convert or resize it "
            "to the publisher's format and size first"
        )
    np.copyto(dst, src, casting="same_kind")
