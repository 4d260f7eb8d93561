"""Element error messages that name the socket path and the fix."""

from __future__ import annotations

from typing import Any

from gi.repository import Gst

_DOMAINS = {
    Gst.ResourceError: Gst.ResourceError.quark,
    Gst.StreamError: Gst.StreamError.quark,
    Gst.CoreError: Gst.CoreError.quark,
}


def post_error(element: Gst.Element, code: Any, text: str, debug: str = "") -> None:
    """Post a GST_ELEMENT_ERROR-style message: ``code`` is e.g. ``Gst.ResourceError.NOT_FOUND``."""
    domain = _DOMAINS[type(code)]()
    element.message_full(Gst.MessageType.ERROR, domain, int(code), text, debug, __file__, "framebus", 0)
