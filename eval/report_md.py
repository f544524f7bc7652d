"""The report's Markdown: tables and computed readings from benchmark records (see qkit.eval.report).

Pure functions of the records: the same records always give the same text, so a committed
report can be checked against the JSON it came from by rendering it again.
"""
from __future__ import annotations

import re

# bench_quant keys shown in fixed columns or in the header; any other numeric key gets a column of its own
QUANT_KEYS = {"id", "method", "bits", "group_size", "act_order", "format", "act_bits", "ppl", "kl", "top1", "seconds",
              "peak_rss_mb", "bits_per_weight", "calibration", "model", "text", "windows", "ctx", "tokens", "round",
              "type", "rotate", "search_samples"}
RECALL_TARGETS = (0.9, 0.95)

WEIGHTS_CAVEAT = ("The default model's fp32 weights are dequantized from Q4_1 (blocks of 32), so W4 g32 "
                  "re-quantization is near lossless by construction; methods differ at g128, 3 bits and 2 bits.")


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    if not m:
        return "unknown machine"
    flags = ", ".join(m.get("flags", []))
    return (f"{m.get('cpu', '?')} ({flags}), {m.get('cores', '?')} cores, python {m.get('python', '?')}, "
            f"numpy {m.get('numpy', '?')}")


# --------------------------------------------------------------------------- weights

def family(r: dict) -> str:
    """The method a row belongs to, its grid left out: 'gptq-ao-w3g128' -> 'gptq-ao', 'rtn-w8a8' -> 'rtn W8A8'."""
    if r.get("method") == "base":
        return "base"
    m = re.match(r"^(.*)-w(\d+)(g\d+|a\d+)?$", r["id"])
    fam = m.group(1) if m else r.get("method", r["id"])
    return f"{fam} W{r['bits']}A{r['act_bits']}" if r.get("act_bits") else fam


def grid(r: dict) -> str:
    """The grid a row quantizes to: 'W3 g128', 'W8 per-channel A8', or a GGML type name."""
    if r.get("type"):
        return str(r["type"])
    if r.get("method") == "base":
        return "fp32"
    g = r.get("group_size")
    s = f"W{r['bits']} " + (f"g{g}" if g and g > 0 else "per-channel")
    return s + (f" A{r['act_bits']}" if r.get("act_bits") else "")


def extra_quant_keys(recs: list[dict]) -> list[str]:
    keys = []
    for r in recs:
        for k, v in r.items():
            if k not in QUANT_KEYS and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    return keys


def data_free(r: dict, recs: list[dict]) -> dict | None:
    """The data-free row a row is measured against: plain RTN (or llama.cpp's plain mix) on the same grid."""
    if r.get("method") == "base":
        return None
    for c in recs:
        if (c.get("method") == "rtn" and not c.get("calibration") and not c.get("rotate") and grid(c) == grid(r)
                and (c.get("format") == "gguf") == (r.get("format") == "gguf") and not c.get("imatrix")):
            return None if c is r else c
    return None


def held_out_closed(r: dict, recs: list[dict]) -> dict | None:
    """{text: gap closed} on the held-out texts (bench_quant's ppl_held_out) against the row's data-free row."""
    base = next((c for c in recs if c.get("method") == "base" and c.get("ppl_held_out")), None)
    ref = data_free(r, recs)
    if base is None or ref is None or not r.get("ppl_held_out") or not ref.get("ppl_held_out"):
        return None
    texts = [t for t in base["ppl_held_out"] if t in r["ppl_held_out"] and t in ref["ppl_held_out"]]
    return {t: gap_closed(ref["ppl_held_out"][t], r["ppl_held_out"][t], base["ppl_held_out"][t]) for t in texts}


