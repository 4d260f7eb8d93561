"""framebussink: publishes raw video into framebus shared memory, zero-copy when upstream lets it.

Upstream is offered a pool whose buffers are slots (``pool.py``) plus
GstVideoMeta support, so elements that honour the allocation query write
straight into shared memory and ``render`` only sends a ~100-byte message.
A buffer from anywhere else is copied into a free slot, counted in
``frames-copied``, and the first such copy is explained at WARNING level.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from gi.repository import GLib, GObject, Gst, GstBase, GstVideo

from .. import protocol as p
from ..errors import FramebusError, Interrupted
from ..publisher import LoanedFrame, Publisher
from ..videoformat import FrameLayout
from ..views import frame_planes
from . import ffi
from .buffers import frame_flags
from .caps import framerate, layout_from_info, layout_from_meta, template_caps, video_info
from .messages import post_error
from .pool import SlotPool

log = logging.getLogger("framebus")

NONE = Gst.CLOCK_TIME_NONE


def _time(value: int) -> int | None:
    return None if value == NONE else int(value)


class FramebusSink(GstBase.BaseSink):
    __gtype_name__ = "GstFramebusSink"  # element names read framebussink0, not the Python module path
    __gstmetadata__ = (
        "framebus sink",
        "Sink/Video",
        "Publishes raw video in shared memory to framebus consumers in other processes, without copying "
        "when upstream writes into the offered pool",
        "framebus developers",
    )
    __gsttemplates__ = (Gst.PadTemplate.new("sink", Gst.PadDirection.SINK, Gst.PadPresence.ALWAYS, template_caps()),)
    __gproperties__ = {
        "socket-path": (
            str,
            "Socket path",
            "Unix socket path consumers connect to",
            None,
            GObject.ParamFlags.READWRITE,
        ),
        "slots": (
            int,
            "Slots",
            "Shared-memory frame slots: upstream may hold half, the rest serve the newest frame and consumers",
            3,
            p.MAX_SLOTS,
            12,
            GObject.ParamFlags.READWRITE,
        ),
        "on-full": (
            str,
            "On full",
            "When every slot is held: 'drop' the frame (never block) or 'block' up to block-timeout",
            "drop",
            GObject.ParamFlags.READWRITE,
        ),
        "block-timeout": (
            float,
            "Block timeout",
            "Seconds on-full=block waits for a slot",
            0.0,
            3600.0,
            5.0,
            GObject.ParamFlags.READWRITE,
        ),
        "wait-for-connection": (
            bool,
            "Wait for connection",
            "Hold the first frame until a consumer is attached",
            False,
            GObject.ParamFlags.READWRITE,
        ),
        "socket-mode": (
            int,
            "Socket mode",
            "Permission bits of the socket file",
            0,
            0o777,
            0o660,
            GObject.ParamFlags.READWRITE,
        ),
        "frames-zero-copy": (
            GObject.TYPE_UINT64,
            "Zero-copy frames",
            "Frames published in place",
            0,
            GLib.MAXUINT64,
            0,
            GObject.ParamFlags.READABLE,
        ),
        "frames-copied": (
            GObject.TYPE_UINT64,
            "Copied frames",
            "Frames upstream wrote outside the pool",
            0,
            GLib.MAXUINT64,
            0,
            GObject.ParamFlags.READABLE,
        ),
        "frames-dropped": (
            GObject.TYPE_UINT64,
            "Dropped frames",
            "Frames dropped because every slot was held",
            0,
            GLib.MAXUINT64,
            0,
            GObject.ParamFlags.READABLE,
        ),
        "consumers": (int, "Consumers", "Consumers attached now", 0, 1 << 30, 0, GObject.ParamFlags.READABLE),
    }

    def __init__(self) -> None:
        super().__init__()
        self._socket_path: str | None = None
        self._slots = 12
        self._on_full = "drop"
        self._block_timeout = 5.0
        self._wait_for_connection = False
        self._socket_mode = 0o660
        self._pub: Publisher | None = None
        self._layout: FrameLayout | None = None
        self._caps_string = ""
        self._loans: dict[int, LoanedFrame] = {}
        self._pools: list[SlotPool] = []
        self._warned_copy = False
        self._flushing = False
        self._prerolled = 0  # the buffer published at preroll, which render must not publish again
        self._eos_probe = self.sinkpad.add_probe(Gst.PadProbeType.EVENT_DOWNSTREAM, self._on_event)

    # ------------------------------------------------------------------ properties

    def do_get_property(self, prop: GObject.ParamSpec) -> Any:
        name = prop.name
        if name in ("frames-zero-copy", "frames-copied", "frames-dropped", "consumers"):
            if self._pub is None:
                return 0
            stats = self._pub.stats
            return {
                "frames-zero-copy": stats.zero_copy,
                "frames-copied": stats.copied,
                "frames-dropped": stats.dropped,
                "consumers": len(stats.consumers),
            }[name]
        return getattr(self, "_" + name.replace("-", "_"))

    def do_set_property(self, prop: GObject.ParamSpec, value: Any) -> None:
        name = prop.name
        if name == "on-full" and value not in ("drop", "block"):
            raise ValueError(f"framebussink on-full must be 'drop' or 'block', not {value!r}")
        setattr(self, "_" + name.replace("-", "_"), value)

    # ------------------------------------------------------------------ lifecycle

    def do_start(self) -> bool:
        if not self._socket_path:
            self._error(Gst.ResourceError.SETTINGS, "socket-path is not set", "set socket-path=/some/path")
            return False
        self._flushing = False
        return True

    def do_stop(self) -> bool:
        if self._pub is not None:
            self._pub.close()  # the mapping stays until the last slot buffer is freed
            self._pub = None
        for pool in self._pools:
            pool.set_active(False)
        self._pools.clear()
        self._layout = None
        return True

    def do_unlock(self) -> bool:
        self._flushing = True
        if self._pub is not None:
            # Ends waits for a slot (on-full=block, a 'block' consumer) in render and in the pool.
            self._pub.interrupt_waits()
        return True

    def do_unlock_stop(self) -> bool:
        self._flushing = False
        return True

    def do_get_caps(self, filter: Gst.Caps | None) -> Gst.Caps:
        # Our order first, so an upstream free to choose picks RGBA rather than its own first format.
        caps = template_caps()
        return caps.intersect_full(filter, Gst.CapsIntersectMode.FIRST) if filter is not None else caps

    def do_set_caps(self, caps: Gst.Caps) -> bool:
        try:
            info = video_info(caps)
            layout = layout_from_info(info)
        except FramebusError as exc:
            self._error(Gst.StreamError.FORMAT, str(exc), caps.to_string())
            return False
        caps_string = caps.to_string()
        if self._pub is not None and layout == self._layout and caps_string == self._caps_string:
            return True
        fps = framerate(info)
        assert self._socket_path is not None
        try:
            if self._pub is None:
                self._pub = Publisher(
                    self._socket_path,
                    layout.format,
                    layout.width,
                    layout.height,
                    framerate=fps,
                    slots=self._slots,
                    on_full=self._on_full,  # type: ignore[arg-type]
                    block_timeout=self._block_timeout,
                    socket_mode=self._socket_mode,
                    strides=layout.strides,
                    caps=caps_string,
                    name=self.get_name(),
                )
            else:
                self._pub.set_format(layout.format, layout.width, layout.height, fps, layout.strides, caps_string)
        except (FramebusError, OSError) as exc:
            self._error(Gst.ResourceError.OPEN_WRITE, f"cannot publish at {self._socket_path}: {exc}", str(exc))
            return False
        self._layout = layout
        self._caps_string = caps_string
        return True

    def do_propose_allocation(self, query: Gst.Query) -> bool:
        caps, _need_pool = query.parse_allocation()
        query.add_allocation_meta(GstVideo.VideoMeta.__gtype__, None)
        if self._pub is None or caps is None:
            return True
        layout = layout_from_info(video_info(caps))
        if layout != self._layout:
            return True  # caps for a format we do not publish yet: no pool to offer
        pool = SlotPool(self._pub, self._loans, self._pool_error)
        config = pool.get_config()
        # Upstream (a queue included) may hold half the slots; the rest serve the newest frame and consumers.
        max_buffers = max(2, self._slots // 2)
        Gst.BufferPool.config_set_params(config, caps, layout.size, 0, max_buffers)
        Gst.BufferPool.config_add_option(config, GstVideo.BUFFER_POOL_OPTION_VIDEO_META)
        if not pool.set_config(config):
            return True
        query.add_allocation_pool(pool, layout.size, 0, max_buffers)
        self._pools.append(pool)
        return True

    # ------------------------------------------------------------------ frames

    def do_preroll(self, buffer: Gst.Buffer) -> Gst.FlowReturn:
        """Publish the preroll frame, as a display sink shows it.

        Otherwise a pipeline holding both this sink and a framebussrc reading
        from it never leaves PAUSED: the source's downstream waits for a frame
        that this sink would only publish in PLAYING.
        """
        result = self._publish(buffer)
        if result == Gst.FlowReturn.OK:
            self._prerolled = ffi.pointer(buffer)
        return result

    def do_render(self, buffer: Gst.Buffer) -> Gst.FlowReturn:
        if self._prerolled and ffi.pointer(buffer) == self._prerolled:
            self._prerolled = 0  # rendered once already, at preroll
            return Gst.FlowReturn.OK
        self._prerolled = 0
        return self._publish(buffer)

    def _publish(self, buffer: Gst.Buffer) -> Gst.FlowReturn:
        pub, layout = self._pub, self._layout
        if pub is None or layout is None:
            self._error(Gst.CoreError.NEGOTIATION, "no caps before the first buffer", "")
            return Gst.FlowReturn.NOT_NEGOTIATED
        if self._wait_for_connection and not pub.consumer_count:
            while not pub.wait_until(lambda s: bool(s.consumers), timeout=0.1):
                if self._flushing:
                    return Gst.FlowReturn.FLUSHING
        pts, dts, duration = _time(buffer.pts), _time(buffer.dts), _time(buffer.duration)
        flags = frame_flags(buffer)
        memory = ffi.pointer(buffer.peek_memory(0)) if buffer.n_memory() == 1 else 0
        loan = self._loans.get(memory)
        if loan is not None and not loan.published:
            meta = GstVideo.buffer_get_video_meta(buffer)
            frame_layout = layout_from_meta(meta, layout) if meta is not None else layout
            try:
                loan.publish(pts=pts, dts=dts, duration=duration, flags=flags, layout=frame_layout)
            except FramebusError as exc:
                self._error(Gst.StreamError.FAILED, f"cannot publish a frame: {exc}", "")
                return Gst.FlowReturn.ERROR
            # Never let the pool hand this buffer out again: consumers may read its slot for a while.
            buffer.set_flags(Gst.BufferFlags.TAG_MEMORY)
            return Gst.FlowReturn.OK
        ours = any(memory in pool.fallbacks for pool in self._pools)
        return self._render_copy(pub, layout, buffer, pts, dts, duration, flags, foreign=not ours)

    def _render_copy(
        self,
        pub: Publisher,
        layout: FrameLayout,
        buffer: Gst.Buffer,
        pts: int | None,
        dts: int | None,
        duration: int | None,
        flags: p.FrameFlags,
        foreign: bool,
    ) -> Gst.FlowReturn:
        if foreign and not self._warned_copy:
            self._warned_copy = True
            peer = self.sinkpad.get_peer()
            upstream = peer.get_parent_element().get_name() if peer and peer.get_parent_element() else "upstream"
            log.warning(
                "%s: %s did not write into the shared-memory pool; copying every such frame (see frames-copied). "
                "Elements that honour the allocation query (videotestsrc, videoconvert, videoscale, queue) avoid it",
                self.get_name(),
                upstream,
            )
        meta = GstVideo.buffer_get_video_meta(buffer)
        source_layout = layout_from_meta(meta, layout) if meta is not None else layout
        ok, info = buffer.map(Gst.MapFlags.READ)
        if not ok:
            self._error(Gst.StreamError.FAILED, "cannot map an incoming buffer", "")
            return Gst.FlowReturn.ERROR
        try:
            data = np.frombuffer(info.data, dtype=np.uint8)
            if source_layout.size > data.size:
                self._error(
                    Gst.StreamError.FAILED,
                    f"buffer of {data.size} bytes is smaller than a {layout.format} {layout.width}x{layout.height} "
                    f"frame ({source_layout.size} bytes)",
                    "",
                )
                return Gst.FlowReturn.ERROR
            planes = frame_planes(int(data.ctypes.data), source_layout, False, data)
            try:
                pub.publish(list(planes), pts=pts, dts=dts, duration=duration, flags=flags, timeout=self._block_timeout)
            except Interrupted:
                return Gst.FlowReturn.FLUSHING
            except FramebusError as exc:
                self._error(Gst.StreamError.FAILED, f"cannot publish a frame: {exc}", "")
                return Gst.FlowReturn.ERROR
            del planes, data
        finally:
            buffer.unmap(info)
        return Gst.FlowReturn.OK

    def _on_event(self, pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        event = info.get_event()
        if event is not None and event.type == Gst.EventType.EOS and self._pub is not None:
            try:
                self._pub.end_of_stream()
            except FramebusError as exc:
                log.warning("%s: end of stream not delivered: %s", self.get_name(), exc)
        return Gst.PadProbeReturn.OK

    def _pool_error(self, text: str) -> None:
        self._error(Gst.ResourceError.BUSY, f"no free slot for upstream: {text}", "raise slots or block-timeout")

    def _error(self, code: Any, text: str, debug: str) -> None:
        where = f"framebussink {self._socket_path}" if self._socket_path else "framebussink"
        post_error(self, code, f"{where}: {text}", debug)


GObject.type_register(FramebusSink)
