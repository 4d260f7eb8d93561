"""The framebus control protocol, sans-IO.

This module turns bytes into typed events and events into bytes, and keeps
the per-connection state machine that says which event may come next.  It
never touches a socket, a file descriptor's contents, a thread or a clock,
so every rule here is tested with plain bytes (see ``docs/PROTOCOL.md`` for
the byte layout).  The socket layer around it passes received file
descriptors in with the bytes they arrived with and sends ``Segment.fds``
as ``SCM_RIGHTS`` with the bytes ``send`` returns.

Why a separate state machine on both sides: the producer must never hand a
consumer a slot that consumer still holds, and a consumer must never release
what it was not given.  Checking both in one pure place keeps the rest of
the code free of protocol bookkeeping.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
MAGIC = b"FBUS"

# Strict limits: every length on the wire is checked against one of these.
MAX_MESSAGE = 65536
MAX_NAME = 255
MAX_FORMAT = 32
MAX_CAPS = 4096
MAX_META = 1024
MAX_REASON = 1024
MAX_STATS = 60000
MAX_PLANES = 4
MAX_SLOTS = 256
MAX_FDS = 64
MAX_IN_FLIGHT = 1024
MAX_DIMENSION = 16384
MAX_SLOT_SIZE = 1 << 34

HEADER = struct.Struct("<HHI")  # type, flags (0), payload length


class ProtocolError(Exception):
    """Malformed bytes or an event out of order; the connection is unusable afterwards."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order: disconnect it."""


class VersionError(RemoteProtocolError):
    """The peer's hello carries an incompatible major version."""

    def __init__(self, peer_major: int, peer_minor: int) -> None:
        super().__init__(
            f"peer speaks framebus protocol {peer_major}.{peer_minor}, this side speaks "
            f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}; run the same major version of framebus on both"
        )
        self.peer_major = peer_major
        self.peer_minor = peer_minor


class Role(enum.IntEnum):
    PRODUCER = 1
    CONSUMER = 2
    OBSERVER = 3  # asks for stats only, receives no frames


class Policy(enum.IntEnum):
    """What the producer does when a consumer already holds max_in_flight frames."""

    NONE = 0  # producers and observers
    DROP = 1  # skip this consumer for that frame, count a drop
    BLOCK = 2  # wait for a release, with a timeout (lossless)
    LATEST = 3  # like DROP, and the consumer keeps only the newest frame


class GoodbyeReason(enum.IntEnum):
    NORMAL = 0
    SHUTDOWN = 1
    PROTOCOL_ERROR = 2
    VERSION_MISMATCH = 3
    NOT_ALLOWED = 4
    TOO_SLOW = 5
    INTERNAL_ERROR = 6


class MessageType(enum.IntEnum):
    HELLO = 1
    CAPS = 2
    SEGMENT = 3
    FRAME = 4
    RELEASE = 5
    EOS = 6
    STATS_REQUEST = 7
    STATS = 8
    GOODBYE = 9


class FrameFlags(enum.IntFlag):
    """Mirrors the GstBuffer flags a consumer needs to rebuild the buffer."""

    NONE = 0
    DISCONT = 1
    DELTA_UNIT = 2
    GAP = 4
    HEADER = 8
    MARKER = 16
    DROPPABLE = 32


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Hello:
    role: Role
    pid: int
    name: str = ""
    policy: Policy = Policy.NONE
    max_in_flight: int = 0
    major: int = PROTOCOL_MAJOR
    minor: int = PROTOCOL_MINOR


@dataclass(frozen=True)
class PlaneInfo:
    offset: int  # from the start of the slot
    stride: int


@dataclass(frozen=True)
class Caps:
    """Starts a generation: every frame until the next Caps has this format."""

    generation: int
    format: str
    width: int
    height: int
    fps_n: int
    fps_d: int
    planes: tuple[PlaneInfo, ...]
    frame_size: int
    caps: str = ""  # the GStreamer caps string, for consumers that are GStreamer elements


@dataclass(frozen=True)
class SlotPlacement:
    fd_index: int  # which of the segment's fds
    offset: int  # where the slot starts inside that fd


