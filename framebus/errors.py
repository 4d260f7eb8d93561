"""Exceptions a framebus user can meet.

Every message names the thing that went wrong and the fix, because the
person reading it is usually looking at a pipeline that stopped, not at
our source.
"""

from __future__ import annotations


class FramebusError(Exception):
    """Base of every framebus error."""


class UnsupportedPlatformError(FramebusError):
    """framebus needs Linux (memfd, SCM_RIGHTS, SO_PEERCRED, seals)."""


class UnsupportedFormatError(FramebusError, ValueError):
    """A video format or size framebus cannot lay out."""


class PathInUseError(FramebusError):
    """A live producer already serves this socket path."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"process {pid}" if pid else "another live producer"
        super().__init__(f"socket path {path!r} is served by {who}; stop that producer or pick another path")
        self.path = path
        self.pid = pid


class SlotsExhaustedError(FramebusError):
    """Every slot is held (by consumers or by the producer) and on_full='block' timed out."""


class FrameTooLargeError(FramebusError, ValueError):
    """A frame does not fit into a slot."""


class ConsumerTooSlowError(FramebusError):
    """A 'block' policy consumer kept its frames too long and was disconnected."""


class VersionMismatchError(FramebusError):
    """The peer speaks an incompatible protocol version."""


class ProducerGoneError(FramebusError):
    """The producer disconnected without end-of-stream and reconnect is off."""


class EndOfStream(FramebusError):
    """The producer signalled end-of-stream."""


class ReceiveTimeout(FramebusError, TimeoutError):
    """No frame arrived within the timeout."""


class FrameReleasedError(FramebusError):
    """A frame's pixels were used after release(): the slot may already hold another frame."""


class PeerRejectedError(FramebusError):
    """The producer refused this consumer (goodbye with a reason)."""


class Interrupted(FramebusError):
    """A blocking receive was interrupted (``Subscriber.interrupt``), e.g. by a GStreamer flush."""
