"""The sans-IO control protocol: wire round-trips, hostile bytes, limits and the state machine.

No sockets: every test turns events into bytes with one ``Connection`` (or
``encode``) and feeds them to another.  The wire layouts below are written
out independently of ``framebus.protocol`` (they are the tables of
``docs/PROTOCOL.md``), so a change to the byte format fails here.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from framebus.protocol import (
    MAX_CAPS,
    MAX_DIMENSION,
    MAX_FDS,
    MAX_FORMAT,
    MAX_IN_FLIGHT,
    MAX_MESSAGE,
    MAX_META,
    MAX_NAME,
    MAX_PLANES,
    MAX_REASON,
    MAX_SLOT_SIZE,
    MAX_SLOTS,
    MAX_STATS,
    NEED_DATA,
    NO_TIME,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    Caps,
    Connection,
    Eos,
    Event,
    FrameFlags,
    FrameReady,
    Goodbye,
    GoodbyeReason,
    Hello,
    LocalProtocolError,
    PlaneInfo,
    Policy,
    ProtocolError,
    Release,
    RemoteProtocolError,
    Role,
    Segment,
    SlotPlacement,
    State,
    Stats,
    StatsRequest,
    VersionError,
    decode,
    encode,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- the wire, written out

HEADER = struct.Struct("<HHI")  # type, flags, payload length
HELLO = struct.Struct("<4sHHBBHI")  # magic, major, minor, role, policy, max_in_flight, pid
CAPS = struct.Struct("<IIIIIQB")  # generation, width, height, fps_n, fps_d, frame_size, n_planes
PLANE = struct.Struct("<QI")  # offset, stride
SEGMENT = struct.Struct("<IQBH")  # generation, slot_size, n_fds, n_slots
PLACEMENT = struct.Struct("<BQ")  # fd_index, offset
FRAME = struct.Struct("<IHHQqqqQQB")  # gen, slot, flags, seq, pts, dts, duration, publish_ns, size, n_planes
RELEASE = struct.Struct("<HQ")  # slot, seq
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")

TYPE_OF = {
    Hello: 1,
    Caps: 2,
    Segment: 3,
    FrameReady: 4,
    Release: 5,
    Eos: 6,
    StatsRequest: 7,
    Stats: 8,
    Goodbye: 9,
}


def msg(kind: int, payload: bytes, flags: int = 0, length: int | None = None) -> bytes:
    return HEADER.pack(kind, flags, len(payload) if length is None else length) + payload


def s16(raw: bytes) -> bytes:
    return U16.pack(len(raw)) + raw


def hello_payload(role: int = 2, policy: int = 1, mif: int = 4, name: bytes = b"", major: int = 1) -> bytes:
    return HELLO.pack(b"FBUS", major, 0, role, policy, mif, 1234) + s16(name)


def caps_payload(
    fmt: bytes = b"RGB",
    caps: bytes = b"",
    planes: tuple[tuple[int, int], ...] = ((0, 12),),
    width: int = 4,
    height: int = 4,
    fps: tuple[int, int] = (30, 1),
    frame_size: int = 48,
    n_planes: int | None = None,
) -> bytes:
    n = len(planes) if n_planes is None else n_planes
    head = CAPS.pack(0, width, height, fps[0], fps[1], frame_size, n)
    return head + b"".join(PLANE.pack(*pl) for pl in planes) + s16(fmt) + s16(caps)


def segment_payload(
    slots: tuple[tuple[int, int], ...] = ((0, 0),),
    n_fds: int = 1,
    slot_size: int = 64,
    n_slots: int | None = None,
) -> bytes:
    n = len(slots) if n_slots is None else n_slots
    return SEGMENT.pack(0, slot_size, n_fds, n) + b"".join(PLACEMENT.pack(*s) for s in slots)


def frame_payload(
    meta: bytes = b"", planes: tuple[tuple[int, int], ...] = (), pts: int = 0, n_planes: int | None = None
) -> bytes:
    n = len(planes) if n_planes is None else n_planes
    head = FRAME.pack(0, 0, 0, 0, pts, NO_TIME, NO_TIME, 0, 10, n)
    return head + b"".join(PLANE.pack(*pl) for pl in planes) + s16(meta)


def stats_payload(raw: bytes, length: int | None = None) -> bytes:
    return U32.pack(7) + U32.pack(len(raw) if length is None else length) + raw


def goodbye_payload(message: bytes, reason: int = 0) -> bytes:
    return U16.pack(reason) + s16(message)


# --------------------------------------------------------------------------- strategies

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
times = st.one_of(st.just(NO_TIME), st.integers(NO_TIME, 2**63 - 1))


def utf8(limit: int, max_chars: int = 200) -> st.SearchStrategy[str]:
    """Text whose UTF-8 fits ``limit`` bytes, including strings of exactly ``limit`` bytes."""
    random_text = st.text(max_size=min(limit, max_chars)).map(lambda s: s.encode()[:limit].decode("utf-8", "ignore"))
    at_limit = st.sampled_from(["x", "\u00e9", "\u20ac", "\U0001f600"]).map(lambda c: c * (limit // len(c.encode())))
    return st.one_of(random_text, at_limit)


formats = st.one_of(
    st.sampled_from(["RGB", "RGBA", "I420", "NV12", "GRAY16_LE", "x" * MAX_FORMAT]),
    st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_",
        min_size=1,
        max_size=MAX_FORMAT,
    ).filter(lambda f: f.replace("_", "") != ""),
)


def plane_infos(limit: int = 2**64) -> st.SearchStrategy[PlaneInfo]:
    return st.builds(PlaneInfo, offset=st.integers(0, limit - 1), stride=st.integers(1, 2**32 - 1))


any_role = st.sampled_from(Role)


def hellos(
    roles: st.SearchStrategy[Role] = any_role,
    majors: st.SearchStrategy[int] = u16,
) -> st.SearchStrategy[Hello]:
    return st.builds(
        Hello,
        role=roles,
        pid=u32,
        name=utf8(MAX_NAME),
        policy=st.sampled_from(Policy),
        max_in_flight=st.integers(0, MAX_IN_FLIGHT),
        major=majors,
        minor=u16,
    )


@st.composite
def caps_events(draw: st.DrawFn, generation: st.SearchStrategy[int] = u32) -> Caps:
    frame_size = draw(st.one_of(st.integers(1, 1 << 24), st.integers(1, MAX_SLOT_SIZE)))
    fps_d = draw(u32)
    return Caps(
        generation=draw(generation),
        format=draw(formats),
        width=draw(st.integers(1, MAX_DIMENSION)),
        height=draw(st.integers(1, MAX_DIMENSION)),
        fps_n=draw(u32) if fps_d else 0,
        fps_d=fps_d,
        planes=tuple(draw(st.lists(plane_infos(frame_size), min_size=1, max_size=MAX_PLANES))),
        frame_size=frame_size,
        caps=draw(utf8(MAX_CAPS)),
    )


@st.composite
def segments(
    draw: st.DrawFn,
    generation: st.SearchStrategy[int] = u32,
    max_slots: int = MAX_SLOTS,
    max_fds: int = MAX_FDS,
) -> Segment:
    n_fds = draw(st.integers(1, max_fds))
    slots = draw(
        st.lists(
            st.builds(
                SlotPlacement,
                fd_index=st.integers(0, n_fds - 1),
                offset=st.integers(0, MAX_SLOT_SIZE * MAX_SLOTS),
            ),
            min_size=1,
            max_size=max_slots,
        )
    )
    return Segment(draw(generation), draw(st.integers(1, MAX_SLOT_SIZE)), tuple(slots), n_fds=n_fds)


@st.composite
def frames(
    draw: st.DrawFn,
    generation: st.SearchStrategy[int] = u32,
    slot: st.SearchStrategy[int] = u16,
    seq: st.SearchStrategy[int] = u64,
    slot_size: int | None = None,
) -> FrameReady:
    """Frames valid on the wire; with ``slot_size`` also valid for a segment of that slot size."""
    size = u64 if slot_size is None else st.integers(0, slot_size)
    planes = plane_infos() if slot_size is None else plane_infos(slot_size)
    return FrameReady(
        generation=draw(generation),
        slot=draw(slot),
        seq=draw(seq),
        pts=draw(times),
        dts=draw(times),
        duration=draw(times),
        publish_ns=draw(u64),
        flags=FrameFlags(draw(u16)),
        size=draw(size),
        planes=tuple(draw(st.lists(planes, max_size=MAX_PLANES))),
        meta=draw(st.one_of(st.binary(max_size=64), st.binary(min_size=MAX_META, max_size=MAX_META))),
    )


releases = st.builds(Release, slot=u16, seq=u64)
stats_requests = st.builds(StatsRequest, request_id=u32)
stats_answers = st.builds(Stats, request_id=u32, json=utf8(MAX_STATS))
goodbyes = st.builds(Goodbye, reason=st.sampled_from(GoodbyeReason), message=utf8(MAX_REASON))

any_event: st.SearchStrategy[Event] = st.one_of(
    hellos(),
    caps_events(),
    segments(),
    frames(),
    releases,
    st.just(Eos()),
    stats_requests,
    stats_answers,
    goodbyes,
)


# --------------------------------------------------------------------------- connection helpers

PRODUCER_HELLO = Hello(Role.PRODUCER, 100, "cam")
SLOT_SIZE = 4096


def consumer_hello(mif: int = 8, policy: Policy = Policy.DROP) -> Hello:
    return Hello(Role.CONSUMER, 200, "viewer", policy, mif)


def deliver(sender: Connection, receiver: Connection, event: Event, fds: tuple[int, ...] | None = None) -> Event:
    """Send through one Connection, receive as one SEQPACKET message on the other; check it arrived intact."""
    if fds is None:
        fds = event.fds if isinstance(event, Segment) else ()
    got = receiver.receive_message(sender.send(event), fds)
    assert got == event
    assert type(got) is type(event)
    if isinstance(event, Segment):
        assert isinstance(got, Segment)
        assert got.fds == fds[: event.n_fds]
    return got


def pair(role: Role = Role.CONSUMER, mif: int = 8) -> tuple[Connection, Connection]:
    """A producer Connection and a consumer (or observer) Connection, hellos exchanged both ways."""
    prod, peer = Connection(Role.PRODUCER), Connection(role)
    hello = consumer_hello(mif) if role == Role.CONSUMER else Hello(Role.OBSERVER, 300, "top")
    deliver(peer, prod, hello)
    deliver(prod, peer, PRODUCER_HELLO)
    assert prod.peer_role == role and peer.peer_role == Role.PRODUCER
    assert prod.their_state == prod.our_state == peer.their_state == peer.our_state == State.IDLE
    return prod, peer


def make_caps(generation: int, fmt: str = "RGB") -> Caps:
    return Caps(generation, fmt, 16, 16, 30, 1, (PlaneInfo(0, 48),), 768, f"video/x-raw,format={fmt}")


def make_segment(generation: int, slots: int = 4, fd: int = 50) -> Segment:
    placements = tuple(SlotPlacement(0, i * SLOT_SIZE) for i in range(slots))
    return Segment(generation, SLOT_SIZE, placements, fds=(fd + generation,))


def streaming(slots: int = 4, generation: int = 0) -> tuple[Connection, Connection]:
    """A producer and a consumer that agree on caps and segment of ``generation``."""
    prod, cons = pair()
    deliver(prod, cons, make_caps(generation))
    deliver(prod, cons, make_segment(generation, slots))
    return prod, cons


def frame(generation: int, slot: int, seq: int, **kw: object) -> FrameReady:
    return FrameReady(generation, slot, seq, pts=seq * 1000, size=768, **kw)  # type: ignore[arg-type]


def reencodes_to(event: Event, data: bytes) -> bool:
    """Whether ``event`` is exactly what ``data`` said (a goodbye with an unknown reason maps to one)."""
    if isinstance(event, Goodbye):
        (reason,) = U16.unpack_from(data, HEADER.size)
        if reason not in set(GoodbyeReason):
            return event.reason == GoodbyeReason.INTERNAL_ERROR and encode(event)[10:] == data[10:]
    return encode(event) == data


# --------------------------------------------------------------------------- round trips


@FAST
@given(any_event)
def test_every_event_round_trips_through_encode_and_decode(event: Event) -> None:
    data = encode(event)
    kind, flags, length = HEADER.unpack_from(data)
    assert kind == TYPE_OF[type(event)]
    assert flags == 0
    assert length == len(data) - HEADER.size
    assert len(data) <= MAX_MESSAGE
    back = decode(kind, data[HEADER.size :])
    assert back == event
    assert type(back) is type(event)
    assert encode(back) == data


def test_the_largest_messages_fit_and_round_trip() -> None:
    planes = tuple(PlaneInfo(2**64 - 1 - i, 2**32 - 1) for i in range(MAX_PLANES))
    biggest: list[Event] = [
        Hello(Role.CONSUMER, 2**32 - 1, "n" * MAX_NAME, Policy.LATEST, MAX_IN_FLIGHT, 2**16 - 1, 2**16 - 1),
        Caps(
            2**32 - 1,
            "F" * MAX_FORMAT,
            MAX_DIMENSION,
            MAX_DIMENSION,
            2**32 - 1,
            2**32 - 1,
            (PlaneInfo(MAX_SLOT_SIZE - 1, 2**32 - 1),),
            MAX_SLOT_SIZE,
        ),
        Caps(
            1,
            "RGB",
            1,
            1,
            0,
            0,
            tuple(PlaneInfo(i, 1) for i in range(MAX_PLANES)),
            MAX_SLOT_SIZE,
            "c" * MAX_CAPS,
        ),
        Segment(
            2**32 - 1,
            MAX_SLOT_SIZE,
            tuple(SlotPlacement(MAX_FDS - 1, MAX_SLOT_SIZE * MAX_SLOTS) for _ in range(MAX_SLOTS)),
            n_fds=MAX_FDS,
        ),
        FrameReady(
            2**32 - 1,
            2**16 - 1,
            2**64 - 1,
            2**63 - 1,
            2**63 - 1,
            2**63 - 1,
            2**64 - 1,
            FrameFlags(0xFFFF),
            2**64 - 1,
            planes,
            b"\xff" * MAX_META,
        ),
        Release(2**16 - 1, 2**64 - 1),
        StatsRequest(2**32 - 1),
        Stats(2**32 - 1, "s" * MAX_STATS),
        Goodbye(GoodbyeReason.INTERNAL_ERROR, "m" * MAX_REASON),
    ]
    sizes = {}
    for event in biggest:
        data = encode(event)
        assert len(data) <= MAX_MESSAGE
        assert decode(data[0], data[HEADER.size :]) == event
        sizes[type(event).__name__] = max(sizes.get(type(event).__name__, 0), len(data))
    # The sizes docs/PROTOCOL.md states for the largest message of each type.
    assert sizes == {
        "Hello": 8 + 16 + 2 + 255,
        "Caps": 8 + 29 + 4 * 12 + 2 + 3 + 2 + 4096,
        "Segment": 8 + 15 + 256 * 9,
        "FrameReady": 8 + 57 + 4 * 12 + 2 + 1024,
        "Release": 8 + 10,
        "StatsRequest": 8 + 4,
        "Stats": 8 + 8 + 60000,
        "Goodbye": 8 + 2 + 2 + 1024,
    }


def test_hello_bytes_match_the_worked_example_in_the_spec() -> None:
    data = encode(Hello(Role.CONSUMER, 4242, "viewer", Policy.DROP, 4))
    assert data.hex(" ") == (
        "01 00 00 00 18 00 00 00 "  # header: type 1, flags 0, 24 payload bytes
        "46 42 55 53 01 00 00 00 "  # "FBUS", major 1, minor 0
        "02 01 04 00 92 10 00 00 "  # role consumer, policy drop, max_in_flight 4, pid 4242
        "06 00 76 69 65 77 65 72"  # name: 6 bytes "viewer"
    )
    assert (PROTOCOL_MAJOR, PROTOCOL_MINOR) == (1, 0)
    assert encode(Release(3, 17)).hex(" ") == "05 00 00 00 0a 00 00 00 03 00 11 00 00 00 00 00 00 00"
    assert encode(Goodbye(GoodbyeReason.NOT_ALLOWED, "no")).hex(" ") == "09 00 00 00 06 00 00 00 04 00 02 00 6e 6f"


@FAST
@given(
    hellos(roles=st.sampled_from([Role.CONSUMER, Role.OBSERVER]), majors=st.just(PROTOCOL_MAJOR)).filter(
        lambda h: h.role == Role.OBSERVER or (h.max_in_flight >= 1 and h.policy != Policy.NONE)
    )
)
def test_any_acceptable_hello_round_trips_through_a_producer_connection(hello: Hello) -> None:
    prod, peer = Connection(Role.PRODUCER), Connection(hello.role)
    assert deliver(peer, prod, hello) == hello
    assert prod.peer_hello == hello
    assert prod.peer_role == hello.role
    assert prod.their_state == State.IDLE
    assert deliver(prod, peer, Hello(Role.PRODUCER, hello.pid, hello.name, minor=hello.minor)).pid == hello.pid


@st.composite
def producer_scripts(draw: st.DrawFn) -> tuple[Caps, Segment, list[FrameReady]]:
    """Caps, a segment with fake fds, and frames in distinct slots with increasing seqs."""
    caps = draw(caps_events())
    seg = draw(segments(generation=st.just(caps.generation), max_slots=12, max_fds=4))
    fds = tuple(draw(st.lists(st.integers(3, 10_000), min_size=seg.n_fds, max_size=seg.n_fds, unique=True)))
    seg = Segment(seg.generation, seg.slot_size, seg.slots, fds)
    n_slots = len(seg.slots)
    slot_order = draw(st.permutations(range(n_slots)))
    n = draw(st.integers(0, n_slots))
    seqs = sorted(draw(st.sets(u64, min_size=n, max_size=n)))
    sent = [
        draw(
            frames(
                generation=st.just(caps.generation),
                slot=st.just(slot),
                seq=st.just(seq),
                slot_size=seg.slot_size,
            )
        )
        for slot, seq in zip(slot_order[:n], seqs, strict=True)
    ]
    return caps, seg, sent


@FAST
@given(producer_scripts(), st.randoms(use_true_random=False))
def test_producer_events_round_trip_to_a_consumer_and_releases_come_back(script, rnd) -> None:
    caps, seg, sent = script
    prod, cons = pair()
    deliver(prod, cons, caps)
    got_seg = deliver(prod, cons, seg)
    assert isinstance(got_seg, Segment) and got_seg.fds == seg.fds
    assert cons.take_unclaimed_fds() == []
    for f in sent:
        deliver(prod, cons, f)
    expected = {f.seq: (f.generation, f.slot) for f in sent}
    assert prod.in_flight_frames() == cons.in_flight_frames() == expected
    assert prod.in_flight == cons.in_flight == len(sent)
    for f in sent:
        assert prod.holds(f.generation, f.slot) and cons.holds(f.generation, f.slot)
    rnd.shuffle(sent)
    for i, f in enumerate(sent):
        deliver(cons, prod, Release(f.slot, f.seq))
        assert prod.last_released == cons.last_released == (f.generation, f.slot)
        assert not prod.holds(f.generation, f.slot) and not cons.holds(f.generation, f.slot)
        assert prod.in_flight == cons.in_flight == len(sent) - i - 1
    deliver(prod, cons, Eos())
    assert prod.in_flight_frames() == cons.in_flight_frames() == {}


@FAST
@given(stats_requests, utf8(MAX_STATS), goodbyes, st.sampled_from([Role.CONSUMER, Role.OBSERVER]))
def test_stats_and_goodbye_round_trip(request: StatsRequest, text: str, bye: Goodbye, role: Role) -> None:
    prod, peer = pair(role)
    deliver(peer, prod, request)
    deliver(prod, peer, Stats(request.request_id, text))
    deliver(peer, prod, bye)
    assert prod.their_state == State.CLOSED and peer.our_state == State.CLOSED
    assert prod.closed and peer.closed


@FEW
@given(producer_scripts(), st.data())
def test_stream_mode_reassembles_any_chunking(script, data) -> None:
    """receive_data/next_event: messages split anywhere come out whole; fds ride with their segment."""
    caps, seg, sent = script
    prod = Connection(Role.PRODUCER)
    prod.receive_message(encode(consumer_hello()))
    script_events: list[Event] = [
        PRODUCER_HELLO,
        caps,
        seg,
        *sent,
        Eos(),
        Goodbye(GoodbyeReason.SHUTDOWN, "bye"),
    ]
    wire = [(prod.send(e), e.fds if isinstance(e, Segment) else ()) for e in script_events]

    cons = Connection(Role.CONSUMER)
    cons.send(consumer_hello())
    received: list[Event] = []

    def drain() -> None:
        while True:
            ev = cons.next_event()
            if ev is NEED_DATA:
                return
            received.append(ev)

    for raw, fds in wire:
        cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=3)))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        for i, piece in enumerate(pieces):
            # Like SOCK_STREAM SCM_RIGHTS: the fds come with the first byte of the segment message.
            cons.receive_data(piece, fds if i == 0 else ())
            before = len(received)
            drain()
            assert len(received) == before + (i == len(pieces) - 1)
    assert received == script_events
    got_seg = received[2]
    assert isinstance(got_seg, Segment) and got_seg.fds == seg.fds
    assert cons.in_flight == len(sent)
    assert cons.their_state == State.CLOSED


# --------------------------------------------------------------------------- hostile bytes


def fresh_producer() -> Connection:
    return Connection(Role.PRODUCER)


def fresh_consumer() -> Connection:
    cons = Connection(Role.CONSUMER)
    cons.send(consumer_hello())
    return cons


def idle_producer() -> Connection:
    return pair()[0]


def idle_consumer() -> Connection:
    return pair()[1]


def idle_observer() -> Connection:
    return pair(Role.OBSERVER)[1]


def streaming_producer() -> Connection:
    prod, cons = streaming()
    deliver(prod, cons, frame(0, 1, 5))
    return prod


def streaming_consumer() -> Connection:
    prod, cons = streaming()
    deliver(prod, cons, frame(0, 1, 5))
    return cons


CONNECTIONS: list[Callable[[], Connection]] = [
    fresh_producer,
    fresh_consumer,
    idle_producer,
    idle_consumer,
    idle_observer,
    streaming_producer,
    streaming_consumer,
]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid message with a few bytes overwritten, inserted or cut."""
    data = bytearray(encode(draw(any_event)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        i = draw(st.integers(0, len(data) - (op != "insert")))
        if op == "set":
            data[i] = draw(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xC3, 0xFE, 0xFF]) | u8)
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif len(data) > 1:
            del data[i]
    return bytes(data)