@dataclass(frozen=True)
class Segment:
    """The shared memory of one generation; ``fds`` travel as SCM_RIGHTS, not as bytes."""

    generation: int
    slot_size: int
    slots: tuple[SlotPlacement, ...]
    fds: tuple[int, ...] = field(default=(), compare=False)
    n_fds: int = 0

    def __post_init__(self) -> None:
        if self.fds and not self.n_fds:
            object.__setattr__(self, "n_fds", len(self.fds))


NO_TIME = -1


@dataclass(frozen=True)
class FrameReady:
    """A slot now holds a complete frame; the consumer owns a reference until Release."""

    generation: int
    slot: int
    seq: int
    pts: int = NO_TIME  # nanoseconds in the producer's stream time, NO_TIME if unknown
    dts: int = NO_TIME
    duration: int = NO_TIME
    publish_ns: int = 0  # CLOCK_MONOTONIC when published, for latency
    flags: FrameFlags = FrameFlags.NONE
    size: int = 0  # bytes of the slot the frame uses
    planes: tuple[PlaneInfo, ...] = ()
    meta: bytes = b""


@dataclass(frozen=True)
class Release:
    slot: int
    seq: int


@dataclass(frozen=True)
class Eos:
    pass


@dataclass(frozen=True)
class StatsRequest:
    request_id: int


@dataclass(frozen=True)
class Stats:
    request_id: int
    json: str


@dataclass(frozen=True)
class Goodbye:
    reason: GoodbyeReason = GoodbyeReason.NORMAL
    message: str = ""


Event = Hello | Caps | Segment | FrameReady | Release | Eos | StatsRequest | Stats | Goodbye


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

# --------------------------------------------------------------------------- encoding

_HELLO = struct.Struct("<4sHHBBHI")
_CAPS = struct.Struct("<IIIIIQB")
_PLANE = struct.Struct("<QI")
_SEGMENT = struct.Struct("<IQBH")
_PLACEMENT = struct.Struct("<BQ")
_FRAME = struct.Struct("<IHHQqqqQQB")
_RELEASE = struct.Struct("<HQ")
_U32 = struct.Struct("<I")
_GOODBYE = struct.Struct("<H")
_STR16 = struct.Struct("<H")


def _put_str(parts: list[bytes], text: str | bytes, limit: int, what: str) -> None:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if len(raw) > limit:
        raise LocalProtocolError(f"{what} is {len(raw)} bytes, the limit is {limit}")
    parts.append(_STR16.pack(len(raw)))
    parts.append(raw)


def _check_range(value: int, lo: int, hi: int, what: str) -> None:
    if not (lo <= value <= hi):
        raise LocalProtocolError(f"{what}={value} is outside {lo}..{hi}")


def encode(event: Event) -> bytes:
    """One event as one message: header plus payload.  Validates every field."""
    try:
        return _encode(event)
    except (struct.error, UnicodeEncodeError) as exc:
        # A field outside its wire type (negative, too wide) or text that is not valid Unicode.
        raise LocalProtocolError(f"cannot encode {type(event).__name__}: {exc}") from None


