"""A consumer process for tests.

verify: receive frames, hold each for a random time, check integrity after
holding, print a JSON summary.  hold: receive N frames, keep them, report,
then wait to be killed.  stall: attach and never read.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from framebus.errors import EndOfStream, ReceiveTimeout
from framebus.subscriber import Frame, Subscriber
from tests.patterns import check


def verify(sub: Subscriber, args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    held: list[tuple[float, int, Frame]] = []
    torn: list[str] = []
    counters: list[int] = []
    received = 0

    def settle(frame: Frame) -> None:
        problem = check(frame.buffer, frame.meta)
        if problem:
            torn.append(problem)
        frame.release()

    while args.count == 0 or received < args.count:
        now = time.monotonic()
        while held and (held[0][0] <= now or len(held) >= args.max_in_flight):
            settle(heapq.heappop(held)[2])
        try:
            frame = sub.receive(timeout=args.timeout)
        except EndOfStream:
            break
        except ReceiveTimeout:
            break
        received += 1
        counters.append(int.from_bytes(frame.meta, "little"))
        hold = rng.uniform(0, args.hold_ms) / 1000
        heapq.heappush(held, (time.monotonic() + hold, frame.seq, frame))
    while held:
        settle(heapq.heappop(held)[2])
    return {
        "received": received,
        "torn": torn[:10],
        "n_torn": len(torn),
        "in_order": counters == sorted(counters),
        "first": counters[0] if counters else None,
        "last": counters[-1] if counters else None,
        "missed": sub.stats.missed,
        "released": sub.stats.released,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--mode", choices=["verify", "hold", "stall"], default="verify")
    ap.add_argument("--policy", default="drop")
    ap.add_argument("--max-in-flight", type=int, default=4)
    ap.add_argument("--hold-ms", type=float, default=2.0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    with Subscriber(args.path, max_in_flight=args.max_in_flight, policy=args.policy) as sub:
        print(f"ATTACHED {os.getpid()}", flush=True)
        if args.mode == "verify":
            print("RESULT " + json.dumps(verify(sub, args)), flush=True)
        elif args.mode == "hold":
            frames = [sub.receive(timeout=args.timeout) for _ in range(args.count)]
            print(f"HOLDING {len(frames)}", flush=True)
            sys.stdin.read()
        else:
            print("STALLED", flush=True)
            sys.stdin.read()


if __name__ == "__main__":
    main()
