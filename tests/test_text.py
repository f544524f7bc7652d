"""Text sources: local files, datasets formats, built-in defaults; calibration sampling."""
import json

import pytest

from qkit import text
from qkit.errors import DataError, UsageError


def test_local_txt_and_datasets_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\nsecond line")
    assert text.load_text(str(tmp_path / "a.txt")) == ("plain text\nsecond line", str(tmp_path / "a.txt"))
    rows = [{"text": "first row"}, {"text": "second row"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert text.load_text(str(tmp_path / "b.jsonl"))[0] == "first row\n\nsecond row"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "body": ["x y", "z"]}), tmp_path / "c.parquet")
    assert text.load_text(str(tmp_path / "c.parquet"))[0] == "x y\n\nz"  # first string column


def test_missing_file_and_hub_name_offline(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="text file not found"):
        text.load_text(str(tmp_path / "nope.txt"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load dataset 'wikitext' .*offline"):
        text.load_text("wikitext:wikitext-2-raw-v1:test")


def test_unknown_builtin():
    with pytest.raises(UsageError, match="unknown built-in text"):
        text.builtin_text("hamlet")


def test_calibration_samples_are_seeded_windows():
    torch = pytest.importorskip("torch")
    ids = torch.arange(1000)
    a = text.calibration_samples(ids, 8, 64, seed=1)
    assert a.shape == (8, 64)
    assert torch.equal(a, text.calibration_samples(ids, 8, 64, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))  # contiguous windows
    with pytest.raises(UsageError, match="fewer than one window"):
        text.calibration_samples(torch.arange(10), 2, 64)


@pytest.mark.data
def test_default_texts_are_disjoint():
    calib, _ = text.load_text(None, default=text.DEFAULT_CALIB)
    ev, _ = text.load_text(None)
    assert len(calib) > 4_000_000 and 250_000 < len(ev) < 400_000
    assert ev[1000:1200] not in calib
