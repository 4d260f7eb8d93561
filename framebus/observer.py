"""Asking a running producer for its statistics, without receiving frames.

An observer connection says hello with the observer role, so the producer
sends it no caps, segment or frames and counts it as no consumer; tools
such as ``framebus stat`` can attach to a live pipeline at no cost to it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import protocol as p
from .errors import FramebusError, ProducerGoneError
from .transport import check_socket_path, close_gracefully, connect, recv_message, send_message


class Observer:
    """A stats-only connection to the producer at ``path``; reuse it for live views."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        check_socket_path(path)
        self.path = path
        try:
            self._sock = connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ProducerGoneError(f"no producer is serving {path!r}; start it first") from None
        self._sock.settimeout(timeout)
        self._conn = p.Connection(p.Role.OBSERVER)
        self._next_id = 1
        send_message(self._sock, self._conn.send(p.Hello(p.Role.OBSERVER, os.getpid(), "observer")))

    def stats(self) -> dict[str, Any]:
        """One snapshot of the producer's ``PublisherStats`` as a dict."""
        request_id = self._next_id
        self._next_id += 1
        send_message(self._sock, self._conn.send(p.StatsRequest(request_id)))
        while True:
            try:
                data, fds = recv_message(self._sock)
            except TimeoutError:
                raise FramebusError(f"producer at {self.path!r} did not answer a stats request") from None
            if not data:
                raise ProducerGoneError(f"producer at {self.path!r} hung up")
            event = self._conn.receive_message(data, fds)
            if isinstance(event, p.Stats) and event.request_id == request_id:
                result: dict[str, Any] = json.loads(event.json)
                return result
            if isinstance(event, p.Goodbye):
                raise ProducerGoneError(f"producer at {self.path!r} said goodbye: {event.message}")

    def close(self) -> None:
        try:
            send_message(self._sock, self._conn.send(p.Goodbye(p.GoodbyeReason.NORMAL, "observer done")))
        except OSError:
            pass  # the producer is already gone; closing is all that is left
        close_gracefully(self._sock)

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_stats(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """One snapshot of a producer's statistics."""
    with Observer(path, timeout) as observer:
        return observer.stats()
