"""Fuzz every file loader qkit has: mutated files must load or fail with one QkitError line.

    qkit bench fuzz --cases 10000                 # every loader, one worker process each in turn
    qkit bench fuzz --cases 2000 --loader gguf    # one loader
    qkit bench fuzz --loader index --replay 1234  # re-run one case in this process, with its traceback

A case takes one seed file set (qkit.eval.fuzz_targets), applies one or two
mutations drawn from a generator seeded by (loader, case number), writes the
files and calls the loader. Mutations: truncation at a section boundary (and
one byte either side), random byte flips (half of them in the first 4 KiB,
where the headers are), an integer field set to a huge, negative or
overflowing value, and structured edits (wrong dtypes, shapes, offsets, value
types, pickle payloads; re-signed where the format has checksums).

Outcomes: ``same`` (loaded, same content as the seed), ``changed`` (loaded,
other content: a byte flip in float data, say), ``error`` (a QkitError with a
one-line message) and failures: another exception type, a multi-line or empty
message, a MemoryError, a case running past CASE_LIMIT_S, or the worker
process dying (a crash). The test suite runs the same cases through
hypothesis, a few hundred per loader (tests/test_fuzz.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from qkit.errors import QkitError
from qkit.eval import fuzz_llm_targets as llm
from qkit.eval import fuzz_targets as ft

CASE_LIMIT_S = 20.0   # a case past this is a hang (the slowest loaders take ~50 ms)
STALL_S = 120.0       # a worker that logs nothing for this long is killed: its case is a hang

TARGETS = {t.name: t for t in [
    ft.Target("index", ft.build_index, ft.load_index),
    ft.Target("npy", ft.build_npy, ft.load_npy),
    ft.Target("fvecs", ft._texmex_builder("fvecs"), ft.load_vectors),
    ft.Target("ivecs", ft._texmex_builder("ivecs"), ft.load_vectors),
    ft.Target("bvecs", ft._texmex_builder("bvecs"), ft.load_vectors),
    ft.Target("hdf5", ft.build_hdf5, ft.load_hdf5),
    ft.Target("safetensors", ft.build_safetensors, ft.load_safetensors),
    ft.Target("gguf", llm.build_gguf, llm.load_gguf),
    ft.Target("imatrix", llm.build_imatrix, llm.load_imatrix),
    ft.Target("config", llm.build_config, llm.load_config),
    ft.Target("quant-config", llm.build_quant_config, llm.load_quant_config),
]}


@dataclass
class Result:
    case: int
    outcome: str        # same | changed | error | FAIL
    mutation: str
    detail: str = ""


# ------------------------------------------------------------------ mutations
def truncations(seed: ft.Seed):
    """Every section boundary of every file, and one byte either side: (description, files)."""
    for name, bounds in seed.bounds.items():
        n = len(seed.files[name])
        for b in sorted({max(0, min(n - 1, x + d)) for x in bounds for d in (-1, 0, 1)}):
            yield f"truncate {name} at {b}", dict(seed.files, **{name: seed.files[name][:b]})


def _flip(rng: random.Random, files: dict):
    name = rng.choice(list(files))
    b = bytearray(files[name])
    if not b:
        return "flip (empty)", files
    where = []
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        i = rng.randrange(min(len(b), 4096)) if rng.random() < 0.5 else rng.randrange(len(b))
        b[i] ^= rng.randrange(1, 256)
        where.append(i)
    return f"flip {name} at {where}", dict(files, **{name: bytes(b)})


def _int_field(rng: random.Random, seed: ft.Seed, files: dict):
    name = rng.choice([n for n in seed.ints if seed.ints[n]] or list(files))
    if not seed.ints.get(name):
        return _flip(rng, files)
    off, width = rng.choice(seed.ints[name])
    b = bytearray(files[name])
    if off + width > len(b):
        return "int field past the end", files
    v = rng.choice(ft.EVIL_INTS + [len(b), len(b) + 1, -len(b)]) % (1 << (8 * width))
    b[off: off + width] = v.to_bytes(width, "little")
    return f"int {name}@{off}/{width} = {v}", dict(files, **{name: bytes(b)})


def mutate(rng: random.Random, seed: ft.Seed) -> tuple[str, dict]:
    """One or two mutations of the seed's files."""
    files = dict(seed.files)
    descs = []
    for _ in range(1 if rng.random() < 0.75 else 2):
        r = rng.random()
        if not any(seed.ints.values()):   # text formats (JSON): mostly structured edits, some breakage
            r = 0.15 + 0.3 * r / 0.6 if r < 0.6 else 1.0 if seed.edits else r
        if r < 0.15:
            name = rng.choice(list(seed.bounds))
            bounds = seed.bounds[name]
            b = max(0, min(len(files[name]), rng.choice(bounds) + rng.choice([-1, 0, 0, 1])))
            d, files = f"truncate {name} at {b}", dict(files, **{name: files[name][:b]})
        elif r < 0.45:
            d, files = _flip(rng, files)
        elif r < 0.65:
            d, files = _int_field(rng, seed, files)
        elif seed.edits:
            edit = rng.choice(seed.edits)
            try:
                files = dict(files, **edit(rng, files))
                d = f"edit {getattr(edit, '__name__', 'edit')}"
            except Exception as e:  # noqa: BLE001 - an edit that cannot apply to already-mangled bytes
                d = f"edit skipped ({type(e).__name__})"
        else:
            d, files = _flip(rng, files)
        descs.append(d)
    return "; ".join(descs), files


