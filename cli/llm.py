"""`qkit quantize` and `qkit eval ppl`: thin shells over qkit.pipeline and qkit.eval.perplexity."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from qkit.errors import UsageError
from qkit.export.common import FORMATS as EXPORT_FORMATS
from qkit.ggml.mixes import FTYPES
from qkit.gptq import CLI_DEFAULTS as _GPTQ_DEFAULTS
from qkit.text import BUILTIN, DEFAULT_CALIB, DEFAULT_EVAL, HELD_OUT

log = logging.getLogger("qkit.cli")
MIXES = tuple(FTYPES)  # llama.cpp's mix names, as `--type` takes them
METHODS = ("rtn", "gptq", "awq", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")
# --type (GGUF): the methods that write llama.cpp's mixes, and the options each takes beyond the mix
GGUF_OPTIONS = {"rtn": (), "gptq": ("act_order", "static_groups", "damp", "gptaq", "gptaq_alpha", "true_sequential",
                                    "calib", "nsamples", "seqlen", "seed"),
                "awq": ("calib", "nsamples", "seqlen", "seed")}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


CALIB_HELP = (f"Calibration text: a built-in set ({', '.join(n for n in BUILTIN if n not in HELD_OUT)}), "
              f"a local file or a dataset (default: {DEFAULT_CALIB}).")
TEXT_HELP = (f"Evaluation text: a built-in held-out text ({', '.join(HELD_OUT)}), a local file or a dataset "
             f"(default: {DEFAULT_EVAL}).")


def _check_json_path(path: str | None) -> None:
    """Fail before the work, not after it, when the summary cannot be written."""
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"--json {path}: directory {Path(path).resolve().parent} does not exist")


def _torch_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _static_for(fmt: str, bits: int, group_size, sym: bool, act_bits) -> bool:
    """Default act-order into a format that stores no g_idx (AWQ GEMM, int-quantized W8A8): static groups
    (each group's scale fixed on its contiguous columns before the updates), said once. True when switched."""
    from qkit import export
    from qkit.export.common import ExportSpec

    def takes(static: bool) -> bool:
        try:
            export.get_format(fmt).check(ExportSpec(fmt, bits, group_size, sym, act_order=True, static_groups=static,
                                                    method="gptq", act_bits=act_bits))
            return True
        except UsageError:
            return False

    if takes(False) or not takes(True):  # a format refusing the run for another reason says so itself, later
        return False
    click.echo(f"qkit: --format {fmt} stores no g_idx: act-order runs with static groups "
               "(--no-act-order or --group-aware to choose otherwise)", err=True)
    return True


def _warn_damped(ref) -> None:
    """--rotate with round-to-nearest on a model whose norms switch channels off (qkit.quarot.damped_norms).

    Only rtn: it is the measured loss. GPTQ (and AWQ + GPTQ) fit calibration outputs, which carry the un-damped
    channel, and compensate; AWQ's scale search sees it too, its effect after rotation is not measured."""
    from qkit.quarot import damped_warning

    w = damped_warning(ref)
    if w:
        click.echo(f"qkit: warning: {w}", err=True)


@click.command("quantize")
@click.argument("model", required=False)
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output directory.")
@click.option("--method", default="rtn", show_default=True, help=f"Chooser: {', '.join(METHODS)}.")
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True, help="Columns per group; -1 per channel.")
@click.option("--sym/--asym", default=False, show_default=True, help="Symmetric grid (zero = 2^(bits-1)).")
@click.option("--clip-search/--no-clip-search", default=None,
              help="rtn/gptq: MSE search of each group's range (default off); awq: AWQ's clip search on the "
                   "layer outputs (default on); awq --round gptq: GPTQ's MSE search (default off).")
@click.option("--act-order/--no-act-order", default=None,
              help="GPTQ: columns by decreasing diag(H) (desc_act). Default: on for gptq with --type (GGML blocks are "
                   "positional, so it implies static groups and costs nothing at run time); otherwise "
                   + ("on" if _GPTQ_DEFAULTS["act_order"] else "off") + " (qkit's GPTQ defaults, chosen on held-out "
                   "text: qkit bench heldout).")
