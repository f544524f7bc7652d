"""`qkit quantize`, `qkit eval ppl` and `qkit generate`: thin shells over qkit.recipe, qkit.eval.perplexity and
qkit.runtime."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import click

from qkit.errors import UsageError
from qkit.export.common import FORMATS as EXPORT_FORMATS
from qkit.ggml.mixes import FTYPES
from qkit.gptq import CLI_DEFAULTS as _GPTQ_DEFAULTS
from qkit.recipe import CALIBRATED, GGUF_OPTIONS, METHODS  # noqa: F401  (the CLI's vocabulary, kept importable)
from qkit.text import BUILTIN, DEFAULT_CALIB, DEFAULT_EVAL, HELD_OUT

log = logging.getLogger("qkit.cli")
MIXES = tuple(FTYPES)  # llama.cpp's mix names, as `--type` takes them


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


@click.command("quantize")
@click.argument("model", required=False)
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output directory.")
@click.option("--method", default=None, show_default="rtn", help=f"Chooser: {', '.join(METHODS)}.")
@click.option("--bits", type=click.IntRange(2, 8), default=None, show_default="4; 8 for smoothquant")
@click.option("--group-size", type=int, default=None, show_default="128; -1 for smoothquant",
              help="Columns per group; -1 per channel.")
@click.option("--sym/--asym", default=None, show_default="asym; sym for smoothquant",
              help="Symmetric grid (zero = 2^(bits-1)).")
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
@click.option("--damp", type=click.FloatRange(0, 1), default=None, show_default="0.01",
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
@click.option("--n-grid", type=click.IntRange(1, None), default=None, show_default="20",
              help="awq: grid points of the alpha search.")
@click.option("--search-samples", type=click.IntRange(1, None), default=None, show_default="4",
              help="awq: calibration sequences the scale and clip searches run on (mean|x| uses all).")
@click.option("--round", "rounding", type=click.Choice(["rtn", "gptq"]), default=None, show_default="rtn",
              help="AWQ: how the scaled weights are rounded: rtn (the paper) or gptq (AWQ scales, then GPTQ with "
                   "the scaled inputs' Hessian; --act-order/--static-groups/--damp apply).")
@click.option("--rotate", is_flag=True,
              help="QuaRot: rotate the residual stream by a randomized Hadamard folded into the weights (norms "
                   "folded, a tied head untied) before quantizing; llama, mistral, qwen2, qwen3.")
@click.option("--rotate-seed", type=int, default=None, show_default="0", help="Seed of the rotation's random signs.")
@click.option("--online-hadamard", is_flag=True,
              help="With --rotate: also rotate down_proj's input by a Hadamard applied at run time (QuaRot stage 1b); "
                   "fake-quantized safetensors only (qkit eval ppl applies it); not with awq.")
@click.option("--calib", default=None, help=CALIB_HELP)
@click.option("--nsamples", type=click.IntRange(1, None), default=None,
              help=f"Calibration sequences (default: {_GPTQ_DEFAULTS['nsamples']} for gptq, the affine grids' "
                   "GPTAQ + true-sequential being a few layer forwards per layer; 128 otherwise).")
@click.option("--seqlen", type=click.IntRange(2, None), default=None, show_default="512")
@click.option("--seed", type=int, default=None, show_default="0", help="Calibration sampling seed.")
@click.option("--type", "ggml_type", default=None,
              help="A llama.cpp mix, case-insensitive, written as a GGUF with llama.cpp's bytes: "
                   + ", ".join(MIXES) + ".")
@click.option("--imatrix", "imatrix_path", type=click.Path(), default=None,
              help="Importance matrix for the GGML quantizers: qkit imatrix or llama-imatrix GGUF, or a legacy imatrix.dat.")
@click.option("--format", "fmt", default=None,
              type=click.Choice(["safetensors", "gguf", *EXPORT_FORMATS]),
              help="Output format. Default: gguf for --type or a .gguf OUTPUT; compressed-tensors for W8A8; else gptq "
                   "(packed; fake-quantized safetensors only for 5-7 bits or --online-hadamard). gptq (v1: zeros "
                   "stored minus 1, so asymmetric zeros are kept >= 1), gptq_v2, awq (GEMM, 4 bits) and "
                   "compressed-tensors (pack-quantized) are packed checkpoints that `qkit eval ppl` and `qkit "
                   "generate` run on qkit's kernels; safetensors: fake-quantized float32.")
@click.option("--recipe", "recipe_path", type=click.Path(), default=None,
              help="Run a recorded recipe instead of the options above: a checkpoint directory, its "
                   "qkit_quantization.json, or a JSON file of qkit.recipe.Recipe.as_dict().")
@click.option("--threads", type=click.IntRange(1, None), default=None, help="Torch threads (default: torch's choice).")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the summary as JSON.")
def quantize_cmd(model, output, threads, json_path, recipe_path, **options):
    """Quantize MODEL (default: SmolLM2-135M-Instruct) layer by layer and write OUTPUT.

    Methods: rtn; gptq; awq (activation-aware scales searched per layer, folded into norms and linears);
    smoothquant (W8A8: per-channel int8 weights after smoothing, per-token dynamic int8 activations).
    Every option maps to one field of a qkit.recipe.Recipe, which checks them all before any work.
    """
    from qkit.recipe import Recipe, load_recipe, model_has_conv1d

    ctx = click.get_current_context()
    if recipe_path:
        typed = [p.opts[-1] for p in ctx.command.params if p.name in options
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if typed:
            raise UsageError(f"--recipe gives every quantization option; drop {', '.join(typed)}")
        recipe = load_recipe(recipe_path)
    else:
        options["format"] = options.pop("fmt")
        options["type"] = options.pop("ggml_type")
        options["imatrix"] = options.pop("imatrix_path")
        recipe = Recipe.from_options(output=output, conv1d=model_has_conv1d(model), **options)
    _check_json_path(json_path)
    _torch_threads(threads)

    def say(line: str) -> None:
        click.echo(line, err=line.startswith("qkit:"))

    s = recipe.run(model, output, progress=True, say=say)
    if recipe.format == "gguf":
        types = ", ".join(f"{k} x{v}" for k, v in sorted(s.types.items()))
        click.echo(f"done: {s.tensors} tensors ({types}); {s.bits_per_weight:.3f} bits/weight; "
                   f"{s.seconds:.1f} s; output {_fmt_bytes(s.output_bytes)}")
        rec = {**asdict(s), **recipe.gguf_record()}
    else:
        stored = (f"; packed {recipe.format}: {s.extra['stored_bits_per_weight']:.3f} bits/weight as stored (g_idx, "
                  "padding included)" if recipe.format != "safetensors" else " (fake-quantized fp32)")
        click.echo(f"done: {s.layers} layers, {s.linears} linears, {s.quantized_params / 1e6:.1f}M weights at "
                   f"{s.bits_per_weight:.3f} bits/weight (codes + fp16 scales + zeros); {s.seconds:.1f} s, "
                   f"peak RSS {s.peak_rss_mb:.0f} MB; output {_fmt_bytes(s.output_bytes)}{stored}")
        rec = asdict(s)
    if json_path:
        from qkit.fileio import atomic_write

        with atomic_write(json_path, "w") as f:
            json.dump(rec, f, indent=1)


@click.group("eval")
def eval_group():
    """Evaluate models."""


RUNTIME_HELP = ("qkit: packed linears on qkit's int8-activation kernels (qkit.runtime), no float copy of the "
                "weights; torch: every weight dequantized to float32 and run by torch. A float model runs on torch "
                "either way.")
HEAD_HELP = "With --runtime qkit: the LM head and embedding as int8 rows (one matrix when tied), or as stored."


def _load_for_run(ref, runtime: str, threads: int | None, head: str):
    """(model, what ran) for eval ppl / generate."""
    from qkit.model import loader

    if runtime == "torch":
        return loader.load_model(ref), "torch float32 (dequantized)" if loader.quantization_config(ref.dir) \
            else "torch float32 (dense)"
    from qkit import runtime as rt

    model, info = rt.load(ref, threads=threads or 1, head=head, progress=True)
    if info.runtime == "qkit":
        rt.torch_beside_kernels()
    return model, info.describe()


@eval_group.command("ppl")
@click.argument("model", required=False)
@click.option("--text", default=None, help=TEXT_HELP)
@click.option("--ctx", type=click.IntRange(2, None), default=512, show_default=True)
@click.option("--windows", type=click.IntRange(1, None), default=None, help="Evaluate only the first N windows.")
@click.option("--llamacpp-protocol", is_flag=True, help="Score only the second half of each window.")
@click.option("--base", default=None, help="Base model for KL divergence and top-1 agreement.")
@click.option("--runtime", type=click.Choice(["qkit", "torch"]), default="qkit", show_default=True, help=RUNTIME_HELP)
@click.option("--head", type=click.Choice(["int8", "float"]), default="int8", show_default=True, help=HEAD_HELP)
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="Threads for torch and qkit's kernels (default: torch's choice, 1 kernel thread).")
@click.option("--json", "json_path", type=click.Path(), default=None)
def ppl_cmd(model, text, ctx, windows, llamacpp_protocol, base, runtime, head, threads, json_path):
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
    m, ran = _load_for_run(ref, runtime, threads, head)
    b = loader.load_model(loader.resolve(base)) if base else None
    r = perplexity(m, ids, ctx, llamacpp=llamacpp_protocol, base=b, max_windows=windows, progress=True)
    info = getattr(m, "qkit_runtime", None)
    if info is not None and info.activations:  # the kernels' own activation blocks, finer than per token
        r.activations = info.activations
    line = f"{ref.name}: ppl {r.ppl:.4f} on {desc} ({r.tokens} scored tokens, {r.windows} windows of {ctx}" + \
        (f"; activations {r.activations})" if r.activations else ")")
    if b is not None:
        line += f"; base ppl {r.base_ppl:.4f}, KL from base {r.kl:.5f}, top-1 agreement {r.top1:.4f}"
    click.echo(line)
    click.echo(f"ran on: {ran}")
    if json_path:
        from qkit.fileio import atomic_write

        rec = {"model": str(model or "default:" + loader.DEFAULT_MODEL), "text": desc, **r.as_dict(),
               "protocol": "llama.cpp (second half)" if llamacpp_protocol else "all tokens", "runtime": ran}
        if base:
            rec["base"] = base
        with atomic_write(json_path, "w") as f:
            json.dump(rec, f, indent=1)


@click.command("generate")
@click.argument("model", required=False)
@click.option("--prompt", default="The capital of France is", show_default=True, help="Prompt text.")
@click.option("-n", "n_tokens", type=click.IntRange(1, None), default=64, show_default=True, help="New tokens.")
@click.option("--temperature", type=click.FloatRange(0, None), default=0.0, show_default=True,
              help="0: greedy; otherwise sample from softmax(logits / T).")
@click.option("--top-k", type=click.IntRange(0, None), default=0, show_default=True, help="0: no top-k cut.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ignore-eos", is_flag=True, help="Generate all N tokens even past end-of-sequence.")
@click.option("--runtime", type=click.Choice(["qkit", "torch"]), default="qkit", show_default=True, help=RUNTIME_HELP)
@click.option("--head", type=click.Choice(["int8", "float"]), default="int8", show_default=True, help=HEAD_HELP)
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Threads for qkit's kernels and torch's ops.")
@click.option("--json", "json_path", type=click.Path(), default=None)
def generate_cmd(model, prompt, n_tokens, temperature, top_k, top_p, seed, ignore_eos, runtime, head, threads,
                 json_path):
    """Generate text from MODEL (a packed checkpoint, or any float model; default SmolLM2-135M-Instruct) with a
    KV cache; prints the text, prefill and decode tokens/s and where each decode token's time went."""
    from qkit.model import loader
    from qkit.runtime.generate import generate

    _check_json_path(json_path)
    _torch_threads(threads)
    ref = loader.resolve(model)
    tok = loader.load_tokenizer(ref)
    m, ran = _load_for_run(ref, runtime, threads, head)
    r = generate(m, tok, prompt, n_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                 stop_at_eos=not ignore_eos, split=True, progress=True)
    click.echo(prompt + r.text)
    click.echo(f"--\nran on: {ran}")
    click.echo(f"prefill: {r.prompt_tokens} tokens in {r.prefill_s * 1e3:.1f} ms ({r.prefill_tps:.1f} tokens/s); "
               f"decode: {r.new_tokens} tokens" + (f", {r.decode_tps:.1f} tokens/s" if r.new_tokens > 1 else "") +
               (" (stopped at end-of-sequence)" if r.stopped == "eos" else ""))
    if r.split_ms:
        total = sum(r.split_ms.values())
        click.echo("per decode token: " + ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)"
                                                    for k, v in r.split_ms.items()))
    if json_path:
        from qkit.fileio import atomic_write

        rec = {"model": str(model or "default:" + loader.DEFAULT_MODEL), "runtime": ran, "threads": threads,
               "prompt": prompt, **r.as_dict()}
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
