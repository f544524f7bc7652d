"""Which linears' calibrated weights move held-out perplexity: hybrids of two quantized models.

    qkit bench gptq-ablate REFERENCE CANDIDATE [--configs all attn mlp L0-9 ...] [--windows 20] [--json PATH]

REFERENCE and CANDIDATE are two fake-quantized safetensors outputs of `qkit quantize`
of the same model on the same grid (typically RTN and GPTQ). Each config builds a
hybrid that takes the CANDIDATE's weights for the linears it selects and the
REFERENCE's for the rest, and evaluates perplexity on every held-out text
(qkit.text.HELD_OUT, the first --windows windows of 512 tokens). A layer-local
error measure (qkit bench gptq-diag) says where GPTQ fits its objective; this says
where that fit reaches the model's predictions. The hybrid is not what the
sequential pipeline would produce with the same selection (the candidate's later
layers were fitted to its own earlier layers), so it shows where the gain or loss
sits, not a recipe.

A config is a selection over linears `model.layers.L.<module>`: `all`, `none`,
`attn` (self_attn.*), `mlp`, `La-b` (layers a..b), any substring of a linear's name
(`down_proj`, `k_proj`), several joined by `:` (all must hold: `L0-9:mlp`), and a
leading `-` for the complement (`-L0-1`).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from qkit.fileio import atomic_write

LINEAR = re.compile(r"layers\.(\d+)\.(.+)\.weight$")


def select(names, spec: str) -> set[str]:
    """The linear weights `spec` selects among `names` (module docstring)."""
    neg = spec.startswith("-")
    parts = spec.lstrip("-").split(":")
    out = set()
    for k in names:
        m = LINEAR.search(k)
        layer, module = int(m.group(1)), m.group(2)
        ok = True
        for p in parts:
            if p == "all":
                continue
            if p == "none":
                ok = False
            elif re.fullmatch(r"L\d+-\d+", p):
                a, b = map(int, p[1:].split("-"))
                ok &= a <= layer <= b
            elif p == "attn":
                ok &= "attn" in module
            elif p == "mlp":
                ok &= "mlp" in module
            else:
                ok &= p in module
        if ok != neg:
            out.add(k)
    return out


def main(argv=None) -> list[dict]:
    from qkit.errors import UsageError
    from qkit.eval.perplexity import perplexity
    from qkit.model import loader
    from qkit.text import HELD_OUT, load_text

    ap = argparse.ArgumentParser(prog="qkit bench gptq-ablate", description=__doc__.split("\n\n")[0])
    ap.add_argument("reference")
    ap.add_argument("candidate")
    ap.add_argument("--configs", nargs="+", default=["none", "all", "attn", "mlp", "L0-9", "L10-19", "L20-29"])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--base", default="default", help="the float model, for the gap-closed columns")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    ref = loader.resolve(a.reference)
    tok = loader.load_tokenizer(ref)
    ids = {t: tok(load_text(t)[0], add_special_tokens=True).input_ids for t in HELD_OUT}

    def ppl(m):
        return {t: perplexity(m, ids[t], 512, max_windows=a.windows).ppl for t in HELD_OUT}

    base = ppl(loader.load_model(loader.resolve(a.base)))
    model = loader.load_model(ref)
    sa = {k: v.clone() for k, v in model.state_dict().items()}
    sb = loader.load_model(loader.resolve(a.candidate)).state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise UsageError(f"{a.reference} and {a.candidate} are not the same architecture")
    linears = [k for k in sa if LINEAR.search(k) and "proj" in k]
    recs = []
    for c in a.configs:
        t0 = time.perf_counter()
        keys = select(linears, c)
        model.load_state_dict({k: (sb[k] if k in keys else sa[k]) for k in sa})
        recs.append({"config": c, "linears": len(keys), "ppl": ppl(model), "seconds": time.perf_counter() - t0})
        print(json.dumps(recs[-1]), file=sys.stderr, flush=True)
    none = next((r["ppl"] for r in recs if r["config"] == "none"), None)
    short = [t.split(":")[-1][:11] for t in HELD_OUT]
    print(f"hybrids of {a.reference} (rest) and {a.candidate} (selected); first {a.windows} windows x 512 tokens"
          + ("; % of the reference's gap to base closed" if none else ""))
    print(f"{'config':14s} {'linears':>7s} " + " ".join(f"{s:>11s}" + ("  closed" if none else "") for s in short))
    print(f"{'base':14s} {'':>7s} " + " ".join(f"{base[t]:11.3f}" + ("        " if none else "") for t in HELD_OUT))
    for r in recs:
        cells = []
        for t in HELD_OUT:
            cell = f"{r['ppl'][t]:11.3f}"
            if none:
                cell += f" {100 * (none[t] - r['ppl'][t]) / (none[t] - base[t]):6.0f}%"
            cells.append(cell)
        print(f"{r['config']:14s} {r['linears']:7d} " + " ".join(cells))
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump({"reference": a.reference, "candidate": a.candidate, "windows": a.windows, "base": base,
                       "configs": recs}, f, indent=1)
    return recs


if __name__ == "__main__":
    main()
