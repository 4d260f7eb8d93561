"""Who holds which slot, and which free slot to hand out next.

A slot is reused only when the producer has let go of it (it is neither
loaned out for writing nor the newest frame kept for late joiners) and
every consumer it was sent to has released it or disconnected.  This
module is that rule and nothing else: no locks, no sockets, so it is
tested on its own and the publisher calls it under its lock.

Free slots are handed out most-recently-released first (a stack): the
producer then writes into memory that is still in the CPU cache, where a
FIFO would rotate through every slot and fetch each one cold.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from .errors import FramebusError


class SlotStateError(FramebusError):
    """A slot operation that breaks the lifecycle: a framebus bug, never user input."""


class SlotTable:
    def __init__(self, n_slots: int) -> None:
        if n_slots < 1:
            raise ValueError(f"need at least one slot, got {n_slots}")
        self.n_slots = n_slots
        # Stack: the last element is handed out next.  Start with slot 0 on top.
        self._free: list[int] = list(range(n_slots - 1, -1, -1))
        self._holders: list[set[Hashable]] = [set() for _ in range(n_slots)]
        self._loaned: set[int] = set()
        self._latest: int | None = None

    # -- producer side

    def loan(self) -> int | None:
        """A free slot for the producer to write into, or None if every slot is held."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._loaned.add(slot)
        return slot

    def cancel_loan(self, slot: int) -> None:
        """The producer wrote nothing worth publishing: the slot is free again, on top."""
        self._require_loaned(slot)
        self._loaned.discard(slot)
        self._maybe_free(slot)

    def publish(self, slot: int) -> None:
        """The loaned slot becomes the newest frame; the previous newest is let go."""
        self._require_loaned(slot)
        self._loaned.discard(slot)
        previous, self._latest = self._latest, slot
        if previous is not None:
            self._maybe_free(previous)

    def let_go_of_latest(self) -> None:
        """At end of stream or shutdown the producer keeps no frame for late joiners."""
        previous, self._latest = self._latest, None
        if previous is not None:
            self._maybe_free(previous)

    @property
    def latest(self) -> int | None:
        return self._latest

    # -- consumer side

    def hold(self, slot: int, consumer: Hashable) -> None:
        """The frame in ``slot`` was sent to ``consumer``."""
        self._require_slot(slot)
        if slot in self._free:
            raise SlotStateError(f"slot {slot} is free and cannot be sent")
        if consumer in self._holders[slot]:
            raise SlotStateError(f"slot {slot} sent twice to consumer {consumer!r}")
        self._holders[slot].add(consumer)

    def release(self, slot: int, consumer: Hashable) -> bool:
        """``consumer`` is done with ``slot``; True if that made the slot free."""
        self._require_slot(slot)
        holders = self._holders[slot]
        if consumer not in holders:
            raise SlotStateError(f"consumer {consumer!r} released slot {slot} it does not hold")
        holders.discard(consumer)
        return self._maybe_free(slot)

    def drop_consumer(self, consumer: Hashable, slots: Iterable[int]) -> list[int]:
        """A consumer disconnected: everything it held is released.  Returns slots freed."""
        slots = list(slots)
        for slot in slots:
            self._require_slot(slot)
        freed = []
        for slot in slots:
            if consumer in self._holders[slot]:
                self._holders[slot].discard(consumer)
                if self._maybe_free(slot):
                    freed.append(slot)
        return freed

    # -- queries

    @property
    def n_free(self) -> int:
        return len(self._free)

    def holders(self, slot: int) -> frozenset[Hashable]:
        return frozenset(self._holders[slot])

    def is_free(self, slot: int) -> bool:
        return slot in self._free

    @property
    def all_free(self) -> bool:
        return len(self._free) == self.n_slots

    def _require_slot(self, slot: int) -> None:
        # A negative index would silently alias another slot (and could pin a free one).
        if not 0 <= slot < self.n_slots:
            raise SlotStateError(f"slot {slot} does not exist; the table has {self.n_slots} slots")

    def _require_loaned(self, slot: int) -> None:
        if slot not in self._loaned:
            raise SlotStateError(f"slot {slot} is not loaned to the producer")

    def _maybe_free(self, slot: int) -> bool:
        if slot in self._loaned or slot == self._latest or self._holders[slot]:
            return False
        self._free.append(slot)
        return True
