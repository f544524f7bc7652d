import os
import tempfile

# Numba's on-disk cache goes to a temporary directory, not into the source tree.
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="qkit-numba-"))

from hypothesis import settings  # noqa: E402

# no example database in the working directory: every run draws afresh (CI is a clean clone anyway)
settings.register_profile("qkit", database=None)
settings.load_profile("qkit")

# No test may reach a model or dataset hub: fail fast instead of retrying for ~24 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
