"""Shared memory for frames: one sealed memfd per segment, mapped once per process.

Why memfd and not ``/dev/shm`` files: nothing is left behind when a process
dies, no name can collide, and seals let the producer promise its consumers
the size never changes (so a consumer's mapping can never SIGBUS) and that
nobody but the producer's existing mapping can ever write the pixels.

Why ``F_SEAL_FUTURE_WRITE``: a read-only file descriptor alone is not
enough, because a consumer can reopen ``/proc/self/fd/N`` read-write.  With
the seal, every new writable mapping and every ``write()`` fails, for the
reopened descriptor too, while the producer keeps writing through the
mapping it made before sealing.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass

from .errors import FramebusError
from .protocol import SlotPlacement

# fcntl constants (Linux uapi); the fcntl module has some of them only on newer Pythons.
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


def create_memfd(name: str, size: int) -> int:
    """A memfd of ``size`` bytes that allows sealing; the caller owns the fd."""
    if size <= 0:
        raise FramebusError(f"shared memory size must be positive, got {size}")
    try:
        fd = os.memfd_create(f"framebus:{name}"[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise FramebusError(f"memfd_create failed ({exc}); framebus needs Linux 3.17 or newer") from exc
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise FramebusError(
            f"cannot size shared memory to {size} bytes ({exc}); free memory or use fewer/smaller slots"
        ) from exc
    return fd


def seal(fd: int) -> None:
    """Freeze size and forbid any writable mapping made from now on."""
    seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    except OSError as exc:
        raise FramebusError(f"sealing shared memory failed ({exc}); framebus needs Linux 5.1 or newer") from exc
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL)


def reopen_read_only(fd: int) -> int:
    """A new, read-only descriptor of the same memory, the one consumers receive."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


class ProducerSegment:
    """The producer's side of a segment: slots laid out in one memfd, mapped writable once.

    The writable mapping is made before sealing, so it is the only one that
    can ever exist.  Consumers get ``consumer_fd``: read-only, sealed.
    """

    def __init__(self, name: str, n_slots: int, slot_size: int) -> None:
        if n_slots < 1:
            raise FramebusError(f"a segment needs at least one slot, got {n_slots}")
        self.n_slots = n_slots
        self.slot_size = slot_size
        self.size = n_slots * slot_size
        self.fd = create_memfd(name, self.size)
        try:
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            seal(self.fd)
            self.consumer_fd = reopen_read_only(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.placements = tuple(SlotPlacement(0, i * slot_size) for i in range(n_slots))

    def slot_offset(self, slot: int) -> int:
        return slot * self.slot_size

    def close(self) -> None:
        """Unmap and close; views still exported keep the mapping until they die."""
        for fd in (self.fd, self.consumer_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.consumer_fd = -1
        try:
            self.map.close()
        except BufferError:
            # numpy views of a slot are still alive: the mapping is freed with the last one.
            pass


@dataclass
class MappedSegment:
    """The consumer's side: each distinct fd mapped once, read-only, for the segment's lifetime."""

    generation: int
    slot_size: int
    maps: tuple[mmap.mmap, ...]
    placements: tuple[SlotPlacement, ...]

    @classmethod
    def map_fds(
        cls, generation: int, slot_size: int, fds: tuple[int, ...], placements: tuple[SlotPlacement, ...]
    ) -> MappedSegment:
        maps: list[mmap.mmap] = []
        try:
            sizes = [os.fstat(fd).st_size for fd in fds]
            for i, p in enumerate(placements):
                if p.offset + slot_size > sizes[p.fd_index]:
                    raise FramebusError(
                        f"slot {i} of generation {generation} ends at {p.offset + slot_size}, past the end "
                        f"of its shared memory ({sizes[p.fd_index]} bytes): the producer sent a bad segment"
                    )
            for fd, size in zip(fds, sizes, strict=True):
                maps.append(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
        except BaseException:
            for m in maps:
                m.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return cls(generation, slot_size, tuple(maps), placements)

    def close(self) -> None:
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass  # a user still holds a view; the mapping goes with the view
