"""The report's figures, from benchmark records (see qkit.eval.report).

matplotlib's object API (Figure, not pyplot): no global state and no GUI backend, so the same
figures save as PNG from the CLI (Agg) and display inline in a notebook.
"""
from __future__ import annotations

from matplotlib.figure import Figure

from qkit.eval.report_md import ann_configs, family, pareto

MARKERS = "osD^v<>pPX*hH"


def _style(i: int) -> dict:
    return {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}"}


def fig_weights(recs: list[dict]) -> Figure:
    """Perplexity and KL from the base against bits per weight, one marker per method; the ppl Pareto front."""
    fig = Figure(figsize=(11, 4.5))
    ax_p, ax_k = fig.subplots(1, 2)
    q = [r for r in recs if r.get("method") != "base"]
    fams = list(dict.fromkeys(family(r) for r in q))
    for i, f in enumerate(fams):
        rs = [r for r in q if family(r) == f]
        st = _style(i)
        ax_p.scatter([r["bits_per_weight"] for r in rs], [r["ppl"] for r in rs], label=f, s=36, **st)
        kl = [r for r in rs if r.get("kl") is not None]
        ax_k.scatter([r["bits_per_weight"] for r in kl], [r["kl"] for r in kl], label=f, s=36, **st)
    front = pareto(q)
    if front:
        ax_p.step([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], where="post", color="0.4",
                  linewidth=1, zorder=0, label="Pareto front")
    base = next((r for r in recs if r.get("method") == "base"), None)
    if base:
        ax_p.axhline(base["ppl"], color="k", linestyle="--", linewidth=1, label=f"base fp32 ({base['ppl']:.2f})")
    ax_p.set(xlabel="bits per weight (scales and zeros included)", ylabel="perplexity (log)", yscale="log",
             title="perplexity vs bits per weight")
    ax_k.set(xlabel="bits per weight", ylabel="KL(base || quantized) per token (log)", yscale="log",
             title="KL from the base")
    for ax in (ax_p, ax_k):
        ax.grid(True, which="both", alpha=0.3)
    ax_p.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def fig_weights_cost(recs: list[dict]) -> Figure:
    """Quantization time and peak RSS per row (horizontal bars)."""
    q = [r for r in recs if r.get("method") != "base"]
    fig = Figure(figsize=(11, 0.25 * len(q) + 1.6))
    ax_t, ax_m = fig.subplots(1, 2, sharey=True)
    ids = [r["id"] for r in q]
    colors = [f"C{list(dict.fromkeys(family(x) for x in q)).index(family(r)) % 10}" for r in q]
    ax_t.barh(ids, [r.get("seconds") or 0 for r in q], color=colors)
    ax_m.barh(ids, [r.get("peak_rss_mb") or 0 for r in q], color=colors)
    ax_t.set(xlabel="quantization seconds (log)", xscale="log", title="time")
    ax_m.set(xlabel="peak RSS, MB", title="memory (the quantizing process)")
    ax_t.invert_yaxis()
    for ax in (ax_t, ax_m):
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def fig_vectors(ann_recs: list[dict], codec_recs: list[dict], title: str) -> Figure:
    """Left: recall@10 vs QPS per HNSW configuration. Right: recall@10 vs bytes per vector, graph and brute force."""
    fig = Figure(figsize=(12, 5))
    ax_q, ax_b = fig.subplots(1, 2)
    for i, ((impl, codec, rr), rs) in enumerate(ann_configs(ann_recs).items()):
        rs = sorted(rs, key=lambda r: r["recall_at_10"])
        label = f"{impl} {codec}" + (f" rerank {rr}" if rr else "")
        st = _style(i)
        ls = "-" if impl == "qkit" else "--"
        ax_q.plot([r["recall_at_10"] for r in rs], [r["qps"] for r in rs], linestyle=ls, label=label, **st)
        ax_b.plot([r["recall_at_10"] for r in rs], [r["bytes_in_ram"] / r["n"] for r in rs], linestyle=ls,
                  label=f"graph: {label}", **st)
    bf = [r for r in codec_recs if r["rerank"] == 0]
    for impl, marker in (("qkit", "o"), ("faiss", "x")):
        rs = [r for r in bf if r["impl"] == impl]
        if rs:
            ax_b.scatter([r["recall_at_10"] for r in rs], [r["bytes_per_vector"] for r in rs], marker=marker,
                         color="k" if impl == "qkit" else "C3", s=28, label=f"brute force: {impl} codecs")
            for r in rs if impl == "qkit" else []:
                ax_b.annotate(r["codec"], (r["recall_at_10"], r["bytes_per_vector"]), fontsize=6,
                              xytext=(3, 2), textcoords="offset points")
    ax_q.set(xlabel="recall@10", ylabel="queries per second, 1 thread (log)", yscale="log", title=f"{title}: speed")
    ax_b.set(xlabel="recall@10", ylabel="bytes per vector (log)", yscale="log", title=f"{title}: memory")
    for ax in (ax_q, ax_b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def fig_kernels(recs: list[dict], bw: dict | None) -> Figure:
    """GB/s read per kernel and backend, with one core's streaming read and copy bandwidth as lines."""
    kernels = list(dict.fromkeys(r["kernel"] for r in recs))
    backends = list(dict.fromkeys(r["backend"] for r in recs))
    fig = Figure(figsize=(10, 0.55 * len(kernels) + 2))
    ax = fig.subplots()
    labelled = set()
    for i, k in enumerate(kernels):   # each kernel's bars share its row, one colour per backend
        rs = [r for r in recs if r["kernel"] == k]
        h = 0.8 / len(rs)
        for j, r in enumerate(rs):
            b = r["backend"]
            ax.barh(i + (j - (len(rs) - 1) / 2) * h, r["gbps"], height=h, color=f"C{backends.index(b) % 10}",
                    label=None if b in labelled else b)
            labelled.add(b)
    if bw:
        ax.axvline(bw["read_gbps"], color="k", linestyle="--", label=f"streaming read {bw['read_gbps']:.1f} GB/s")
        ax.axvline(bw["copy_gbps"], color="0.5", linestyle=":", label=f"streaming copy {bw['copy_gbps']:.1f} GB/s")
    ax.set_yticks(range(len(kernels)), kernels)
    ax.invert_yaxis()
    ax.set(xlabel="GB/s of operand read (1 thread)", title="kernel throughput vs memory bandwidth")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def figures(data) -> dict[str, Figure]:
    """File name -> figure for every section a ReportData holds."""
    out = {}
    if data.quant:
        out["weights.png"] = fig_weights(data.quant)
        out["weights_cost.png"] = fig_weights_cost(data.quant)
    if data.heldout and data.heldout.get("rows"):
        from qkit.eval import bench_heldout, report_md

        rows = data.heldout["rows"]
        fig = bench_heldout.figure(rows, report_md.heldout_texts(rows))
        if fig is not None:
            out["heldout.png"] = fig
    crecs = (data.codecs or {}).get("records", [])
    for ds in sorted((data.ann or {}).keys() | {r["dataset"] for r in crecs}):
        arecs = ((data.ann or {}).get(ds) or {}).get("records", [])
        out[f"vectors-{ds}.png"] = fig_vectors(arecs, [r for r in crecs if r["dataset"] == ds], ds)
    if data.kernels:
        out["kernels.png"] = fig_kernels(data.kernels, data.bandwidth)
    return out
