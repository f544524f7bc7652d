"""Crash safety: `qkit quantize` and `qkit ann build` killed with SIGKILL (and interrupted with Ctrl-C).

Each writer is stopped at a named point through qkit.fileio's test hook
(QKIT_TEST_PAUSE / QKIT_TEST_PAUSE_FILE; the process sleeps there until killed)
or, for calibration, as soon as it says it has started. After every kill: the
target is absent or still the previous complete version, the inputs are byte
for byte what they were, and the next run succeeds and removes the temporary
files the dead processes left (qkit.fileio.remove_stale_temps).
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from llm_models import make_model  # noqa: E402

from qkit.ann import Index  # noqa: E402
from qkit.errors import FormatError  # noqa: E402
from qkit.model.safetensors_io import WeightStore  # noqa: E402

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 40


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (or of root itself)."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(target: Path) -> list[str]:
    return sorted(n for n in os.listdir(target.parent) if n.startswith(f".{target.name}."))


def start(args, tmp_path: Path, point: str | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    ready = tmp_path / f"paused-{time.monotonic_ns()}"
    if point:
        env.update(QKIT_TEST_PAUSE=point, QKIT_TEST_PAUSE_FILE=str(ready))
    # SIGINT back to its default in the child: a test run started in the background of a non-interactive shell
    # (nohup ... &) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all
    p = subprocess.Popen([sys.executable, "-P", "-m", "qkit.cli.main", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return p, ready


def wait_paused(p, ready: Path, timeout: float = 180) -> None:
    t_end = time.monotonic() + timeout
    while not ready.exists():
        if p.poll() is not None:
            pytest.fail(f"the writer exited ({p.returncode}) before its pause point:\n{p.stderr.read()[-3000:]}")
        if time.monotonic() > t_end:
            p.kill()
            pytest.fail("the writer never reached its pause point")
        time.sleep(0.05)


def kill9(p) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    p.stderr.close()


def run_ok(args):
    """A normal run, in this process (another pid than the killed ones: their temporaries are stale)."""
    from qkit.cli.main import main

    assert main(list(args)) == 0


# ------------------------------------------------------------------ qkit quantize
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("crash")
    src = root / "src"
    make_model("llama", src)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(str(src))
    (root / "calib.txt").write_text(TEXT)
    return root, src


def test_quantize_killed_at_every_stage(tiny_model, tmp_path):
    root, src = tiny_model
    out = tmp_path / "q"
    args = ["quantize", str(src), "-o", str(out), "--method", "gptq", "--group-size", "32", "--nsamples", "8",
            "--seqlen", "32", "--calib", str(root / "calib.txt")]
    inputs = snapshot(src)
    run_ok(args)
    v1 = snapshot(out)
    assert "qkit_quantization.json" in v1

    # 1. during calibration: killed as soon as the run says it is calibrating
    p, _ = start(args, tmp_path)
    for line in p.stdout:
        if line.startswith("calibration:"):
            break
    kill9(p)
    assert snapshot(out) == v1

    # 2. while quantizing: half of the first decoder layer's shard written into the temporary directory
    p, ready = start(args, tmp_path, "shard.writing@2")
    wait_paused(p, ready)
    kill9(p)
    assert snapshot(out) == v1 and leftovers(out), "the dead run's temporary directory should still be there"

    # 3. while replacing: the old output moved aside, the new one not yet in place
    p, ready = start(args, tmp_path, "dir.swapped")
    wait_paused(p, ready)
    kill9(p)
    assert not out.exists()   # absent: the previous version waits beside it, and is not half-replaced
    assert snapshot(src) == inputs

    # the next run succeeds, and removes (or puts back, then replaces) what the dead runs left
    run_ok(args)
    assert snapshot(out).keys() == v1.keys() and leftovers(out) == []   # GPTQ's float sums vary with threads
    store = WeightStore(out)
    assert all(store.get(k).shape == store.shape(k) for k in store.keys())
    assert snapshot(src) == inputs


# ------------------------------------------------------------------ qkit ann build
@pytest.fixture()
def vectors(tmp_path):
    for seed in (0, 1):
        np.save(tmp_path / f"x{seed}.npy", np.random.default_rng(seed).normal(size=(3000, 16)).astype(np.float32))
    return tmp_path / "x0.npy"


def test_ann_build_killed_while_writing(vectors, tmp_path):
    out = tmp_path / "i.qkit"
    args = ["ann", "build", str(vectors), "-o", str(out), "--ef-construction", "20", "--store", "float"]
    inputs = snapshot(vectors)
    run_ok(args)
    v1 = snapshot(out)
    assert list(v1) == [out.name]   # one file: graph, codes and the re-rank store
    other = ["ann", "build", str(vectors.with_name("x1.npy"))] + args[3:]   # other vectors

    # header written, arrays not; then the temporary complete, not yet renamed: the old index stands
    for point in ("index.writing", "atomic.before_rename"):
        p, ready = start(other, tmp_path, point)
        wait_paused(p, ready)
        kill9(p)
        assert snapshot(out) == v1 and leftovers(out)
        D, I = Index.load(out).search(np.zeros((1, 16), np.float32), 3, rerank=10)
        assert (I >= 0).all()
    assert snapshot(vectors) == inputs

    run_ok(other)
    Index.load(out).search(np.zeros((1, 16), np.float32), 3, rerank=10)
    assert snapshot(out) != v1 and leftovers(out) == []
    assert snapshot(vectors) == inputs


def test_ctrl_c_exits_130_with_one_line_and_no_partial_output(vectors, tmp_path):
    out = tmp_path / "i.qkit"
    p, ready = start(["ann", "build", str(vectors), "-o", str(out), "--ef-construction", "20"], tmp_path,
                     "index.writing")
    wait_paused(p, ready)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    tail = [ln for ln in err.splitlines() if ln.strip()][-1:]
    assert tail == ["qkit: interrupted"] and "Traceback" not in err
    assert not out.exists() and leftovers(out) == []


# ------------------------------------------------------------------ stale temporaries (qkit.fileio)
def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from qkit.fileio import _host, atomic_write, remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "out.bin"
    stale = tmp_path / f".out.bin.{_host()}-{dead_pid}-abc123.tmp"
    mine = tmp_path / f".out.bin.{_host()}-{os.getpid()}-xyz.tmp"
    other_host = tmp_path / f".out.bin.otherhost-{dead_pid}-abc.tmp"
    unrelated = tmp_path / ".out.bin.notes"
    for p in (stale, mine, other_host, unrelated):
        p.write_bytes(b"x")
    with atomic_write(target) as f:
        f.write(b"new")
    assert not stale.exists() and mine.exists() and other_host.exists() and unrelated.exists()
    # a directory swapped out by a dead replace_dir comes back when its target is missing
    old = tmp_path / f".d.old-{_host()}-{dead_pid}"
    old.mkdir()
    (old / "f").write_text("previous")
    remove_stale_temps(tmp_path / "d")
    assert (tmp_path / "d" / "f").read_text() == "previous" and not old.exists()