def _encode(event: Event) -> bytes:
    parts: list[bytes] = []
    if isinstance(event, Hello):
        kind = MessageType.HELLO
        _check_range(event.max_in_flight, 0, MAX_IN_FLIGHT, "max_in_flight")
        _check_range(event.pid, 0, 2**32 - 1, "pid")
        parts.append(
            _HELLO.pack(
                MAGIC,
                event.major,
                event.minor,
                int(event.role),
                int(event.policy),
                event.max_in_flight,
                event.pid,
            )
        )
        _put_str(parts, event.name, MAX_NAME, "hello name")
    elif isinstance(event, Caps):
        kind = MessageType.CAPS
        _validate_caps(event, LocalProtocolError)
        parts.append(
            _CAPS.pack(
                event.generation,
                event.width,
                event.height,
                event.fps_n,
                event.fps_d,
                event.frame_size,
                len(event.planes),
            )
        )
        parts.extend(_PLANE.pack(p.offset, p.stride) for p in event.planes)
        _put_str(parts, event.format, MAX_FORMAT, "format name")
        _put_str(parts, event.caps, MAX_CAPS, "caps string")
    elif isinstance(event, Segment):
        kind = MessageType.SEGMENT
        _validate_segment(event, LocalProtocolError)
        parts.append(_SEGMENT.pack(event.generation, event.slot_size, event.n_fds, len(event.slots)))
        parts.extend(_PLACEMENT.pack(s.fd_index, s.offset) for s in event.slots)
    elif isinstance(event, FrameReady):
        kind = MessageType.FRAME
        if len(event.planes) > MAX_PLANES:
            raise LocalProtocolError(f"{len(event.planes)} planes, the limit is {MAX_PLANES}")
        for t, what in ((event.pts, "pts"), (event.dts, "dts"), (event.duration, "duration")):
            _check_range(t, NO_TIME, 2**63 - 1, what)
        parts.append(
            _FRAME.pack(
                event.generation,
                event.slot,
                int(event.flags),
                event.seq,
                event.pts,
                event.dts,
                event.duration,
                event.publish_ns,
                event.size,
                len(event.planes),
            )
        )
        parts.extend(_PLANE.pack(p.offset, p.stride) for p in event.planes)
        _put_str(parts, event.meta, MAX_META, "frame metadata")
    elif isinstance(event, Release):
        kind = MessageType.RELEASE
        parts.append(_RELEASE.pack(event.slot, event.seq))
    elif isinstance(event, Eos):
        kind = MessageType.EOS
    elif isinstance(event, StatsRequest):
        kind = MessageType.STATS_REQUEST
        parts.append(_U32.pack(event.request_id))
    elif isinstance(event, Stats):
        kind = MessageType.STATS
        raw = event.json.encode("utf-8")
        if len(raw) > MAX_STATS:
            raise LocalProtocolError(f"stats are {len(raw)} bytes, the limit is {MAX_STATS}")
        parts.append(_U32.pack(event.request_id))
        parts.append(_U32.pack(len(raw)))
        parts.append(raw)
    elif isinstance(event, Goodbye):
        kind = MessageType.GOODBYE
        parts.append(_GOODBYE.pack(int(event.reason)))
        _put_str(parts, event.message, MAX_REASON, "goodbye message")
    else:  # pragma: no cover - guarded by the type checker
        raise LocalProtocolError(f"not a framebus event: {event!r}")
    payload = b"".join(parts)
    return HEADER.pack(int(kind), 0, len(payload)) + payload


def _validate_caps(c: Caps, error: type[ProtocolError]) -> None:
    if not (0 < c.width <= MAX_DIMENSION and 0 < c.height <= MAX_DIMENSION):
        raise error(f"caps size {c.width}x{c.height} is outside 1..{MAX_DIMENSION}")
    if not (1 <= len(c.planes) <= MAX_PLANES):
        raise error(f"caps have {len(c.planes)} planes, expected 1..{MAX_PLANES}")
    if not (0 < c.frame_size <= MAX_SLOT_SIZE):
        raise error(f"caps frame size {c.frame_size} is outside 1..{MAX_SLOT_SIZE}")
    if not c.format or not c.format.isascii() or not c.format.replace("_", "").isalnum():
        raise error(f"caps format name {c.format!r} is not an ASCII identifier")
    if c.fps_d == 0 and c.fps_n != 0:
        raise error(f"caps framerate {c.fps_n}/0 has a zero denominator")
    for p in c.planes:
        if p.stride == 0 or p.offset >= c.frame_size:
            raise error(f"caps plane {p} does not fit a frame of {c.frame_size} bytes")


def _validate_segment(s: Segment, error: type[ProtocolError]) -> None:
    if not (1 <= s.n_fds <= MAX_FDS):
        raise error(f"segment has {s.n_fds} fds, expected 1..{MAX_FDS}")
    if not (1 <= len(s.slots) <= MAX_SLOTS):
        raise error(f"segment has {len(s.slots)} slots, expected 1..{MAX_SLOTS}")
    if not (0 < s.slot_size <= MAX_SLOT_SIZE):
        raise error(f"segment slot size {s.slot_size} is outside 1..{MAX_SLOT_SIZE}")
    for i, p in enumerate(s.slots):
        if p.fd_index >= s.n_fds:
            raise error(f"slot {i} names fd {p.fd_index} of a segment with {s.n_fds} fds")
        if p.offset > MAX_SLOT_SIZE * MAX_SLOTS:
            raise error(f"slot {i} offset {p.offset} is too large")


