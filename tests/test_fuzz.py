"""Fuzzed inputs: every loader ends in a one-line QkitError or a load, never another exception, crash or hang.

The cases are qkit.eval.fuzz's (the same generators the 10,000-case campaign runs,
`qkit bench fuzz`), drawn here by hypothesis, a few hundred per loader;
every truncation at a section boundary is run exhaustively.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkit.eval import fuzz

# cases per loader (the slow loaders build a model from its config, or read HDF5 in a child process)
EXAMPLES = {"index": 300, "npy": 300, "fvecs": 200, "ivecs": 100, "bvecs": 200, "hdf5": 100, "safetensors": 300,
            "gguf": 300, "imatrix": 300, "config": 150, "quant-config": 200}


@pytest.fixture(scope="module")
def campaigns(tmp_path_factory):
    return {}


def campaign(campaigns, tmp_path_factory, name):
    if name not in campaigns:
        campaigns[name] = fuzz.Campaign(name, tmp_path_factory.mktemp(f"fuzz-{name}"))
    return campaigns[name]


def test_every_loader_is_fuzzed():
    assert set(EXAMPLES) == set(fuzz.TARGETS)


@pytest.mark.parametrize("name", list(fuzz.TARGETS))
def test_seed_loads_and_truncations_fail_cleanly(name, campaigns, tmp_path_factory):
    c = campaign(campaigns, tmp_path_factory, name)
    assert c.seeds[0].reference is not None, "the unmutated seed must load"
    results = list(c.truncation_cases())
    bad = [r for r in results if r.outcome == "FAIL"]
    assert not bad, "\n".join(f"{r.mutation}: {r.detail}" for r in bad[:5])
    assert any(r.outcome == "error" for r in results)


@pytest.mark.parametrize("name", list(fuzz.TARGETS))
def test_mutated_files_fail_cleanly(name, campaigns, tmp_path_factory):
    c = campaign(campaigns, tmp_path_factory, name)
    outcomes = []

    @settings(max_examples=EXAMPLES[name], deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=st.integers(0, 2**31 - 1))
    def check(case):
        r = c.run_case(case)
        outcomes.append(r.outcome)
        assert r.outcome != "FAIL", f"{name} case {case} ({r.mutation}): {r.detail}"

    check()
    assert "error" in outcomes   # the mutations do reach the checks


def test_json_edits_and_truncation_points_are_reproducible(tmp_path):
    c = fuzz.Campaign("npy", tmp_path)
    assert c.run_case(17).mutation == c.run_case(17).mutation