hostile = st.one_of(
    st.binary(max_size=120),
    st.builds(msg, st.integers(0, 11), st.binary(max_size=200)),  # a framing-valid header, random payload
    mutated_messages(),
    st.builds(encode, segments(max_slots=4, max_fds=3)),  # well-formed, but rarely welcome where it lands
)
fake_fds = st.lists(st.integers(3, 999), max_size=3, unique=True)


def check_fds_accounted(conn: Connection, event: Event | None, fds: list[int]) -> None:
    """Every fd handed in is attached to an accepted segment or left for take_unclaimed_fds to close."""
    attached = list(event.fds) if isinstance(event, Segment) else []
    assert attached + conn.take_unclaimed_fds() == fds


@FAST
@given(st.sampled_from(CONNECTIONS), hostile, fake_fds)
def test_hostile_messages_raise_only_protocol_errors(make: Callable[[], Connection], data: bytes, fds) -> None:
    conn = make()
    try:
        event = conn.receive_message(data, fds)
    except ProtocolError as exc:
        assert isinstance(exc, RemoteProtocolError)
        assert conn.their_state == State.ERROR and conn.closed
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        check_fds_accounted(conn, None, fds)
        return
    # Accepted: then it really was one well-formed message, byte for byte.
    assert reencodes_to(event, data)
    check_fds_accounted(conn, event, fds)