def quant_table(recs: list[dict]) -> tuple[list[str], list[list[str]]]:
    extra = extra_quant_keys(recs)
    texts = next((list(r["ppl_held_out"]) for r in recs if r.get("ppl_held_out")), [])
    held = [f"gap closed: {' / '.join(t.split(':')[-1] for t in texts)}"] if texts else []
    header = ["row", "method", "grid", "bits/weight", "ppl", "KL", "top-1", "quant s", "peak MB", *held, *extra]
    rows = []
    for r in recs:
        c = held_out_closed(r, recs) if texts else None
        cell = [" / ".join(f"{100 * c[t]:.0f}%" for t in texts if t in c) if c else "-"] if texts else []
        rows.append([r["id"], family(r), grid(r), fmt(r.get("bits_per_weight"), ".3f"), fmt(r.get("ppl"), ".3f"),
                     fmt(r.get("kl"), ".4f"), fmt(r.get("top1"), ".4f"), fmt(r.get("seconds"), ".1f"),
                     fmt(r.get("peak_rss_mb"), ".0f"), *cell, *[fmt(r.get(k), ".4g") for k in extra]])
    return header, rows


def pareto(recs: list[dict], x="bits_per_weight", y="ppl") -> list[dict]:
    """Rows no other row beats on both x and y (smaller is better on both), by increasing x."""
    pts = sorted((r for r in recs if r.get(x) is not None and r.get(y) is not None), key=lambda r: (r[x], r[y]))
    front, best = [], float("inf")
    for r in pts:
        if r[y] < best:
            front.append(r)
            best = r[y]
    return front


def gap_closed(ppl_plain: float, ppl: float, ppl_base: float) -> float:
    """The share of the plain quantizer's perplexity gap to the base model that a method closes:
    (ppl_plain - ppl) / (ppl_plain - ppl_base); 1 is the base model's perplexity, 0 no better than plain, below 0
    worse."""
    return (ppl_plain - ppl) / (ppl_plain - ppl_base)


def llamacpp_gap(rs: list[dict], rtn: dict, recs: list[dict]) -> str:
    """The same measure in llama.cpp's perplexity, for GGUF rows scored by llama.cpp against its F32 GGUF row."""
    f32 = next((r for r in recs if r.get("method") == "base" and r.get("ppl_llamacpp") is not None), None)
    scored = [r for r in rs if r.get("ppl_llamacpp") is not None and r is not rtn]
    if f32 is None or rtn.get("ppl_llamacpp") is None or not scored or rtn["ppl_llamacpp"] <= f32["ppl_llamacpp"]:
        return ""
    b = min(scored, key=lambda r: r["ppl_llamacpp"])
    g = gap_closed(rtn["ppl_llamacpp"], b["ppl_llamacpp"], f32["ppl_llamacpp"])
    said = f"{g:.1%} of the gap closed" if g >= 0 else "no row better than plain"
    return (f"; by llama.cpp, {b['id']} {b['ppl_llamacpp']:.3f} against {rtn['ppl_llamacpp']:.3f} and F32 "
            f"{f32['ppl_llamacpp']:.3f}: {said}")


def weights_reading(recs: list[dict]) -> list[str]:
    """What wins where, computed from the rows (no number here is typed in by hand)."""
    out = []
    base = next((r for r in recs if r.get("method") == "base"), None)
    q = [r for r in recs if r.get("method") != "base"]
    if base:
        out.append(f"Base (fp32): ppl {base['ppl']:.3f}.")
    if not q:
        return out
    front = pareto(q)
    out.append("Pareto front (no row has both fewer bits per weight and a lower ppl): "
               + ", ".join(f"{r['id']} ({r['bits_per_weight']:.2f} b, ppl {r['ppl']:.2f})" for r in front) + ".")
    by_grid: dict[str, list[dict]] = {}
    for r in q:
        by_grid.setdefault(grid(r), []).append(r)
    for g, rs in by_grid.items():
        if len(rs) < 2:
            continue
        best = min(rs, key=lambda r: r["ppl"])
        worst = max(rs, key=lambda r: r["ppl"])
        rtn = next((r for r in rs if family(r).startswith("rtn")), None)
        line = f"{g}: best {best['id']} (ppl {best['ppl']:.3f}, KL {fmt(best.get('kl'), '.4f')})"
        if rtn is not None and rtn is not best:
            line += f", {100 * (best['ppl'] / rtn['ppl'] - 1):+.1f}% ppl against RTN ({rtn['ppl']:.3f})"
            if base and rtn["ppl"] > base["ppl"]:
                line += f", closing {gap_closed(rtn['ppl'], best['ppl'], base['ppl']):.1%} of its gap to base"
            line += llamacpp_gap(rs, rtn, recs)
        elif worst is not best:
            line += f"; worst {worst['id']} (ppl {worst['ppl']:.3f})"
        out.append(line + ".")
    timed = [r for r in q if r.get("seconds")]
    if timed:
        fast, slow = min(timed, key=lambda r: r["seconds"]), max(timed, key=lambda r: r["seconds"])
        out.append(f"Time: {fast['id']} quantizes in {fast['seconds']:.0f} s, {slow['id']} in {slow['seconds']:.0f} s "
                   f"({slow['seconds'] / max(fast['seconds'], 1e-9):.0f}x).")
    mem = [r for r in q if r.get("peak_rss_mb")]
    if mem:
        lo, hi = min(mem, key=lambda r: r["peak_rss_mb"]), max(mem, key=lambda r: r["peak_rss_mb"])
        out.append(f"Peak memory: {lo['peak_rss_mb']:.0f} MB ({lo['id']}) to {hi['peak_rss_mb']:.0f} MB ({hi['id']}).")
    return out


