"""Unix SOCK_SEQPACKET sockets: claiming a path, peer credentials, messages with fds.

Why SEQPACKET: message boundaries come from the kernel, so one ``recvmsg``
is one protocol message with exactly the fds sent with it, and a dead peer
is a hang-up the moment its process exits.

Why a lock beside the socket file: a socket file left by a crashed producer
looks just like a live one.  Each producer also binds an abstract-namespace
socket named after the path's real location; the kernel drops that name
when the process dies, however it dies.  So "lock taken" means a live
producer (never stolen), and "file there, lock free" means a stale file
(replaced).
"""

from __future__ import annotations

import array
import errno
import hashlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import FramebusError, PathInUseError
from .protocol import MAX_FDS, MAX_MESSAGE

log = logging.getLogger("framebus")

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL
_CRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    return PeerCred(*_CRED.unpack(raw))


def check_socket_path(path: str) -> str:
    """Validate a socket path before use; the errors say what to change."""
    if not path:
        raise FramebusError("socket path is empty; pass a path such as /tmp/cam1")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise FramebusError(
            f"socket path {path!r} is {len(os.fsencode(path))} bytes, Unix sockets allow "
            f"{MAX_SOCKET_PATH}; use a shorter path"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FramebusError(
            f"directory {directory!r} of socket path {path!r} does not exist; create it "
            f"(mkdir -p {directory}) or choose another path"
        )
    return path


def _lock_name(path: str) -> bytes:
    real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:40]
    return b"\0framebus-lock-" + digest.encode()


def _pid_listening_at(address: str | bytes) -> int | None:
    """The pid of whoever listens at ``address`` (SO_PEERCRED), or None if nobody does."""
    for kind in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM):
        probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1.0)
            probe.connect(address)
            return peer_cred(probe).pid
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return None
            if exc.errno != errno.EPROTOTYPE:  # wrong socket type: try the other one
                return None
        finally:
            probe.close()
    return None


class Listener:
    """A claimed socket path: the listening socket plus the lock that proves it is ours."""

    def __init__(self, path: str, mode: int = 0o660) -> None:
        check_socket_path(path)
        self.path = path
        self._lock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._lock.bind(_lock_name(path))
            self._lock.listen(1)
        except OSError as exc:
            self._lock.close()
            if exc.errno == errno.EADDRINUSE:
                raise PathInUseError(path, _pid_listening_at(_lock_name(path))) from None
            raise FramebusError(f"cannot lock socket path {path!r}: {exc}") from exc
        try:
            self._remove_stale(path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                self.sock.bind(path)
                os.chmod(path, mode)
                self.sock.listen(64)
                self.sock.setblocking(False)
            except PermissionError as exc:
                self.sock.close()
                raise FramebusError(
                    f"permission denied creating socket {path!r}; choose a directory you can write "
                    f"to, or run as a user who can"
                ) from exc
            except OSError:
                self.sock.close()
                raise
        except BaseException:
            self._lock.close()
            raise

    @staticmethod
    def _remove_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FramebusError(f"{path!r} exists and is not a socket; remove it or choose another socket path")
        pid = _pid_listening_at(path)
        if pid is not None:
            # Alive but not holding our lock: another program (say shmsink) is serving there.
            raise PathInUseError(path, pid)
        log.info("replacing stale socket %s left by a producer that exited", path)
        os.unlink(path)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close and remove the socket file (only ours: we still hold the lock here)."""
        if self.sock.fileno() >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass  # removed by hand while we ran; nothing left to clean
            self.sock.close()
        self._lock.close()


def connect(path: str) -> socket.socket:
    """A blocking SEQPACKET connection to a producer; errors name the path and the fix."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()  # no producer (yet): the caller decides whether to wait
        raise
    except PermissionError as exc:
        sock.close()
        raise FramebusError(
            f"permission denied connecting to {path!r}; the producer's socket mode or allowed uids exclude this user"
        ) from exc
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EPROTOTYPE:
            raise FramebusError(f"{path!r} is not a framebus socket (wrong socket type)") from exc
        raise
    return sock


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], ancillary)
    else:
        sock.send(data)


_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)


def recv_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and its fds; b'' means the peer hung up.  Oversized input raises."""
    data, ancdata, flags, _addr = sock.recvmsg(MAX_MESSAGE + 1, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise TruncatedMessage(f"message or its file descriptors exceeded the limits (flags {flags:#x})")
    return data, fds


class TruncatedMessage(FramebusError):
    """The peer sent more than a message may hold: treat as a protocol error."""


def close_gracefully(sock: socket.socket) -> None:
    """Close after discarding unread messages.

    Linux resets a Unix connection whose closing end still has unread data,
    and the peer then loses the messages we sent last (end-of-stream,
    goodbye).  Reading our queue empty first lets them arrive.
    """
    try:
        sock.setblocking(False)
        while True:
            data, fds = recv_message(sock)
            for fd in fds:
                os.close(fd)
            if not data:
                break
    except (BlockingIOError, InterruptedError):
        pass  # queue empty: nothing left that could reset the peer
    except (OSError, TruncatedMessage) as exc:
        log.debug("discarding unread messages before close: %s", exc)
    sock.close()