@FAST
@given(st.sampled_from(CONNECTIONS), hostile, st.data())
def test_hostile_streams_raise_only_protocol_errors(make: Callable[[], Connection], data: bytes, draw) -> None:
    conn = make()
    cuts = sorted(draw.draw(st.sets(st.integers(0, len(data)), max_size=4)))
    events: list[Event] = []
    try:
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            conn.receive_data(data[a:b])
            while (ev := conn.next_event()) is not NEED_DATA:
                events.append(ev)
    except ProtocolError as exc:
        assert isinstance(exc, RemoteProtocolError)
        return
    # Whatever was accepted is the input's prefix, byte for byte; what is left is an incomplete message.
    pos = 0
    for e in events:
        size = len(encode(e))
        assert reencodes_to(e, data[pos : pos + size])
        pos += size
    rest = data[pos:]
    if len(rest) >= HEADER.size:
        assert HEADER.size + HEADER.unpack_from(rest)[2] > len(rest)


@FAST
@given(any_event, st.data())
def test_truncated_messages_are_rejected(event: Event, data) -> None:
    raw = encode(event)
    cut = data.draw(st.integers(0, len(raw) - 1))
    conn = data.draw(st.sampled_from(CONNECTIONS))()
    with pytest.raises(RemoteProtocolError):
        conn.receive_message(raw[:cut])
    assert conn.their_state == State.ERROR
    # Even with the header's length fixed up to match, a cut payload never parses.
    payload = raw[HEADER.size : cut] if cut > HEADER.size else b""
    if len(payload) < len(raw) - HEADER.size:
        with pytest.raises(RemoteProtocolError):
            decode(raw[0], payload)
        with pytest.raises(RemoteProtocolError):
            data.draw(st.sampled_from(CONNECTIONS))().receive_message(msg(raw[0], payload))


