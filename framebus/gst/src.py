"""framebussrc: pushes frames from a framebus producer as buffers that point into its shared memory.

Each buffer wraps the slot in place, read-only, in this process's single
mapping of the segment; when the last reference to that memory is dropped,
wherever downstream that happens (a queue, one branch of a tee, a
compositor, an appsink that kept the sample), the slot is released to the
producer at once.  Caps come from the producer: no capsfilter is needed.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from gi.repository import GLib, GObject, Gst, GstBase

from .. import protocol as p
from ..errors import EndOfStream, FramebusError, Interrupted, ProducerGoneError, ReceiveTimeout
from ..subscriber import Frame, Subscriber
from . import ffi
from .buffers import add_video_meta, set_buffer_flags
from .caps import template_caps
from .messages import post_error

log = logging.getLogger("framebus")


class FramebusSrc(GstBase.BaseSrc):
    __gtype_name__ = "GstFramebusSrc"  # element names read framebussrc0, not the Python module path
    __gstmetadata__ = (
        "framebus source",
        "Source/Video",
        "Receives raw video from a framebus producer in another process; buffers point into its shared "
        "memory (read-only) and are released to it when the last reference is dropped",
        "framebus developers",
    )
    __gsttemplates__ = (Gst.PadTemplate.new("src", Gst.PadDirection.SRC, Gst.PadPresence.ALWAYS, template_caps()),)
    __gproperties__ = {
        "socket-path": (str, "Socket path", "The producer's Unix socket path", None, GObject.ParamFlags.READWRITE),
        "is-live": (
            bool,
            "Is live",
            "Act as a live source (timestamps from the producer's clock)",
            True,
            GObject.ParamFlags.READWRITE,
        ),
        "reconnect": (
            bool,
            "Reconnect",
            "Wait for a producer that is missing or gone instead of ending",
            True,
            GObject.ParamFlags.READWRITE,
        ),
        "max-in-flight": (
            int,
            "Max in flight",
            "Frames this source may hold at once",
            1,
            p.MAX_IN_FLIGHT,
            4,
            GObject.ParamFlags.READWRITE,
        ),
        "policy": (
            str,
            "Policy",
            "When max-in-flight frames are held: 'drop', 'block' (lossless) or 'latest'",
            "drop",
            GObject.ParamFlags.READWRITE,
        ),
        "frames-received": (
            GObject.TYPE_UINT64,
            "Frames received",
            "Frames received",
            0,
            GLib.MAXUINT64,
            0,
            GObject.ParamFlags.READABLE,
        ),
        "frames-missed": (
            GObject.TYPE_UINT64,
            "Frames missed",
            "Frames the producer skipped us for",
            0,
            GLib.MAXUINT64,
            0,
            GObject.ParamFlags.READABLE,
        ),
        "latency-us": (
            float,
            "Latency",
            "Median publish-to-receive time of the last 64 frames, in microseconds",
            0.0,
            1e12,
            0.0,
            GObject.ParamFlags.READABLE,
        ),
    }

    def __init__(self) -> None:
        super().__init__()
        self._socket_path: str | None = None
        self._is_live = True
        self._reconnect = True
        self._max_in_flight = 4
        self._policy = "drop"
        self._sub: Subscriber | None = None
        self._caps: Gst.Caps | None = None
        self._stream_key: tuple[int, int] | None = None  # (connection epoch, generation) of the caps sent
        self._frame_duration = 0
        self._latencies: collections.deque[int] = collections.deque(maxlen=64)
        self._clock: Gst.Clock | None = None
        self._clock_is_monotonic = False
        self.set_format(Gst.Format.TIME)
        self.set_live(True)

    # ------------------------------------------------------------------ properties

    def do_get_property(self, prop: GObject.ParamSpec) -> Any:
        if prop.name == "frames-received":
            return self._sub.stats.received if self._sub else 0
        if prop.name == "frames-missed":
            return self._sub.stats.missed if self._sub else 0
        if prop.name == "latency-us":
            recent = sorted(self._latencies)
            return recent[len(recent) // 2] / 1000 if recent else 0.0
        return getattr(self, "_" + prop.name.replace("-", "_"))

    def do_set_property(self, prop: GObject.ParamSpec, value: Any) -> None:
        if prop.name == "policy" and value not in ("drop", "block", "latest"):
            raise ValueError(f"framebussrc policy must be 'drop', 'block' or 'latest', not {value!r}")
        setattr(self, "_" + prop.name.replace("-", "_"), value)
        if prop.name == "is-live":
            self.set_live(bool(value))

    # ------------------------------------------------------------------ lifecycle

    def do_start(self) -> bool:
        if not self._socket_path:
            post_error(
                self,
                Gst.ResourceError.SETTINGS,
                "framebussrc: socket-path is not set",
                "set socket-path to the producer's socket",
            )
            return False
        try:
            self._sub = Subscriber(
                self._socket_path,
                max_in_flight=self._max_in_flight,
                policy=self._policy,  # type: ignore[arg-type]
                reconnect=self._reconnect,
                name=self.get_name(),
            )
        except FramebusError as exc:
            post_error(self, Gst.ResourceError.NOT_FOUND, f"framebussrc {self._socket_path}: {exc}", str(exc))
            return False
        self._caps = None
        self._stream_key = None
        return True

    def do_stop(self) -> bool:
        if self._sub is not None:
            self._sub.close()  # buffers still downstream keep their mapping until freed
            self._sub = None
        return True

    def do_unlock(self) -> bool:
        if self._sub is not None:
            self._sub.interrupt()
        return True

    def do_unlock_stop(self) -> bool:
        if self._sub is not None:
            self._sub.clear_interrupt()
        return True

    def do_is_seekable(self) -> bool:
        return False

    # ------------------------------------------------------------------ caps

    def do_negotiate(self) -> bool:
        # The producer decides the caps; they are set when its first frame (or a new generation) arrives.
        return True

    def do_get_caps(self, filter: Gst.Caps | None) -> Gst.Caps:
        # Called during GObject construction too, before __init__ has set _caps.
        current = getattr(self, "_caps", None)
        caps = current if current is not None else template_caps()
        return caps.intersect(filter) if filter is not None else caps

    def do_gst_base_src_query(self, query: Gst.Query) -> bool:
        if query.type == Gst.QueryType.LATENCY:
            # A frame is complete when published: one frame of latency at most, the producer's own excluded.
            query.set_latency(self._is_live, self._frame_duration, Gst.CLOCK_TIME_NONE)
            return True
        return GstBase.BaseSrc.do_query(self, query)

    # ------------------------------------------------------------------ frames

    def do_create(self, offset: int, size: int, buf: Gst.Buffer | None = None) -> tuple[Gst.FlowReturn, Any]:
        sub = self._sub
        if sub is None:
            return Gst.FlowReturn.FLUSHING, None
        while True:
            try:
                frame = sub.receive(timeout=None)
                break
            except Interrupted:
                return Gst.FlowReturn.FLUSHING, None
            except EndOfStream:
                if not self._reconnect:
                    return Gst.FlowReturn.EOS, None
                log.info("%s: producer at %s ended its stream; waiting for more", self.get_name(), self._socket_path)
            except (ProducerGoneError, ReceiveTimeout) as exc:
                post_error(self, Gst.ResourceError.READ, f"framebussrc {self._socket_path}: {exc}", str(exc))
                return Gst.FlowReturn.ERROR, None
            except FramebusError as exc:
                post_error(self, Gst.StreamError.FAILED, f"framebussrc {self._socket_path}: {exc}", str(exc))
                return Gst.FlowReturn.ERROR, None
        key = (sub.stats.reconnects, frame.generation)
        if key != self._stream_key and not self._announce(frame):
            frame.release()
            return Gst.FlowReturn.NOT_NEGOTIATED, None
        self._stream_key = key
        self._latencies.append(frame.latency_ns)
        return Gst.FlowReturn.OK, self._wrap(frame)

    def _announce(self, frame: Frame) -> bool:
        """New producer or new generation: send its caps downstream."""
        caps = Gst.Caps.from_string(frame.caps) if frame.caps else None
        if caps is None or not caps.is_fixed():
            fps = frame.info.framerate
            caps = Gst.Caps.from_string(
                f"video/x-raw, format={frame.format}, width={frame.width}, height={frame.height}"
                + (f", framerate={fps.numerator}/{fps.denominator}" if fps else ", framerate=0/1")
            )
        fps = frame.info.framerate
        self._frame_duration = int(Gst.SECOND / fps) if fps else 0
        self._caps = caps
        if not self.set_caps(caps):
            post_error(
                self,
                Gst.CoreError.NEGOTIATION,
                f"framebussrc {self._socket_path}: downstream refuses the producer's caps {caps.to_string()}",
                "put videoconvert/videoscale after framebussrc",
            )
            return False
        return True

    def _wrap(self, frame: Frame) -> Gst.Buffer:
        buffer = Gst.Buffer.new()
        ffi.append_wrapped_memory(buffer, frame.address, frame.size, True, frame.release)
        if frame.layout is not None:
            add_video_meta(buffer, frame.layout)
        buffer.pts = self._timestamp(frame)
        buffer.dts = Gst.CLOCK_TIME_NONE
        buffer.duration = frame.duration if frame.duration is not None else Gst.CLOCK_TIME_NONE
        buffer.offset = frame.seq
        if frame.flags:
            set_buffer_flags(buffer, frame.flags)
        return buffer

    def _timestamp(self, frame: Frame) -> int:
        """Producer time to this pipeline's running time.

        Both sides stamp CLOCK_MONOTONIC; GStreamer's default system clock is
        that same clock, so the publish moment maps exactly.  Non-live:
        the producer's own PTS.
        """
        if not self._is_live:
            return frame.pts if frame.pts is not None else Gst.CLOCK_TIME_NONE
        clock = self.get_clock()
        if clock is None:
            return Gst.CLOCK_TIME_NONE
        base = self.get_base_time()
        if clock is not self._clock:  # checked once per clock, not per frame
            self._clock = clock
            self._clock_is_monotonic = (
                isinstance(clock, Gst.SystemClock) and clock.props.clock_type == Gst.ClockType.MONOTONIC
            )
        if self._clock_is_monotonic:
            running = frame.publish_ns - base
        else:
            running = clock.get_time() - base - (time.monotonic_ns() - frame.publish_ns)
        return max(0, int(running))


GObject.type_register(FramebusSrc)
