"""GStreamer elements framebussink and framebussrc (gst-python).

``register()`` makes both available to ``Gst.parse_launch`` in this
process; ``gst-launch-1.0`` finds them through the gst-python plugin
loader after ``eval "$(framebus env)"``.
"""

from __future__ import annotations

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstBase", "1.0")
gi.require_version("GstVideo", "1.0")

from gi.repository import GLib, Gst  # noqa: E402

Gst.init(None)


def _quiet_floating_warning(domain: str, level: GLib.LogLevelFlags, message: str, data: object) -> None:
    """GStreamer < 1.24 reports every element written in Python as "should be floating".

    It is a known PyGObject/GStreamer 1.22 mismatch about the initial
    reference, not a fault of the element; printed on every gst-launch it
    only hides real messages, so exactly that one is dropped.
    """
    if "should be floating" in message:
        return
    GLib.log_default_handler(domain, level, message, data)


if Gst.version() < (1, 24, 0, 0):
    GLib.log_set_handler("GStreamer", GLib.LogLevelFlags.LEVEL_CRITICAL, _quiet_floating_warning, None)

__all__ = ["Gst", "register"]

_registered = False


def register() -> None:
    """Register framebussink and framebussrc with GStreamer (idempotent)."""
    global _registered
    if _registered:
        return
    from .sink import FramebusSink
    from .src import FramebusSrc

    for name, element in (("framebussink", FramebusSink), ("framebussrc", FramebusSrc)):
        if Gst.ElementFactory.find(name) is None and not Gst.Element.register(None, name, Gst.Rank.NONE, element):
            raise RuntimeError(f"registering the GStreamer element {name} failed")
    _registered = True
