"""SlotTable: when a slot is free, in which order free slots come back, and what counts as misuse."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from framebus.slot import SlotStateError, SlotTable


def free_slots(table: SlotTable) -> set[int]:
    return {s for s in range(table.n_slots) if table.is_free(s)}


def test_new_table_is_all_free():
    table = SlotTable(3)
    assert table.all_free
    assert table.n_free == 3
    assert table.latest is None
    assert free_slots(table) == {0, 1, 2}
    assert all(table.holders(s) == frozenset() for s in range(3))


@pytest.mark.parametrize("n", [0, -1])
def test_needs_a_slot(n):
    with pytest.raises(ValueError, match=str(n)):
        SlotTable(n)


def test_loans_start_at_slot_zero():
    table = SlotTable(4)
    assert [table.loan() for _ in range(4)] == [0, 1, 2, 3]
    assert table.loan() is None
    assert table.n_free == 0 and not table.all_free


def test_loaned_slot_is_not_free():
    table = SlotTable(2)
    slot = table.loan()
    assert not table.is_free(slot)
    assert table.n_free == 1
    table.cancel_loan(slot)
    assert table.is_free(slot)
    assert table.all_free


def test_latest_is_not_free_and_publish_frees_previous():
    table = SlotTable(3)
    a = table.loan()
    table.publish(a)
    assert table.latest == a
    assert not table.is_free(a)
    b = table.loan()
    assert b != a
    table.publish(b)
    assert table.latest == b
    assert table.is_free(a)
    assert not table.is_free(b)
    assert table.n_free == 2


def test_publish_keeps_previous_while_held():
    table = SlotTable(3)
    a = table.loan()
    table.publish(a)
    table.hold(a, "c1")
    table.hold(a, "c2")
    b = table.loan()
    table.publish(b)
    assert not table.is_free(a)
    assert table.holders(a) == {"c1", "c2"}
    assert table.release(a, "c1") is False
    assert not table.is_free(a)
    assert table.release(a, "c2") is True
    assert table.is_free(a)


def test_release_of_latest_does_not_free_it():
    table = SlotTable(2)
    a = table.loan()
    table.publish(a)
    table.hold(a, "c")
    assert table.release(a, "c") is False
    assert not table.is_free(a)
    table.let_go_of_latest()
    assert table.latest is None
    assert table.is_free(a)
    assert table.all_free


def test_let_go_of_latest_keeps_held_slot():
    table = SlotTable(2)
    a = table.loan()
    table.publish(a)
    table.hold(a, "c")
    table.let_go_of_latest()
    assert table.latest is None
    assert not table.is_free(a)
    assert table.release(a, "c") is True
    assert table.all_free
    table.let_go_of_latest()  # nothing to let go of: harmless
    assert table.all_free


def test_cancelled_loan_with_holder_waits_for_release():
    # A slot can be sent while loaned (the publisher holds before its state settles); cancelling
    # then must not free it under the consumer.
    table = SlotTable(2)
    a = table.loan()
    table.hold(a, "c")
    table.cancel_loan(a)
    assert not table.is_free(a)
    assert table.loan() != a
    assert table.release(a, "c") is True


def test_mru_order_after_cancel():
    table = SlotTable(4)
    a, b, c = table.loan(), table.loan(), table.loan()
    table.cancel_loan(a)
    table.cancel_loan(c)
    table.cancel_loan(b)
    # Released last is loaned first; untouched slot 3 sits under all of them.
    assert [table.loan() for _ in range(4)] == [b, c, a, 3]


def test_mru_order_after_release():
    table = SlotTable(4)
    slots = []
    for _ in range(3):
        s = table.loan()
        table.publish(s)
        table.hold(s, "c")
        slots.append(s)
    table.let_go_of_latest()
    assert table.n_free == 1  # only slot 3, never used
    for s in (slots[1], slots[0], slots[2]):
        assert table.release(s, "c") is True
    assert table.loan() == slots[2]
    assert table.loan() == slots[0]
    assert table.loan() == slots[1]
    assert table.loan() == 3
    assert table.loan() is None


def test_steady_state_reuses_the_same_two_slots():
    # One producer, one consumer releasing promptly: the cache-warm pair is all that is used.
    table = SlotTable(8)
    used = set()
    for _ in range(50):
        s = table.loan()
        used.add(s)
        previous = table.latest
        table.publish(s)
        table.hold(s, "c")
        if previous is not None:
            table.release(previous, "c")
    assert used == {0, 1}


def test_all_slots_held_returns_none():
    table = SlotTable(3)
    for _ in range(3):
        s = table.loan()
        table.publish(s)
        table.hold(s, "slow")
    # The latest is kept by the producer, the two before it by the slow consumer.
    assert table.n_free == 0
    assert table.loan() is None
    assert table.loan() is None
    assert table.release(0, "slow") is True
    assert table.loan() == 0
    assert table.loan() is None


def test_drop_consumer_releases_everything_it_held():
    table = SlotTable(4)
    for _ in range(3):
        s = table.loan()
        table.publish(s)
        table.hold(s, "a")
        table.hold(s, "b")
    # 0 and 1 held by a and b; 2 is also latest.
    assert table.drop_consumer("a", [0, 1, 2, 3]) == []
    assert table.holders(0) == {"b"}
    assert table.drop_consumer("b", [2, 1, 0]) == [1, 0]
    assert table.is_free(0) and table.is_free(1)
    assert not table.is_free(2)
    assert table.holders(2) == frozenset()
    assert table.loan() == 0  # freed last, loaned first
    # A consumer unknown to the table, or slots it does not hold: nothing happens.
    assert table.drop_consumer("nobody", range(4)) == []
    assert table.drop_consumer("a", []) == []


def test_consumers_are_any_hashable():
    table = SlotTable(2)
    s = table.loan()
    table.publish(s)
    table.hold(s, 7)
    table.hold(s, ("peer", 42))
    assert table.holders(s) == {7, ("peer", 42)}


# -- misuse


def test_cancel_or_publish_without_loan():
    table = SlotTable(2)
    with pytest.raises(SlotStateError, match="slot 0 is not loaned"):
        table.cancel_loan(0)
    with pytest.raises(SlotStateError, match="slot 1 is not loaned"):
        table.publish(1)
    s = table.loan()
    table.publish(s)
    with pytest.raises(SlotStateError):
        table.publish(s)
    with pytest.raises(SlotStateError):
        table.cancel_loan(s)
    t = table.loan()
    table.cancel_loan(t)
    with pytest.raises(SlotStateError):
        table.cancel_loan(t)
    assert table.latest == s


def test_hold_free_slot():
    table = SlotTable(2)
    with pytest.raises(SlotStateError, match="slot 1 is free"):
        table.hold(1, "c")
    assert table.holders(1) == frozenset()
    assert table.n_free == 2


def test_hold_twice():
    table = SlotTable(2)
    s = table.loan()
    table.publish(s)
    table.hold(s, "c")
    with pytest.raises(SlotStateError, match="twice"):
        table.hold(s, "c")
    assert table.holders(s) == {"c"}


def test_release_not_held():
    table = SlotTable(2)
    s = table.loan()
    table.publish(s)
    with pytest.raises(SlotStateError, match="'c' released slot 0"):
        table.release(s, "c")
    table.hold(s, "c")
    table.release(s, "c")
    with pytest.raises(SlotStateError):
        table.release(s, "c")
    with pytest.raises(SlotStateError):
        table.release(1, "c")  # a free slot


@pytest.mark.parametrize("slot", [-1, -3, 3, 100])
def test_out_of_range_slots(slot):
    table = SlotTable(3)
    for s in range(3):
        table.loan()
        table.publish(s)
        table.hold(s, "c")
    table.let_go_of_latest()
    table.release(0, "c")
    with pytest.raises(SlotStateError):
        table.hold(slot, "d")
    with pytest.raises(SlotStateError):
        table.release(slot, "c")
    with pytest.raises(SlotStateError):
        table.cancel_loan(slot)
    with pytest.raises(SlotStateError):
        table.publish(slot)
    with pytest.raises(SlotStateError):
        table.drop_consumer("c", [1, slot])  # checked before anything is dropped
    # Nothing leaked onto the real slots (slot -1 must not alias slot 2).
    assert [table.holders(s) for s in range(3)] == [frozenset(), {"c"}, {"c"}]
    assert free_slots(table) == {0}


def test_negative_slot_cannot_pin_a_free_slot():
    table = SlotTable(2)
    with pytest.raises(SlotStateError):
        table.hold(-1, "c")  # would alias free slot 1
    assert table.loan() == 0
    assert table.loan() == 1
    assert table.holders(1) == frozenset()


# -- random operations against an independent model


CONSUMERS = ("a", "b", "c")


class SlotMachine(RuleBasedStateMachine):
    """Random producer/consumer traffic; a model decides what is free and in which order."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.table: SlotTable | None = None

    @precondition(lambda self: self.table is None)
    @rule(n=st.integers(1, 5))
    def start(self, n):
        self.n = n
        self.table = SlotTable(n)
        self.loaned: set[int] = set()
        self.latest: int | None = None
        self.held: dict[int, set[str]] = {s: set() for s in range(n)}
        self.stack: list[int] = list(range(n))[::-1]  # top is the end

    # model

    def busy(self, slot: int) -> bool:
        return slot in self.loaned or slot == self.latest or bool(self.held[slot])

    def settle(self, slot: int) -> bool:
        """The model's answer to "does this event make ``slot`` free?", pushing it on top if so."""
        if self.busy(slot) or slot in self.stack:
            return False
        self.stack.append(slot)
        return True

    def started(self) -> bool:
        return self.table is not None

    # producer

    @precondition(started)
    @rule()
    def loan(self):
        slot = self.table.loan()
        if not self.stack:
            assert slot is None, f"loan() handed out slot {slot} while every slot is busy"
            return
        assert slot is not None, f"loan() returned None with slots {self.stack} free"
        assert slot not in self.loaned, f"slot {slot} loaned twice"
        assert slot != self.latest, f"the latest frame's slot {slot} was loaned out"
        assert not self.held[slot], f"slot {slot} loaned while held by {self.held[slot]}"
        assert slot == self.stack[-1], f"loan() gave {slot}, most recently freed is {self.stack[-1]}"
        self.stack.pop()
        self.loaned.add(slot)

    @precondition(lambda self: self.started() and self.loaned)
    @rule(data=st.data())
    def cancel(self, data):
        slot = data.draw(st.sampled_from(sorted(self.loaned)))
        self.table.cancel_loan(slot)
        self.loaned.discard(slot)
        self.settle(slot)

    @precondition(lambda self: self.started() and self.loaned)
    @rule(data=st.data())
    def publish(self, data):
        slot = data.draw(st.sampled_from(sorted(self.loaned)))
        self.table.publish(slot)
        self.loaned.discard(slot)
        previous, self.latest = self.latest, slot
        if previous is not None:
            self.settle(previous)

    @precondition(started)
    @rule()
    def let_go_of_latest(self):
        self.table.let_go_of_latest()
        previous, self.latest = self.latest, None
        if previous is not None:
            self.settle(previous)

    # consumers

    @precondition(started)
    @rule(data=st.data(), consumer=st.sampled_from(CONSUMERS))
    def hold(self, data, consumer):
        candidates = [s for s in range(self.n) if self.busy(s) and consumer not in self.held[s]]
        if not candidates:
            return
        slot = data.draw(st.sampled_from(candidates))
        self.table.hold(slot, consumer)
        self.held[slot].add(consumer)

    @precondition(started)
    @rule(data=st.data())
    def release(self, data):
        pairs = [(s, c) for s in range(self.n) for c in sorted(self.held[s])]
        if not pairs:
            return
        slot, consumer = data.draw(st.sampled_from(pairs))
        freed = self.table.release(slot, consumer)
        self.held[slot].discard(consumer)
        assert freed == self.settle(slot)

    @precondition(started)
    @rule(data=st.data(), consumer=st.sampled_from(CONSUMERS))
    def drop(self, data, consumer):
        slots = data.draw(st.permutations(range(self.n)))
        slots = slots[: data.draw(st.integers(0, self.n))]
        freed = self.table.drop_consumer(consumer, slots)
        expected = []
        for s in slots:
            if consumer in self.held[s]:
                self.held[s].discard(consumer)
                if self.settle(s):
                    expected.append(s)
        assert freed == expected

    # misuse never changes the state

    @precondition(started)
    @rule(slot=st.integers(-2, 6), consumer=st.sampled_from(CONSUMERS), op=st.integers(0, 3))
    def misuse(self, slot, consumer, op):
        valid_slot = 0 <= slot < self.n
        if op == 0 and not (valid_slot and slot in self.loaned):
            with pytest.raises(SlotStateError):
                self.table.cancel_loan(slot)
        elif op == 1 and not (valid_slot and slot in self.loaned):
            with pytest.raises(SlotStateError):
                self.table.publish(slot)
        elif op == 2 and not (valid_slot and self.busy(slot) and consumer not in self.held[slot]):
            with pytest.raises(SlotStateError):
                self.table.hold(slot, consumer)
        elif op == 3 and not (valid_slot and consumer in self.held[slot]):
            with pytest.raises(SlotStateError):
                self.table.release(slot, consumer)

    @invariant()
    def table_agrees_with_model(self):
        if self.table is None:
            return
        t = self.table
        assert t.latest == self.latest
        assert t.n_free == len(self.stack)
        assert t.all_free == (len(self.stack) == self.n)
        for s in range(self.n):
            assert t.holders(s) == self.held[s]
            assert t.is_free(s) == (s in self.stack)
            # The rule itself: free exactly when not loaned, not latest and held by nobody.
            assert t.is_free(s) == (not self.busy(s))


TestSlotMachine = SlotMachine.TestCase
TestSlotMachine.settings = settings(max_examples=250, stateful_step_count=60, deadline=None)
