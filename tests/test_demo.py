"""The demo end to end: real producer processes, a real mixer process, a real PNG."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_png(path: str) -> np.ndarray:
    """Decode the demo's own PNG (8-bit, filter 0 rows, RGB) to check its pixels."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * 3)
    assert not raw[:, 0].any()
    return raw[:, 1:].reshape(height, width, 3)


@pytest.mark.parametrize("python_consumer", [False, True])
def test_demo_runs_two_feeds_and_writes_the_mosaic(sock_dir: str, python_consumer: bool) -> None:
    snapshot = os.path.join(sock_dir, "mosaic.png")
    argv = [
        sys.executable,
        "-m",
        "framebus.cli",
        "demo",
        "--feeds",
        "2",
        "--size",
        "320x240",
        "--fps",
        "20",
        "--seconds",
        "2.5",
        "--snapshot",
        snapshot,
    ]
    if python_consumer:
        argv.append("--python-consumer")
    before = set(os.listdir("/tmp"))
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "demo passed" in out.stdout
    assert "feed0:" in out.stdout and "feed1:" in out.stdout and "cpu mixer" in out.stdout
    assert f"snapshot: {snapshot}" in out.stdout
    image = _read_png(snapshot)
    assert image.shape == (240, 320, 3)
    left, right = image[:, :160], image[:, 160:]
    # feed0 is the SMPTE bars (many colours), feed1 the ball on black (mostly black, a little white).
    assert len(np.unique(left.reshape(-1, 3), axis=0)) >= 7
    assert (right < 16).all(axis=2).mean() > 0.9 and (right > 200).all(axis=2).any()
    leftovers = {n for n in set(os.listdir("/tmp")) - before if n.startswith("framebus-demo-")}
    assert not leftovers, "the demo left its socket directory behind"


def test_demo_rejects_bad_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "framebus.cli", "demo", "--size", "big"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2 and "WIDTHxHEIGHT" in out.stderr


def test_demo_cleans_up_everything_on_ctrl_c(sock_dir: str) -> None:
    snapshot = os.path.join(sock_dir, "mosaic.png")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "framebus.cli",
            "demo",
            "--feeds",
            "2",
            "--size",
            "160x120",
            "--seconds",
            "120",
            "--snapshot",
            snapshot,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()  # the first live-view line: producers and mixer are running
        assert line.startswith("["), line
        workdirs = [n for n in os.listdir("/tmp") if n.startswith("framebus-demo-")]
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_child_of(int(p), proc.pid)]
        assert len(children) >= 3  # two producers and the mixer
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert "frames mixed:" in out and os.path.exists(snapshot)
    assert not [n for n in workdirs if os.path.exists(os.path.join("/tmp", n))], "socket directory left behind"
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")], "a demo process outlived it"


def _is_child_of(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == parent
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return False
