"""The result store: `results/EXP/PROFILE.json`, one file per experiment and profile.

A file holds `{"experiment", "profile", "provenance", "config", "runs": [...]}`; each run is
`{"key", "config", "seed", "metrics", "history", "wall_s"}`. Files are written atomically (temporary
file + `os.replace`) and are strict JSON: a non-finite number is stored as `null` (`allow_nan=False`
guards it). The book only ever *reads* these files; `normlab.sweep` produces them
(`python -m normlab run EXP --profile P`).
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import os
import platform
import subprocess
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from .utils import repo_root

#: smoke: seconds (CI); cpu: <= 30 min on 2 cores; cpu_long: ~1-2 h on 2 cores, where a question needs
#: longer training than `cpu` affords; cpu_converged: trained until the verdict stops moving, many
#: CPU-hours; full: a GPU. Not every experiment has every profile.
PROFILES = ("smoke", "cpu", "cpu_long", "cpu_converged", "full")
#: What a chapter shows, best first (a record still being recorded is skipped).
SHOWN = ("full", "cpu_converged", "cpu_long", "cpu")


def results_dir() -> Path:
    """`$NORMLAB_RESULTS` if set, else `results/` of the checkout."""
    return Path(os.environ.get("NORMLAB_RESULTS") or repo_root() / "results")


def result_path(experiment: str, profile: str) -> Path:
    return results_dir() / experiment / f"{profile}.json"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The CPU model, so a reader can tell a laptop from a server, with its family and model numbers and the
    # kernels torch picked (AVX2, AVX512...): seeded runs repeat bit for bit only on one kind of CPU, and a
    # name such as "AMD EPYC" covers several generations.
    name, ids = platform.processor() or platform.machine(), []
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in first_cpu.splitlines() if ":" in ln)}
        name = fields.get("model name", name)
        if "cpu family" in fields and "model" in fields:
            ids = [f"family {fields['cpu family']}, model {fields['model']}"]
    except OSError:
        pass
    return f"{name} ({'; '.join(ids + [f'torch {torch.backends.cpu.get_cpu_capability()} kernels'])})"


def libraries() -> dict[str, str | None]:
    """Versions of the libraries beneath torch that a run's numbers can depend on: torchvision, numpy, and
    Pillow, whose JPEG decoder turns the CIFAR-10 files into pixels (None: not installed)."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return {name: version(name) for name in ("torchvision", "numpy", "pillow")}


def provenance(profile: str, device: torch.device) -> dict[str, Any]:
    """Where a result came from: code version, library versions, hardware, time."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "libraries": libraries(),
        "device": str(device),
        "device_name": device_name(device),
        "num_threads": torch.get_num_threads(),
        # processes of a torchrun job (each one device or set of threads); 1 for a plain run
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "profile": profile,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": 0.0,
    }


def finite(obj: Any) -> tuple[Any, bool]:
    """`obj` with every non-finite float replaced by None, and whether any was replaced."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, True
    if isinstance(obj, dict):
        pairs = [(k, finite(v)) for k, v in obj.items()]
        return {k: v for k, (v, _) in pairs}, any(bad for _, (_, bad) in pairs)
    if isinstance(obj, (list, tuple)):
        items = [finite(v) for v in obj]
        return [v for v, _ in items], any(bad for _, bad in items)
    return obj, False


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write strict JSON so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shared result folders unreadable to others
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_key(run_config: dict[str, Any]) -> str:
    """A stable identity for one run of a sweep: its configuration, keys sorted."""
    return json.dumps(run_config, sort_keys=True, separators=(",", ":"))