# ------------------------------------------------------------------ running cases
class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs too long (a BaseException, so no loader swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Campaign:
    """One loader's seeds, written under `workdir`, and the runner of its cases."""

    def __init__(self, name: str, workdir: Path):
        self.target = TARGETS[name]
        self.dir = Path(workdir)
        seed_dir = self.dir / "seeds"
        seed_dir.mkdir(parents=True, exist_ok=True)
        self.seeds = self.target.build(seed_dir)
        for i, s in enumerate(self.seeds):
            d = self._case_dir(i)
            for n, b in s.static.items():
                (d / n).write_bytes(b)
            out = self.check(i, "seed", s.files)
            s.reference = out.detail if out.outcome == "loaded" else None

    def _case_dir(self, i: int) -> Path:
        d = self.dir / f"case{i}"
        d.mkdir(exist_ok=True)
        return d

    def check(self, seed_i: int, desc: str, files: dict, case: int = -1) -> Result:
        d = self._case_dir(seed_i)
        for n, b in files.items():
            p = d / n
            with contextlib.suppress(FileNotFoundError):
                p.unlink()   # a new inode: a memory map of the previous case never sees these bytes
            p.write_bytes(b)
        for n in self.seeds[seed_i].files:
            if n not in files:
                with contextlib.suppress(FileNotFoundError):
                    (d / n).unlink()
        seed = self.seeds[seed_i]
        try:
            with time_limit(CASE_LIMIT_S):
                got = self.target.load(d / seed.main)
        except CaseTimeout:
            return Result(case, "FAIL", desc, f"hang: still running after {CASE_LIMIT_S:.0f} s")
        except QkitError as e:
            msg = str(e)
            if not msg or "\n" in msg:
                return Result(case, "FAIL", desc, f"QkitError message is not one line: {msg!r}")
            return Result(case, "error", desc, f"{type(e).__name__}: {msg}")
        except MemoryError:
            return Result(case, "FAIL", desc, "MemoryError (a declared size reached an allocation)")
        except Exception as e:  # noqa: BLE001 - the point of fuzzing: anything else is a finding
            tb = traceback.extract_tb(e.__traceback__)[-1]
            return Result(case, "FAIL", desc, f"{type(e).__name__}: {str(e)[:200]} "
                                              f"(at {Path(tb.filename).name}:{tb.lineno})")
        if seed.reference is None and desc == "seed":
            return Result(case, "loaded", desc, got)
        return Result(case, "same" if got == seed.reference else "changed", desc, "")

    def run_case(self, case: int) -> Result:
        rng = random.Random(f"{self.target.name}:{case}")
        i = rng.randrange(len(self.seeds))
        desc, files = mutate(rng, self.seeds[i])
        return self.check(i, f"seed {i}: {desc}", files, case)

    def truncation_cases(self):
        for i, s in enumerate(self.seeds):
            for desc, files in truncations(s):
                yield self.check(i, f"seed {i}: {desc}", files)


# ------------------------------------------------------------------ the campaign: one worker process per loader
def _worker(name: str, start: int, count: int, log: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=f"qkit-fuzz-{name}-") as tmp:
        camp = Campaign(name, Path(tmp))
        with open(log, "a") as f:
            for case in range(start, start + count):
                f.write(json.dumps({"begin": case}) + "\n")
                f.flush()
                r = camp.run_case(case)
                f.write(json.dumps(r.__dict__) + "\n")
                f.flush()


def _campaign(name: str, cases: int, log: Path) -> dict:
    """Run cases 0..cases-1 in worker processes; a worker that dies or stalls marks its case a failure."""
    counts = {"same": 0, "changed": 0, "error": 0, "FAIL": 0}
    failures = []
    start = 0
    t0 = time.perf_counter()
    while start < cases:
        log.write_text("")
        cmd = [sys.executable, "-P", "-m", "qkit.eval.fuzz", "--worker", "--loader", name, "--start", str(start),
               "--cases", str(cases - start), "--log", str(log)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        last_size, last_change = 0, time.monotonic()
        while proc.poll() is None:
            time.sleep(0.5)
            size = log.stat().st_size
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change > STALL_S:
                proc.kill()
        proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        pending = None
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if "begin" in rec:
                pending = rec["begin"]
                continue
            pending = None
            counts[rec["outcome"]] += 1
            if rec["outcome"] == "FAIL":
                failures.append(rec)
            start = rec["case"] + 1
        if proc.returncode != 0:
            if pending is None:
                raise RuntimeError(f"fuzz worker for {name} failed before its first case:\n{err[-2000:]}")
            why = f"worker died (exit {proc.returncode})" if proc.returncode > 0 or proc.returncode < -9 \
                else f"worker killed by signal {-proc.returncode}"
            counts["FAIL"] += 1
            failures.append({"case": pending, "outcome": "FAIL", "mutation": "(see --replay)",
                             "detail": f"{why}; {err.strip().splitlines()[-1] if err.strip() else ''}"})
            start = pending + 1
    return {"loader": name, "cases": sum(counts.values()), **counts, "seconds": round(time.perf_counter() - t0, 1),
            "failures": failures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qkit bench fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="cases per loader")
    ap.add_argument("--loader", action="append", choices=list(TARGETS), help="loader(s) to fuzz (default: all)")
    ap.add_argument("--replay", type=int, default=None, help="run one case here and print its outcome")
    ap.add_argument("--json", default=None, help="write the per-loader counts and failures as JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--log", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    names = a.loader or list(TARGETS)
    if a.worker:
        _worker(names[0], a.start, a.cases, Path(a.log))
        return 0
    if a.replay is not None:
        with tempfile.TemporaryDirectory() as tmp:
            for n in names:
                r = Campaign(n, Path(tmp) / n).run_case(a.replay)
                print(f"{n} case {r.case}: {r.outcome}: {r.mutation}\n  {r.detail}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="qkit-fuzz-") as tmp:
        for n in names:
            row = _campaign(n, a.cases, Path(tmp) / f"{n}.log")
            rows.append(row)
            print(f"{n:14s} {row['cases']:6d} cases: {row['same']:5d} same, {row['changed']:5d} changed, "
                  f"{row['error']:5d} QkitError, {row['FAIL']:4d} failures ({row['seconds']:.0f} s)", flush=True)
            for f in row["failures"][:10]:
                print(f"    case {f['case']}: {f['mutation']}: {f['detail']}", flush=True)
    if a.json:
        from qkit.fileio import atomic_write

        with atomic_write(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["FAIL"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
