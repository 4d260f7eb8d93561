"""The few GStreamer C calls PyGObject cannot make: wrapping our own memory in a GstMemory.

PyGObject has no way to build a ``GstMemory`` around an existing pointer
with a destroy notification, and that is the whole trick of framebus in
GStreamer: a buffer whose memory *is* a slot of the shared segment, and a
callback the moment the last reference to it is gone (that is when the
slot may be released or reused).  ctypes provides exactly that; everything
else stays in PyGObject.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("framebus")

_lib = ctypes.CDLL(ctypes.util.find_library("gstreamer-1.0") or "libgstreamer-1.0.so.0")
_NOTIFY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

_lib.gst_memory_new_wrapped.restype = ctypes.c_void_p
_lib.gst_memory_new_wrapped.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_void_p,
    _NOTIFY,
]
_lib.gst_buffer_append_memory.restype = None
_lib.gst_buffer_append_memory.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_lib.gst_buffer_get_size.restype = ctypes.c_size_t
_lib.gst_buffer_get_size.argtypes = [ctypes.c_void_p]

MEMORY_FLAG_READONLY = 1 << 1  # GST_MEMORY_FLAG_READONLY == GST_MINI_OBJECT_FLAG_LOCK_READONLY

_callbacks: dict[int, Callable[[], None]] = {}
_callbacks_lock = threading.Lock()
_next_key = 1


def _on_free_impl(user_data: int | None) -> None:
    """Runs in whatever thread drops the last reference; must never raise into C."""
    with _callbacks_lock:
        callback = _callbacks.pop(user_data or 0, None)
    if callback is None:
        log.error("framebus: memory freed twice or unknown (key %s)", user_data)
        return
    try:
        callback()
    except Exception:
        log.exception("framebus: error while releasing a slot")


_on_free = _NOTIFY(_on_free_impl)  # kept alive for the life of the process: C holds it


def _pointer_from_hash(boxed: Any) -> int:
    return hash(boxed) & 0xFFFFFFFFFFFFFFFF


_BOXED_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p)  # PyGBoxed: PyObject_HEAD, then the gpointer


def _pointer_from_struct(boxed: Any) -> int:
    return ctypes.c_void_p.from_address(id(boxed) + _BOXED_OFFSET).value or 0


def pointer(boxed: Any) -> int:
    """The C pointer behind a PyGObject boxed value (Gst.Buffer, Gst.Memory).

    PyGObject's hash of a boxed value is its pointer (PyGObject 3.42); the
    pointer is also the first field after the object header.
    ``_self_check`` picks whichever this installation gets right, proven on
    a buffer of known size, before anything relies on it.
    """
    return _pointer_from_hash(boxed)


def append_wrapped_memory(buffer: Any, address: int, size: int, readonly: bool, on_free: Callable[[], None]) -> int:
    """Append a GstMemory over ``size`` bytes at ``address`` to ``buffer``; returns the memory pointer.

    ``on_free`` runs once, when the memory's last reference is dropped.
    """
    global _next_key
    with _callbacks_lock:
        key = _next_key
        _next_key += 1
        _callbacks[key] = on_free
    flags = MEMORY_FLAG_READONLY if readonly else 0
    memory = _lib.gst_memory_new_wrapped(flags, address, size, 0, size, key, _on_free)
    if not memory:
        with _callbacks_lock:
            _callbacks.pop(key, None)
        raise MemoryError(f"gst_memory_new_wrapped failed for {size} bytes")
    _lib.gst_buffer_append_memory(pointer(buffer), memory)
    return int(memory)


def pending_callbacks() -> int:
    """Wrapped memories still alive: for tests that check nothing leaks."""
    with _callbacks_lock:
        return len(_callbacks)


def _self_check() -> None:
    import gi

    gi.require_version("Gst", "1.0")
    from gi.repository import Gst

    Gst.init(None)
    global pointer
    for candidate in (_pointer_from_hash, _pointer_from_struct):
        probes = [Gst.Buffer.new_allocate(None, size, None) for size in (4321, 1234)]
        if all(_lib.gst_buffer_get_size(candidate(b)) == b.get_size() for b in probes):
            pointer = candidate
            return
    raise ImportError(
        "this PyGObject exposes no C pointer of a Gst.Buffer that framebus can verify; framebus.gst cannot "
        "wrap shared memory in GStreamer buffers with it (PyGObject 3.42 as in Debian 12 works)"
    )


_self_check()
