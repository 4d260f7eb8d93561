"""A producer process for tests: publishes pattern frames (see tests/patterns.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from framebus.publisher import Publisher
from tests.patterns import fill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--format", default="RGBA")
    ap.add_argument("--size", default="32x32")
    ap.add_argument("--frames", type=int, default=100, help="0: until stdin closes")
    ap.add_argument("--fps", type=float, default=0.0)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--wait-consumers", type=int, default=0)
    ap.add_argument("--hold-open", action="store_true", help="after the frames, wait for stdin to close")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    w, h = (int(v) for v in args.size.split("x"))
    with Publisher(args.path, args.format, w, h, framerate=args.fps or None, slots=args.slots) as pub:
        print(f"READY {os.getpid()}", flush=True)
        if args.wait_consumers:
            pub.wait_for_consumers(args.wait_consumers, timeout=30)
        period = 1.0 / args.fps if args.fps else 0.0
        start = time.monotonic()
        n = 0
        while args.frames == 0 or n < args.frames:
            with pub.loan() as frame:
                meta = fill(frame.buffer, n)
                frame.publish(pts=n * 1_000_000, meta=meta)
            n += 1
            if period:
                delay = start + n * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        print("PUBLISHED " + json.dumps(pub.stats.to_dict()), flush=True)
        if args.hold_open:
            sys.stdin.read()


if __name__ == "__main__":
    main()
