"""Sealed memfd segments (what a consumer can and cannot do with its fd) and numpy views over them."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import mmap
import os

import numpy as np
import pytest

from framebus.errors import FramebusError, UnsupportedFormatError
from framebus.protocol import SlotPlacement
from framebus.segment import (
    F_ADD_SEALS,
    F_GET_SEALS,
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    MappedSegment,
    ProducerSegment,
    create_memfd,
)
from framebus.videoformat import make_layout, slot_size_for
from framebus.views import base_address, check_layout_fits, flat_view, frame_image, frame_planes

SLOT = 4 * mmap.PAGESIZE
N_SLOTS = 3


@pytest.fixture
def segment():
    seg = ProducerSegment("test", N_SLOTS, SLOT)
    yield seg
    seg.close()


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def consumer_map(seg: ProducerSegment) -> MappedSegment:
    """What a subscriber does with a segment message: map_fds takes ownership, so pass a dup."""
    return MappedSegment.map_fds(1, seg.slot_size, (os.dup(seg.consumer_fd),), seg.placements)


# -- the memfd and its seals


def test_segment_is_sealed(segment):
    assert os.readlink(f"/proc/self/fd/{segment.fd}").startswith("/memfd:framebus:test")
    assert segment.size == N_SLOTS * SLOT
    assert os.fstat(segment.fd).st_size == segment.size
    for fd in (segment.fd, segment.consumer_fd):
        seals = fcntl.fcntl(fd, F_GET_SEALS)
        for name, bit in [
            ("F_SEAL_SHRINK", F_SEAL_SHRINK),
            ("F_SEAL_GROW", F_SEAL_GROW),
            ("F_SEAL_FUTURE_WRITE", F_SEAL_FUTURE_WRITE),
            ("F_SEAL_SEAL", F_SEAL_SEAL),
        ]:
            assert seals & bit, f"{name} missing from seals {seals:#x}"


def test_seal_constants_are_the_kernel_ones():
    assert (F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_FUTURE_WRITE) == (0x1, 0x2, 0x4, 0x10)


def test_descriptors_are_cloexec(segment):
    for fd in (segment.fd, segment.consumer_fd):
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(fd)


def test_consumer_fd_is_read_only(segment):
    assert fcntl.fcntl(segment.consumer_fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert fcntl.fcntl(segment.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    # Same memory, different description.
    assert os.fstat(segment.fd).st_ino == os.fstat(segment.consumer_fd).st_ino


def test_consumer_fd_cannot_be_mapped_writable(segment):
    with pytest.raises(OSError):
        mmap.mmap(segment.consumer_fd, segment.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    with pytest.raises(OSError):
        os.write(segment.consumer_fd, b"x")


def test_reopened_read_write_cannot_write(segment):
    # The hole a read-only fd alone leaves open; F_SEAL_FUTURE_WRITE closes it.
    fd = os.open(f"/proc/self/fd/{segment.consumer_fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, segment.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", SLOT)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    assert segment.map[SLOT] == 0


def test_read_only_mapping_cannot_be_made_writable(segment):
    # mprotect() must not upgrade a read-only shared mapping of the reopened read-write fd.
    fd = os.open(f"/proc/self/fd/{segment.consumer_fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        m = mmap.mmap(fd, segment.size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        view = np.frombuffer(m, dtype=np.uint8)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        rc = libc.mprotect(base_address(view), segment.size, mmap.PROT_READ | mmap.PROT_WRITE)
        assert rc == -1, "mprotect made a sealed read-only mapping writable"
        assert ctypes.get_errno() in (errno.EACCES, errno.EPERM)
        del view
    finally:
        m.close()


def test_size_is_frozen(segment):
    for size in (segment.size * 2, segment.size - 1, 0):
        with pytest.raises(PermissionError):
            os.ftruncate(segment.fd, size)
        with pytest.raises(OSError):
            os.ftruncate(segment.consumer_fd, size)
    assert os.fstat(segment.fd).st_size == segment.size


def test_seals_are_final(segment):
    with pytest.raises(PermissionError):
        fcntl.fcntl(segment.fd, F_ADD_SEALS, 0x8)  # F_SEAL_WRITE, refused after F_SEAL_SEAL


def test_create_memfd_rejects_bad_size():
    for size in (0, -1):
        with pytest.raises(FramebusError, match=str(size)):
            create_memfd("bad", size)


def test_segment_needs_a_slot():
    with pytest.raises(FramebusError, match="at least one slot"):
        ProducerSegment("none", 0, SLOT)


# -- producer writes, consumer reads


def test_placements(segment):
    assert segment.placements == tuple(SlotPlacement(0, i * SLOT) for i in range(N_SLOTS))
    assert [segment.slot_offset(i) for i in range(N_SLOTS)] == [0, SLOT, 2 * SLOT]


def test_consumer_sees_producer_writes(segment):
    pattern = (np.arange(segment.size, dtype=np.uint64) * 2654435761 >> 7).astype(np.uint8)
    producer = np.frombuffer(segment.map, dtype=np.uint8)
    assert producer.flags.writeable
    consumer = consumer_map(segment)
    try:
        assert len(consumer.maps) == 1
        seen = np.frombuffer(consumer.maps[0], dtype=np.uint8)
        assert not seen.flags.writeable
        assert seen.size == segment.size
        producer[:] = pattern
        assert np.array_equal(seen, pattern)
        # Later writes show up too: it is the same memory, not a copy.
        producer[SLOT : 2 * SLOT] = 0xA5
        assert (seen[SLOT : 2 * SLOT] == 0xA5).all()
        assert np.array_equal(seen[:SLOT], pattern[:SLOT])
        with pytest.raises(ValueError):
            seen[0] = 1
        with pytest.raises(TypeError):
            consumer.maps[0][0] = 1
        del seen
    finally:
        del producer
        consumer.close()


def test_map_fds_takes_ownership_of_the_fds(segment):
    fd = os.dup(segment.consumer_fd)
    consumer = MappedSegment.map_fds(7, SLOT, (fd,), segment.placements)
    assert is_closed(fd)
    assert (consumer.generation, consumer.slot_size, consumer.placements) == (7, SLOT, segment.placements)
    consumer.close()


def test_map_fds_with_several_fds():
    a = ProducerSegment("a", 1, SLOT)
    b = ProducerSegment("b", 2, SLOT)
    try:
        a.map[:4] = b"AAAA"
        b.map[SLOT : SLOT + 4] = b"BBBB"
        placements = (SlotPlacement(0, 0), SlotPlacement(1, 0), SlotPlacement(1, SLOT))
        fds = (os.dup(a.consumer_fd), os.dup(b.consumer_fd))
        consumer = MappedSegment.map_fds(2, SLOT, fds, placements)
        assert all(is_closed(fd) for fd in fds)
        assert consumer.maps[0][:4] == b"AAAA"
        assert consumer.maps[1][SLOT : SLOT + 4] == b"BBBB"
        consumer.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("offset", [N_SLOTS * SLOT - SLOT + 1, N_SLOTS * SLOT, 10 * N_SLOTS * SLOT])
def test_map_fds_rejects_slot_past_the_end(segment, offset):
    placements = (*segment.placements[:-1], SlotPlacement(0, offset))
    fd = os.dup(segment.consumer_fd)
    with pytest.raises(FramebusError, match=rf"slot {N_SLOTS - 1} of generation 5 ends at {offset + SLOT}"):
        MappedSegment.map_fds(5, SLOT, (fd,), placements)
    assert is_closed(fd), "map_fds leaked the fd on error"


def test_map_fds_rejects_slot_size_larger_than_fd(segment):
    fd = os.dup(segment.consumer_fd)
    with pytest.raises(FramebusError, match="past the end"):
        MappedSegment.map_fds(1, 2 * SLOT, (fd,), segment.placements)
    assert is_closed(fd)


def test_map_fds_last_slot_exactly_at_the_end(segment):
    placements = (SlotPlacement(0, segment.size - SLOT),)
    consumer = MappedSegment.map_fds(1, SLOT, (os.dup(segment.consumer_fd),), placements)
    consumer.close()


# -- closing while views live


def test_producer_close_with_live_view():
    seg = ProducerSegment("close", 2, SLOT)
    fds = (seg.fd, seg.consumer_fd)
    base = np.frombuffer(seg.map, dtype=np.uint8)
    base[:16] = np.arange(16)
    layout = make_layout("GRAY8", 16, 4)
    (plane,) = frame_planes(base_address(base) + SLOT, layout, True, base)
    plane[:] = 9
    del base
    seg.close()
    assert all(is_closed(fd) for fd in fds)
    assert seg.fd == seg.consumer_fd == -1
    seg.close()  # twice is harmless
    gc.collect()
    # The view still keeps the mapping: readable and intact.
    assert (plane == 9).all()
    keep = plane.base.keep  # the views' owner object holds the producer's base array
    assert np.array_equal(keep[:16], np.arange(16))
    del plane, keep
    gc.collect()


def test_consumer_close_with_live_view(segment):
    segment.map[:8] = b"framebus"
    consumer = consumer_map(segment)
    seen = np.frombuffer(consumer.maps[0], dtype=np.uint8)
    consumer.close()
    consumer.close()
    gc.collect()
    assert seen[:8].tobytes() == b"framebus"
    del seen
    gc.collect()


def test_close_without_views_unmaps(segment):
    consumer = consumer_map(segment)
    consumer.close()
    assert all(m.closed for m in consumer.maps)
    segment.close()
    assert segment.map.closed


# -- numpy views over a slot


class Views:
    """Writable (producer) and read-only views of one slot of a segment."""

    def __init__(self, seg: ProducerSegment, slot: int) -> None:
        self.base = np.frombuffer(seg.map, dtype=np.uint8)
        self.address = base_address(self.base) + seg.slot_offset(slot)
        self.offset = seg.slot_offset(slot)

    def planes(self, layout, writable):
        return frame_planes(self.address, layout, writable, self.base)

    def image(self, layout, writable):
        return frame_image(self.address, layout, writable, self.base)


@pytest.fixture
def big_segment():
    seg = ProducerSegment("views", 2, slot_size_for(make_layout("RGBA", 641, 481, strides=(4096,))))
    yield seg
    seg.close()


def check_plane(arr, shape, strides, writable, dtype=np.uint8):
    assert arr.shape == shape
    assert arr.strides == strides
    assert arr.dtype == dtype
    assert arr.flags.writeable == writable


@pytest.mark.parametrize("writable", [True, False])
def test_rgba_views(big_segment, writable):
    v = Views(big_segment, 1)
    layout = make_layout("RGBA", 640, 480)
    (plane,) = v.planes(layout, writable)
    check_plane(plane, (480, 640, 4), (2560, 4, 1), writable)
    image = v.image(layout, writable)
    check_plane(image, (480, 640, 4), (2560, 4, 1), writable)
    assert base_address(image) == v.address


def test_rgb_padded_stride_views(big_segment):
    v = Views(big_segment, 0)
    layout = make_layout("RGB", 641, 481, strides=(2048,))
    check_layout_fits(layout, big_segment.slot_size)
    image = v.image(layout, True)
    check_plane(image, (481, 641, 3), (2048, 3, 1), True)
    image[:] = 7
    raw = v.base[: layout.size].reshape(481, 2048)
    assert (raw[:, : 641 * 3] == 7).all()
    assert (raw[:, 641 * 3 :] == 0).all(), "the view wrote into row padding"
    ro = v.image(layout, False)
    check_plane(ro, (481, 641, 3), (2048, 3, 1), False)
    assert (ro == 7).all()


def test_gray_views(big_segment):
    v = Views(big_segment, 0)
    layout = make_layout("GRAY8", 5, 3)  # stride 8
    image = v.image(layout, False)
    check_plane(image, (3, 5), (8, 1), False)
    layout16 = make_layout("GRAY16_LE", 5, 3)  # stride 12
    (plane,) = v.planes(layout16, True)
    check_plane(plane, (3, 5), (12, 2), True, np.dtype("<u2"))
    plane[0, 0] = 0x0102
    assert v.base[:2].tolist() == [0x02, 0x01]


def test_i420_tight_views(big_segment):
    v = Views(big_segment, 1)
    layout = make_layout("I420", 640, 480)
    y, u, vv = v.planes(layout, True)
    check_plane(y, (480, 640), (640, 1), True)
    check_plane(u, (240, 320), (320, 1), True)
    check_plane(vv, (240, 320), (320, 1), True)
    assert base_address(u) - base_address(y) == 640 * 480
    assert base_address(vv) - base_address(u) == 320 * 240
    y[:] = 16
    u[:] = 128
    vv[:] = 200
    image = v.image(layout, False)
    check_plane(image, (720, 640), (640, 1), False)
    assert (image[:480] == 16).all()
    flat_chroma = image[480:].reshape(-1)
    assert (flat_chroma[: 320 * 240] == 128).all()
    assert (flat_chroma[320 * 240 :] == 200).all()


@pytest.mark.parametrize(
    ("fmt", "width", "height", "strides"),
    [
        ("I420", 1278, 718, (1280, 640, 640)),  # padded rows
        ("I420", 642, 480, None),  # chroma rows 321 bytes, stride 324
        ("I420", 640, 479, None),  # odd height
        ("NV12", 642, 480, None),  # luma stride 644
        ("YV12", 320, 240, (384, 192, 192)),
    ],
)
def test_padded_planar_has_no_single_image(fmt, width, height, strides):
    seg = ProducerSegment("pad", 1, slot_size_for(make_layout(fmt, width, height, strides)))
    try:
        v = Views(seg, 0)
        layout = make_layout(fmt, width, height, strides)
        with pytest.raises(UnsupportedFormatError, match=rf"{fmt} {width}x{height}"):
            v.image(layout, False)
        planes = v.planes(layout, False)  # the planes are still there
        assert [p.shape[:2] for p in planes] == [(pl.rows, pl.columns) for pl in layout.planes]
        del planes, v
    finally:
        seg.close()


def test_nv12_views(big_segment):
    v = Views(big_segment, 0)
    layout = make_layout("NV12", 640, 480)
    y, uv = v.planes(layout, True)
    check_plane(y, (480, 640), (640, 1), True)
    check_plane(uv, (240, 320, 2), (640, 2, 1), True)
    uv[..., 0] = 1
    uv[..., 1] = 2
    image = v.image(layout, False)
    check_plane(image, (720, 640), (640, 1), False)
    assert image[480:, 0::2].min() == 1 and image[480:, 0::2].max() == 1
    assert image[480:, 1::2].min() == 2 and image[480:, 1::2].max() == 2


def test_yuy2_views(big_segment):
    v = Views(big_segment, 0)
    layout = make_layout("YUY2", 641, 3)  # odd width: stride rounds up to 1284
    (plane,) = v.planes(layout, False)
    check_plane(plane, (3, 641, 2), (1284, 2, 1), False)
    image = v.image(layout, True)
    check_plane(image, (3, 641, 2), (1284, 2, 1), True)


def test_writes_through_writable_view_seen_read_only(big_segment):
    v = Views(big_segment, 1)
    layout = make_layout("RGBA", 64, 32)
    writer = v.image(layout, True)
    reader = v.image(layout, False)
    assert np.shares_memory(writer, reader)
    writer[5, 7] = (1, 2, 3, 4)
    assert reader[5, 7].tolist() == [1, 2, 3, 4]
    assert v.base[v.offset + 5 * 256 + 7 * 4 : v.offset + 5 * 256 + 8 * 4].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        reader[0, 0] = 0
    # A consumer's mapping of the same slot sees it as well.
    consumer = consumer_map(big_segment)
    seen = np.frombuffer(consumer.maps[0], dtype=np.uint8)
    start = big_segment.slot_offset(1) + 5 * 256 + 7 * 4
    assert seen[start : start + 4].tolist() == [1, 2, 3, 4]
    del seen
    consumer.close()


def test_views_do_not_touch_other_slots(big_segment):
    v1 = Views(big_segment, 1)
    layout = make_layout("RGBA", 641, 481, strides=(4096,))
    v1.image(layout, True)[:] = 255
    assert not v1.base[: big_segment.slot_offset(1)].any()


def test_flat_view(big_segment):
    v = Views(big_segment, 1)
    v.planes(make_layout("GRAY8", 4, 1), True)[0][0] = (1, 2, 3, 4)
    flat = flat_view(v.address, 4, False, v.base)
    check_plane(flat, (4,), (1,), False)
    assert flat.tolist() == [1, 2, 3, 4]


def test_view_keeps_its_owner_alive():
    seg = ProducerSegment("keep", 1, SLOT)
    base = np.frombuffer(seg.map, dtype=np.uint8)
    image = frame_image(base_address(base), make_layout("GRAY8", 8, 8), True, base)
    del base
    seg.close()
    gc.collect()
    image[:] = 3
    assert (image == 3).all()
    assert not seg.map.closed  # BufferError kept it open while exported


def test_check_layout_fits():
    layout = make_layout("RGBA", 640, 480)
    check_layout_fits(layout, layout.size)
    with pytest.raises(UnsupportedFormatError, match=f"past the slot of {layout.size - 1} bytes"):
        check_layout_fits(layout, layout.size - 1)
    moved = layout.with_planes((2560,), (4096,))
    with pytest.raises(UnsupportedFormatError, match="ends at byte"):
        check_layout_fits(moved, layout.size)
