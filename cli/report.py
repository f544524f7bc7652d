"""`qkit eval report`: a thin shell over qkit.eval.report."""
from __future__ import annotations

import click


@click.command("report")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Report directory (replaced atomically; an existing one must be a qkit report).")
@click.option("--full", is_flag=True,
              help="The benchmarks' full defaults (hours; resumes from their caches) instead of quick sizes.")
@click.option("--sections", default="weights,vectors,kernels", show_default=True,
              help="Comma-separated subset of weights, vectors, kernels.")
@click.option("--datasets", "datasets_", default="fashion-mnist,glove-50", show_default=True,
              help="Vector datasets for the vectors section.")
@click.option("--quant-json", type=click.Path(), default=None,
              help="Read the weights section from bench_quant --json output, or its per-row cache directory.")
@click.option("--heldout-json", type=click.Path(), default=None,
              help="Read the held-out texts' table from bench_heldout --json output.")
@click.option("--ann-json", type=click.Path(), multiple=True,
              help="Read a dataset's graph results from bench_ann --json output (repeatable).")
@click.option("--codecs-json", type=click.Path(), default=None, help="Read brute-force results from bench_codecs --json.")
@click.option("--kernels-json", type=click.Path(), default=None, help="Read kernel results from bench_kernels --json.")
@click.option("--bandwidth-json", type=click.Path(), default=None,
              help="Read memory bandwidth from qkit bench bandwidth --json.")
@click.option("--cache", default=".qkit-run", show_default=True, type=click.Path(),
              help="Benchmark caches (bench_quant and bench_heldout rows; full sections under CACHE/report/).")
@click.option("--rerun", is_flag=True, help="Run full sections again instead of reusing CACHE/report/.")
def report_cmd(output, full, sections, datasets_, quant_json, heldout_json, ann_json, codecs_json, kernels_json, bandwidth_json,
               cache, rerun):
    """Run the benchmarks (or read their JSON) and write PNG plots and a Markdown report into OUTPUT."""
    from qkit.eval import report

    out = report.build(output, full=full, sections=[s for s in sections.split(",") if s],
                       datasets_=[d for d in datasets_.split(",") if d], quant_json=quant_json, ann_json=ann_json,
                       codecs_json=codecs_json, kernels_json=kernels_json, bandwidth_json=bandwidth_json,
                       heldout_json=heldout_json, cache=cache, rerun=rerun)
    click.echo(f"report: {out / 'report.md'}")
