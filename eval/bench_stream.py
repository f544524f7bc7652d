"""Is quantization really streamed? Peak RSS of 2-layer vs 8-layer models whose layers are >= 64 MB.

    qkit bench stream [--hidden 1024] [--intermediate 4096] [--layers 2 8] [--json PATH]

Builds random Llama checkpoints (fp32 safetensors) that differ only in depth,
quantizes each with RTN W4 g128 in its own process (`qkit quantize`), and
reports each run's peak RSS. If the pipeline holds one layer at a time, the
deeper model costs at most about one more layer (plus allocator noise): the
check is peak(8) - peak(2) < one layer + 100 MB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from qkit.fileio import atomic_write


def make_checkpoint(path: Path, layers: int, hidden: int, intermediate: int, vocab: int = 1024) -> int:
    """Write a random Llama with `layers` layers; return the bytes of one decoder layer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(path))
    return sum(p.numel() * 4 for p in model.model.layers[0].parameters())


def quantize_in_subprocess(src: Path, out: Path, summary: Path) -> dict:
    cmd = [sys.executable, "-P", "-m", "qkit.cli.main", "quantize", str(src), "-o", str(out), "--bits", "4",
           "--group-size", "128", "--json", str(summary)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"quantize failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
    return json.loads(summary.read_text())


def run(hidden: int, intermediate: int, depths: list[int], workdir: str | None = None) -> dict:
    """Build and quantize each depth under `workdir` (a temporary directory by default)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="qkit-stream-", dir=workdir) as tmp:
        tmp = Path(tmp)
        layer_bytes = 0
        for n in depths:
            src = tmp / f"llama-{n}"
            layer_bytes = make_checkpoint(src, n, hidden, intermediate)
            s = quantize_in_subprocess(src, tmp / f"q-{n}", tmp / f"s-{n}.json")
            rows.append({"layers": n, "peak_rss_mb": s["peak_rss_mb"], "seconds": s["seconds"],
                         "checkpoint_mb": sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20})
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    limit = layer_bytes / 2**20 + 100
    return {"layer_mb": layer_bytes / 2**20, "runs": rows, "growth_mb": growth, "limit_mb": limit,
            "streams": growth < limit}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="qkit bench stream", description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 8])
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    res = run(a.hidden, a.intermediate, a.layers)
    print(f"one decoder layer: {res['layer_mb']:.0f} MB (hidden {a.hidden}, intermediate {a.intermediate}, fp32)")
    for r in res["runs"]:
        print(f"{r['layers']:3d} layers: checkpoint {r['checkpoint_mb']:7.0f} MB, peak RSS {r['peak_rss_mb']:7.0f} MB, "
              f"{r['seconds']:.1f} s")
    print(f"growth {res['growth_mb']:.0f} MB vs limit {res['limit_mb']:.0f} MB (one layer + 100 MB): "
          f"{'streams' if res['streams'] else 'DOES NOT STREAM'}")
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
