"""A smoke run of the benchmark on tiny frames: the report must be complete and well formed.

Timing is not checked here (that is what the benchmark is for); the
structure and the counted facts are: both systems measured, framebus copies
no pixels when upstream writes into its pool, shmsink copies behind a tee.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_writes_a_complete_report(sock_dir: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "framebus.cli",
            "bench",
            "--quick",
            "--sizes",
            "160x120",
            "--scale",
            "0.2",
            "--output-dir",
            sock_dir,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(os.path.join(sock_dir, "BENCHMARKS.md")) as f:
        report = f.read()
    for heading in (
        "## Machine",
        "## Max throughput",
        "## Latency at 30 fps",
        "## How to reproduce",
        "fan-out",
        "videoconvert",
        "stopped",
    ):
        assert heading in report, heading
    assert "framebussink → framebussrc" in report and "shmsink → shmsrc" in report
    assert "gstreamer: GStreamer 1." in report
    with open(os.path.join(sock_dir, "benchmarks.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(sock_dir, "benchmarks.json")) as f:
        data = json.load(f)
    results = data["results"]
    by = {(r["system"], r["scenario"]): r for r in results}
    pair_fb, pair_shm = by[("framebus", "pair")], by[("shm", "pair")]
    for r in (pair_fb, pair_shm):
        assert r["error"] is None and r["frames"] > 0 and r["fps"] > 0 and r["producer_cpu_ms"] > 0
    assert pair_fb["copies_per_frame"] == 0.0
    fan_fb = next(r for r in results if r["system"] == "framebus" and r["scenario"].startswith("fan-out"))
    fan_shm = next(r for r in results if r["system"] == "shm" and r["scenario"].startswith("fan-out"))
    assert fan_fb["copies_per_frame"] == 0.0  # one sink, three consumers, no copy
    assert fan_shm["copies_per_frame"] == 1.0  # tee in front of shmsink: every frame copied
    latency = [r for r in results if r["scenario"] == "latency@30fps"]
    assert {r["system"] for r in latency} >= {"framebus", "shm"} and all(r["latency_us"] for r in latency)
