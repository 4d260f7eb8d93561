"""The framebus command against a live producer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from framebus.observer import fetch_stats
from framebus.publisher import Publisher
from framebus.subscriber import Subscriber


def _framebus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "framebus.cli", *args], capture_output=True, text=True, timeout=60)


def test_stats_over_the_protocol_describe_consumers(sock_path: str) -> None:
    with Publisher(sock_path, "RGBA", 32, 16, framerate=25) as pub, Subscriber(sock_path, max_in_flight=3) as sub:
        assert pub.wait_for_consumers(1, timeout=5)
        for _ in range(5):
            pub.publish(np.zeros((16, 32, 4), np.uint8))
        held = [sub.receive(timeout=5) for _ in range(3)]
        stats = fetch_stats(sock_path)
        assert (stats["format"], stats["width"], stats["height"], stats["framerate"]) == ("RGBA", 32, 16, "25/1")
        assert stats["published"] == 5 and stats["copied"] == 5
        (c,) = stats["consumers"]  # the observer itself is not a consumer
        assert (c["pid"], c["policy"], c["in_flight"], c["sent"], c["dropped"]) == (os.getpid(), "drop", 3, 3, 2)
        for f in held:
            f.release()


def test_stat_command_once_and_json(sock_path: str) -> None:
    with Publisher(sock_path, "GRAY8", 8, 8) as pub, Subscriber(sock_path, name="viewer"):
        assert pub.wait_for_consumers(1, timeout=5)
        pub.publish(np.zeros((8, 8), np.uint8))
        text = _framebus("stat", sock_path, "--once")
        assert text.returncode == 0, text.stderr
        assert "GRAY8 8x8" in text.stdout and "viewer" in text.stdout
        as_json = _framebus("stat", sock_path, "--once", "--json")
        snapshot = json.loads(as_json.stdout)
        assert snapshot["published"] == 1 and snapshot["consumers"][0]["name"] == "viewer"


def test_stat_on_a_missing_producer_says_so(sock_dir: str) -> None:
    out = _framebus("stat", os.path.join(sock_dir, "none"), "--once")
    assert out.returncode == 2 and "no producer is serving" in out.stderr


def test_env_prints_plugin_and_python_paths() -> None:
    out = _framebus("env")
    assert out.returncode == 0
    assert "GST_PLUGIN_PATH=" in out.stdout and "PYTHONPATH=" in out.stdout


def test_stats_of_very_many_consumers_stay_valid_json_within_the_limit() -> None:
    from framebus import protocol as p
    from framebus.publisher import _stats_json

    consumer = {
        "id": 1,
        "pid": 1,
        "uid": 0,
        "name": "x" * 200,
        "policy": "drop",
        "max_in_flight": 4,
        "in_flight": 0,
        "sent": 0,
        "dropped": 0,
        "released": 0,
    }
    stats = {"path": "/tmp/x", "published": 7, "consumers": [dict(consumer, id=i) for i in range(1000)]}
    text = _stats_json(stats)
    assert len(text.encode()) <= p.MAX_STATS
    parsed = json.loads(text)
    assert parsed["published"] == 7 and 0 < len(parsed["consumers"]) < 1000
    assert parsed["consumers_omitted"] == 1000 - len(parsed["consumers"])
    assert json.loads(_stats_json({"consumers": [consumer]})) == {"consumers": [consumer]}
