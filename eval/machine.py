"""What machine a benchmark ran on: CPU model, SIMD flags, cores, library versions."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted=("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "popcnt", "avx512f", "avx512_vnni",
                      "avx_vnni")) -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def describe() -> dict:
    import numpy as np

    info = {
        "cpu": cpu_model(),
        "flags": cpu_flags(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')}, "
                        f"{d.get('num_threads')} threads)" for d in threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        pass
    return info
