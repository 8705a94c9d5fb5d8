"""Bring recorded results to the book's one set of record keys: `python -m normlab.migrate [--check]`.

Every experiment now reports the same names for the same things (`RECORD_KEYS`): `test_error` in
percent (not an accuracy fraction), `test_loss`, `train_loss`, `val_loss`, `diverged`, `data_source`,
`n_train`, `n_test`, `steps`, and the run's `seed`. Records written before that used other names
(`test_acc`, `final_val_loss`, `final_train_loss`, `data`, `dataset`, `train_steps`, a history `loss`).
This script renames them in place, converts accuracy fractions to error percentages, and adds
`n_train` / `n_test` where the record's configuration determines them. It changes no number's value
beyond that conversion, leaves everything else as it was (provenance included), and is idempotent:
a migrated record is left untouched. The record files are rewritten atomically.

It also records where a profile was amended while it recorded (`AMENDED`): a key added to (or
changed in) the profile's configuration that drops runs not yet recorded, or adds runs. The key is added to the
record's configuration only if every run already recorded is still one of the profile's runs, so no
recorded number changes meaning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .results import atomic_write_json, load_path, results_dir

#: The metric keys shared by every experiment (each where it applies).
RECORD_KEYS = ("test_error", "test_loss", "train_loss", "val_loss", "diverged", "data_source", "n_train",
               "n_test", "steps", "seed")
#: Old metric name -> new name.
RENAMED = {"data": "data_source", "dataset": "data_source", "train_steps": "steps", "final_val_loss": "val_loss",
           "final_train_loss": "train_loss"}
#: Sizes of the full splits, for configurations that say "all of it" (`None`).
FULL_SIZE = {"cifar10": (50_000, 10_000), "fashion_mnist": (60_000, 10_000)}


#: (experiment, profile) -> configuration keys added to (or changed in) the profile while it recorded.
#: Each drops runs not yet recorded or adds runs, and changes none of those recorded.
AMENDED: dict[tuple[str, str], dict[str, Any]] = {
    # narrowed: the 60-epoch runs only at the N where the verdict is drawn (the epoch-doubling check);
    # then widened: a second doubling, to 120 epochs, at those N
    ("gn_batch_size", "cpu_converged"): {"doubling_batch_sizes": [32, 2], "epoch_list": [30, 60, 120]},
    # widened: signal propagation at three seeds (seconds each), so its verdict has a spread; seed 0's
    # runs, recorded first, are the same runs. Then NF+AGC's lr grid by 0.03, below the best of its
    # recorded sweep (0.1, the grid's low end), before its finals; then the unnormalized net's by 0.3,
    # above the best of its sweep (0.1, the grid's high end), before its finals; and the budget check
    # (every network at twice the epochs, at the final seeds), after the finals
    ("nf_resnet", "cpu_converged"): {"spp_seeds": [0, 1, 2], "budget": {"epochs": 60, "seeds": [1, 2, 3]},
                                     "lrs": {"bn": [0.03, 0.1, 0.3, 1.0], "nf": [0.03, 0.1, 0.3, 1.0, 3.0],
                                             "nf_noagc": [0.01, 0.03, 0.1, 0.3],
                                             "none": [0.003, 0.01, 0.03, 0.1, 0.3]}},
}


def _error_percent(acc: float | None) -> float | None:
    return None if acc is None else 100.0 * (1.0 - acc)


def migrate_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if k == "test_acc":
            out["test_error"] = _error_percent(v)
        else:
            out[RENAMED.get(k, k)] = v
    return out


def migrate_row(row: Any) -> Any:
    if not isinstance(row, dict):
        return row
    out = {}
    for k, v in row.items():
        if k == "test_acc":
            out["test_error"] = _error_percent(v)
        elif k == "loss":  # bn_eval_mode's per-step training loss
            out["train_loss"] = v
        else:
            out[k] = v
    return out


def _sizes(config: dict[str, Any]) -> tuple[int | None, int | None]:
    """`(n_train, n_test)` implied by a configuration's subset sizes, where it names them."""
    dataset = config.get("dataset")
    for train_key, test_key in (("train_subset", "test_subset"), ("train_size", "test_size")):
        if train_key in config and dataset in FULL_SIZE:
            full_train, full_test = FULL_SIZE[dataset]
            return (min(config[train_key] or full_train, full_train),
                    min(config[test_key] or full_test, full_test))
    return None, None


def migrate_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record with the book's keys (a new dict; the argument is not changed)."""
    n_train, n_test = _sizes(record.get("config", {}))
    runs = []
    for run in record.get("runs", []):
        metrics = migrate_metrics(run.get("metrics", {}))
        trained = "test_error" in metrics or "val_loss" in metrics
        if trained and n_train is not None:
            metrics.setdefault("n_train", n_train)
            metrics.setdefault("n_test", n_test)
        runs.append({**run, "metrics": metrics, "history": [migrate_row(h) for h in run.get("history", [])]})
    return {**record, "runs": runs}


def amend_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its profile's `AMENDED` keys in its configuration (a new dict), if it lacks them
    and every recorded run is still a run of the amended profile; otherwise ValueError naming the run."""
    added = AMENDED.get((record.get("experiment"), record.get("profile")), {})
    config = record.get("config", {})
    if not added or all(config.get(k) == v for k, v in added.items()):
        return record
    from .experiments import get_experiment
    from .results import run_key

    amended = {**config, **added}
    keep = {run_key(r) for r in get_experiment(record["experiment"]).runs(amended)}
    dropped = [r["key"] for r in record["runs"] if r["key"] not in keep]
    if dropped:
        raise ValueError(f"{record['experiment']}/{record['profile']}: recorded run {dropped[0]} is not a run of the "
                         f"profile amended by {added}: the amendment would orphan it")
    return {**record, "config": amended, "complete": keep <= {r["key"] for r in record["runs"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normlab.migrate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report records that need migrating (exit 1)")
    args = parser.parse_args(argv)
    stale = []
    for path in sorted(Path(results_dir()).glob("*/*.json")):
        record = load_path(path)
        migrated = amend_record(migrate_record(record))
        if migrated != record:
            stale.append(path)
            if not args.check:
                atomic_write_json(path, migrated)
    verb = "needs migrating" if args.check else "migrated"
    for path in stale:
        shown = path.relative_to(results_dir().parent) if path.is_relative_to(results_dir().parent) else path
        print(f"{verb}: {shown}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