@FEW
@given(st.sampled_from([PRODUCER_HELLO, make_caps(0), make_segment(0), frame(0, 0, 7)]), st.data())
def test_stream_mode_waits_for_the_rest_of_a_message(event: Event, data) -> None:
    if isinstance(event, FrameReady):
        _, cons = streaming()
    else:
        cons = fresh_consumer()
        for before in (PRODUCER_HELLO, make_caps(0))[: [Hello, Caps, Segment].index(type(event))]:
            cons.receive_message(encode(before))
    raw = encode(event)
    cut = data.draw(st.integers(0, len(raw) - 1))
    fds = event.fds if isinstance(event, Segment) else ()
    cons.receive_data(raw[:cut], fds)
    assert cons.next_event() is NEED_DATA
    assert cons.next_event() is NEED_DATA
    cons.receive_data(raw[cut:])
    got = cons.next_event()
    assert got == event
    if isinstance(event, Segment):
        assert isinstance(got, Segment) and got.fds == event.fds
    assert cons.next_event() is NEED_DATA


# --------------------------------------------------------------------------- lengths and limits


@pytest.mark.parametrize("length", [MAX_MESSAGE - HEADER.size + 1, MAX_MESSAGE, 2**32 - 1])
def test_a_header_announcing_more_than_max_message_is_rejected_at_once(length: int) -> None:
    stream = fresh_consumer()
    stream.receive_data(HEADER.pack(1, 0, length))  # no payload yet: the header alone is enough to refuse
    with pytest.raises(RemoteProtocolError, match="exceeds the limit 65536"):
        stream.next_event()
    assert stream.their_state == State.ERROR
    with pytest.raises(RemoteProtocolError, match="exceeds the limit 65536"):
        fresh_consumer().receive_message(HEADER.pack(8, 0, length) + b"\0" * 16)


def test_a_header_at_exactly_max_message_waits_for_its_payload() -> None:
    stream = fresh_consumer()
    stream.receive_data(HEADER.pack(1, 0, MAX_MESSAGE - HEADER.size))
    assert stream.next_event() is NEED_DATA


STRING_LIMITS = [
    ("hello name", 1, lambda n: hello_payload(name=b"n" * n), MAX_NAME),
    ("format name", 2, lambda n: caps_payload(fmt=b"F" * n), MAX_FORMAT),
    ("caps string", 2, lambda n: caps_payload(caps=b"c" * n), MAX_CAPS),
    ("frame metadata", 4, lambda n: frame_payload(meta=b"\xff" * n), MAX_META),
    ("stats", 8, lambda n: stats_payload(b"s" * n), MAX_STATS),
    ("goodbye message", 9, lambda n: goodbye_payload(b"m" * n), MAX_REASON),
]


@pytest.mark.parametrize(("what", "kind", "build", "limit"), STRING_LIMITS, ids=[s[0] for s in STRING_LIMITS])
def test_string_lengths_are_checked_against_their_limits(what, kind, build, limit) -> None:
    at_limit = decode(kind, build(limit))  # exactly at the limit is fine
    assert len(encode(at_limit)) == HEADER.size + len(build(limit))
    with pytest.raises(RemoteProtocolError, match=rf"{what} are|{what} is {limit + 1} bytes, the limit is {limit}"):
        decode(kind, build(limit + 1))
    with pytest.raises(RemoteProtocolError):
        Connection(Role.CONSUMER).receive_message(msg(kind, build(limit + 1)))


def test_a_length_prefix_longer_than_the_limit_is_refused_before_reading() -> None:
    # 65535 announced, nothing follows: refused for the limit, not reported as a truncation.
    with pytest.raises(RemoteProtocolError, match="hello name is 65535 bytes, the limit is 255"):
        decode(1, HELLO.pack(b"FBUS", 1, 0, 2, 1, 4, 1) + U16.pack(0xFFFF))
    with pytest.raises(RemoteProtocolError, match="stats are 4294967295 bytes"):
        decode(8, stats_payload(b"", length=2**32 - 1))
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode(8, stats_payload(b"abc", length=10))


BAD_PAYLOADS = [
    ("unknown type 0", 0, b"", "unknown message type 0"),
    ("unknown type 10", 10, b"", "unknown message type 10"),
    ("bad magic", 1, HELLO.pack(b"SHM!", 1, 0, 2, 1, 4, 1) + s16(b""), "bad magic"),
    ("unknown role", 1, hello_payload(role=4), "unknown role 4"),
    ("role zero", 1, hello_payload(role=0), "unknown role 0"),
    ("unknown policy", 1, hello_payload(policy=4), "unknown policy 4"),
    ("max_in_flight", 1, hello_payload(mif=MAX_IN_FLIGHT + 1), "max_in_flight 1025 exceeds 1024"),
    ("hello utf-8", 1, hello_payload(name=b"\xc3("), "invalid UTF-8 in hello"),
    ("trailing byte", 1, hello_payload() + b"\0", "1 trailing bytes after hello"),
    ("eos with payload", 6, b"\0", "1 trailing bytes after eos"),
    ("caps 0 planes", 2, caps_payload(planes=()), "caps have 0 planes"),
    ("caps 5 planes", 2, caps_payload(planes=((0, 12),) * 5), "caps have 5 planes"),
    ("caps lies about planes", 2, caps_payload(n_planes=2), "truncated|trailing|format name"),
    ("caps width 0", 2, caps_payload(width=0), "caps size 0x4"),
    ("caps too tall", 2, caps_payload(height=MAX_DIMENSION + 1), "caps size 4x16385"),
    ("caps frame size 0 with plane", 2, caps_payload(frame_size=0), "frame size 0"),
    ("caps frame size huge", 2, caps_payload(frame_size=MAX_SLOT_SIZE + 1), "frame size"),
    ("caps empty format", 2, caps_payload(fmt=b""), "not an ASCII identifier"),
    ("caps underscore format", 2, caps_payload(fmt=b"__"), "not an ASCII identifier"),
    ("caps spaced format", 2, caps_payload(fmt=b"RG B"), "not an ASCII identifier"),
    ("caps non-ascii format", 2, caps_payload(fmt="R\u00c9B".encode()), "not an ASCII identifier"),
    ("caps fps x/0", 2, caps_payload(fps=(30, 0)), "zero denominator"),
    ("caps plane stride 0", 2, caps_payload(planes=((0, 0),)), "does not fit"),
    ("caps plane past frame", 2, caps_payload(planes=((48, 12),)), "does not fit"),
    ("caps utf-8", 2, caps_payload(caps=b"\xff"), "invalid UTF-8 in caps"),
    ("segment 0 slots", 3, segment_payload(slots=()), "0 slots"),
    ("segment 257 slots", 3, segment_payload(slots=((0, 0),) * 257), "257 slots, the limit is 256"),
    ("segment lies about slots", 3, segment_payload(n_slots=2), "truncated"),
    ("segment 0 fds", 3, segment_payload(n_fds=0), "0 fds"),
    ("segment 65 fds", 3, segment_payload(n_fds=65), "65 fds"),
    ("segment fd index", 3, segment_payload(slots=((1, 0),), n_fds=1), "names fd 1"),
    ("segment slot size 0", 3, segment_payload(slot_size=0), "slot size 0"),
    ("segment slot size huge", 3, segment_payload(slot_size=MAX_SLOT_SIZE + 1), "slot size"),
    ("segment offset huge", 3, segment_payload(slots=((0, MAX_SLOT_SIZE * MAX_SLOTS + 1),)), "too large"),
    ("frame 5 planes", 4, frame_payload(planes=((0, 1),) * 5), "5 planes, the limit is 4"),
    ("frame pts -2", 4, frame_payload(pts=-2), "pts -2 is negative"),
    ("frame trailing", 4, frame_payload() + b"x", "trailing"),
    ("release short", 5, RELEASE.pack(1, 2)[:-1], "truncated"),
    ("stats request short", 7, b"\0\0", "truncated"),
    ("stats utf-8", 8, stats_payload(b"\xed\xa0\x80"), "invalid UTF-8 in stats"),
    ("goodbye utf-8", 9, goodbye_payload(b"\x80"), "invalid UTF-8 in goodbye"),
    ("goodbye short", 9, b"\x01", "truncated"),
]


