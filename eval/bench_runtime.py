"""qkit's runtime against torch: prefill and decode tokens/s, peak RSS, and the decode GEMV's bandwidth.

    qkit bench runtime [--model M] [--threads 1,2] [--prompt 512] [--decode 128] [--work DIR] [--json P] [--plot P]

Rows, each run in a process of its own (so its peak RSS is its own), at each thread count:
- torch fp32 (dense): the float model as transformers runs it (torch's own threads = the row's);
- qkit W4 g128 (GPTQ format): `qkit quantize --bits 4 --group-size 128 --format gptq` of the model (RTN: the
  method does not change the speed), on qkit's W4A8 kernels, head and embedding int8;
- qkit W8 per-channel: `--bits 8 --group-size -1 --format gptq`, on the W8A8 kernels, head int8.
Each process loads the model, then generates `decode` tokens after a `prompt`-token prompt (token ids of the
evaluation text, greedy, end-of-sequence ignored) through qkit.runtime.generate: prefill tokens/s over the
prompt pass, decode tokens/s over the single-token forwards. Then a short second run with forward hooks gives
the per-token split (linears, attention, head, other), kept out of the timed figures. Peak RSS is the
process's high-water mark above its RSS after the imports. For the qkit rows, the decoder linears' and the
head's kernels are also timed alone, one token each, in model order (every packed byte read once per pass, as
a decode step reads them): bytes / time is the GEMV's effective bandwidth, beside the single-core read
bandwidth (qkit.eval.bandwidth) measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROWS = [("torch fp32 (dense)", None), ("qkit W4 g128 (gptq)", ["--bits", "4", "--group-size", "128"]),
        ("qkit W8 per-channel (gptq)", ["--bits", "8", "--group-size", "-1"])]


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def checkpoint(model: str | None, extra: list[str], work: Path) -> Path:
    """The packed checkpoint of `extra`, quantized once and kept in `work`."""
    name = "q" + "_".join(a.strip("-") for a in extra)
    out = work / name
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "qkit.cli.main", "quantize", *([model] if model else []), "-o", str(out),
               "--method", "rtn", "--format", "gptq", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"qkit quantize failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return out


def gemv_bandwidth(model, repeat: int = 5) -> dict:
    """The packed linears' kernels alone, one token, in model order: bytes read per second."""
    import numpy as np

    from qkit.ext import _kernels as native
    from qkit.runtime.linear import QuantLinear

    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    rng = np.random.default_rng(0)
    xs = {}
    for m in lins:
        if m.in_features not in xs:
            xs[m.in_features] = native.quantize_q8_rows(rng.standard_normal((1, m.in_features)).astype(np.float32))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for m in lins:
            q, s = xs[m.in_features]
            native.gemm_a8(q, s, m._qweight, m._zeros, m._scales, m.group_size, m.bits, m.options.isa_code(),
                           m.options.threads)
        best = min(best, time.perf_counter() - t0)
    nbytes = sum(m.packed_bytes() for m in lins)
    return {"gemv_bytes": nbytes, "gemv_ms": best * 1e3, "gemv_gbps": nbytes / best / 1e9}


def child(args) -> dict:
    """One row in this process: load, generate, measure; the record as JSON on stdout."""
    import torch

    torch.set_num_threads(args.threads)
    from qkit import runtime as rt
    from qkit.eval import bandwidth
    from qkit.model import loader
    from qkit.runtime.generate import generate
    from qkit.text import DEFAULT_EVAL, load_text

    ref = loader.resolve(args.path)
    tok = loader.load_tokenizer(ref)
    body, _ = load_text(None, default=DEFAULT_EVAL)
    ids = tok(body, add_special_tokens=True).input_ids[: args.prompt]
    loader.empty_model(loader.load_config(ref, online_rotation=True))  # import the modeling code first
    base_kb = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    model, info = rt.load(ref, threads=args.threads)
    load_s = time.perf_counter() - t0
    if info.runtime == "qkit":
        rt.torch_beside_kernels()  # as `qkit generate` runs it: the kernels take the row's threads
    r = generate(model, tok, prompt_ids=ids, n=args.decode, stop_at_eos=False)
    peak_kb = _rss_kb("VmHWM")
    s = generate(model, tok, prompt_ids=ids[:64], n=17, stop_at_eos=False, split=True)
    rec = {"runtime": info.describe(), "threads": args.threads, "prompt": len(ids), "decode": r.new_tokens,
           "prefill_tps": r.prefill_tps, "decode_tps": r.decode_tps, "load_s": load_s,
           "peak_rss_mb": (peak_kb - base_kb) / 1024, "baseline_rss_mb": base_kb / 1024, "split_ms": s.split_ms,
           "packed_mb": info.packed_bytes / 1e6, "repacked": info.repacked, "isa": info.isa}
    if info.runtime == "qkit":
        rec.update(gemv_bandwidth(model))
        rec["read_gbps_1core"] = bandwidth.measure(mb=256, repeat=3)["read_gbps"]
    return rec