def load_path(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and rerun the experiment") from e


def best_profile(experiment: str) -> str:
    """The profile the book shows: the first of `SHOWN` whose record is complete (every run recorded)."""
    for profile in SHOWN:
        path = result_path(experiment, profile)
        if path.exists() and load_path(path).get("complete", True):
            return profile
    raise FileNotFoundError(
        f"no recorded results for {experiment!r} in {results_dir()}: "
        f"run `python -m normlab run {experiment} --profile cpu` (or full on a GPU)"
    )


def load(experiment: str, profile: str | None = None) -> dict[str, Any]:
    """Load recorded results; `profile=None` or `"recorded"` picks the best complete one (`SHOWN`)."""
    if profile in (None, "recorded"):
        profile = best_profile(experiment)
    path = result_path(experiment, profile)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m normlab run {experiment} --profile {profile}`")
    return load_path(path)


def header(record: dict[str, Any]) -> str:
    """One line of provenance for a chapter or the CLI: profile, runs, code, library, hardware, compute."""
    prov = record["provenance"]
    world = prov.get("world_size", 1)
    where = f"{prov.get('num_threads')} thread(s)" + (f" x {world} processes" if world > 1 else "")
    status = "" if record.get("complete", True) else ", still recording"
    seconds = sum(compute_s(r) for r in record["runs"])
    compute = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
    return (f"profile {record['profile']}: {len(record['runs'])} runs{status}, {commits(record)}, "
            f"torch {prov.get('torch')}, {prov.get('device')} ({machines(record)}, {where}), {compute} of compute")


def commits(record: dict[str, Any]) -> str:
    """The commit(s) a record's runs came from: "commit abc1234567", or, for a recording that spans
    commits, each with its runs ("commits abc1234567: 6 runs; def7654321: 8 runs"); "(uncommitted
    changes)" after any commit a run (or the record) was made from with a dirty tree. Runs without their
    own provenance count as the record's."""
    prov = record["provenance"]
    own = [(r.get("provenance") or {}) for r in record["runs"]]
    made = [(p.get("git_commit") or prov.get("git_commit") or "unknown",
             p["git_dirty"] if "git_dirty" in p else bool(prov.get("git_dirty"))) for p in own]
    if not made:
        made = [(prov.get("git_commit") or "unknown", bool(prov.get("git_dirty")))]
    count = collections.Counter(c for c, _ in made)  # in first-recorded order
    dirty = {c for c, d in made if d}
    def name(c: str) -> str:
        return c[:10] + (" (uncommitted changes)" if c in dirty else "")
    if len(count) == 1:
        return f"commit {name(next(iter(count)))}"
    return "commits " + "; ".join(f"{name(c)}: {_n_runs(k)}" for c, k in count.items())


def compute_s(run: dict[str, Any]) -> float:
    """The seconds a run cost: its wall time or, if larger, its trainer's clock (the last history row's
    `time_s`), which a run resumed from a checkpoint carries over from the killed process; runs recorded
    before their wall time included that process's time count it this way."""
    clock = max((h.get("time_s") or 0.0 for h in run.get("history") or [] if isinstance(h, dict)), default=0.0)
    return max(run.get("wall_s") or 0.0, clock)


def machines(record: dict[str, Any]) -> str:
    """The machine(s) a record's runs came from. A recording that spans sessions may span machines (and a
    seeded run repeats bit for bit only on one): each run names its own; runs recorded before runs did
    are counted apart rather than credited to the machine the record was started on."""
    names = [r.get("provenance", {}).get("device_name") for r in record["runs"]]
    named = sorted(set(n for n in names if n))
    if not named:  # no run names its machine: the one the record was started on
        return str(record["provenance"].get("device_name"))
    counts = [f"{n}: {_n_runs(names.count(n))}" for n in named] if len(named) > 1 else named
    unnamed = names.count(None)
    return "; ".join(counts + ([f"{_n_runs(unnamed)} without a recorded machine"] if unnamed else []))


def _n_runs(k: int) -> str:
    return f"{k} run" + ("s" if k != 1 else "")


def for_notebook(experiment: str, profile: str) -> dict[str, Any]:
    """What a chapter shows: recorded results for `profile="recorded"`, else a real run of `profile`.

    Real runs (CI's `smoke`) are written to a temporary folder, never over the recorded results.
    """
    if profile == "recorded":
        return load(experiment)
    from .sweep import sweep

    out = Path(tempfile.mkdtemp(prefix="normlab-")) / f"{profile}.json"
    return sweep(experiment, profile, out=out, progress=False, log=None)


def runs_where(record: dict[str, Any], **conditions: Any) -> list[dict[str, Any]]:
    """The runs whose config matches every `key=value` given (`lr=0.1`, `norm="bn"`, ...)."""
    return [r for r in record["runs"] if all(r["config"].get(k) == v for k, v in conditions.items())]


def band(runs: list[dict[str, Any]], metric: str, x: str = "epoch") -> dict[str, Any] | None:
    """A curve over seeds: `{x: [...], "mean", "min", "max"}` of `metric` in the runs' history rows, at the
    `x` values (epochs or steps) every run has a value at, and `"n"` (runs); None without runs. What the
    chapters draw as a line (the mean) in a band (the seed range)."""
    curves = [{h[x]: h[metric] for h in r["history"] if h.get(metric) is not None and h.get(x) is not None}
              for r in runs]
    if not curves:
        return None
    xs = sorted(set.intersection(*map(set, curves)))
    values = [[c[v] for c in curves] for v in xs]
    return {x: xs, "mean": [sum(v) / len(v) for v in values], "min": [min(v) for v in values],
            "max": [max(v) for v in values], "n": len(curves)}


def finished(runs: list[dict[str, Any]], metric: str, at: Any, x: str = "epoch") -> list[dict[str, Any]]:
    """The runs that did not diverge and have `metric` at `x == at` (the last epoch or step): the runs a
    curve over seeds (`band`) or a convergence check may use, since a diverged or unfinished run's curve
    stops early and would cut every other seed's short."""
    return [r for r in runs if not r["metrics"].get("diverged")
            and any(h.get(x) == at and h.get(metric) is not None for h in r["history"])]


def by_seed(record: dict[str, Any], metric: str, drop_missing: bool = False, **conditions: Any) -> dict[int, Any]:
    """`{seed: metrics[metric]}` of the runs matching `conditions`: None where a run has no value, or,
    with `drop_missing`, those seeds left out."""
    out = {r["seed"]: r["metrics"].get(metric) for r in runs_where(record, **conditions)}
    return {s: v for s, v in out.items() if v is not None} if drop_missing else out


def _is_sweep(run: dict[str, Any]) -> bool:
    return "sweep" in (run["config"].get("phase"), run["config"].get("kind"))


def seed_summary(record: dict[str, Any]) -> dict[str, Any]:
    """How many seeds stand behind each cell of a record: `{"cells": {cell: n_seeds}, "sweep": {arm: {lr:
    n_seeds}}}`. A cell is a run's config without its seed (as sorted JSON); runs of an lr sweep (config
    `phase` or `kind` "sweep") are counted per arm (the config without lr, seed, phase and kind) and lr
    instead, since a sweep's seeds choose an lr rather than carry a comparison. What `python -m normlab
    show` prints under the runs."""
    cells: dict[str, set] = {}
    sweep: dict[str, dict[float, set]] = {}
    for r in record["runs"]:
        c = r["config"]
        if _is_sweep(r):
            arm = json.dumps({k: v for k, v in c.items() if k not in ("lr", "seed", "phase", "kind")}, sort_keys=True)
            sweep.setdefault(arm, {}).setdefault(c["lr"], set()).add(r["seed"])
        else:
            cells.setdefault(json.dumps({k: v for k, v in c.items() if k != "seed"}, sort_keys=True), set()).add(r["seed"])
    return {"cells": {k: len(v) for k, v in cells.items()},
            "sweep": {arm: {lr: len(s) for lr, s in sorted(by_lr.items())} for arm, by_lr in sweep.items()}}
