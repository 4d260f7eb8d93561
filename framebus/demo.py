"""``framebus demo``: several producer processes, one mixer process, a live view, a verdict.

The seed's scenario on one machine: each producer is a GStreamer pipeline
(its own ``videotestsrc`` pattern, moving) ending in ``framebussink``; the
mixer process composes all feeds into a mosaic, with ``framebussrc`` and
``compositor`` or with Python ``Subscriber``s and numpy.  Everything it
starts (processes, sockets) is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import FramebusError, ProducerGoneError
from .observer import Observer
from .procstat import CpuMeter
from .videoformat import make_layout

# Cheap patterns only (a few ms per 1080p frame), each moving, so four feeds fit a 2-core machine.
PATTERNS = [
    ("smpte", "horizontal-speed=4"),
    ("ball", "motion=wavy"),
    ("checkers-8", "horizontal-speed=3"),
    ("bar", "horizontal-speed=6 foreground-color=0xffff8000"),
    ("smpte75", "horizontal-speed=-3"),
    ("ball", "motion=sweep background-color=0xff203060"),
    ("checkers-4", "horizontal-speed=-2"),
    ("smpte100", "horizontal-speed=5"),
    ("bar", "horizontal-speed=-4 foreground-color=0xff00c0ff"),
    ("checkers-2", "horizontal-speed=1"),
    ("ball", "motion=hsweep foreground-color=0xffff0000"),
    ("smpte", "horizontal-speed=-6"),
    ("checkers-1", "horizontal-speed=4"),
    ("bar", "horizontal-speed=2 foreground-color=0xff80ff00"),
    ("smpte75", "horizontal-speed=7"),
    ("ball", "motion=wavy background-color=0xff402010"),
]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    cpu: CpuMeter
    cpu_percent: float = 0.0
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)


def _spawn(name: str, argv: list[str]) -> Proc:
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc = Proc(name, popen, CpuMeter(popen.pid))
    threading.Thread(target=proc.pump, daemon=True).start()
    threading.Thread(target=_drain, args=(popen,), daemon=True).start()
    return proc


def _drain(popen: subprocess.Popen[str]) -> None:
    assert popen.stderr is not None
    for line in popen.stderr:
        if "warning" in line.lower() or "error" in line.lower():
            sys.stderr.write(f"[{popen.pid}] {line}")


def _producer_pipeline(i: int, path: str, args: argparse.Namespace) -> list[str]:
    pattern, extra = PATTERNS[i % len(PATTERNS)]
    caps = f"video/x-raw,format={args.format},width={args.width},height={args.height},framerate={args.fps}/1"
    return [
        "videotestsrc",
        "is-live=true",
        f"pattern={pattern}",
        *extra.split(),
        "!",
        caps,
        "!",
        "framebussink",
        f"socket-path={path}",
        "slots=8",
    ]


def _connect_observers(paths: list[str], procs: list[Proc], timeout: float) -> list[Observer]:
    """Wait until every producer serves its socket (processes give no other signal that they are ready)."""
    observers: list[Observer] = []
    deadline = time.monotonic() + timeout
    for path, proc in zip(paths, procs, strict=True):
        while True:
            if proc.popen.poll() is not None:
                raise FramebusError(f"producer {proc.name} exited with status {proc.popen.returncode} before serving")
            try:
                observers.append(Observer(path))
                break
            except ProducerGoneError:
                if time.monotonic() > deadline:
                    raise FramebusError(f"producer {proc.name} did not serve {path} within {timeout} s") from None
                time.sleep(0.05)
    return observers


class View:
    """Live terminal view: rich tables in place on a TTY, a plain line a second otherwise."""

    def __init__(self, args: argparse.Namespace, tty: bool) -> None:
        self.args = args
        self.tty = tty
        self.live: Any = None
        self._last_plain = 0.0
        if tty:
            from rich.live import Live

            self.live = Live(auto_refresh=False, transient=False)
            self.live.start()

    def update(self, feeds: list[dict[str, Any]], procs: list[Proc], elapsed: float) -> None:
        if self.live is not None:
            self.live.update(self._tables(feeds, procs, elapsed), refresh=True)
            return
        if elapsed - self._last_plain < 1.0:
            return
        self._last_plain = elapsed
        parts = [
            f"feed{i}: {f['fps']:.1f} fps zc={f['zero_copy']} cp={f['copied']} drop={f['drops']} "
            f"lat={f['latency_us']:.0f}us"
            for i, f in enumerate(feeds)
        ]
        cpu = " ".join(f"{p.name}={p.cpu_percent:.0f}%" for p in procs)
        print(f"[{elapsed:5.1f}s] " + " | ".join(parts) + f" | cpu {cpu}", flush=True)

    def _tables(self, feeds: list[dict[str, Any]], procs: list[Proc], elapsed: float) -> Any:
        from rich.console import Group
        from rich.table import Table

        a = self.args
        table = Table(
            title=f"framebus demo: {a.feeds} feeds {a.width}x{a.height} {a.format} @ {a.fps} fps  "
            f"[{elapsed:.1f}/{a.seconds:.0f} s]"
        )
        for column in ("feed", "pattern", "fps", "zero-copy", "copied", "drops", "in flight", "latency"):
            table.add_column(column, justify="right")
        for i, f in enumerate(feeds):
            table.add_row(
                f"feed{i}",
                PATTERNS[i % len(PATTERNS)][0],
                f"{f['fps']:.1f}",
                str(f["zero_copy"]),
                str(f["copied"]),
                str(f["drops"]),
                str(f["in_flight"]),
                f"{f['latency_us']:.0f} µs",
            )
        cpu = Table(title="processes")
        for column in ("process", "pid", "CPU %"):
            cpu.add_column(column, justify="right")
        for p in procs:
            cpu.add_row(p.name, str(p.popen.pid), f"{p.cpu_percent:.0f}")
        return Group(table, cpu)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def run(args: argparse.Namespace) -> int:
    layout = make_layout(args.format, args.width, args.height)
    workdir = tempfile.mkdtemp(prefix="framebus-demo-", dir="/tmp")
    snapshot = args.snapshot or os.path.join(tempfile.gettempdir(), "framebus-demo.png")
    if args.output and args.output.endswith(".png"):
        snapshot = args.output
    paths = [os.path.join(workdir, f"feed{i}") for i in range(args.feeds)]
    procs: list[Proc] = []
    observers: list[Observer] = []
    view: View | None = None
    interrupted = False

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        for i, path in enumerate(paths):
            argv = [sys.executable, "-m", "framebus.cli", "launch", *_producer_pipeline(i, path, args)]
            procs.append(_spawn(f"producer{i}", argv))
        observers = _connect_observers(paths, procs, timeout=30)
        mixer_argv = [
            sys.executable,
            "-m",
            "framebus.mixer",
            *paths,
            "--width",
            str(args.width),
            "--height",
            str(args.height),
            "--fps",
            str(args.fps),
            "--seconds",
            str(args.seconds),
            "--snapshot",
            snapshot,
        ]
        if args.output and args.output.endswith(".mp4"):
            mixer_argv += ["--output", args.output]
        if args.python_consumer:
            mixer_argv.append("--python")
        mixer = _spawn("mixer", mixer_argv)
        procs.append(mixer)
        view = View(args, sys.stdout.isatty())
        start = time.monotonic()
        done: dict[str, Any] | None = None
        progress: dict[str, Any] = {"feeds": [{} for _ in paths]}
        rates = [RateMeter() for _ in paths]
        silent: set[int] = set()  # producers whose stats failed, reported once each
        cpu_totals: dict[str, float] = {}
        while done is None:
            try:
                line = mixer.lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if message.get("kind") == "done":
                    done = message
                else:
                    progress = message
                    for meter, feed in zip(rates, progress["feeds"], strict=True):
                        meter.add(float(progress["t"]), int(feed["received"]))
            if interrupted:
                mixer.popen.send_signal(signal.SIGINT)
                interrupted = False
            for p in procs:
                p.cpu_percent = p.cpu.sample()
                cpu_totals[p.name] = p.cpu.total
            feeds = []
            for i, observer in enumerate(observers):
                try:
                    stats = observer.stats()
                except (FramebusError, OSError) as exc:
                    if i not in silent:
                        silent.add(i)
                        print(f"framebus demo: producer{i} stopped answering: {exc}", file=sys.stderr)
                    stats = {"zero_copy": 0, "copied": 0, "dropped": 0, "consumers": []}
                mixed_feed = progress["feeds"][i] if i < len(progress["feeds"]) else {}
                consumers = stats.get("consumers", [])
                feeds.append(
                    {
                        "fps": rates[i].fps,
                        "zero_copy": stats["zero_copy"],
                        "copied": stats["copied"],
                        "drops": stats["dropped"] + sum(c["dropped"] for c in consumers),
                        "in_flight": sum(c["in_flight"] for c in consumers),
                        "latency_us": float(mixed_feed.get("latency_us", 0.0)),
                    }
                )
            view.update(feeds, procs, time.monotonic() - start)
        view.close()
        view = None
        final_stats = []
        for observer in observers:
            try:
                final_stats.append(observer.stats())
            except (FramebusError, OSError) as exc:
                print(f"framebus demo: no final statistics from {observer.path}: {exc}", file=sys.stderr)
                final_stats.append({})
        mixer.popen.wait(timeout=30)
        return _summarise(args, layout.size, done, final_stats, cpu_totals, snapshot, time.monotonic() - start)
    finally:
        signal.signal(signal.SIGINT, previous)
        if view is not None:
            view.close()
        for observer in observers:
            with contextlib.suppress(OSError, FramebusError):
                observer.close()
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGINT)  # producers: end of stream, then exit
        for p in procs:
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        shutil.rmtree(workdir, ignore_errors=True)


class RateMeter:
    """Frames per second over the last two seconds of (time, count) samples."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, t: float, count: int) -> None:
        self.samples.append((t, count))
        while len(self.samples) > 2 and t - self.samples[0][0] > 2.0:
            self.samples.popleft()

    @property
    def fps(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


def _summarise(
    args: argparse.Namespace,
    frame_bytes: int,
    done: dict[str, Any] | None,
    stats: list[dict[str, Any]],
    cpu_totals: dict[str, float],
    snapshot: str,
    elapsed: float,
) -> int:
    if done is None:
        print("framebus demo: the mixer ended without a result", file=sys.stderr)
        return 1
    ok = done.get("error") is None
    print()
    print(f"frames mixed: {done['mixed']}")
    zero_copy = sum(int(s.get("zero_copy", 0)) for s in stats)
    copied = sum(int(s.get("copied", 0)) for s in stats)
    received = sum(int(f["received"]) for f in done["feeds"])
    print(
        f"pixel bytes not copied: {(zero_copy + received) * frame_bytes / 1e9:.2f} GB "
        f"({zero_copy} frames written in place by producers, {received} read in place by the mixer); "
        f"copied: {copied} frames"
    )
    for i, feed in enumerate(done["feeds"]):
        s = stats[i] if i < len(stats) else {}
        consumer_drops = sum(c["dropped"] for c in s.get("consumers", []))
        good = abs(feed["fps"] - args.fps) <= 0.1 * args.fps
        ok = ok and good
        why = []
        if s.get("dropped"):
            why.append(f"{s['dropped']} dropped at the producer (every slot held)")
        if consumer_drops or feed["missed"]:
            why.append(f"{max(consumer_drops, feed['missed'])} skipped for the mixer (it held max-in-flight frames)")
        print(
            f"feed{i}: {feed['received']} frames, {feed['fps']:.1f} fps ({'ok' if good else 'OFF RATE'}); "
            + ("; ".join(why) if why else "no drops")
        )
    for name, seconds in sorted(cpu_totals.items()):
        # CPU over the whole life of the process (start-up included), against the demo's wall time.
        print(f"cpu {name}: {seconds:.2f} s ({100 * seconds / max(elapsed, 1e-9):.0f} % of one core)")
    if done.get("snapshot"):
        print(f"snapshot: {done['snapshot']}")
    if done.get("error"):
        print(f"error: {done['error']}", file=sys.stderr)
    print("demo " + ("passed: every feed at the requested rate" if ok else "FAILED: see above"))
    return 0 if ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feeds", type=int, default=4, help="producer processes (default 4, up to 16)")
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of every feed and of the mosaic")
    parser.add_argument("--fps", type=int, default=30, help="frames per second (default 30)")
    parser.add_argument("--format", default="RGBA", help="raw format of the feeds (default RGBA)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the mixer runs (default 10)")
    parser.add_argument("--output", help="FILE.mp4 (x264) or FILE.png (snapshot path)")
    parser.add_argument("--snapshot", help="where to write the PNG snapshot (default /tmp/framebus-demo.png)")
    parser.add_argument(
        "--python-consumer", action="store_true", help="mix with Python Subscribers and numpy instead of compositor"
    )


def main(args: argparse.Namespace) -> int:
    try:
        args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise FramebusError(f"--size {args.size!r} is not WIDTHxHEIGHT, e.g. 1920x1080") from None
    if not 1 <= args.feeds <= 16:
        raise FramebusError(f"--feeds {args.feeds}: choose 1 to 16")
    if args.python_consumer and args.format not in ("RGBA", "BGRA", "RGBx", "BGRx"):
        raise FramebusError("--python-consumer mixes 4-byte packed formats only: use --format RGBA")
    return run(args)