@pytest.mark.parametrize(("kind", "payload", "match"), [b[1:] for b in BAD_PAYLOADS], ids=[b[0] for b in BAD_PAYLOADS])
def test_malformed_payloads_are_remote_protocol_errors(kind: int, payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode(kind, payload)


def test_header_flags_must_be_zero() -> None:
    with pytest.raises(RemoteProtocolError, match="flags 0x1 must be zero"):
        fresh_consumer().receive_message(msg(1, hello_payload(role=1, policy=0, mif=0), flags=1))


def test_a_goodbye_with_an_unknown_reason_is_still_a_goodbye() -> None:
    assert decode(9, goodbye_payload(b"later", reason=999)) == Goodbye(GoodbyeReason.INTERNAL_ERROR, "later")


def test_frame_flags_keep_unknown_bits() -> None:
    got = decode(4, FRAME.pack(0, 0, 0x8003, 0, 0, 0, 0, 0, 0, 0) + s16(b""))
    assert isinstance(got, FrameReady)
    assert int(got.flags) == 0x8003
    assert FrameFlags.DISCONT in got.flags and FrameFlags.DELTA_UNIT in got.flags


BAD_EVENTS = [
    ("hello max_in_flight", Hello(Role.CONSUMER, 1, "", Policy.DROP, MAX_IN_FLIGHT + 1)),
    ("hello negative pid", Hello(Role.CONSUMER, -1)),
    ("hello wide pid", Hello(Role.CONSUMER, 2**32)),
    ("hello long name", Hello(Role.CONSUMER, 1, "\u00e9" * 128)),
    ("hello wide major", Hello(Role.CONSUMER, 1, major=2**16)),
    ("caps 0 planes", Caps(0, "RGB", 4, 4, 0, 1, (), 48)),
    ("caps long format", Caps(0, "F" * (MAX_FORMAT + 1), 4, 4, 0, 1, (PlaneInfo(0, 12),), 48)),
    ("caps long caps", Caps(0, "RGB", 4, 4, 0, 1, (PlaneInfo(0, 12),), 48, "c" * (MAX_CAPS + 1))),
    ("caps negative generation", Caps(-1, "RGB", 4, 4, 0, 1, (PlaneInfo(0, 12),), 48)),
    ("caps wide fps", Caps(0, "RGB", 4, 4, 2**32, 1, (PlaneInfo(0, 12),), 48)),
    ("segment no fds", Segment(0, 64, (SlotPlacement(0, 0),))),
    ("segment fd index", Segment(0, 64, (SlotPlacement(1, 0),), fds=(5,))),
    ("frame 5 planes", FrameReady(0, 0, 0, planes=(PlaneInfo(0, 1),) * 5)),
    ("frame pts", FrameReady(0, 0, 0, pts=-2)),
    ("frame meta", FrameReady(0, 0, 0, meta=b"m" * (MAX_META + 1))),
    ("frame negative generation", FrameReady(-1, 0, 0)),
    ("frame wide slot", FrameReady(0, 2**16, 0)),
    ("frame negative seq", FrameReady(0, 0, -5)),
    ("release wide slot", Release(2**16, 0)),
    ("stats request negative", StatsRequest(-1)),
    ("stats too long", Stats(1, "s" * (MAX_STATS + 1))),
    ("stats surrogate", Stats(1, "\ud800")),
    ("goodbye long", Goodbye(GoodbyeReason.NORMAL, "m" * (MAX_REASON + 1))),
]


@pytest.mark.parametrize("event", [b[1] for b in BAD_EVENTS], ids=[b[0] for b in BAD_EVENTS])
def test_encoding_an_invalid_event_is_a_local_protocol_error(event: Event) -> None:
    with pytest.raises(LocalProtocolError):
        encode(event)


# --------------------------------------------------------------------------- state machine violations


def test_frame_before_caps() -> None:
    prod, cons = pair()
    with pytest.raises(LocalProtocolError, match="before its caps and segment"):
        prod.send(frame(0, 0, 0))
    with pytest.raises(RemoteProtocolError, match="before its caps and segment"):
        cons.receive_message(encode(frame(0, 0, 0)))
    assert cons.their_state == State.ERROR


def test_frame_before_segment() -> None:
    prod, cons = pair()
    deliver(prod, cons, make_caps(0))
    with pytest.raises(LocalProtocolError, match="segment missing"):
        prod.send(frame(0, 0, 0))
    with pytest.raises(RemoteProtocolError, match="segment missing"):
        cons.receive_message(encode(frame(0, 0, 0)))


def test_segment_without_caps() -> None:
    prod, cons = pair()
    with pytest.raises(LocalProtocolError, match="does not match caps generation -1"):
        prod.send(make_segment(0))
    with pytest.raises(RemoteProtocolError, match="does not match caps generation -1"):
        cons.receive_message(encode(make_segment(0)), [50])


def test_segment_of_another_generation_and_a_second_segment() -> None:
    prod, cons = pair()
    deliver(prod, cons, make_caps(3))
    with pytest.raises(LocalProtocolError, match="segment generation 2 does not match caps generation 3"):
        prod.send(make_segment(2))
    deliver(prod, cons, make_segment(3))
    with pytest.raises(LocalProtocolError, match="second segment for generation 3"):
        prod.send(make_segment(3))
    with pytest.raises(RemoteProtocolError, match="second segment"):
        cons.receive_message(encode(make_segment(3)), [9])


def test_caps_generation_must_increase() -> None:
    prod, cons = pair()
    deliver(prod, cons, make_caps(5))
    for gen in (5, 4):
        with pytest.raises(LocalProtocolError, match=f"caps generation {gen} does not follow 5"):
            prod.send(make_caps(gen))
    with pytest.raises(RemoteProtocolError, match="does not follow 5"):
        cons.receive_message(encode(make_caps(0)))


def test_frame_with_generation_mismatch() -> None:
    prod, cons = streaming(generation=2)
    for gen in (1, 3):
        with pytest.raises(LocalProtocolError, match=f"frame of generation {gen}"):
            prod.send(frame(gen, 0, 0))
    with pytest.raises(RemoteProtocolError, match="frame of generation 1"):
        cons.receive_message(encode(frame(1, 0, 0)))


def test_frame_slot_must_be_inside_the_segment() -> None:
    prod, cons = streaming(slots=3)
    with pytest.raises(LocalProtocolError, match="slot 3, the segment has 3"):
        prod.send(frame(0, 3, 0))
    deliver(prod, cons, frame(0, 2, 0))  # the last slot is fine
    with pytest.raises(RemoteProtocolError, match="slot 7, the segment has 3"):
        cons.receive_message(encode(frame(0, 7, 1)))


def test_frame_must_fit_its_slot() -> None:
    prod, _ = streaming()
    with pytest.raises(LocalProtocolError, match="exceeds the slot size 4096"):
        prod.send(FrameReady(0, 0, 0, size=SLOT_SIZE + 1))
    with pytest.raises(LocalProtocolError, match="outside a slot"):
        prod.send(FrameReady(0, 0, 0, size=10, planes=(PlaneInfo(SLOT_SIZE, 16),)))
    with pytest.raises(LocalProtocolError, match="outside a slot"):
        prod.send(FrameReady(0, 0, 0, size=10, planes=(PlaneInfo(0, 0),)))
    assert prod.in_flight == 0


def test_seq_must_increase() -> None:
    prod, cons = streaming()
    deliver(prod, cons, frame(0, 0, 10))
    for seq in (10, 9):
        with pytest.raises(LocalProtocolError, match=f"frame seq {seq} does not follow 10"):
            prod.send(frame(0, 1, seq))
    with pytest.raises(RemoteProtocolError, match="frame seq 10 does not follow 10"):
        cons.receive_message(encode(frame(0, 1, 10)))
    assert prod.in_flight_frames() == {10: (0, 0)}


def test_seq_keeps_increasing_across_generations() -> None:
    prod, cons = streaming()
    deliver(prod, cons, frame(0, 0, 10))
    deliver(prod, cons, make_caps(1))
    deliver(prod, cons, make_segment(1))
    with pytest.raises(LocalProtocolError, match="does not follow 10"):
        prod.send(frame(1, 0, 0))


def test_sending_a_slot_the_consumer_still_holds() -> None:
    prod, cons = streaming()
    deliver(prod, cons, frame(0, 2, 1))
    with pytest.raises(LocalProtocolError, match="slot 2 sent again while the consumer still holds seq 1"):
        prod.send(frame(0, 2, 2))
    with pytest.raises(RemoteProtocolError, match="still holds seq 1"):
        cons.receive_message(encode(frame(0, 2, 2)))
    # Once released, the slot may be sent again.
    prod2, cons2 = streaming()
    deliver(prod2, cons2, frame(0, 2, 1))
    deliver(cons2, prod2, Release(2, 1))
    deliver(prod2, cons2, frame(0, 2, 2))
    assert prod2.in_flight_frames() == cons2.in_flight_frames() == {2: (0, 2)}


def test_release_of_a_frame_never_sent() -> None:
    prod, cons = streaming()
    deliver(prod, cons, frame(0, 1, 4))
    for slot, seq in ((1, 5), (0, 4), (3, 3)):  # unknown seq, wrong slot for a known seq, nothing
        with pytest.raises(LocalProtocolError, match=f"release of slot {slot} seq {seq}, which is not in flight"):
            cons.send(Release(slot, seq))
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        prod.receive_message(encode(Release(0, 4)))
    assert cons.in_flight_frames() == {4: (0, 1)}


def test_double_release() -> None:
    prod, cons = streaming()
    deliver(prod, cons, frame(0, 1, 4))
    deliver(cons, prod, Release(1, 4))
    with pytest.raises(LocalProtocolError, match="released twice"):
        cons.send(Release(1, 4))
    with pytest.raises(RemoteProtocolError, match="released twice"):
        prod.receive_message(encode(Release(1, 4)))


def test_data_before_hello() -> None:
    with pytest.raises(LocalProtocolError, match="first message must be hello, not StatsRequest"):
        Connection(Role.CONSUMER).send(StatsRequest(1))
    with pytest.raises(LocalProtocolError, match="first message must be hello, not Caps"):
        Connection(Role.PRODUCER).send(make_caps(0))
    with pytest.raises(RemoteProtocolError, match="first message must be hello, not Release"):
        Connection(Role.PRODUCER).receive_message(encode(Release(0, 0)))
    with pytest.raises(RemoteProtocolError, match="first message must be hello, not Caps"):
        fresh_consumer().receive_message(encode(make_caps(0)))


def test_producer_needs_the_peer_hello_before_streaming() -> None:
    prod = Connection(Role.PRODUCER)
    prod.send(PRODUCER_HELLO)
    with pytest.raises(LocalProtocolError, match="before the peer's hello"):
        prod.send(make_caps(0))


def test_second_hello() -> None:
    prod, cons = pair()
    with pytest.raises(LocalProtocolError, match="hello was already sent"):
        cons.send(consumer_hello())
    with pytest.raises(RemoteProtocolError, match="second hello"):
        prod.receive_message(encode(consumer_hello()))
    with pytest.raises(RemoteProtocolError, match="second hello"):
        cons.receive_message(encode(PRODUCER_HELLO))


def test_hello_role_must_match_the_connection() -> None:
    with pytest.raises(LocalProtocolError, match="hello says role PRODUCER, connection is CONSUMER"):
        Connection(Role.CONSUMER).send(PRODUCER_HELLO)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (Role.PRODUCER, Hello(Role.PRODUCER, 1)),
        (Role.CONSUMER, consumer_hello()),
        (Role.CONSUMER, Hello(Role.OBSERVER, 1)),
        (Role.OBSERVER, consumer_hello()),
    ],
)
def test_peers_of_the_wrong_role_are_refused(ours: Role, theirs: Hello) -> None:
    with pytest.raises(RemoteProtocolError, match="cannot talk to"):
        Connection(ours).receive_message(encode(theirs))


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        (consumer_hello(mif=0), "max_in_flight 0 is outside 1..1024"),
        (consumer_hello(policy=Policy.NONE), "must name a policy"),
    ],
)
def test_consumer_hello_must_be_usable(hello: Hello, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        Connection(Role.PRODUCER).receive_message(encode(hello))


def test_wrong_role_sends() -> None:
    prod, cons = streaming()
    with pytest.raises(LocalProtocolError, match="a consumer may not send FrameReady"):
        cons.send(frame(0, 0, 0))
    with pytest.raises(LocalProtocolError, match="a producer may not send Release"):
        prod.send(Release(0, 0))
    with pytest.raises(LocalProtocolError, match="a producer may not send StatsRequest"):
        prod.send(StatsRequest(1))
    with pytest.raises(LocalProtocolError, match="a consumer may not send Stats"):
        cons.send(Stats(1, "{}"))
    with pytest.raises(RemoteProtocolError, match="a consumer may not send FrameReady"):
        prod.receive_message(encode(frame(0, 0, 0)))
    prod2, cons2 = streaming()
    deliver(prod2, cons2, frame(0, 0, 0))
    with pytest.raises(RemoteProtocolError, match="a producer may not send Release"):
        cons2.receive_message(encode(Release(0, 0)))
    _, observer = pair(Role.OBSERVER)
    with pytest.raises(LocalProtocolError, match=r"an? observer may not send Release"):
        observer.send(Release(0, 0))


@pytest.mark.parametrize("event", [make_caps(0), make_segment(0), frame(0, 0, 0), Eos()])
def test_observers_receive_stats_only(event: Event) -> None:
    prod, observer = pair(Role.OBSERVER)
    with pytest.raises(LocalProtocolError, match="to an observer"):
        prod.send(event)
    fds = [50] if isinstance(event, Segment) else []
    with pytest.raises(RemoteProtocolError, match="to an observer"):
        observer.receive_message(encode(event), fds)
    assert observer.take_unclaimed_fds() == fds


def test_nothing_after_goodbye() -> None:
    prod, cons = streaming()
    deliver(prod, cons, Goodbye(GoodbyeReason.SHUTDOWN, "bye"))
    assert prod.our_state == State.CLOSED and cons.their_state == State.CLOSED
    with pytest.raises(LocalProtocolError, match="connection is closed"):
        prod.send(Eos())
    with pytest.raises(RemoteProtocolError, match="after the connection was closed"):
        cons.receive_message(encode(Eos()))
    # The other direction is still open until the consumer says goodbye too.
    deliver(cons, prod, Goodbye(GoodbyeReason.NORMAL, "closing"))
    with pytest.raises(RemoteProtocolError, match="after the connection was closed"):
        prod.receive_message(encode(StatsRequest(1)))
    # In a byte stream, a message behind a goodbye in the same read is refused as well.
    stream = fresh_consumer()
    stream.receive_data(encode(PRODUCER_HELLO) + encode(Goodbye()) + encode(Eos()))
    assert stream.next_event() == PRODUCER_HELLO
    assert stream.next_event() == Goodbye()
    with pytest.raises(RemoteProtocolError, match="Eos after goodbye"):
        stream.next_event()


def test_goodbye_can_always_be_sent() -> None:
    fresh = Connection(Role.CONSUMER)
    assert decode(9, fresh.send(Goodbye(GoodbyeReason.VERSION_MISMATCH, "x"))[8:]) == Goodbye(
        GoodbyeReason.VERSION_MISMATCH, "x"
    )
    failed = fresh_consumer()
    with pytest.raises(RemoteProtocolError):
        failed.receive_message(b"junk")
    failed.send(Goodbye(GoodbyeReason.PROTOCOL_ERROR, "junk"))
    assert failed.our_state == State.CLOSED


def test_a_failed_connection_stays_failed() -> None:
    cons = fresh_consumer()
    with pytest.raises(RemoteProtocolError):
        cons.receive_message(encode(Eos()))
    with pytest.raises(RemoteProtocolError, match="after the connection was error"):
        cons.receive_message(encode(PRODUCER_HELLO))
    with pytest.raises(RemoteProtocolError, match="already failed"):
        cons.next_event()


def test_fds_with_a_non_segment_message() -> None:
    prod, cons = streaming()
    with pytest.raises(RemoteProtocolError, match="2 file descriptors arrived with a FrameReady"):
        cons.receive_message(prod.send(frame(0, 0, 0)), [7, 8])
    assert cons.take_unclaimed_fds() == [7, 8]
    assert cons.take_unclaimed_fds() == []


def test_segment_announcing_more_fds_than_arrived() -> None:
    prod, cons = pair()
    deliver(prod, cons, make_caps(0))
    seg = Segment(0, SLOT_SIZE, (SlotPlacement(0, 0), SlotPlacement(1, 0)), fds=(5, 6))
    with pytest.raises(RemoteProtocolError, match="segment announces 2 fds, 1 arrived"):
        cons.receive_message(prod.send(seg), [5])
    assert cons.take_unclaimed_fds() == [5]


def test_a_segment_with_trailing_bytes_leaves_its_fds_to_be_closed() -> None:
    # Regression: the segment was accepted, then refused for the extra bytes, and its fds were lost.
    prod, cons = pair()
    deliver(prod, cons, make_caps(0))
    with pytest.raises(RemoteProtocolError, match="1 extra bytes after one message"):
        cons.receive_message(encode(make_segment(0)) + b"\0", [50])
    assert cons.take_unclaimed_fds() == [50]


def test_surplus_fds_of_a_segment_are_left_unclaimed() -> None:
    prod, cons = pair()
    deliver(prod, cons, make_caps(0))
    got = cons.receive_message(prod.send(make_segment(0)), [50, 51])
    assert isinstance(got, Segment) and got.fds == (50,)
    assert cons.take_unclaimed_fds() == [51]


def test_a_rejected_segment_leaves_its_fds_to_be_closed() -> None:
    # Regression: the fds used to be claimed before the state check and were lost when it failed.
    _, cons = streaming()
    with pytest.raises(RemoteProtocolError, match="second segment"):
        cons.receive_message(encode(make_segment(0)), [77])
    assert cons.take_unclaimed_fds() == [77]


def test_fds_arriving_after_goodbye_are_left_to_be_closed() -> None:
    prod, cons = pair()
    deliver(prod, cons, Goodbye())
    with pytest.raises(RemoteProtocolError):
        cons.receive_message(encode(make_segment(0)), [31])
    assert cons.take_unclaimed_fds() == [31]


@pytest.mark.parametrize(("major", "minor"), [(2, 7), (0, 0), (65535, 1)])
def test_version_mismatch(major: int, minor: int) -> None:
    hello = Hello(Role.CONSUMER, 1, "new", Policy.DROP, 4, major=major, minor=minor)
    with pytest.raises(VersionError) as info:
        Connection(Role.PRODUCER).receive_message(encode(hello))
    assert isinstance(info.value, RemoteProtocolError)
    assert (info.value.peer_major, info.value.peer_minor) == (major, minor)
    text = str(info.value)
    assert f"{major}.{minor}" in text
    assert f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}" in text
    with pytest.raises(VersionError, match=f"protocol {major}.{minor}, this side speaks 1.0"):
        fresh_consumer().receive_message(encode(Hello(Role.PRODUCER, 1, major=major, minor=minor)))


