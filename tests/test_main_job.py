"""The main job (`qkit run`, `./dev run`): its summary table and row choice; the LLM half end to end on tiny settings."""
import json

import pytest

from qkit.eval import main_job


def test_pick_is_the_fastest_setting_reaching_the_target():
    sweep = [{"ef": 10, "recall_at_10": 0.93, "qps": 9000.0}, {"ef": 16, "recall_at_10": 0.951, "qps": 7000.0},
             {"ef": 32, "recall_at_10": 0.98, "qps": 4000.0}]
    assert main_job._pick(sweep)["ef"] == 16
    assert main_job._pick(sweep[:1])["ef"] == 10          # none reaches it: the most accurate
    low = [{"ef": 10, "recall_at_10": 0.5, "qps": 9.0}, {"ef": 20, "recall_at_10": 0.7, "qps": 5.0}]
    assert main_job._pick(low)["ef"] == 20


def test_summary_table_has_one_line_per_row_and_aligned_columns():
    llm = [{"id": "base", "row": "base (fp32)", "ppl": 30.77, "kl": 0.0, "top1": 1.0, "file_bytes": 538e6,
            "bits_per_weight": 32.0, "seconds": None},
           {"id": "rtn", "row": "RTN W4 g128", "ppl": 40.18, "kl": 0.4145, "top1": 0.661, "file_bytes": 258.8e6,
            "bits_per_weight": 4.169, "seconds": 14.9}]
    ann = [{"row": "hnswlib (M 16, efc 200)", "ef": 24, "recall_at_10": 0.955, "qps": 6526.0,
            "bytes_per_vector": 3284.4, "build_s": 24.8}]
    t = main_job.summary_table(llm, ann).splitlines()
    assert len(t) == 2 + 3 and t[0].split() == ["part", "row", "quality", "size", "time"]
    assert "ppl 40.18, KL 0.4145, top-1 0.661" in t[3] and "258.8 MB, 4.17 bpw" in t[3] and "quantize 15 s" in t[3]
    assert "recall@10 0.955 at ef 24, 6,526 QPS" in t[4] and "3284 B/vector" in t[4] and "build 24.8 s" in t[4]
    col = t[0].index("quality")
    assert all(line[col - 2:col] == "  " for line in t[2:])


def test_subprocesses_do_not_import_from_the_working_directory():
    assert main_job.qkit_argv("info")[1:4] == ["-P", "-m", "qkit.cli.main"]


@pytest.mark.slow
@pytest.mark.data
def test_llm_rows_end_to_end_on_tiny_settings(tmp_path):
    recs = main_job.llm_rows(tmp_path, windows=1, nsamples=2, seqlen=64, only=("gptq-ao-w4g128",))
    assert [r["id"] for r in recs] == ["base", "gptq-ao-w4g128"]   # the RTN row runs the same two commands
    base, gptq = recs
    assert base["bits_per_weight"] == 32.0 and base["file_bytes"] > 1.8 * gptq["file_bytes"]
    for r in recs[1:]:
        assert 4.0 < r["bits_per_weight"] < 4.5 and r["kl"] > 0 and r["ppl"] > 1
        assert json.loads((tmp_path / f"{r['id']}.quant.json").read_text())["output_bytes"] == r["file_bytes"]
        cfg = json.loads((tmp_path / r["id"] / "config.json").read_text())["quantization_config"]
        assert cfg["bits"] == 4 and cfg["group_size"] == 128
    assert json.loads((tmp_path / "gptq-ao-w4g128" / "config.json").read_text())["quantization_config"]["desc_act"]
    assert "2 x 64 tokens" in gptq["calibration"]
