"""Every kernel backend and ISA this machine can run, for tests that hold them all to the references."""
from qkit import ext

BACKENDS = [("numpy", None), ("numba", None)]
if ext.native_available():
    BACKENDS.append(("native", "scalar"))
    if ext.best_isa() == "avx2":
        BACKENDS.append(("native", "avx2"))
IDS = [f"{b}-{i}" if i else b for b, i in BACKENDS]
