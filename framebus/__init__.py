"""framebus: zero-copy shared-memory video between processes.

A ``Publisher`` owns shared-memory slots and lends them out; ``Subscriber``
processes map the same slots read-only and give each frame back when done.
The GStreamer elements ``framebussink`` and ``framebussrc`` sit on the
same core (``framebus.gst``).
"""

from __future__ import annotations

import sys

from .errors import (
    ConsumerTooSlowError,
    EndOfStream,
    FramebusError,
    FrameReleasedError,
    FrameTooLargeError,
    Interrupted,
    PathInUseError,
    PeerRejectedError,
    ProducerGoneError,
    ReceiveTimeout,
    SlotsExhaustedError,
    UnsupportedFormatError,
    UnsupportedPlatformError,
    VersionMismatchError,
)

if not sys.platform.startswith("linux"):
    raise UnsupportedPlatformError(f"framebus needs Linux (memfd, SCM_RIGHTS, SO_PEERCRED); this is {sys.platform}")

__version__ = "0.1.0"

__all__ = [
    "ConsumerTooSlowError",
    "EndOfStream",
    "FrameReleasedError",
    "FrameTooLargeError",
    "FramebusError",
    "Interrupted",
    "PathInUseError",
    "PeerRejectedError",
    "ProducerGoneError",
    "ReceiveTimeout",
    "SlotsExhaustedError",
    "UnsupportedFormatError",
    "UnsupportedPlatformError",
    "VersionMismatchError",
    "__version__",
]
