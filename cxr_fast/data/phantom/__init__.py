"""The built-in phantom (moved into a package; the next change splits drawing.py by job)."""

from cxr_fast.data.phantom.drawing import *  # noqa: F401,F403
from cxr_fast.data.phantom.drawing import _prevalence, main  # noqa: F401
