"""gst-python plugin loader entry for framebussrc (GST_PLUGIN_PATH points at the folder above)."""

from gi.repository import Gst

import framebus.gst  # noqa: F401  (versions and the 1.22 log filter first)
from framebus.gst.src import FramebusSrc

__gstelementfactory__ = ("framebussrc", Gst.Rank.NONE, FramebusSrc)