def test_a_different_minor_version_is_accepted() -> None:
    prod = Connection(Role.PRODUCER)
    hello = Hello(Role.CONSUMER, 1, "", Policy.BLOCK, 2, major=PROTOCOL_MAJOR, minor=PROTOCOL_MINOR + 9)
    assert prod.receive_message(encode(hello)) == hello
    assert prod.peer_hello is not None and prod.peer_hello.minor == PROTOCOL_MINOR + 9


def test_frame_after_eos_needs_new_caps() -> None:
    prod, cons = streaming()
    deliver(prod, cons, Eos())
    with pytest.raises(LocalProtocolError, match="after end-of-stream"):
        prod.send(frame(0, 0, 0))
    with pytest.raises(RemoteProtocolError, match="after end-of-stream"):
        cons.receive_message(encode(frame(0, 0, 0)))


def test_stats_bookkeeping() -> None:
    prod, cons = pair()
    with pytest.raises(LocalProtocolError, match="stats answer 1 to no request"):
        prod.send(Stats(1, "{}"))
    with pytest.raises(RemoteProtocolError, match="stats answer 1 to no request"):
        cons.receive_message(encode(Stats(1, "{}")))
    prod, cons = pair()
    for i in range(16):
        deliver(cons, prod, StatsRequest(i))
    with pytest.raises(LocalProtocolError, match="already pending"):
        cons.send(StatsRequest(3))
    with pytest.raises(LocalProtocolError, match="more than 16"):
        cons.send(StatsRequest(16))
    deliver(prod, cons, Stats(3, "{}"))
    deliver(cons, prod, StatsRequest(3))  # answered, so the id may be used again
    with pytest.raises(RemoteProtocolError, match="more than 16"):
        prod.receive_message(encode(StatsRequest(16)))


