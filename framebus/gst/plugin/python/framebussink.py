"""gst-python plugin loader entry for framebussink (GST_PLUGIN_PATH points at the folder above)."""

from gi.repository import Gst

import framebus.gst  # noqa: F401  (versions and the 1.22 log filter first)
from framebus.gst.sink import FramebusSink

__gstelementfactory__ = ("framebussink", Gst.Rank.NONE, FramebusSink)