def weights_md(recs: list[dict]) -> str:
    r0 = recs[0]
    model = r0.get("model", "?")
    if model == "default":
        model += " (SmolLM2-135M-Instruct, fp32 dequantized from Q4_1)"
    calib = next((r["calibration"] for r in recs if r.get("calibration")), "none (no calibrated row)")
    head = (f"Model: {model}. Evaluation: {r0.get('text', '?')}, {r0.get('windows', '?')} windows of "
            f"{r0.get('ctx', '?')} tokens ({r0.get('tokens', '?')} tokens scored). Calibration: {calib}.")
    h, rows = quant_table(recs)
    parts = ["## Weights: bits per weight, perplexity, KL, time, memory", head, "",
             "> " + WEIGHTS_CAVEAT, "", "![bits per weight vs perplexity](weights.png)", "",
             "![quantization time and peak memory](weights_cost.png)", "", md_table(h, rows), "", "Reading:", ""]
    parts += [f"- {line}" for line in weights_reading(recs)]
    return "\n".join(parts)



def heldout_texts(rows: list[dict]) -> list[str]:
    """The held-out texts every row was scored on, in the first row's order."""
    texts = list(rows[0]["ppl"]) if rows else []
    return [t for t in texts if all(t in r["ppl"] for r in rows)]


def heldout_closed(rows: list[dict], texts: list[str]) -> dict:
    """{row id: {text: gap closed}} against each row's data-free reference (its 'ref') and the base row."""
    by = {r["id"]: r for r in rows}
    base = by.get("base")
    out = {}
    for r in rows:
        ref = by.get(r.get("ref"))
        if base is None or ref is None:
            continue
        out[r["id"]] = {t: gap_closed(ref["ppl"][t], r["ppl"][t], base["ppl"][t]) for t in texts}
    return out


def heldout_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    texts = heldout_texts(rows)
    closed = heldout_closed(rows, texts)
    h = ["row", "vs", "bits/w", "quant s"] + [c for t in texts for c in (f"ppl {t}", f"closed {t}")] + ["mean closed"]
    out = []
    for r in rows:
        c = closed.get(r["id"])
        cells = [r["id"], r.get("ref") or "", fmt(r.get("bits_per_weight"), ".3f"), fmt(r.get("seconds"), ".0f")]
        for t in texts:
            cells += [fmt(r["ppl"][t], ".3f"), f"{100 * c[t]:.0f}%" if c else ""]
        cells.append(f"{100 * sum(c.values()) / len(c):.0f}%" if c else "")
        out.append(cells)
    return h, out