class _Reader:
    """Bounds-checked reads from one message payload; any overrun is a RemoteProtocolError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, s: struct.Struct) -> tuple[int | bytes, ...]:
        end = self.pos + s.size
        if end > len(self.data):
            raise RemoteProtocolError(f"message truncated: needed {end} bytes, have {len(self.data)}")
        values = s.unpack_from(self.data, self.pos)
        self.pos = end
        return values

    def raw(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise RemoteProtocolError(f"message truncated: needed {end} bytes, have {len(self.data)}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def string(self, limit: int, what: str) -> str:
        return self.blob(limit, what).decode("utf-8", errors="strict")

    def blob(self, limit: int, what: str) -> bytes:
        (n,) = self.take(_STR16)
        assert isinstance(n, int)
        if n > limit:
            raise RemoteProtocolError(f"{what} is {n} bytes, the limit is {limit}")
        return self.raw(n)

    def done(self, what: str) -> None:
        if self.pos != len(self.data):
            raise RemoteProtocolError(f"{len(self.data) - self.pos} trailing bytes after {what}")


def _ints(values: tuple[int | bytes, ...]) -> list[int]:
    out = []
    for v in values:
        assert isinstance(v, int)
        out.append(v)
    return out


def _enum(kind: type[enum.IntEnum], value: int, what: str) -> enum.IntEnum:
    try:
        return kind(value)
    except ValueError:
        raise RemoteProtocolError(f"unknown {what} {value}") from None


def decode(kind_value: int, payload: bytes) -> Event:
    """Parse one payload of the given message type into an event (fds not attached)."""
    kind = _enum(MessageType, kind_value, "message type")
    r = _Reader(payload)
    event: Event
    try:
        if kind == MessageType.HELLO:
            magic, major, minor, role, policy, mif, pid = r.take(_HELLO)
            if magic != MAGIC:
                raise RemoteProtocolError(f"bad magic {magic!r} in hello: not a framebus peer")
            major_i, minor_i, role_i, policy_i, mif_i, pid_i = _ints((major, minor, role, policy, mif, pid))
            if mif_i > MAX_IN_FLIGHT:
                raise RemoteProtocolError(f"max_in_flight {mif_i} exceeds {MAX_IN_FLIGHT}")
            name = r.string(MAX_NAME, "hello name")
            event = Hello(
                role=Role(_enum(Role, role_i, "role")),
                pid=pid_i,
                name=name,
                policy=Policy(_enum(Policy, policy_i, "policy")),
                max_in_flight=mif_i,
                major=major_i,
                minor=minor_i,
            )
        elif kind == MessageType.CAPS:
            gen, w, h, fn, fd, size, n = _ints(r.take(_CAPS))
            if not 1 <= n <= MAX_PLANES:
                raise RemoteProtocolError(f"caps have {n} planes, expected 1..{MAX_PLANES}")
            planes = tuple(PlaneInfo(*_ints(r.take(_PLANE))) for _ in range(n))
            fmt = r.string(MAX_FORMAT, "format name")
            caps = r.string(MAX_CAPS, "caps string")
            event = Caps(gen, fmt, w, h, fn, fd, planes, size, caps)
            _validate_caps(event, RemoteProtocolError)
        elif kind == MessageType.SEGMENT:
            gen, slot_size, n_fds, n_slots = _ints(r.take(_SEGMENT))
            if n_slots > MAX_SLOTS:
                raise RemoteProtocolError(f"segment has {n_slots} slots, the limit is {MAX_SLOTS}")
            slots = tuple(SlotPlacement(*_ints(r.take(_PLACEMENT))) for _ in range(n_slots))
            event = Segment(gen, slot_size, slots, (), n_fds)
            _validate_segment(event, RemoteProtocolError)
        elif kind == MessageType.FRAME:
            gen, slot, flags, seq, pts, dts, dur, pub, size, n = _ints(r.take(_FRAME))
            if n > MAX_PLANES:
                raise RemoteProtocolError(f"frame has {n} planes, the limit is {MAX_PLANES}")
            for t, what in ((pts, "pts"), (dts, "dts"), (dur, "duration")):
                if t < NO_TIME:
                    raise RemoteProtocolError(f"frame {what} {t} is negative")
            planes = tuple(PlaneInfo(*_ints(r.take(_PLANE))) for _ in range(n))
            meta = r.blob(MAX_META, "frame metadata")
            event = FrameReady(gen, slot, seq, pts, dts, dur, pub, FrameFlags(flags), size, planes, meta)
        elif kind == MessageType.RELEASE:
            slot, seq = _ints(r.take(_RELEASE))
            event = Release(slot, seq)
        elif kind == MessageType.EOS:
            event = Eos()
        elif kind == MessageType.STATS_REQUEST:
            (rid,) = _ints(r.take(_U32))
            event = StatsRequest(rid)
        elif kind == MessageType.STATS:
            rid, n = _ints(r.take(_U32) + r.take(_U32))
            if n > MAX_STATS:
                raise RemoteProtocolError(f"stats are {n} bytes, the limit is {MAX_STATS}")
            event = Stats(rid, r.raw(n).decode("utf-8", errors="strict"))
        else:
            (reason,) = _ints(r.take(_GOODBYE))
            message = r.string(MAX_REASON, "goodbye message")
            try:
                why = GoodbyeReason(reason)
            except ValueError:
                why = GoodbyeReason.INTERNAL_ERROR  # a newer peer's reason: still a goodbye
            event = Goodbye(why, message)
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"invalid UTF-8 in {kind.name.lower()} message: {exc}") from None
    r.done(kind.name.lower() + " message")
    return event


# --------------------------------------------------------------------------- state machine


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"  # the peer's hello has not arrived yet
    IDLE = "idle"  # hello exchanged, no generation with a segment yet
    CLOSED = "closed"  # goodbye sent or received
    ERROR = "error"


_PRODUCER_SENDS = {Caps, Segment, FrameReady, Eos, Stats, Goodbye, Hello}
_CONSUMER_SENDS = {Release, StatsRequest, Goodbye, Hello}
_OBSERVER_SENDS = {StatsRequest, Goodbye, Hello}
_SENDS = {
    Role.PRODUCER: _PRODUCER_SENDS,
    Role.CONSUMER: _CONSUMER_SENDS,
    Role.OBSERVER: _OBSERVER_SENDS,
}


@dataclass
class _Stream:
    """What both sides agree about the producer's stream on one connection."""

    generation: int = -1  # latest caps generation
    segment_slots: int = 0  # slots in that generation's segment, 0 before the segment
    slot_size: int = 0
    last_seq: int = -1
    # seq -> (generation, slot) of every frame sent and not yet released.
    in_flight: dict[int, tuple[int, int]] = field(default_factory=dict)
    held: set[tuple[int, int]] = field(default_factory=set)
    pending_stats: set[int] = field(default_factory=set)
    ended: bool = False


