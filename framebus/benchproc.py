"""One process of a benchmark run: a GStreamer pipeline with a timestamping probe.

The probe sits on the sink pad of the element named ``stamp`` and records
CLOCK_MONOTONIC for every buffer, in both producer and consumer processes
and for every system alike, so latency is measured the same way for
framebus, shmsink/shmsrc and unixfd.  It also notes whether each buffer's
memory came from the named allocator (how shmsink's copies are counted).
The parent reads CPU time and page faults from ``wait4``; this process
reports counts and writes its stamps to a file.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time
from typing import Any

import numpy as np


def run(args: argparse.Namespace) -> dict[str, Any]:
    import framebus.gst as fgst

    fgst.register()
    from gi.repository import Gst

    pipeline = Gst.parse_launch(args.pipeline)
    stamp = pipeline.get_by_name("stamp")
    stamps = np.zeros(max(args.count, args.expect, 1) + 16, dtype=np.int64)
    state = {"n": 0, "foreign": 0}
    window: dict[str, tuple[float, int]] = {"first": (0.0, 0), "last": (0.0, 0)}
    done = [False]

    def probe(pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        n = state["n"]
        if n < stamps.size:
            stamps[n] = time.monotonic_ns()
        state["n"] = n + 1
        # CPU and faults of the whole process over the steady window, first buffer to last: start-up
        # (interpreter, imports, negotiation) is left out for every system alike.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        window["last"] = (usage.ru_utime + usage.ru_stime, usage.ru_minflt)
        if n == 0:
            window["first"] = window["last"]
        if args.allocator:
            buffer = info.get_buffer()
            allocator = buffer.peek_memory(0).allocator if buffer.n_memory() else None
            name = allocator.get_name() if allocator is not None else ""
            if args.allocator not in (name, type(allocator).__name__ if allocator else ""):
                state["foreign"] += 1
        if args.count and n + 1 >= args.count:
            done[0] = True
        return Gst.PadProbeReturn.OK

    if stamp is not None:
        stamp.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, probe)
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    bus = pipeline.get_bus()
    error = None
    pipeline.set_state(Gst.State.PLAYING)
    print("READY", flush=True)
    deadline = time.monotonic() + args.timeout
    while not done[0] and not stop[0]:
        if time.monotonic() > deadline:
            error = f"timed out after {args.timeout:.0f} s with {state['n']} buffers"
            break
        message = bus.timed_pop_filtered(50 * Gst.MSECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
        if message is None:
            continue
        if message.type == Gst.MessageType.ERROR:
            err, _debug = message.parse_error()
            if (args.count and state["n"] < args.count) or not state["n"]:
                error = f"{message.src.get_name()}: {err.message}"
            # Otherwise the producer went away after sending frames (shmsrc reports that as an error): the end.
        break
    copied = None
    if stamp is not None and stamp.find_property("frames-copied") is not None:
        copied = int(stamp.get_property("frames-copied"))
    pipeline.set_state(Gst.State.NULL)
    n = min(state["n"], stamps.size)
    if args.stamps:
        np.save(args.stamps, stamps[:n])
    (cpu0, faults0), (cpu1, faults1) = window["first"], window["last"]
    return {
        "buffers": state["n"],
        "foreign": state["foreign"],
        "copied": copied,
        "error": error,
        "window_cpu_s": cpu1 - cpu0,
        "window_faults": faults1 - faults0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m framebus.benchproc")
    ap.add_argument("pipeline")
    ap.add_argument("--count", type=int, default=0, help="stop after this many buffers (0: at end of stream)")
    ap.add_argument("--expect", type=int, default=0, help="buffers expected, to size the stamp array")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--stamps", help="write the probe's CLOCK_MONOTONIC stamps here (.npy)")
    ap.add_argument("--allocator", help="count buffers whose memory is not from this allocator")
    args = ap.parse_args(argv)
    result = run(args)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
