"""Old import path of qkit.gguf.write, kept for one release (0.x): the same module object, so attributes set
on one are seen through the other."""
import sys

from qkit.gguf import write as _module

sys.modules[__name__] = _module
