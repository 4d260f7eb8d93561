"""Shared fixtures: short socket paths and helper processes talked to through stdout lines."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class Proc:
    """A child process whose stdout lines are the events a test waits for (no sleeps)."""

    def __init__(self, script: str, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "procs", script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.append(line)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """The rest of the first stdout line starting with ``prefix``; fails on exit or timeout."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no {prefix!r} line within {timeout} s; stderr:\n{''.join(self.stderr)}"
                ) from None
            if line is None:
                self.popen.wait(5)
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before {prefix!r}; stderr:\n" + "".join(self.stderr)
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def expect_json(self, prefix: str, timeout: float = 60.0) -> Any:
        return json.loads(self.expect(prefix, timeout))

    def close_stdin(self) -> None:
        if self.popen.stdin and not self.popen.stdin.closed:
            self.popen.stdin.close()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        self.close_stdin()
        return self.popen.wait(timeout)


@pytest.fixture
def spawn() -> Iterator[Any]:
    procs: list[Proc] = []

    def _spawn(script: str, *args: str) -> Proc:
        proc = Proc(script, *args)
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        proc.close_stdin()
        proc.kill()
        for stream in (proc.popen.stdout, proc.popen.stderr, proc.popen.stdin):
            if stream:
                stream.close()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short directory for sockets (sun_path allows 107 bytes; pytest's tmp_path can be long)."""
    path = tempfile.mkdtemp(prefix="fbt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "feed")
