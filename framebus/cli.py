"""The ``framebus`` command: environment setup, live statistics, and (later) the demo and benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from .errors import FramebusError


def _cmd_env(args: argparse.Namespace) -> int:
    """Print the shell lines that let gst-launch-1.0 find framebussink/framebussrc."""
    print(f'export GST_PLUGIN_PATH="{plugin_dir()}${{GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}}"')
    print(f'export PYTHONPATH="{":".join(python_path())}${{PYTHONPATH:+:$PYTHONPATH}}"')
    return 0


def plugin_dir() -> str:
    """Where the gst-python plugin loader finds framebussink.py and framebussrc.py (in python/)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "gst", "plugin")


def python_path() -> list[str]:
    """What GStreamer's embedded (system) Python needs: this package and this environment's libraries."""
    import sysconfig

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    return paths


def _format_stats(s: dict[str, Any]) -> str:
    lines = [
        f"{s['path']}  pid {s['pid']}  {s['format']} {s['width']}x{s['height']} @ {s['framerate']}  "
        f"generation {s['generation']}",
        f"slots {s['slots_free']}/{s['slots']} free ({s['slot_size']} bytes each)  published {s['published']} "
        f"(zero-copy {s['zero_copy']}, copied {s['copied']}, dropped {s['dropped']})  up {s['uptime_s']:.1f} s",
        "",
        f"{'id':>4} {'pid':>7} {'uid':>6} {'policy':>7} {'in flight':>9} {'sent':>9} {'dropped':>8} "
        f"{'released':>9}  name",
    ]
    for c in s["consumers"]:
        lines.append(
            f"{c['id']:>4} {c['pid']:>7} {c['uid']:>6} {c['policy']:>7} "
            f"{c['in_flight']:>4}/{c['max_in_flight']:<4} {c['sent']:>9} {c['dropped']:>8} {c['released']:>9}  "
            f"{c['name']}"
        )
    if not s["consumers"]:
        lines.append("   (no consumers)")
    return "\n".join(lines)


def _cmd_stat(args: argparse.Namespace) -> int:
    from .observer import Observer

    with Observer(args.path) as observer:
        previous: dict[str, Any] | None = None
        while True:
            snapshot = observer.stats()
            if previous is not None:
                dt = snapshot["uptime_s"] - previous["uptime_s"]
                snapshot["fps"] = round((snapshot["published"] - previous["published"]) / dt, 2) if dt else 0.0
            if args.json:
                print(json.dumps(snapshot), flush=True)
            else:
                if sys.stdout.isatty() and not args.once:
                    print("\x1b[H\x1b[2J", end="")
                print(_format_stats(snapshot), flush=True)
                if "fps" in snapshot:
                    print(f"\nframe rate {snapshot['fps']} fps")
            if args.once:
                return 0
            previous = snapshot
            time.sleep(args.interval)


def _cmd_launch(args: argparse.Namespace) -> int:
    """Like gst-launch-1.0, with the framebus elements registered and a clean Ctrl-C (EOS, then exit)."""
    import signal

    import framebus.gst as fgst

    fgst.register()
    from gi.repository import GLib, Gst

    description = " ".join(args.pipeline)
    try:
        pipeline = Gst.parse_launch(description)
    except GLib.Error as exc:
        print(f"framebus launch: cannot build the pipeline: {exc.message}", file=sys.stderr)
        return 2
    interrupts = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("framebus launch: interrupt, sending end-of-stream (Ctrl-C again to stop at once)", file=sys.stderr)
            pipeline.send_event(Gst.Event.new_eos())

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigint)
    bus = pipeline.get_bus()
    status = 0
    try:
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            status = 1
        while status == 0 and interrupts < 2:
            message = bus.timed_pop_filtered(100 * Gst.MSECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
            if message is None:
                continue
            if message.type == Gst.MessageType.EOS:
                break
            error, debug = message.parse_error()
            print(f"framebus launch: error from {message.src.get_name()}: {error.message}", file=sys.stderr)
            if args.verbose and debug:
                print(debug, file=sys.stderr)
            status = 1
        if status == 1:
            # Drain the bus for the error that explains a failed state change.
            message = bus.pop_filtered(Gst.MessageType.ERROR)
            if message is not None:
                print(f"framebus launch: {message.parse_error()[0].message}", file=sys.stderr)
    finally:
        pipeline.set_state(Gst.State.NULL)
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    return status


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="framebus", description="Zero-copy shared-memory video.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="print shell exports so gst-launch-1.0 finds the framebus elements")
    env.set_defaults(func=_cmd_env)

    stat = sub.add_parser("stat", help="show a running producer's consumers, slots and counters")
    stat.add_argument("path", help="the producer's socket path")
    stat.add_argument("--once", action="store_true", help="print one snapshot and exit")
    stat.add_argument("--json", action="store_true", help="machine-readable output, one JSON object a line")
    stat.add_argument("--interval", type=float, default=1.0, help="seconds between updates (default 1)")
    stat.set_defaults(func=_cmd_stat)

    launch = sub.add_parser(
        "launch", help="run a GStreamer pipeline like gst-launch-1.0, with framebussink/framebussrc available"
    )
    launch.add_argument("pipeline", nargs="+", help="pipeline description, e.g. videotestsrc ! framebussink ...")
    launch.set_defaults(func=_cmd_launch)

    demo = sub.add_parser(
        "demo",
        help="several producer processes into one mixer process, with a live view",
        description="Runs --feeds producer processes (videotestsrc ! framebussink) and one mixer process "
        "(framebussrc ! compositor, or Python Subscribers) for --seconds, shows per-feed rate, zero-copy and "
        "copied frames, drops, slots in flight, latency and CPU per process, then a summary and a PNG snapshot. "
        "Exit status 0 only if every feed reached the requested rate within 10 %%.",
    )
    from .demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="framebus against shmsink/shmsrc (and unixfd) side by side; writes docs/BENCHMARKS.md",
        description="Measures max frames/s, CPU and page faults per frame, latency at 30 fps, pixel copies, "
        "fan-out, videoconvert, a stalled consumer, many producers and 4K with shmsink's default area, for "
        "framebus and shmsink/shmsrc (and unixfdsink/unixfdsrc where GStreamer has them), in one run.",
    )
    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    try:
        result: int = args.func(args)
        return result
    except FramebusError as exc:
        print(f"framebus: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
