"""Every kernel backend and ISA this machine can run, for tests that hold them all to the references."""
from qkit import ext

BACKENDS = [("numpy", None), ("numba", None)]
if ext.native_available():
    BACKENDS.append(("native", "scalar"))
    if ext.best_isa() == "avx2":
        BACKENDS.append(("native", "avx2"))
IDS = [f"{b}-{i}" if i else b for b, i in BACKENDS]

# the W4A8 kernels have one more path: AVX-512 VNNI (vpdpbusd), where the CPU reports it
W4A8_BACKENDS = list(BACKENDS)
if ext.native_available() and ext.cpu_flags().get("avx512vnni"):
    W4A8_BACKENDS.append(("native", "avx512vnni"))
W4A8_IDS = [f"{b}-{i}" if i else b for b, i in W4A8_BACKENDS]