@click.option("--static-groups", is_flag=True, help="GPTQ: fix every group's scale/zero before the updates.")
@click.option("--group-aware", is_flag=True,
              help="GPTQ with --act-order: groups stay at contiguous columns (g_idx = i // g, as kernels without "
                   "g_idx read them), taken by decreasing top diag(H) and each group's columns by diag(H) "
                   "(GPTQModel's act_group_aware); scale/zero chosen when a group is reached.")
@click.option("--damp", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="GPTQ: dampening, a fraction of mean(diag H).")
@click.option("--gptaq/--no-gptaq", default=None,
              help="GPTQ: asymmetric calibration (GPTAQ, GPTQModel's v2): each linear's target is the float model's "
                   "output, W X, solved on the quantized model's inputs; one more layer forward per layer. Default "
                   + ("on" if _GPTQ_DEFAULTS["gptaq"] else "off") + " (off inside GGML grids).")
@click.option("--gptaq-alpha", type=click.FloatRange(0, 1), default=None,
              help="GPTAQ: share of the asymmetric correction applied (the GPTAQ authors' default is 0.25; "
                   "qkit's: " + str(_GPTQ_DEFAULTS["gptaq_alpha"]) + ").")
@click.option("--true-sequential/--no-true-sequential", default=None,
              help="GPTQ: inside each layer, calibrate and quantize the linears in the order they run (q/k/v, o, "
                   "gate/up, down), each on the outputs of the quantized ones before it (AutoGPTQ's "
                   "true_sequential). Default " + ("on" if _GPTQ_DEFAULTS["true_sequential"] else "off")
              + " (off inside GGML grids).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=None,
              help="smoothquant: migration strength, s = max|X|^alpha / max|W|^(1-alpha) (default 0.5).")
@click.option("--act-bits", type=click.IntRange(8, 8), default=None,
              help="Per-token dynamic int8 activations (W8A8): written as compressed-tensors int-quantized, applied "
                   "by `qkit eval ppl`. Default 8 for smoothquant; with rtn: naive W8A8.")
@click.option("--n-grid", type=click.IntRange(1, None), default=20, show_default=True,
              help="awq: grid points of the alpha search.")
@click.option("--search-samples", type=click.IntRange(1, None), default=4, show_default=True,
              help="awq: calibration sequences the scale and clip searches run on (mean|x| uses all).")
@click.option("--round", "rounding", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
              help="AWQ: how the scaled weights are rounded: rtn (the paper) or gptq (AWQ scales, then GPTQ with "
                   "the scaled inputs' Hessian; --act-order/--static-groups/--damp apply).")
@click.option("--rotate", is_flag=True,
              help="QuaRot: rotate the residual stream by a randomized Hadamard folded into the weights (norms "
                   "folded, a tied head untied) before quantizing; llama, mistral, qwen2, qwen3.")
@click.option("--rotate-seed", type=int, default=0, show_default=True, help="Seed of the rotation's random signs.")
@click.option("--online-hadamard", is_flag=True,
              help="With --rotate: also rotate down_proj's input by a Hadamard applied at run time (QuaRot stage 1b); "
                   "fake-quantized safetensors only (qkit eval ppl applies it); not with awq.")
@click.option("--calib", default=None, help=CALIB_HELP)
@click.option("--nsamples", type=click.IntRange(1, None), default=None,
              help=f"Calibration sequences (default: {_GPTQ_DEFAULTS['nsamples']} for gptq, the affine grids' "
                   "GPTAQ + true-sequential being a few layer forwards per layer; 128 otherwise).")
