"""Old import path of qkit.gguf.hf_meta, kept for one release (0.x): the same module object, so attributes set
on one are seen through the other."""
import sys

from qkit.gguf import hf_meta as _module

sys.modules[__name__] = _module
