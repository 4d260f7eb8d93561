"""The buffer pool framebussink offers upstream: every buffer's memory is a shared-memory slot.

Why a pool of our own: the allocation query lets a sink offer a pool, and
an upstream element that takes it (videotestsrc, videoconvert, videoscale,
a queue passes it on) writes each frame straight into a slot.  The sink
then publishes the slot without copying.

Why every buffer is used once: GStreamer's pool recycles a buffer as soon
as its last reference is gone, but consumers in other processes may still
be reading that slot.  The sink marks each rendered buffer
``GST_BUFFER_FLAG_TAG_MEMORY``, so the pool frees it instead of reusing it;
the next ``alloc_buffer`` lends the slot the publisher chooses (free, and
most recently released first).  The slot itself is held by the buffer's
memory until that memory is freed (``Publisher.loan(keep=True)``).

Only ``alloc_buffer`` is overridden: PyGObject mishandles chaining up to
the vfuncs that take a buffer with full transfer.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from gi.repository import Gst

from ..errors import FramebusError, Interrupted, SlotsExhaustedError
from ..publisher import LoanedFrame, Publisher
from . import ffi
from .buffers import add_video_meta

log = logging.getLogger("framebus")


class SlotPool(Gst.BufferPool):
    """Buffers whose memory is a loaned slot of ``publisher`` (see module docstring)."""

    def __init__(self, publisher: Publisher, loans: dict[int, LoanedFrame], on_error: Callable[[str], None]) -> None:
        super().__init__()
        self._publisher = weakref.ref(publisher)
        self._on_error = on_error  # the sink posts it: a pool has no bus of its own
        # GstMemory pointer -> the loan behind it, shared with the sink: how render recognises a slot.
        self.loans = loans
        # GstMemory pointers of the ordinary-memory buffers lent when no slot was free.
        self.fallbacks: set[int] = set()

    def do_flush_start(self) -> None:
        # Upstream is flushing: a thread waiting in alloc_buffer for a slot must give up now.
        pub = self._publisher()
        if pub is not None:
            pub.interrupt_waits()

    def do_flush_stop(self) -> None:
        pass  # nothing to undo: interrupt_waits only ends the waits already in progress

    def do_alloc_buffer(self, params: Any) -> tuple[Gst.FlowReturn, Gst.Buffer | None]:
        pub = self._publisher()
        if pub is None:
            return Gst.FlowReturn.FLUSHING, None
        try:
            frame = pub.loan(keep=True)
        except Interrupted:
            return Gst.FlowReturn.FLUSHING, None  # a flush or a state change ended the wait for a slot
        except SlotsExhaustedError as exc:
            # on-full=block waited block-timeout in vain: say so, rather than let upstream pause silently.
            self._on_error(str(exc))
            return Gst.FlowReturn.ERROR, None
        except FramebusError as exc:
            log.debug("framebus pool: no slot to lend: %s", exc)
            return Gst.FlowReturn.FLUSHING, None
        layout = frame.layout
        if frame.dropped:
            # Every slot is held by consumers: hand out ordinary memory, recognisable in render (the
            # sink then copies it if a slot has come free, else drops it) and forgotten when freed.
            scratch = np.empty(layout.size, dtype=np.uint8)
            buffer = Gst.Buffer.new()
            fallback: list[int] = []

            def forget() -> None:
                self.fallbacks.discard(fallback[0])
                del scratch_ref[:]

            scratch_ref = [scratch]
            fallback.append(ffi.append_wrapped_memory(buffer, int(scratch.ctypes.data), layout.size, False, forget))
            self.fallbacks.add(fallback[0])
            add_video_meta(buffer, layout)
            return Gst.FlowReturn.OK, buffer
        buffer = Gst.Buffer.new()
        key: list[int] = []

        def on_free() -> None:
            # The last reference to the slot's memory is gone: only now may the slot be reused.
            self.loans.pop(key[0], None)
            frame.release()

        memory = ffi.append_wrapped_memory(buffer, frame.address, layout.size, False, on_free)
        key.append(memory)
        self.loans[memory] = frame
        add_video_meta(buffer, layout)
        return Gst.FlowReturn.OK, buffer