# --------------------------------------------------------------------------- a whole conversation


def test_full_producer_consumer_exchange() -> None:
    prod, cons = Connection(Role.PRODUCER), Connection(Role.CONSUMER)
    assert prod.our_state == prod.their_state == State.AWAIT_HELLO

    hello = deliver(cons, prod, consumer_hello(mif=3, policy=Policy.BLOCK))
    assert prod.peer_hello == hello and prod.peer_role == Role.CONSUMER
    deliver(prod, cons, PRODUCER_HELLO)
    assert cons.peer_hello == PRODUCER_HELLO and cons.peer_role == Role.PRODUCER

    # Generation 0: caps, a segment of 3 slots in 2 fds, three frames.
    deliver(prod, cons, make_caps(0))
    seg0 = Segment(0, SLOT_SIZE, (SlotPlacement(0, 0), SlotPlacement(0, SLOT_SIZE), SlotPlacement(1, 0)), fds=(40, 41))
    got = deliver(prod, cons, seg0)
    assert isinstance(got, Segment) and got.fds == (40, 41) and got.n_fds == 2
    for slot, seq in ((0, 0), (1, 1), (2, 5)):
        deliver(prod, cons, frame(0, slot, seq, flags=FrameFlags.DISCONT, meta=b"m%d" % seq))
    assert prod.in_flight == cons.in_flight == 3
    assert prod.in_flight_frames() == cons.in_flight_frames() == {0: (0, 0), 1: (0, 1), 5: (0, 2)}
    assert prod.holds(0, 1) and cons.holds(0, 1) and not prod.holds(1, 1)

    deliver(cons, prod, Release(1, 1))
    assert prod.last_released == cons.last_released == (0, 1)
    assert not prod.holds(0, 1)
    deliver(prod, cons, frame(0, 1, 6))  # slot 1 is free again

    # Caps change while generation 0 frames are in flight.
    deliver(prod, cons, make_caps(1, "NV12"))
    deliver(prod, cons, make_segment(1, slots=2))
    deliver(prod, cons, frame(1, 0, 7))  # slot 0 of generation 1 is another piece of memory
    assert prod.holds(0, 0) and prod.holds(1, 0)
    assert prod.in_flight_frames() == cons.in_flight_frames() == {0: (0, 0), 5: (0, 2), 6: (0, 1), 7: (1, 0)}
    with pytest.raises(LocalProtocolError, match="frame of generation 0"):
        prod.send(frame(0, 0, 8))  # the old generation takes no new frames

    # The old generation's frames come back after the change.
    for slot, seq in ((2, 5), (0, 0), (1, 6)):
        deliver(cons, prod, Release(slot, seq))
        assert prod.last_released == cons.last_released == (0, slot)
    assert prod.in_flight_frames() == cons.in_flight_frames() == {7: (1, 0)}
    assert not any(prod.holds(0, s) or cons.holds(0, s) for s in range(3))

    # End of stream, then a fresh start with new caps.
    deliver(prod, cons, Eos())
    with pytest.raises(LocalProtocolError, match="after end-of-stream"):
        prod.send(frame(1, 1, 8))
    deliver(prod, cons, make_caps(2))
    deliver(prod, cons, make_segment(2, slots=1))
    deliver(prod, cons, frame(2, 0, 8))
    deliver(cons, prod, Release(0, 7))
    assert prod.last_released == (1, 0)
    assert prod.in_flight_frames() == cons.in_flight_frames() == {8: (2, 0)}

    # Stats while streaming.
    deliver(cons, prod, StatsRequest(42))
    deliver(prod, cons, Stats(42, '{"published": 9}'))

    # Goodbye: no more from the producer; its unreleased frame is the IO layer's to drop.
    deliver(prod, cons, Goodbye(GoodbyeReason.SHUTDOWN, "producer closed"))
    assert cons.their_state == State.CLOSED and cons.closed and prod.closed
    assert prod.in_flight_frames() == {8: (2, 0)}
    assert cons.take_unclaimed_fds() == []


