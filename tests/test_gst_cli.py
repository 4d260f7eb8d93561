"""Loading the elements the ways users do: gst-inspect/gst-launch through the plugin loader, framebus launch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from framebus import ProducerGoneError
from framebus.observer import fetch_stats
from framebus.subscriber import Subscriber

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    """The environment after `eval "$(framebus env)"`, computed by a real shell."""
    out = subprocess.run(
        ["bash", "-c", f'eval "$({sys.executable} -m framebus.cli env)" && env -0'],
        capture_output=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    env = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
    env["GST_REGISTRY"] = os.path.join(ROOT, ".venv", "gst-registry.bin")  # our own cache, never a stale one
    return env


def _wait_for_producer(path: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> dict[str, object]:
    """Until the other process serves the path (there is no event to wait on across processes)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"producer exited with {proc.returncode}"
        try:
            return fetch_stats(path)
        except (ProducerGoneError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_gst_inspect_finds_both_elements_through_the_plugin_loader() -> None:
    env = _env()
    for name, words in (
        ("framebussink", ["socket-path", "frames-zero-copy", "on-full"]),
        ("framebussrc", ["socket-path", "reconnect", "max-in-flight"]),
    ):
        out = subprocess.run(["gst-inspect-1.0", name], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        for word in words:
            assert word in out.stdout, (name, word)
        assert "should be floating" not in out.stderr


def test_gst_launch_producer_feeds_a_python_subscriber_and_exits_0_at_eos(sock_path: str) -> None:
    env = _env()
    proc = subprocess.Popen(
        [
            "gst-launch-1.0",
            "-q",
            "videotestsrc",
            "num-buffers=20",
            "pattern=solid-color",
            "foreground-color=0xff336699",
            "!",
            "video/x-raw,format=RGBA,width=64,height=48,framerate=100/1",
            "!",
            "framebussink",
            f"socket-path={sock_path}",
            "wait-for-connection=true",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with Subscriber(sock_path, reconnect=True, policy="block", max_in_flight=4) as sub:
            colours = []
            for frame in sub:
                with frame:
                    colours.append(tuple(int(v) for v in frame.array[10, 10]))
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert colours == [(0x33, 0x66, 0x99, 0xFF)] * 20
    assert not os.path.exists(sock_path)  # no stale socket left behind
    assert b"should be floating" not in err


def test_framebus_launch_stops_cleanly_on_ctrl_c(sock_path: str) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "framebus.cli",
            "launch",
            "videotestsrc",
            "is-live=true",
            "!",
            "video/x-raw,format=RGBA,width=64,height=48",
            "!",
            "framebussink",
            f"socket-path={sock_path}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        stats = _wait_for_producer(sock_path, proc)
        assert (stats["format"], stats["width"], stats["height"]) == ("RGBA", 64, 48)
        with Subscriber(sock_path) as sub:
            frame = sub.receive(timeout=10)
            assert frame.array.shape == (48, 64, 4) and np.any(frame.array)
            frame.release()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"sending end-of-stream" in err
    assert not os.path.exists(sock_path)


def test_framebus_launch_reports_a_bad_pipeline() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "framebus.cli", "launch", "nosuchelement", "!", "fakesink"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2 and "nosuchelement" in out.stderr
