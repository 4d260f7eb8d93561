"""The demo's mixer process: N framebus feeds into one mosaic.

Two implementations of the same job: GStreamer (one ``framebussrc`` per
feed into a ``compositor``) or plain Python (one ``Subscriber`` per feed,
numpy pasting the newest frame of each into the mosaic).  It reports
progress as JSON lines on stdout for ``framebus demo`` to display, and at
the end writes a PNG snapshot of the mosaic.

Run by ``framebus demo``; ``python -m framebus.mixer --help`` for use on its own.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from typing import Any

import numpy as np

from .png import write_png


def mosaic_cells(n: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of each feed's cell: a near-square grid filling the output."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cw, ch = width // cols, height // rows
    return [((i % cols) * cw, (i // cols) * ch, cw, ch) for i in range(n)]


def _emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


class _Stop:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._set)
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum: int, frame: object) -> None:
        self.requested = True


def run_gstreamer(args: argparse.Namespace) -> dict[str, Any]:
    import framebus.gst as fgst

    fgst.register()
    from gi.repository import Gst

    w, h = args.width, args.height
    cells = mosaic_cells(len(args.paths), w, h)
    pads = " ".join(
        f"sink_{i}::xpos={x} sink_{i}::ypos={y} sink_{i}::width={cw} sink_{i}::height={ch}"
        for i, (x, y, cw, ch) in enumerate(cells)
    )
    out = "fakesink sync=false async=false"
    if args.output and args.output.endswith(".mp4"):
        out = (
            f"videoconvert ! x264enc speed-preset=ultrafast tune=zerolatency ! mp4mux ! filesink location={args.output}"
        )
    feeds = " ".join(
        f"framebussrc name=feed{i} socket-path={path} max-in-flight=3 ! queue max-size-buffers=1 ! mix.sink_{i}"
        for i, path in enumerate(args.paths)
    )
    description = (
        f"compositor name=mix background=black {pads} ! "
        f"video/x-raw,format=RGBA,width={w},height={h},framerate={args.fps}/1 ! tee name=t "
        f"t. ! queue ! {out} "
        f"t. ! queue leaky=downstream max-size-buffers=1 ! appsink name=snap max-buffers=1 drop=true sync=false "
        f"{feeds}"
    )
    pipeline = Gst.parse_launch(description)
    mixed = [0]

    def count(pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        mixed[0] += 1
        return Gst.PadProbeReturn.OK

    mix = pipeline.get_by_name("mix")
    mix.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, count)
    from gi.repository import GstVideo

    for pad in mix.sinkpads:
        # Nearest-neighbour downscaling: a third of the default scaler's cost, plenty for a monitor wall.
        config = Gst.Structure.new_empty("GstVideoConverter")
        config.set_value("GstVideoConverter.resampler-method", GstVideo.VideoResamplerMethod.NEAREST)
        pad.set_property("converter-config", config)
    sources = [pipeline.get_by_name(f"feed{i}") for i in range(len(args.paths))]
    first_frame: list[tuple[float, int] | None] = [None] * len(sources)
    stop = _Stop()
    pipeline.set_state(Gst.State.PLAYING)
    bus = pipeline.get_bus()
    start = time.monotonic()
    error = None
    try:
        while not stop.requested and time.monotonic() - start < args.seconds:
            message = bus.timed_pop_filtered(int(args.interval * Gst.SECOND), Gst.MessageType.ERROR)
            if message is not None:
                err, _debug = message.parse_error()
                error = f"{message.src.get_name()}: {err.message}"
                break
            now = time.monotonic()
            feeds_state = []
            for i, src in enumerate(sources):
                received = int(src.get_property("frames-received"))
                if received and first_frame[i] is None:
                    first_frame[i] = (now, received)
                feeds_state.append(
                    {
                        "received": received,
                        "missed": int(src.get_property("frames-missed")),
                        "latency_us": round(float(src.get_property("latency-us")), 1),
                    }
                )
            _emit("progress", t=round(now - start, 2), mixed=mixed[0], feeds=feeds_state)
        end = time.monotonic()
        final = [
            {"received": int(s.get_property("frames-received")), "missed": int(s.get_property("frames-missed"))}
            for s in sources
        ]
        sample = pipeline.get_by_name("snap").emit("try-pull-sample", Gst.SECOND)
        snapshot = None
        if sample is not None and args.snapshot:
            buffer = sample.get_buffer()
            ok, info = buffer.map(Gst.MapFlags.READ)
            if ok:
                image = np.frombuffer(info.data, np.uint8)[: w * h * 4].reshape(h, w, 4)
                write_png(args.snapshot, image[:, :, :3])
                buffer.unmap(info)
                snapshot = args.snapshot
        if args.output and args.output.endswith(".mp4"):
            pipeline.send_event(Gst.Event.new_eos())
            bus.timed_pop_filtered(10 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    finally:
        pipeline.set_state(Gst.State.NULL)
    return {
        "mixed": mixed[0],
        "feeds": final,
        "snapshot": snapshot,
        "error": error,
        "first": first_frame,
        "end": end,
    }


def run_python(args: argparse.Namespace) -> dict[str, Any]:
    from .errors import ReceiveTimeout
    from .subscriber import Subscriber

    w, h = args.width, args.height
    cells = mosaic_cells(len(args.paths), w, h)
    mosaic = np.zeros((h, w, 4), np.uint8)
    subs = [
        Subscriber(path, max_in_flight=2, policy="latest", reconnect=True, name="python-mixer") for path in args.paths
    ]
    received = [0] * len(subs)
    latencies: list[list[int]] = [[] for _ in subs]
    first_frame: list[tuple[float, int] | None] = [None] * len(subs)
    stop = _Stop()
    start = time.monotonic()
    next_report = start + args.interval
    period = 1.0 / args.fps
    next_tick = start
    mixed = 0
    try:
        while not stop.requested and time.monotonic() - start < args.seconds:
            for i, sub in enumerate(subs):
                try:
                    frame = sub.receive(timeout=0)
                except ReceiveTimeout:
                    continue
                with frame:
                    received[i] += 1
                    latencies[i].append(frame.latency_ns)
                    if first_frame[i] is None:
                        first_frame[i] = (time.monotonic(), 1)
                    x, y, cw, ch = cells[i]
                    image = frame.array
                    sy, sx = max(1, image.shape[0] // ch), max(1, image.shape[1] // cw)
                    part = image[::sy, ::sx][:ch, :cw]
                    if part.ndim == 3 and part.shape[2] == 4:
                        mosaic[y : y + part.shape[0], x : x + part.shape[1]] = part
            mixed += 1
            now = time.monotonic()
            if now >= next_report:
                next_report += args.interval
                _emit(
                    "progress",
                    t=round(now - start, 2),
                    mixed=mixed,
                    feeds=[
                        {
                            "received": received[i],
                            "missed": sub.stats.missed,
                            "latency_us": round(float(np.median(latencies[i][-64:])) / 1000, 1) if latencies[i] else 0,
                        }
                        for i, sub in enumerate(subs)
                    ],
                )
            next_tick += period
            # Mixing runs at the output frame rate; a short wait here is the mixer's clock, not synchronisation.
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        snapshot = None
        if args.snapshot:
            write_png(args.snapshot, mosaic[:, :, :3])
            snapshot = args.snapshot
    finally:
        end = time.monotonic()
        final = [{"received": received[i], "missed": sub.stats.missed} for i, sub in enumerate(subs)]
        for sub in subs:
            sub.close()
    return {
        "mixed": mixed,
        "feeds": final,
        "snapshot": snapshot,
        "error": None,
        "first": first_frame,
        "end": end,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m framebus.mixer", description=__doc__)
    ap.add_argument("paths", nargs="+", help="socket paths of the feeds")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between progress lines")
    ap.add_argument("--snapshot", help="PNG file for the last mosaic")
    ap.add_argument("--output", help="also encode the mosaic to this .mp4 file")
    ap.add_argument("--python", action="store_true", help="mix with Python Subscribers and numpy")
    args = ap.parse_args(argv)
    result = run_python(args) if args.python else run_gstreamer(args)
    end = result.pop("end")
    for feed, first in zip(result["feeds"], result.pop("first"), strict=True):
        # The rate over the steady part: from the first sample that saw frames to the end.
        if first is None or end <= first[0]:
            feed["fps"] = 0.0
        else:
            feed["fps"] = round((feed["received"] - first[1]) / (end - first[0]), 2)
    _emit("done", **result)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