def test_observer_exchange() -> None:
    prod, observer = pair(Role.OBSERVER)
    deliver(observer, prod, StatsRequest(1))
    deliver(observer, prod, StatsRequest(2))
    deliver(prod, observer, Stats(2, "{}"))
    deliver(prod, observer, Stats(1, '{"consumers": []}'))
    deliver(observer, prod, Goodbye())
    assert prod.in_flight == observer.in_flight == 0


# --------------------------------------------------------------------------- random interleavings


class ProducerConsumer(RuleBasedStateMachine):
    """A producer and a consumer with messages in flight both ways, delivered in any interleaving."""

    def __init__(self) -> None:
        super().__init__()
        self.prod, self.cons = pair(mif=MAX_IN_FLIGHT)
        self.to_consumer: deque[tuple[bytes, tuple[int, ...], Event]] = deque()
        self.to_producer: deque[tuple[bytes, Event]] = deque()
        self.generation = -1
        self.n_slots = 0
        self.ended = False
        self.seq = -1
        self.sent: dict[int, tuple[int, int]] = {}  # the producer's view: not yet released to it
        self.received: dict[int, tuple[int, int]] = {}  # the consumer's view: received, not released
        self.stats_ids = 0
        self.pending_stats: set[int] = set()

    def _to_consumer(self, event: Event) -> None:
        fds = event.fds if isinstance(event, Segment) else ()
        self.to_consumer.append((self.prod.send(event), fds, event))

    @rule(slots=st.integers(1, 5), skip=st.integers(1, 3))
    def new_caps(self, slots: int, skip: int) -> None:
        self.generation += skip
        self._to_consumer(make_caps(self.generation))
        self._to_consumer(make_segment(self.generation, slots))
        self.n_slots, self.ended = slots, False

    @precondition(lambda self: self.n_slots and not self.ended)
    @rule(data=st.data(), gap=st.integers(1, 3))
    def publish(self, data: st.DataObject, gap: int) -> None:
        held = {slot for gen, slot in self.sent.values() if gen == self.generation}
        free = [s for s in range(self.n_slots) if s not in held]
        if not free:
            # Every slot is out: the state machine must refuse to hand one out again.
            before = self.prod.in_flight_frames()
            with pytest.raises(LocalProtocolError, match="still holds"):
                self.prod.send(frame(self.generation, data.draw(st.sampled_from(sorted(held))), self.seq + gap))
            assert self.prod.in_flight_frames() == before
            return
        slot = data.draw(st.sampled_from(free))
        self.seq += gap
        self._to_consumer(frame(self.generation, slot, self.seq))
        self.sent[self.seq] = (self.generation, slot)
        assert self.prod.holds(self.generation, slot)

    @precondition(lambda self: self.n_slots and not self.ended)
    @rule()
    def end_of_stream(self) -> None:
        self._to_consumer(Eos())
        self.ended = True

    @precondition(lambda self: len(self.pending_stats) < 16)
    @rule()
    def ask_for_stats(self) -> None:
        self.stats_ids += 1
        self.pending_stats.add(self.stats_ids)
        request = StatsRequest(self.stats_ids)
        self.to_producer.append((self.cons.send(request), request))

    @precondition(lambda self: self.to_consumer)
    @rule(n=st.integers(1, 4))
    def deliver_to_consumer(self, n: int) -> None:
        for _ in range(min(n, len(self.to_consumer))):
            data, fds, event = self.to_consumer.popleft()
            got = self.cons.receive_message(data, fds)
            assert got == event
            if isinstance(got, FrameReady):
                self.received[got.seq] = (got.generation, got.slot)
                assert self.cons.holds(got.generation, got.slot)
            elif isinstance(got, Segment):
                assert got.fds == fds
            elif isinstance(got, Stats):
                self.pending_stats.discard(got.request_id)

    @precondition(lambda self: self.received)
    @rule(data=st.data())
    def consumer_releases(self, data: st.DataObject) -> None:
        self._release(data.draw(st.sampled_from(sorted(self.received))))

    def _release(self, seq: int) -> None:
        where = self.received.pop(seq)
        release = Release(where[1], seq)
        self.to_producer.append((self.cons.send(release), release))
        assert self.cons.last_released == where
        assert not self.cons.holds(*where)
        with pytest.raises(LocalProtocolError, match="released twice"):
            self.cons.send(release)

    @precondition(lambda self: self.to_producer)
    @rule(n=st.integers(1, 4))
    def deliver_to_producer(self, n: int) -> None:
        for _ in range(min(n, len(self.to_producer))):
            data, event = self.to_producer.popleft()
            got = self.prod.receive_message(data)
            assert got == event
            if isinstance(got, Release):
                where = self.sent.pop(got.seq)
                assert self.prod.last_released == where
                assert not self.prod.holds(*where)
            else:
                assert isinstance(got, StatsRequest)
                self._to_consumer(Stats(got.request_id, f'{{"id": {got.request_id}}}'))

    @invariant()
    def both_sides_agree(self) -> None:
        assert self.prod.in_flight_frames() == self.sent
        assert self.cons.in_flight_frames() == self.received
        assert self.prod.in_flight == len(self.sent)
        # Every difference between the two views is a message still on its way.
        queued_frames = {e.seq for _, _, e in self.to_consumer if isinstance(e, FrameReady)}
        queued_releases = {e.seq for _, e in self.to_producer if isinstance(e, Release)}
        assert set(self.sent) == set(self.received) | queued_frames | queued_releases
        assert not (queued_frames & queued_releases) and not (set(self.received) & queued_releases)
        if not self.to_consumer and not self.to_producer:
            assert self.prod.in_flight == self.cons.in_flight
            assert self.prod.in_flight_frames() == self.cons.in_flight_frames()

    def teardown(self) -> None:
        # Drain both ways and release everything: both sides end with nothing in flight.
        while self.to_consumer or self.to_producer or self.received:
            self.deliver_to_consumer(len(self.to_consumer))
            for seq in sorted(self.received):
                self._release(seq)
            self.deliver_to_producer(len(self.to_producer))
            self.both_sides_agree()
        assert self.prod.in_flight == self.cons.in_flight == 0
        assert self.sent == self.received == {}
        assert self.pending_stats == set()


ProducerConsumer.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRandomInterleavingsKeepBothSidesInStep = ProducerConsumer.TestCase
