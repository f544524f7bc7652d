import os

# No test may reach a model or dataset hub: fail fast instead of retrying for ~24 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
