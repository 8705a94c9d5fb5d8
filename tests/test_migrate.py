"""The record-key migration: old names become the book's, values convert exactly, and it is idempotent."""

from __future__ import annotations

import json

import pytest

from normlab import migrate, results


OLD = {"experiment": "x", "profile": "cpu", "provenance": {"git_dirty": False},
       "config": {"dataset": "cifar10", "train_subset": 10000, "test_subset": None},
       "runs": [{"key": "k", "config": {"seed": 0}, "seed": 0,
                 "metrics": {"test_acc": 0.875, "final_train_loss": 0.5, "data": "CIFAR-10 (copy)", "diverged": False,
                             "train_steps": 12, "final_val_loss": None, "acc_eval_b8": 0.9},
                 "history": [{"step": 1, "test_acc": 0.5, "loss": 2.0}, 3]}]}


def test_old_keys_become_the_books_keys():
    new = migrate.migrate_record(OLD)
    m = new["runs"][0]["metrics"]
    assert m == {"test_error": 12.5, "train_loss": 0.5, "data_source": "CIFAR-10 (copy)", "diverged": False,
                 "steps": 12, "val_loss": None, "acc_eval_b8": 0.9, "n_train": 10000, "n_test": 10000}
    assert new["runs"][0]["history"] == [{"step": 1, "test_error": 50.0, "train_loss": 2.0}, 3]
    assert new["provenance"] == OLD["provenance"] and new["config"] == OLD["config"]
    assert migrate.migrate_record(new) == new  # idempotent
    assert OLD["runs"][0]["metrics"]["test_acc"] == 0.875  # the input is not modified


def test_the_cli_rewrites_stale_records_and_check_reports_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NORMLAB_RESULTS", str(tmp_path))
    (tmp_path / "x").mkdir()
    path = tmp_path / "x" / "cpu.json"
    results.atomic_write_json(path, OLD)
    assert migrate.main(["--check"]) == 1 and "needs migrating" in capsys.readouterr().out
    assert json.loads(path.read_text()) == OLD
    assert migrate.main([]) == 0
    assert migrate.main(["--check"]) == 0
    assert json.loads(path.read_text())["runs"][0]["metrics"]["test_error"] == pytest.approx(12.5)


def test_committed_records_use_the_books_keys():
    """Every committed record has been migrated (new records are written with these keys)."""
    stale = [p.name for p in sorted(results.results_dir().glob("*/*.json"))
             if migrate.migrate_record(results.load_path(p)) != results.load_path(p)]
    assert not stale, "run `python -m normlab.migrate`"


def _gn_record(runs):
    from normlab.experiments import gn_batch_size as g

    config = {k: v for k, v in g.PROFILES["cpu_converged"].items() if k != "doubling_batch_sizes"}
    config["epoch_list"] = [30, 60]  # as the profile first recorded
    return {"experiment": "gn_batch_size", "profile": "cpu_converged", "config": config, "complete": False,
            "runs": [{"key": results.run_key(r), "config": r} for r in runs]}


def test_a_narrowed_profile_keeps_its_recorded_runs_and_refuses_to_orphan_one():
    from normlab.experiments import gn_batch_size as g

    kept = [{"norm": "gn", "batch_size": 32, "seed": 0, "epochs": 30}, {"norm": "bn", "batch_size": 2, "seed": 1,
                                                                          "epochs": 60}]
    narrowed = migrate.amend_record(_gn_record(kept))
    assert narrowed["config"] == g.PROFILES["cpu_converged"]  # the sweep's configuration check now passes
    assert len(g.runs(narrowed["config"])) == 30 + 12 + 12 and narrowed["complete"] is False
    assert migrate.amend_record(narrowed) is narrowed  # idempotent
    orphan = _gn_record(kept + [{"norm": "bn", "batch_size": 8, "seed": 0, "epochs": 60}])
    with pytest.raises(ValueError, match="batch_size.*8.*not a run of the profile amended"):
        migrate.amend_record(orphan)


def test_a_widened_profile_keeps_its_recorded_runs_and_adds_the_new_ones():
    from normlab.experiments import nf_resnet as nfr

    config = {k: v for k, v in nfr.PROFILES["cpu_converged"].items() if k != "spp_seeds"}
    recorded = [r for r in nfr.runs(config) if r["kind"] == "spp" or (r["kind"] == "sweep" and r["model"] == "bn")][:6]
    record = {"experiment": "nf_resnet", "profile": "cpu_converged", "config": config, "complete": False,
              "runs": [{"key": results.run_key(r), "config": r} for r in recorded]}
    widened = migrate.amend_record(record)
    assert widened["config"] == nfr.PROFILES["cpu_converged"] and widened["runs"] == record["runs"]
    new = {results.run_key(r) for r in nfr.runs(widened["config"])} - {r["key"] for r in record["runs"]}
    assert sorted(json.loads(k)["seed"] for k in new if json.loads(k)["kind"] == "spp") == [1] * 4 + [2] * 4
    assert widened["complete"] is False and migrate.amend_record(widened) is widened
    # the lr grids widened after their sweeps chose an end (NF+AGC's downward, the unnormalized net's
    # upward): one more sweep run each, no other
    assert migrate.AMENDED[("nf_resnet", "cpu_converged")]["lrs"] == nfr.PROFILES["cpu_converged"]["lrs"]
    old = {**nfr.PROFILES["cpu_converged"], "lrs": {**nfr.PROFILES["cpu_converged"]["lrs"], "nf": [0.1, 0.3, 1.0, 3.0],
                                                    "none": [0.003, 0.01, 0.03, 0.1]}}
    added = ({results.run_key(r) for r in nfr.runs(nfr.PROFILES["cpu_converged"])}
             - {results.run_key(r) for r in nfr.runs(old)})
    assert sorted(added) == sorted(results.run_key(r) for r in ({"kind": "sweep", "model": "nf", "lr": 0.03, "seed": 0},
                                                               {"kind": "sweep", "model": "none", "lr": 0.3, "seed": 0}))
    # the budget check, added after the finals: only budget runs, recorded runs untouched
    assert migrate.AMENDED[("nf_resnet", "cpu_converged")]["budget"] == nfr.PROFILES["cpu_converged"]["budget"]
    before = {k: v for k, v in nfr.PROFILES["cpu_converged"].items() if k != "budget"}
    added = ({results.run_key(r) for r in nfr.runs(nfr.PROFILES["cpu_converged"])}
             - {results.run_key(r) for r in nfr.runs(before)})
    assert len(added) == 12 and {json.loads(k)["kind"] for k in added} == {"budget"}
