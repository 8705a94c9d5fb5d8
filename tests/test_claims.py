"""The claims ledger: every claim answered, verdicts from the vocabulary, measured numbers equal to the records."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from normlab import claims, stats


@pytest.fixture(scope="module")
def entries():
    return claims.load_ledger()


def test_every_claim_has_an_entry_with_a_verdict_and_evidence(entries):
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids), "the ledger lists the claims in order"
    assert set(ids) == set(claims.claim_ids()), sorted(set(claims.claim_ids()) ^ set(ids))
    assert len(claims.claim_ids()) == 38
    for e in entries:
        assert e["verdict"] in claims.VOCABULARY, e
        assert len(e["evidence"].split()) >= 8, f"{e['id']}: evidence is a sentence or more, with its source"


def test_claim_ids_are_read_from_the_shared_list(tmp_path):
    text = "| id | claim |\n|---|---|\n| C01 | a |\n| C02 | b |\n"
    (tmp_path / "CLAIMS.md").write_text(text)
    assert claims.claim_ids(tmp_path / "CLAIMS.md") == ["C01", "C02"]


def test_measured_values_and_verdicts_equal_what_the_records_give(entries):
    assert claims.stale(entries) == []
    waiting = claims.pending()
    for e in entries:
        if e["id"] in claims.MEASURES and e["id"] not in waiting:
            assert e.get("measured"), f"{e['id']} is measured: run python -m normlab.claims --update"
        if e["id"] in waiting:
            assert not e.get("measured"), f"{e['id']}: numbers from a record that is not complete"


def test_a_record_still_recording_is_pending_not_measured(tmp_path, monkeypatch):
    import json

    (tmp_path / "running_stats").mkdir()
    (tmp_path / "running_stats" / "cpu.json").write_text(json.dumps({"profile": "cpu", "complete": False, "runs": []}))
    monkeypatch.setenv("NORMLAB_RESULTS", str(tmp_path))
    with pytest.raises(claims.RecordPending, match="still recording"):
        claims.MEASURES["C19"]()
    with pytest.raises(claims.RecordPending, match="no recorded results"):
        claims.MEASURES["C20"]()  # bn_fold_speed: nothing recorded in this folder


def test_the_transformer_claims_wait_for_the_depth_study(tmp_path, monkeypatch):
    # C29-C31 read ch08's grid and its depth study together: a complete grid is not enough.
    import json
    import shutil

    from normlab import results

    (tmp_path / "prepost_ln").mkdir()
    shutil.copy(results.results_dir() / "prepost_ln" / "cpu_converged.json", tmp_path / "prepost_ln")
    (tmp_path / "prepost_ln" / "cpu_converged_depth.json").write_text(
        json.dumps({"profile": "cpu_converged_depth", "complete": False, "runs": []}))
    monkeypatch.setenv("NORMLAB_RESULTS", str(tmp_path))
    for cid in ("C29", "C30", "C31"):
        with pytest.raises(claims.RecordPending, match="cpu_converged_depth.json is still recording"):
            claims.MEASURES[cid]()


def test_a_typed_number_or_verdict_is_caught(entries):
    changed = copy.deepcopy(entries)
    c06 = next(e for e in changed if e["id"] == "C06")
    key = next(iter(c06["measured"]["values"]))
    c06["measured"]["values"][key] = 1.0
    c06["verdict"] = "holds"
    problems = claims.stale(changed)
    assert any("C06: measured" in p for p in problems) and any("C06: verdict" in p for p in problems), problems
    stray = copy.deepcopy(entries)
    next(e for e in stray if e["id"] == "C05")["measured"] = {"values": {"x": 1}}
    assert any("C05: has measured values but no function" in p for p in claims.stale(stray))


def test_measured_verdicts_use_the_book_verdict_function():
    # combine(): every part holds -> holds; none holds -> does not hold; a mix -> partly.
    assert claims.combine([stats.HOLDS, stats.HOLDS]) == "holds"
    assert claims.combine([stats.WITHIN_NOISE, stats.DOES_NOT_HOLD]) == "does not hold"
    assert claims.combine([stats.HOLDS, stats.WITHIN_NOISE]) == "partly"
    assert claims.combine([stats.WITHIN_NOISE, stats.WITHIN_NOISE]) == "within noise"
    assert set(stats.MEASURED_VERDICTS) <= set(claims.VOCABULARY)
    # alternatives ("10x; elsewhere 3-5x"): one holding is enough; all measured against is needed to refute
    assert claims.either([stats.DOES_NOT_HOLD, stats.HOLDS]) == "holds"
    assert claims.either([stats.DOES_NOT_HOLD, stats.WITHIN_NOISE]) == "within noise"
    assert claims.either([stats.DOES_NOT_HOLD, stats.DOES_NOT_HOLD]) == "does not hold"


def test_factor_claims_are_judged_on_a_log_scale():
    iv = lambda est, lo, hi: stats.Interval(est, lo, hi, 3, "t-log", 0.95)  # noqa: E731
    assert claims.factor_verdict(iv(9.0, 7.0, 12.0), 10.0) == "holds"          # inside [5, 20]
    assert claims.factor_verdict(iv(1.5, 0.6, 4.0), 10.0) == "does not hold"   # wholly below 5
    assert claims.factor_verdict(iv(1.5, 0.6, 4.0), 4.0, within=1.25) == "within noise"
    iv = stats.Interval(-6.0, -9.0, -3.0, 3, "t", 0.95)
    assert claims.interval(iv) == "-6 [-9, -3] (n=3, 95% t)"


def test_parameter_counts_are_torch_nn_s():
    m = claims.MEASURES["C22"]().values
    c = m["channels"]
    assert (m["bn_parameters"], m["bn_buffers"]) == (2 * c, 2 * c + 1)
    assert (m["ln_parameters"], m["rms_parameters"], m["gn_parameters"]) == (2 * c, c, 2 * c)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "claims.yml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ("- id: C01\n  claim: x\n  verdict: true-ish\n  evidence: because\n", "is not one of"),
    ("- id: C01\n  claim: x\n  verdict: holds\n", "empty or missing evidence"),
    ("- id: C01\n  claim: x\n  verdict: holds\n  evidence: e\n  verdikt: holds\n", "unknown field"),
    ("- id: C01\n  claim: x\n  verdict: holds\n  evidence: e\n- id: C01\n  claim: y\n  verdict: holds\n  evidence: e\n",
     "appears twice"),
    ("id: C01\n", "must be a list"),
    ("- id: C01\n  claim: a: b: c\n", "not valid YAML"),
])
def test_bad_ledgers_are_refused_with_the_fix(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        claims.load_ledger(_write(tmp_path, text))


def test_update_rewrites_only_measured_fields(tmp_path, entries):
    p = tmp_path / "claims.yml"
    stripped = copy.deepcopy(entries)
    for e in stripped:
        e.pop("measured", None)
    p.write_text(yaml.safe_dump(stripped, sort_keys=False))
    changed = claims.update(p)
    assert set(changed) <= set(claims.MEASURES) and "C06" in changed
    assert claims.load_ledger(p) == entries, "update + the hand-written fields give back the committed ledger"


def test_the_table_renders_every_entry(entries):
    import sys
    sys.path.insert(0, str(claims.ledger_path().parent / "_ext"))
    from normlab_claims import ledger_markdown

    lines = ledger_markdown(entries)
    assert sum(line.startswith("* - C") for line in lines) == len(entries)
    assert any("*Measured* (`results/signal_propagation/cpu.json`)" in line for line in lines)


def test_normalizer_free_numbers_come_from_ch06s_claims(tmp_path, monkeypatch):
    # C33's verdict is the sources' (NF-ResNets are from 2021, not 2024); its numbers are ch06's two
    # match claims, judged by nf_resnet.claims at the pre-fixed margin.
    import json

    from normlab import results
    from normlab.experiments import nf_resnet as nfr

    record = results.load("nf_resnet", "cpu_converged")
    (tmp_path / "nf_resnet").mkdir()
    (tmp_path / "nf_resnet" / "cpu_converged.json").write_text(json.dumps({**record, "complete": True}))
    monkeypatch.setenv("NORMLAB_RESULTS", str(tmp_path))
    m = claims.MEASURES["C33"]()
    assert m.verdict is None and m.records == ["results/nf_resnet/cpu_converged.json"]
    rows = {text.split(" (")[0]: (iv, word) for text, iv, word in nfr.claims(record)}
    epochs = record["config"]["epochs"]
    iv, word = rows["NF + AGC matches BN"]
    assert m.values[f"nf_agc_minus_bn_{epochs}_epochs"] == claims.interval(iv)
    assert m.values[f"nf_agc_matches_bn_{epochs}_epochs"] == word
    iv, word = rows["NF without AGC matches BN"]
    assert m.values[f"nf_noagc_minus_bn_{epochs}_epochs"].startswith(f"{iv.estimate:+.3g} [")
    assert m.values[f"nf_noagc_matches_bn_{epochs}_epochs"] == word
    assert 0 <= m.values["agc_clipped_fraction_final_runs"] <= 1
    (tmp_path / "nf_resnet" / "cpu_converged.json").write_text(json.dumps({**record, "complete": False}))
    with pytest.raises(claims.RecordPending, match="still recording"):
        claims.MEASURES["C33"]()