class Connection:
    """One end of one framebus connection.

    ``send(event)`` returns the bytes to write (one SEQPACKET message);
    ``receive_data(data, fds)`` buffers what arrived and ``next_event()``
    hands back events one by one, or ``NEED_DATA``.  Both directions are
    checked: a local violation raises ``LocalProtocolError`` (our bug), a
    remote one ``RemoteProtocolError`` (disconnect the peer).
    """

    def __init__(self, our_role: Role) -> None:
        self.our_role = our_role
        self.peer_role: Role | None = None
        self.peer_hello: Hello | None = None
        self.our_state = State.AWAIT_HELLO  # our hello not yet sent
        self.their_state = State.AWAIT_HELLO
        self._stream = _Stream()
        # (generation, slot) of the latest Release applied, for the side that frees the slot.
        self.last_released: tuple[int, int] = (-1, -1)
        self._buffer = bytearray()
        self._fds: list[int] = []

    # -- queries the IO layer uses

    @property
    def in_flight(self) -> int:
        """Frames sent to (or received by) the consumer and not yet released."""
        return len(self._stream.in_flight)

    def in_flight_frames(self) -> dict[int, tuple[int, int]]:
        """seq -> (generation, slot) for every unreleased frame."""
        return dict(self._stream.in_flight)

    def holds(self, generation: int, slot: int) -> bool:
        return (generation, slot) in self._stream.held

    @property
    def closed(self) -> bool:
        return State.CLOSED in (self.our_state, self.their_state) or State.ERROR in (
            self.our_state,
            self.their_state,
        )

    def take_unclaimed_fds(self) -> list[int]:
        """File descriptors that arrived but belong to no event: the caller closes them."""
        fds, self._fds = self._fds, []
        return fds

    # -- sending

    def send(self, event: Event) -> bytes:
        if isinstance(event, Goodbye):
            # A goodbye may always be sent, even after an error, to tell the peer why.
            data = encode(event)
            self.our_state = State.CLOSED
            return data
        if self.our_state in (State.CLOSED, State.ERROR):
            raise LocalProtocolError(f"cannot send {type(event).__name__}: connection is {self.our_state.value}")
        if type(event) not in _SENDS[self.our_role]:
            raise LocalProtocolError(f"a {self.our_role.name.lower()} may not send {type(event).__name__}")
        if self.our_state == State.AWAIT_HELLO:
            if not isinstance(event, Hello):
                raise LocalProtocolError(f"the first message must be hello, not {type(event).__name__}")
            if event.role != self.our_role:
                raise LocalProtocolError(f"hello says role {event.role.name}, connection is {self.our_role.name}")
            data = encode(event)
            self.our_state = State.IDLE
            return data
        if isinstance(event, Hello):
            raise LocalProtocolError("hello was already sent")
        data = encode(event)
        self._apply(event, LocalProtocolError)
        return data

    # -- receiving

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Buffer bytes (and the fds that came with them); EOF is an empty ``data``."""
        self._fds.extend(fds)  # before any check: take_unclaimed_fds must see them to close them
        if self.their_state in (State.CLOSED, State.ERROR) and data:
            raise RemoteProtocolError(f"data after the connection was {self.their_state.value}")
        self._buffer += data

    def next_event(self) -> Event | _NeedData:
        if self.their_state == State.ERROR:
            raise RemoteProtocolError("connection already failed")
        if len(self._buffer) < HEADER.size:
            return NEED_DATA
        kind, flags, length = HEADER.unpack_from(self._buffer, 0)
        try:
            if flags != 0:
                raise RemoteProtocolError(f"message header flags {flags:#x} must be zero")
            if length > MAX_MESSAGE - HEADER.size:
                raise RemoteProtocolError(f"message of {length} bytes exceeds the limit {MAX_MESSAGE}")
            if len(self._buffer) < HEADER.size + length:
                return NEED_DATA
            payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
            event = decode(kind, payload)
            event = self._attach_fds(event)
            self._receive(event)
        except ProtocolError:
            self.their_state = State.ERROR
            raise
        if isinstance(event, Segment):
            # Claimed only once the segment is accepted; a rejected one leaves them to take_unclaimed_fds.
            del self._fds[: event.n_fds]
        del self._buffer[: HEADER.size + length]
        return event

    def receive_message(self, data: bytes, fds: Sequence[int] = ()) -> Event:
        """For message transports (SOCK_SEQPACKET): exactly one whole message."""
        self.receive_data(data, fds)
        event = self.next_event()
        if isinstance(event, _NeedData):
            self.their_state = State.ERROR
            raise RemoteProtocolError(f"truncated message of {len(data)} bytes")
        if self._buffer:
            self.their_state = State.ERROR
            if isinstance(event, Segment):
                self._fds[:0] = event.fds  # the caller never gets this segment: its fds are unclaimed again
            raise RemoteProtocolError(f"{len(self._buffer)} extra bytes after one message")
        return event

    def _attach_fds(self, event: Event) -> Event:
        if isinstance(event, Segment):
            if len(self._fds) < event.n_fds:
                raise RemoteProtocolError(f"segment announces {event.n_fds} fds, {len(self._fds)} arrived")
            fds = tuple(self._fds[: event.n_fds])
            return Segment(event.generation, event.slot_size, event.slots, fds, event.n_fds)
        if self._fds:
            raise RemoteProtocolError(f"{len(self._fds)} file descriptors arrived with a {type(event).__name__}")
        return event

    def _receive(self, event: Event) -> None:
        if self.their_state == State.CLOSED:
            raise RemoteProtocolError(f"{type(event).__name__} after goodbye")
        if isinstance(event, Goodbye):
            self.their_state = State.CLOSED
            return
        if self.their_state == State.AWAIT_HELLO:
            if not isinstance(event, Hello):
                raise RemoteProtocolError(f"the first message must be hello, not {type(event).__name__}")
            if event.major != PROTOCOL_MAJOR:
                raise VersionError(event.major, event.minor)
            allowed = {Role.CONSUMER, Role.OBSERVER} if self.our_role == Role.PRODUCER else {Role.PRODUCER}
            if event.role not in allowed:
                raise RemoteProtocolError(f"a {self.our_role.name.lower()} cannot talk to a {event.role.name.lower()}")
            if event.role == Role.CONSUMER and not (1 <= event.max_in_flight <= MAX_IN_FLIGHT):
                raise RemoteProtocolError(f"consumer max_in_flight {event.max_in_flight} is outside 1..{MAX_IN_FLIGHT}")
            if event.role == Role.CONSUMER and event.policy == Policy.NONE:
                raise RemoteProtocolError("a consumer hello must name a policy")
            self.peer_role = event.role
            self.peer_hello = event
            self.their_state = State.IDLE
            return
        if isinstance(event, Hello):
            raise RemoteProtocolError("second hello")
        assert self.peer_role is not None
        if type(event) not in _SENDS[self.peer_role]:
            raise RemoteProtocolError(f"a {self.peer_role.name.lower()} may not send {type(event).__name__}")
        self._apply(event, RemoteProtocolError)

    def _apply(self, event: Event, error: type[ProtocolError]) -> None:
        """Check one event against the shared stream state and update it."""
        s = self._stream
        if self.our_role == Role.PRODUCER and self.peer_role is None:
            raise error(f"{type(event).__name__} before the peer's hello said who it is")
        receiver = self.peer_role if self.our_role == Role.PRODUCER else self.our_role
        if isinstance(event, Caps | Segment | FrameReady | Eos) and receiver != Role.CONSUMER:
            raise error(f"{type(event).__name__} to an observer, which receives stats only")
        if isinstance(event, Caps):
            if event.generation <= s.generation:
                raise error(f"caps generation {event.generation} does not follow {s.generation}")
            s.generation = event.generation
            s.segment_slots = 0
            s.ended = False
        elif isinstance(event, Segment):
            if event.generation != s.generation or s.generation < 0:
                raise error(f"segment generation {event.generation} does not match caps generation {s.generation}")
            if s.segment_slots:
                raise error(f"second segment for generation {event.generation}")
            s.segment_slots = len(event.slots)
            s.slot_size = event.slot_size
        elif isinstance(event, FrameReady):
            if s.ended:
                raise error("frame after end-of-stream without new caps")
            if s.segment_slots == 0 or event.generation != s.generation:
                raise error(
                    f"frame of generation {event.generation} before its caps and segment "
                    f"(current generation {s.generation}, segment {'sent' if s.segment_slots else 'missing'})"
                )
            if event.slot >= s.segment_slots:
                raise error(f"frame names slot {event.slot}, the segment has {s.segment_slots}")
            if event.seq <= s.last_seq:
                raise error(f"frame seq {event.seq} does not follow {s.last_seq}")
            if (event.generation, event.slot) in s.held:
                raise error(
                    f"slot {event.slot} sent again while the consumer still holds seq "
                    f"{self._seq_of(event.generation, event.slot)}"
                )
            if event.size > s.slot_size:
                raise error(f"frame size {event.size} exceeds the slot size {s.slot_size}")
            for p in event.planes:
                if p.offset >= s.slot_size or p.stride == 0:
                    raise error(f"frame plane {p} is outside a slot of {s.slot_size} bytes")
            s.last_seq = event.seq
            s.in_flight[event.seq] = (event.generation, event.slot)
            s.held.add((event.generation, event.slot))
        elif isinstance(event, Release):
            where = s.in_flight.get(event.seq)
            if where is None or where[1] != event.slot:
                raise error(
                    f"release of slot {event.slot} seq {event.seq}, which is not in flight "
                    "(never sent, or released twice)"
                )
            del s.in_flight[event.seq]
            s.held.discard(where)
            self.last_released = where
        elif isinstance(event, Eos):
            s.ended = True
        elif isinstance(event, StatsRequest):
            if event.request_id in s.pending_stats:
                raise error(f"stats request {event.request_id} is already pending")
            if len(s.pending_stats) >= 16:
                raise error("more than 16 stats requests pending")
            s.pending_stats.add(event.request_id)
        elif isinstance(event, Stats):
            if event.request_id not in s.pending_stats:
                raise error(f"stats answer {event.request_id} to no request")
            s.pending_stats.discard(event.request_id)

    def _seq_of(self, generation: int, slot: int) -> int:
        for seq, where in self._stream.in_flight.items():
            if where == (generation, slot):
                return seq
        return -1