def run(model: str | None, threads: list[int], prompt: int, decode: int, work: Path, progress=print) -> tuple:
    from qkit.eval import machine
    from qkit.model import loader

    work.mkdir(parents=True, exist_ok=True)
    base = str(loader.resolve(model).dir) if model else str(loader.default_model().dir)
    recs = []
    for name, extra in ROWS:
        path = base if extra is None else str(checkpoint(model, extra, work))
        for t in threads:
            env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
            cmd = [sys.executable, "-m", "qkit.eval.bench_runtime", "--child", path, "--threads", str(t),
                   "--prompt", str(prompt), "--decode", str(decode)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:
                raise SystemExit(f"{name} x{t} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            rec = {"row": name, **json.loads(r.stdout.strip().splitlines()[-1])}
            recs.append(rec)
            progress(f"{name} x{t}: prefill {rec['prefill_tps']:.1f} tok/s, decode {rec['decode_tps']:.1f} tok/s, "
                     f"peak RSS +{rec['peak_rss_mb']:.0f} MB")
    import torch

    info = {**machine.describe(), "torch": torch.__version__, "prompt": prompt, "decode": decode}
    return recs, info


def print_table(recs: list[dict], info: dict) -> None:
    print(f"machine: {info['cpu']}; torch {info['torch']}; prompt {info['prompt']} tokens, decode {info['decode']}")
    base = {r["threads"]: r for r in recs if r["row"].startswith("torch")}
    head = (f"{'row':28s} {'thr':>3s} {'prefill t/s':>11s} {'x':>5s} {'decode t/s':>10s} {'x':>5s} "
            f"{'peak RSS MB':>11s} {'x':>5s} {'GEMV GB/s':>9s} {'% read bw':>9s}")
    print(head)
    print("-" * len(head))
    for r in recs:
        b = base.get(r["threads"], r)
        bw = f"{r['gemv_gbps']:9.1f} {100 * r['gemv_gbps'] / r['read_gbps_1core']:8.0f}%" if "gemv_gbps" in r \
            else f"{'':9s} {'':9s}"
        print(f"{r['row']:28s} {r['threads']:3d} {r['prefill_tps']:11.1f} {r['prefill_tps'] / b['prefill_tps']:5.2f} "
              f"{r['decode_tps']:10.1f} {r['decode_tps'] / b['decode_tps']:5.2f} {r['peak_rss_mb']:11.0f} "
              f"{r['peak_rss_mb'] / b['peak_rss_mb']:5.2f} {bw}")
    for r in recs:
        sp = r.get("split_ms") or {}
        print(f"  {r['row']} x{r['threads']}: per decode token " + ", ".join(f"{k} {v:.2f} ms" for k, v in sp.items())
              + (f"; ran on {r['runtime']}" if r["threads"] == 1 else ""))
    q = [r for r in recs if "read_gbps_1core" in r]
    if q:
        bws = ", ".join(f"{r['read_gbps_1core']:.1f}" for r in q)
        print(f"single-core read bandwidth in the same runs: {bws} GB/s")


def plot(recs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qkit.fileio import atomic_write

    labels = [f"{r['row']}\nx{r['threads']}" for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(axes, ("prefill_tps", "decode_tps", "peak_rss_mb"),
                              ("prefill tokens/s", "decode tokens/s", "peak RSS above baseline (MB)")):
        ax.bar(np.arange(len(recs)), [r[key] for r in recs], color=["C0" if "torch" in r["row"] else "C1"
                                                                     for r in recs])
        ax.set_xticks(np.arange(len(recs)), labels, rotation=60, fontsize=7, ha="right")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="qkit bench runtime", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="A float model (default: the built-in default model).")
    ap.add_argument("--threads", default="1,2", help="Comma-separated thread counts.")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--work", default=None, help="Where the quantized checkpoints are kept (default: the cache).")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        a.path = a.child
        a.threads = int(a.threads)
        print(json.dumps(child(a)))
        return None
    from qkit.errors import UsageError
    from qkit.fileio import atomic_write

    try:
        threads = [int(t) for t in a.threads.split(",")]
    except ValueError:
        raise UsageError(f"--threads {a.threads!r}: expected comma-separated integers") from None
    if a.prompt < 1 or a.decode < 2:
        raise UsageError("--prompt must be >= 1 and --decode >= 2")
    from qkit.model.loader import _models_cache

    work = Path(a.work) if a.work else _models_cache() / "bench-runtime"
    recs, info = run(a.model, threads, a.prompt, a.decode, work)
    print_table(recs, info)
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump({"machine": info, "records": recs}, f, indent=1)
    if a.plot:
        plot(recs, a.plot)
    return recs


if __name__ == "__main__":
    main()