def heldout_reading(rows: list[dict]) -> list[str]:
    """The best calibrated row by mean gap closed, and every row that loses to its data-free row somewhere."""
    texts = heldout_texts(rows)
    closed = heldout_closed(rows, texts)
    if not closed:
        return []
    mean = {i: sum(c.values()) / len(c) for i, c in closed.items()}
    best = max(mean, key=mean.get)
    out = [f"Best by the mean over the {len(texts)} held-out texts: {best} closes "
           + ", ".join(f"{100 * closed[best][t]:.0f}% ({t})" for t in texts) + f"; mean {100 * mean[best]:.0f}%."]
    worse = [f"{i} on {t}" for i, c in closed.items() for t in texts if c[t] < 0]
    out.append("Worse than its data-free row: " + (", ".join(worse) if worse else "none") + ".")
    return out


def heldout_md(d: dict) -> str:
    rows = d["rows"]
    w = rows[0].get("windows", "?") if rows else "?"
    calib = next((r["calibration"] for r in rows if r.get("calibration")), "none")
    h, table = heldout_table(rows)
    parts = ["## Weights on held-out text: does what a calibrated method fits carry over?",
             f"`qkit bench heldout`: perplexity on the first {w} windows of 512 tokens of each text, none of them in "
             f"any calibration set (calibration, e.g.: {calib}). A row's share of the gap closed is "
             "(ppl(vs) - ppl(row)) / (ppl(vs) - ppl(base)), against its data-free row on the same grid (vs).", "",
             "![gap closed per held-out text](heldout.png)", "", md_table(h, table), "", "Reading:", ""]
    parts += [f"- {line}" for line in heldout_reading(rows)]
    return "\n".join(parts)


# --------------------------------------------------------------------------- vectors

def ann_configs(recs: list[dict]) -> dict[tuple, list[dict]]:
    """(impl, codec, rerank) -> that configuration's records, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in recs:
        out.setdefault((r["impl"], r["codec"], r["rerank"]), []).append(r)
    return out


def best_qps(rs: list[dict], target: float):
    ok = [r["qps"] for r in rs if r["recall_at_10"] >= target]
    return max(ok) if ok else None


def ann_summary(recs: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["impl", "codec", "rerank", "bytes/vector", *[f"QPS at R@10 >= {t}" for t in RECALL_TARGETS],
              "max R@10", "build s"]
    rows = []
    for (impl, codec, rr), rs in ann_configs(recs).items():
        rows.append([impl, codec, rr, fmt(rs[0]["bytes_in_ram"] / rs[0]["n"], ".1f"),
                     *[fmt(best_qps(rs, t), ".0f") for t in RECALL_TARGETS],
                     fmt(max(r["recall_at_10"] for r in rs), ".4f"), fmt(rs[0].get("build_s"), ".1f")])
    return header, rows


def ann_table(recs: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["impl", "codec", "ef", "rerank", "recall@10", "QPS", "bytes/vector", "build s"]
    rows = [[r["impl"], r["codec"], r["ef"], r["rerank"], fmt(r["recall_at_10"], ".4f"), fmt(r["qps"], ".1f"),
             fmt(r["bytes_in_ram"] / r["n"], ".1f"), fmt(r.get("build_s"), ".2f")] for r in recs]
    return header, rows


def codecs_table(recs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per (impl, codec): recall@10 of the estimate alone and after each re-rank depth."""
    reranks = sorted({r["rerank"] for r in recs})
    header = ["impl", "codec", "bytes/vector", *[("R@10" if rr == 0 else f"R@10 rerank {rr}") for rr in reranks]]
    by: dict[tuple, dict] = {}
    for r in recs:
        by.setdefault((r["impl"], r["codec"]), {"bpv": r["bytes_per_vector"]})[r["rerank"]] = r["recall_at_10"]
    rows = [[impl, codec, v["bpv"], *[fmt(v.get(rr), ".4f") for rr in reranks]] for (impl, codec), v in by.items()]
    return header, rows