@click.option("--seqlen", type=click.IntRange(2, None), default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Calibration sampling seed.")
@click.option("--type", "ggml_type", default=None,
              help="A llama.cpp mix, case-insensitive, written as a GGUF with llama.cpp's bytes: "
                   + ", ".join(MIXES) + ".")
@click.option("--imatrix", "imatrix_path", type=click.Path(), default=None,
              help="Importance matrix for the GGML quantizers: qkit imatrix or llama-imatrix GGUF, or a legacy imatrix.dat.")
@click.option("--format", "fmt", default=None,
              type=click.Choice(["safetensors", "gguf", *EXPORT_FORMATS]),
              help="Output format (default: gguf for --type or a .gguf OUTPUT, else a fake-quantized safetensors dir). "
                   "gptq (v1: zeros stored minus 1, so asymmetric zeros are kept >= 1), gptq_v2, awq (GEMM, 4 bits) "
                   "and compressed-tensors (pack-quantized) write packed checkpoints that `qkit eval ppl` reads back.")
@click.option("--threads", type=click.IntRange(1, None), default=None, help="Torch threads (default: torch's choice).")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the summary as JSON.")
def quantize_cmd(model, output, method, bits, group_size, sym, clip_search, act_order, static_groups, group_aware,
                 damp, gptaq, gptaq_alpha, true_sequential, alpha,
                 act_bits, n_grid, search_samples, rounding, rotate, rotate_seed, online_hadamard, calib, nsamples,
                 seqlen, seed, ggml_type, imatrix_path, fmt, threads, json_path):
    """Quantize MODEL (default: SmolLM2-135M-Instruct) layer by layer and write OUTPUT.

    Methods: rtn; gptq; awq (activation-aware scales searched per layer, folded into norms and linears);
    smoothquant (W8A8: per-channel int8 weights after smoothing, per-token dynamic int8 activations).
    """
    from qkit import affine, pipeline
    from qkit.gptq import GPTQ, GPTQConfig
    from qkit.model import loader
    from qkit.rtn import RTN
    from qkit.text import calibration_set

    method = method.lower()
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    ctx = click.get_current_context()

    def given(name):
        return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE

    gptaq_alpha = _GPTQ_DEFAULTS["gptaq_alpha"] if gptaq_alpha is None else gptaq_alpha

    if method == "smoothquant":  # W8A8 defaults: per-channel symmetric int8 weights, int8 activations
        bits = bits if given("bits") else 8
        group_size = group_size if given("group_size") else -1
        sym = sym if given("sym") else True
        act_bits = act_bits or 8
    for opt, ok in (("alpha", method == "smoothquant"), ("n_grid", method == "awq"),
                    ("search_samples", method == "awq"),
                    ("rounding", method == "awq"), ("act_bits", method in ("rtn", "smoothquant"))):
        if given(opt) and not ok:
            raise UsageError(f"--{'round' if opt == 'rounding' else opt.replace('_', '-')} does not apply to "
                             f"--method {method}")
    if given("rotate_seed") and not rotate:
        raise UsageError("--rotate-seed applies only with --rotate")
    if online_hadamard and not rotate:
        raise UsageError("--online-hadamard applies only with --rotate")
    if online_hadamard and method == "awq":
        raise UsageError("--online-hadamard does not combine with --method awq: AWQ folds the down_proj scales into "
                         "up_proj, across the run-time Hadamard")
    if clip_search and method == "smoothquant":
        raise UsageError("--clip-search does not apply to --method smoothquant (per-channel int8, min-max)")
    fmt = fmt or ("gguf" if ggml_type or Path(output).suffix == ".gguf" else
                  "compressed-tensors" if act_bits else "safetensors")
    if act_bits and fmt != "compressed-tensors":
        raise UsageError(f"activation quantization (--act-bits, smoothquant) is written as compressed-tensors "
                         f"int-quantized; drop --format {fmt}")
    if fmt == "gguf":
        from qkit.ggml.mixes import mix_name
        from qkit.model.gguf_write import write_gguf
        from qkit.model import loader as _loader

        if not ggml_type:
            raise UsageError("a GGUF output needs --type (a llama.cpp mix such as Q4_K_M)")
        if method not in GGUF_OPTIONS:
            raise UsageError(f"--method {method} into GGML grids is not available; --type takes "
                             f"{', '.join(GGUF_OPTIONS)}")
        if method == "awq" and rounding != "rtn":
            raise UsageError("--round gptq does not apply to --type: use --method gptq for GPTQ in the GGML grids")
        def flag(n):  # as the user typed it
            return "--no-act-order" if n == "act_order" and act_order is False else f"--{n.replace('_', '-')}"

        ignored = [flag(n) for n in ("bits", "group_size", "sym", "clip_search", "act_order", "static_groups",
                                     "group_aware", "damp", "gptaq", "gptaq_alpha", "true_sequential", "calib",
                                     "nsamples", "seqlen", "seed")
                   if given(n) and n not in GGUF_OPTIONS[method]]
        if ignored:
            raise UsageError(f"{', '.join(ignored)} do not apply to --type {ggml_type} with --method {method}: the "
                             "mix decides every tensor's grid")
        if Path(output).is_dir():
            raise UsageError(f"output {output} is a directory; give a .gguf file name")
        # GPTQ in GGML grids: act-order by default. The blocks stay positional (static groups), and on the
        # default model it is the better GPTQ at both mixes measured (eval/report: q4_k_m-gptq-ao vs q4_k_m-gptq)
        act_order = method == "gptq" if act_order is None else act_order
        # GPTAQ and true-sequential are opt-in inside the GGML grids (measured on the affine grid only)
        gptaq, true_sequential = bool(gptaq), bool(true_sequential)
        nsamples = nsamples or 128  # the GGML grids' calibrated rows were measured on 128 sequences
        mix = mix_name(ggml_type)
        _check_json_path(json_path)
        _torch_threads(threads)
        im = None
        if imatrix_path:  # read before any (possibly long) model conversion
            from qkit.imatrix import read_imatrix

            im = read_imatrix(imatrix_path)
        ref = _loader.resolve(model)
        if online_hadamard:
            raise UsageError("--online-hadamard cannot be written to GGUF: llama.cpp does not apply it")
        if rotate:  # the writer reads every tensor through the rotation; the head becomes output.weight
            from qkit.quarot import RotateConfig, rotated_ref

            if method == "rtn":  # the source's norms (the rotated store's are ones)
                _warn_damped(ref)
            ref = rotated_ref(ref, RotateConfig(seed=rotate_seed))
        click.echo(f"quantizing {ref.name} to GGUF {mix} (llama.cpp's mix rules, "
                   + ("its rounding" if method == "rtn" else f"{method} in its grids" + (", act-order, static groups"
                                                                                       if act_order else ""))
                   + (f", importance matrix of {len(im)} tensors" if im else "")
                   + (f", rotated: randomized Hadamard, seed {rotate_seed}" if rotate else "") + f") -> {output}")
        if method == "rtn":
            g = write_gguf(ref, output, mix, imatrix=im, progress=True, inputs=(imatrix_path,) if imatrix_path else ())
        else:
            g = _gguf_calibrated(ref, output, mix, method, im, imatrix_path, calib, nsamples, seqlen, seed,
                                 act_order, static_groups, damp, n_grid, search_samples, gptaq, gptaq_alpha,
                                 true_sequential)
        types = ", ".join(f"{k} x{v}" for k, v in sorted(g.types.items()))
        click.echo(f"done: {g.tensors} tensors ({types}); {g.bits_per_weight:.3f} bits/weight; "
                   f"{g.seconds:.1f} s; output {_fmt_bytes(g.output_bytes)}")
        if json_path:
            from dataclasses import asdict

            from qkit.fileio import atomic_write

            with atomic_write(json_path, "w") as f:
                gptq_rec = {"desc_act": act_order, "static_groups": act_order or static_groups,
                            # act-order implies static groups
                            "damp_percent": damp, "true_sequential": true_sequential,
                            **({"gptaq": True, "gptaq_alpha": gptaq_alpha} if gptaq else {})} if method == "gptq" else {}
                json.dump({**asdict(g), **gptq_rec,
                           **({"rotate": {"kind": "hadamard", "seed": rotate_seed}} if rotate else {})}, f, indent=1)
        return
    if ggml_type or imatrix_path:
        raise UsageError(f"--type and --imatrix write GGUF; drop --format {fmt}")
    default_order = method == "gptq" and act_order is None  # act-order from qkit's defaults, not asked for
    if method == "gptq":  # qkit's GPTQ defaults (qkit.gptq.CLI_DEFAULTS), each flag overriding its own
        act_order = _GPTQ_DEFAULTS["act_order"] if act_order is None else act_order
        gptaq = _GPTQ_DEFAULTS["gptaq"] if gptaq is None else gptaq
        true_sequential = _GPTQ_DEFAULTS["true_sequential"] if true_sequential is None else true_sequential
    nsamples = nsamples or (_GPTQ_DEFAULTS["nsamples"] if method == "gptq" else 128)
    act_order, gptaq, true_sequential = bool(act_order), bool(gptaq), bool(true_sequential)
    if group_size == 0 or group_size < -1:
        raise UsageError(f"--group-size must be a positive number of columns or -1, got {group_size}")
    _check_json_path(json_path)
    _torch_threads(threads)
    # Scales are fp16 in every output (as every packed format stores them, and as bits/weight counts them), so
    # the safetensors output and each packed export of the same run are the same model.
    grid = {"scale_dtype": "float16", "min_zero": 0}
    if fmt != "safetensors":
        from qkit import export

        grid = export.grid_requirements(fmt)
    if clip_search is None:
        # AWQ's own clip search is part of the method (not before GPTQ rounding); RTN's MSE search is opt-in
        clip_search = method == "awq" and rounding == "rtn"
    if (act_order or static_groups) and not (method == "gptq" or (method == "awq" and rounding == "gptq")):
        raise UsageError("--act-order and --static-groups apply to --method gptq (or awq with --round gptq)")
    if group_aware and not act_order:
        raise UsageError("--group-aware orders columns by act-order inside contiguous groups: add --act-order")
    if gptaq and method != "gptq":
        raise UsageError("--gptaq applies to --method gptq")
    if given("gptaq_alpha") and not gptaq:
        raise UsageError("--gptaq-alpha applies with --gptaq")
    if true_sequential and method != "gptq":
        raise UsageError("--true-sequential applies to --method gptq")
    cfg = affine.AffineConfig(bits=bits, group_size=None if group_size == -1 else group_size, symmetric=sym,
                              method="mse" if clip_search and method in ("rtn", "gptq") else "minmax", **grid)
    ref = loader.resolve(model)
    rot = None
    if rotate:
        from qkit.quarot import RotateConfig, check_rotatable

        rot = RotateConfig(seed=rotate_seed, online=online_hadamard)
        check_rotatable(loader.load_config(ref))  # before the calibration text is tokenized
        if method == "rtn":
            _warn_damped(ref)
    record = {"bits": bits, "group_size": group_size, "sym": sym, "clip_search": clip_search, "source": str(ref.dir),
              "scale_dtype": "float16", "min_zero": grid["min_zero"], **({"act_bits": act_bits} if act_bits else {})}
    if method == "gptq":
        if default_order and act_order and not (static_groups or group_aware) and fmt != "safetensors":
            static_groups = _static_for(fmt, bits, cfg.group_size, sym, act_bits)
        gcfg = GPTQConfig(bits=bits, group_size=cfg.group_size, symmetric=sym, act_order=act_order,
                          static_groups=static_groups, group_aware=group_aware, damp=damp, clip_search=clip_search,
                          gptaq=gptaq, gptaq_alpha=gptaq_alpha, true_sequential=true_sequential, **grid)
        chooser = GPTQ(gcfg)
        record.update({"desc_act": act_order, "static_groups": static_groups, "damp_percent": damp,
                       "true_sequential": true_sequential,
                       **({"gptaq": True, "gptaq_alpha": gptaq_alpha} if gptaq else {}),
                       **({"act_group_aware": True} if group_aware else {})})
    elif method == "awq":
        from qkit.awq import AWQ, AWQConfig

        gptq_cfg = None
        awq_clip = clip_search
        if rounding == "gptq":
            # --clip-search here is GPTQ's MSE grid; AWQ's own clip would hand GPTQ clipped weights to reproduce
            gptq_cfg = GPTQConfig(bits=bits, group_size=cfg.group_size, symmetric=sym, act_order=act_order,
                                  static_groups=static_groups, group_aware=group_aware, damp=damp,
                                  clip_search=clip_search, **grid)
            awq_clip = False
            record.update({"round": "gptq", "desc_act": act_order, "static_groups": static_groups,
                           "damp_percent": damp})
        chooser = AWQ(AWQConfig(bits=bits, group_size=cfg.group_size, symmetric=sym, n_grid=n_grid, clip=awq_clip,
                                search_samples=search_samples, **grid), gptq=gptq_cfg)
        record.update({"n_grid": n_grid, "search_samples": search_samples})
    elif method == "smoothquant":
        from qkit.smoothquant import SmoothQuant, SmoothQuantConfig

        alpha = 0.5 if alpha is None else alpha
        chooser = SmoothQuant(SmoothQuantConfig(alpha=alpha, bits=bits, group_size=cfg.group_size, symmetric=sym,
                                                act_bits=act_bits, **grid))
        record["alpha"] = alpha
    else:
        chooser = RTN(cfg)
    if fmt != "safetensors":  # what the format cannot hold (bits, act-order's g_idx): refused before any work
        export.check_chooser(fmt, chooser)
        export.get_format(fmt).check(chooser.export_spec(fmt, act_bits))
    samples = calib_desc = None
    if method in CALIBRATED:
        tok = loader.load_tokenizer(ref)
        samples, calib_desc = calibration_set(calib, lambda t: tok(t).input_ids, nsamples, seqlen, seed)
        calib_desc = f"{calib_desc}: {nsamples} x {seqlen} tokens, seed {seed}"
        record["calibration"] = calib_desc
    click.echo(f"quantizing {ref.name} with {method} W{bits}" + (f"A{act_bits}" if act_bits else "")
               + (f" rotated (randomized Hadamard, seed {rotate_seed}"
                  + (", online before down_proj)" if online_hadamard else ")") if rotate else "")
               + f" g{group_size} {'sym' if sym else 'asym'}" + (" act-order" if act_order else "")
               + (f" alpha {alpha}" if method == "smoothquant" else "") + f" -> {output}"
               + (f"\ncalibration: {calib_desc}" if calib_desc else ""))
    if fmt == "gptq" and not sym:
        click.echo("gptq (v1) stores zero - 1: every zero is kept >= 1 at quantization time (a group whose zero "
                   "would be 0 gets its grid widened by one step); --format gptq_v2 keeps the plain grid")
    s = pipeline.quantize_model(ref, output, chooser, samples=samples, calibration=calib_desc, progress=True,
                                record=record, fmt=fmt, act_bits=act_bits, rotate=rot)
    stored = (f"; packed {fmt}: {s.extra['stored_bits_per_weight']:.3f} bits/weight as stored (g_idx, padding "
              "included)" if fmt != "safetensors" else " (fake-quantized fp32)")
    click.echo(f"done: {s.layers} layers, {s.linears} linears, {s.quantized_params / 1e6:.1f}M weights at "
               f"{s.bits_per_weight:.3f} bits/weight (codes + fp16 scales + zeros); {s.seconds:.1f} s, "
               f"peak RSS {s.peak_rss_mb:.0f} MB; output {_fmt_bytes(s.output_bytes)}{stored}")
    if json_path:
        from dataclasses import asdict

        from qkit.fileio import atomic_write

        with atomic_write(json_path, "w") as f:
            json.dump(asdict(s), f, indent=1)


def _gguf_calibrated(ref, output, mix, method, im, imatrix_path, calib, nsamples, seqlen, seed, act_order,
                     static_groups, damp, n_grid, search_samples, gptaq=False, gptaq_alpha=0.25,
                     true_sequential=False):
    """GPTQ or AWQ into the mix's GGML grids (qkit.gptq_ggml), calibrated on `calib`."""
    from qkit.awq import AWQConfig
    from qkit.gptq import GPTQConfig
    from qkit.gptq_ggml import quantize_gguf
    from qkit.model import loader
    from qkit.text import calibration_set

    tok = loader.load_tokenizer(ref)
    samples, desc = calibration_set(calib, lambda t: tok(t).input_ids, nsamples, seqlen, seed)
    desc = f"{desc}: {nsamples} x {seqlen} tokens, seed {seed}"
    click.echo(f"calibration: {desc}")
    return quantize_gguf(ref, output, mix, method, samples, calibration=desc, imatrix=im, progress=True,
                         inputs=(imatrix_path,) if imatrix_path else (),
                         gptq=GPTQConfig(act_order=act_order, static_groups=static_groups, damp=damp, gptaq=gptaq,
                                         gptaq_alpha=gptaq_alpha, true_sequential=true_sequential),
                         awq=AWQConfig(n_grid=n_grid, search_samples=search_samples))


@click.group("eval")
def eval_group():
    """Evaluate models."""


@eval_group.command("ppl")
@click.argument("model", required=False)
@click.option("--text", default=None, help=TEXT_HELP)
@click.option("--ctx", type=click.IntRange(2, None), default=512, show_default=True)
@click.option("--windows", type=click.IntRange(1, None), default=None, help="Evaluate only the first N windows.")
@click.option("--llamacpp-protocol", is_flag=True, help="Score only the second half of each window.")
@click.option("--base", default=None, help="Base model for KL divergence and top-1 agreement.")
@click.option("--threads", type=click.IntRange(1, None), default=None)
@click.option("--json", "json_path", type=click.Path(), default=None)
def ppl_cmd(model, text, ctx, windows, llamacpp_protocol, base, threads, json_path):
    """Perplexity of MODEL (default: SmolLM2-135M-Instruct) on non-overlapping windows of TEXT."""
    from qkit.eval.perplexity import perplexity
    from qkit.model import loader
    from qkit.text import DEFAULT_EVAL, load_text

    _check_json_path(json_path)
    _torch_threads(threads)
    ref = loader.resolve(model)
    tok = loader.load_tokenizer(ref)
    body, desc = load_text(text, default=DEFAULT_EVAL)
    ids = tok(body, add_special_tokens=True).input_ids
    m = loader.load_model(ref)
    b = loader.load_model(loader.resolve(base)) if base else None
    r = perplexity(m, ids, ctx, llamacpp=llamacpp_protocol, base=b, max_windows=windows, progress=True)
    line = f"{ref.name}: ppl {r.ppl:.4f} on {desc} ({r.tokens} scored tokens, {r.windows} windows of {ctx}" + \
        (f"; activations {r.activations})" if r.activations else ")")
    if b is not None:
        line += f"; base ppl {r.base_ppl:.4f}, KL from base {r.kl:.5f}, top-1 agreement {r.top1:.4f}"
    click.echo(line)
    if json_path:
        from qkit.fileio import atomic_write

        rec = {"model": str(model or "default:" + loader.DEFAULT_MODEL), "text": desc, **r.as_dict(),
               "protocol": "llama.cpp (second half)" if llamacpp_protocol else "all tokens"}
        if base:
            rec["base"] = base
        with atomic_write(json_path, "w") as f:
            json.dump(rec, f, indent=1)


@click.command("imatrix")
@click.argument("model", required=False)
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output imatrix GGUF.")
@click.option("--calib", default=None, help=CALIB_HELP)
@click.option("--nsamples", type=click.IntRange(1, None), default=128, show_default=True)
@click.option("--seqlen", type=click.IntRange(2, None), default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--process-output", is_flag=True,
              help="Also the LM head (output.weight), as llama-imatrix --process-output; an untied head only.")
@click.option("--threads", type=click.IntRange(1, None), default=None)
def imatrix_cmd(model, output, calib, nsamples, seqlen, seed, process_output, threads):
    """Importance matrix of MODEL: per input column of each linear, the mean squared activation."""
    from qkit.imatrix import collect, write_imatrix
    from qkit.model import loader
    from qkit.text import calibration_set

    if not Path(output).resolve().parent.is_dir():
        raise UsageError(f"output directory does not exist: {Path(output).resolve().parent}")
    _torch_threads(threads)
    ref = loader.resolve(model)
    tok = loader.load_tokenizer(ref)
    samples, desc = calibration_set(calib, lambda t: tok(t).input_ids, nsamples, seqlen, seed)
    if Path(output).is_dir():
        raise UsageError(f"output {output} is a directory; give a file name")
    stats = collect(ref, samples, progress=True, process_output=process_output)
    write_imatrix(output, stats, [f"{desc} ({nsamples} x {seqlen} tokens, seed {seed})"], seqlen,
                  inputs=ref.input_files())
    click.echo(f"imatrix of {len(stats)} tensors from {nsamples} x {seqlen} tokens of {desc} -> {output}")