def vectors_reading(ann_recs: list[dict], codec_recs: list[dict]) -> list[str]:
    """The fastest configuration at each recall target and the fewest bytes reaching it (computed)."""
    out = []
    cfgs = ann_configs(ann_recs)
    for t in RECALL_TARGETS:
        ok = [(best_qps(rs, t), k, rs[0]["bytes_in_ram"] / rs[0]["n"]) for k, rs in cfgs.items()
              if best_qps(rs, t) is not None]
        if not ok:
            out.append(f"No graph configuration reaches recall@10 {t}.")
            continue
        qps, (impl, codec, rr), bpv = max(ok, key=lambda x: x[0])
        small = min(ok, key=lambda x: x[2])
        line = (f"Recall@10 >= {t}: fastest {impl} {codec}" + (f" rerank {rr}" if rr else "")
                + f" ({qps:.0f} QPS, {bpv:.0f} bytes/vector)")
        if small[1] != (impl, codec, rr):
            s_impl, s_codec, s_rr = small[1]
            line += (f"; fewest bytes {s_impl} {s_codec}" + (f" rerank {s_rr}" if s_rr else "")
                     + f" ({small[2]:.0f} bytes/vector, {small[0]:.0f} QPS)")
        out.append(line + ".")
    for rr in sorted({r["rerank"] for r in codec_recs}):
        ok = [r for r in codec_recs if r["rerank"] == rr and r["recall_at_10"] >= 0.9]
        if ok:
            r = min(ok, key=lambda r: (r["bytes_per_vector"], -r["recall_at_10"]))
            out.append(f"Brute force, {'no re-ranking' if rr == 0 else f're-ranking the best {rr}'}: the smallest "
                       f"code reaching recall@10 0.9 is {r['impl']} {r['codec']} ({r['bytes_per_vector']} bytes, "
                       f"{r['recall_at_10']:.4f}).")
    return out


def vectors_md(ds: str, ann: dict | None, codecs: dict | None) -> str:
    parts = [f"## Vectors: {ds}", "", f"![recall vs QPS and bytes, {ds}](vectors-{ds}.png)", ""]
    recs = (ann or {}).get("records") or []
    if recs:
        r0 = recs[0]
        parts += [f"{r0['n']} base vectors of {r0.get('dim', '?')} dimensions, {r0.get('n_queries', '?')} queries; "
                  f"HNSW M={r0.get('M', '?')}, ef_construction={r0.get('ef_construction', '?')}, "
                  f"{r0.get('build_threads', '?')} build threads, one search thread; all implementations in one run "
                  f"on {machine_line(ann.get('machine', {}))}. bytes/vector = what a search reads (codes, graph, "
                  f"ids, and the re-rank store when it re-ranks) / n.", ""]
        h, rows = ann_summary(recs)
        parts += [md_table(h, rows), ""]
        churn = [r for r in recs if "removed_10pct" in r]
        if churn:
            parts += ["After removals and under a filter (recall@10 at the fastest setting reaching 0.95):", "",
                      md_table(["codec", "ef", "rerank", "recall@10", "10% filter", "10% removed"],
                               [[r["codec"], r["ef"], r["rerank"], fmt(r["recall_at_10"], ".4f"),
                                 fmt(r.get("filter_10pct"), ".4f"), fmt(r.get("removed_10pct"), ".4f")]
                                for r in churn]), ""]
        h, rows = ann_table(recs)
        parts += ["<details><summary>every setting</summary>", "", md_table(h, rows), "", "</details>", ""]
    crecs = [r for r in (codecs or {}).get("records") or [] if r["dataset"] == ds]
    if crecs:
        nq = crecs[0].get("n_queries", "?")
        parts += [f"Brute force (every code scanned, no graph; {nq} queries): recall@10 of each codec's estimate, "
                  "then after exact re-ranking of its best candidates.", ""]
        h, rows = codecs_table(crecs)
        parts += [md_table(h, rows), ""]
    reading = vectors_reading(recs, crecs)
    if reading:
        parts += ["Reading:", "", *[f"- {line}" for line in reading], ""]
    return "\n".join(parts).rstrip()


# --------------------------------------------------------------------------- kernels

def kernels_table(recs: list[dict], bw: dict | None) -> tuple[list[str], list[list[str]]]:
    header = ["kernel", "backend", "bytes/vector", "GB/s", "% of read bandwidth", "Mvec/s", "x f32 BLAS"]
    rows = []
    for r in recs:
        pct = 100 * r["gbps"] / bw["read_gbps"] if bw else None
        rows.append([r["kernel"], r["backend"], fmt(r.get("bytes_per_vector"), ".1f"), fmt(r["gbps"], ".2f"),
                     fmt(pct, ".0f"), fmt(r["vectors_per_s"] / 1e6, ".1f"), fmt(r.get("ratio_vs_f32_blas"), ".2f")])
    return header, rows


def kernels_reading(recs: list[dict], bw: dict | None) -> list[str]:
    """Per kernel, the fastest backend and its share of the streaming read bandwidth (computed)."""
    out = []
    for k in dict.fromkeys(r["kernel"] for r in recs):
        rs = [r for r in recs if r["kernel"] == k]
        best = max(rs, key=lambda r: r["vectors_per_s"])
        line = f"{k}: fastest {best['backend']}, {best['gbps']:.2f} GB/s"
        if bw and not k.startswith("dot_many"):   # the many-against-many kernel is compute-bound by design
            line += f" ({100 * best['gbps'] / bw['read_gbps']:.0f}% of the read bandwidth)"
        slow = min(rs, key=lambda r: r["vectors_per_s"])
        if slow is not best:
            line += f", {best['vectors_per_s'] / slow['vectors_per_s']:.1f}x {slow['backend']}"
        out.append(line + ".")
    return out


def kernels_md(recs: list[dict] | None, bw: dict | None) -> str:
    parts = ["## Kernels: throughput per backend against memory bandwidth"]
    if bw:
        parts += [f"One core streams {bw['copy_gbps']:.2f} GB/s in a copy (read + write) and reads "
                  f"{bw['read_gbps']:.2f} GB/s ({bw.get('mb', 0):.0f} MB buffers, best of {bw.get('repeat', '?')}). "
                  "A scan that reads its codes once cannot beat the read figure once they are out of cache; "
                  "GB/s below counts the bytes each kernel reads, one thread."
                  + (f" The 1-minute load average during the bandwidth run was {bw['load_average_1m']:.1f} on "
                     f"{bw.get('machine', {}).get('cores', '?')} cores: other jobs shared the memory bus."
                     if bw.get("load_average_1m", 0) >= 1 else ""), ""]
    if recs:
        r0 = recs[0]
        parts += [f"Rows of {r0.get('dim', '?')} dimensions; {r0.get('rows', '?')} rows in the int8 scans "
                  f"({machine_line(r0.get('machine', {}))}).", "", "![kernel throughput](kernels.png)", ""]
        h, rows = kernels_table(recs, bw)
        parts += [md_table(h, rows), "", "Reading:", "", *[f"- {line}" for line in kernels_reading(recs, bw)]]
    return "\n".join(parts).rstrip()


# --------------------------------------------------------------------------- the whole report

def render(data, meta: dict) -> str:
    """report.md of a ReportData and its meta (date, mode, machine, sources)."""
    parts = ["# qkit evaluation report", "",
             f"Generated {meta['date']} ({meta['mode']} mode) on {machine_line(meta.get('machine', {}))}.", "",
             "Sources: " + "; ".join(f"{k}: {v}" for k, v in meta.get("sources", {}).items()) + ".", "",
             "Every table below is rendered from the JSON in data/ (`qkit.eval.report_md.render`); rendering "
             "`qkit.eval.report.load_report(this directory)` again gives this file.", ""]
    if data.quant:
        parts += [weights_md(data.quant), ""]
    if data.heldout and data.heldout.get("rows"):
        parts += [heldout_md(data.heldout), ""]
    for ds in sorted((data.ann or {}).keys() | {r["dataset"] for r in (data.codecs or {}).get("records", [])}):
        parts += [vectors_md(ds, (data.ann or {}).get(ds), data.codecs), ""]
    if data.kernels or data.bandwidth:
        parts += [kernels_md(data.kernels, data.bandwidth), ""]
    return "\n".join(parts).rstrip() + "\n"
