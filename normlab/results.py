"""The result store: `results/EXP/PROFILE.json`, one file per experiment and profile.

A file holds `{"experiment", "profile", "provenance", "config", "runs": [...]}`; each run is
`{"key", "config", "seed", "metrics", "history", "wall_s"}`. Every run is written as soon as it
finishes, atomically (temporary file + `os.replace`), so a sweep that is killed loses at most the run
in flight, and a restarted sweep skips the runs already recorded. Several processes started with
the same command share one sweep: each claims a run before starting it (`RESULT.json.claims`, under
an exclusive lock), so on a machine with c cores, c single-threaded processes finish a sweep of small
models about c times sooner than one. The book only ever *reads* these files; they are produced by
`python -m normlab run EXP --profile P`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .utils import default_device, repo_root

try:
    import fcntl
except ImportError:  # Windows: no file locks; one process per sweep there
    fcntl = None

#: smoke: seconds (CI); cpu: <= 30 min on 2 cores; cpu_long: ~1-2 h on 2 cores, where a question needs
#: longer training than `cpu` affords; full: a GPU. Not every experiment has every profile.
PROFILES = ("smoke", "cpu", "cpu_long", "full")


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
    try:  # the CPU model, so a reader can tell a laptop from a server
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(profile: str, device: torch.device) -> dict[str, Any]:
    """Where a result came from: code version, library versions, hardware, time."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "num_threads": torch.get_num_threads(),
        "profile": profile,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": 0.0,
    }


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shared result folders unreadable to others
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
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
    """The profile the book shows: `full` if recorded, else `cpu_long`, else `cpu`."""
    for profile in ("full", "cpu_long", "cpu"):
        if result_path(experiment, profile).exists():
            return profile
    raise FileNotFoundError(
        f"no recorded results for {experiment!r} in {results_dir()}: "
        f"run `python -m normlab run {experiment} --profile cpu` (or full on a GPU)"
    )


def load(experiment: str, profile: str | None = None) -> dict[str, Any]:
    """Load recorded results; `profile=None` or `"recorded"` picks `full`, else `cpu_long`, else `cpu`."""
    if profile in (None, "recorded"):
        profile = best_profile(experiment)
    path = result_path(experiment, profile)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m normlab run {experiment} --profile {profile}`")
    return load_path(path)


@contextlib.contextmanager
def _locked(out: Path):
    """Hold an exclusive lock on `out`'s claims file; yields the claims `{run_key: pid}` to update."""
    path = out.with_name(out.name + ".claims")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            text = f.read()
            claims = json.loads(text) if text.strip() else {}
            yield claims
            f.seek(0)
            f.truncate()
            f.write(json.dumps(claims))
            f.flush()
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _recorded(out: Path) -> set[str]:
    return {r["key"] for r in load_path(out)["runs"]} if out.exists() else set()


def sweep(
    experiment: str,
    profile: str,
    out: Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run every run of `experiment`'s `profile` not yet in `out`, recording each as it finishes.

    `out` defaults to `results/EXP/PROFILE.json`. Returns the complete record. Runs that another live
    process of the same sweep has claimed are left to it (start one process per core to share a sweep).
    """
    from .experiments import get_experiment

    module = get_experiment(experiment)
    if profile not in module.PROFILES:
        raise ValueError(f"{experiment} has no profile {profile!r}; choose one of {sorted(module.PROFILES)}")
    device = default_device(device)
    config = module.PROFILES[profile]
    out = Path(out) if out is not None else result_path(experiment, profile)

    existing = load_path(out) if out.exists() else None
    if existing is not None and existing.get("config") != config:
        raise ValueError(
            f"{out} was recorded with another configuration of the {profile!r} profile; "
            "move it away (or delete it) to record afresh"
        )
    new_record = {"experiment": experiment, "profile": profile,
                  "provenance": provenance(profile, device), "config": config, "runs": []}
    all_runs = module.runs(config)
    done = {r["key"] for r in existing["runs"]} if existing is not None else set()
    if log and done:
        log(f"{experiment}/{profile}: {len(done)} runs already recorded, {len(all_runs) - len(done)} to go")
    for i, run_config in enumerate(all_runs):
        key = run_key(run_config)
        if key in done:
            continue
        with _locked(out) as claims:  # claim the run, unless it was recorded or claimed meanwhile
            owner = claims.get(key)
            if key in _recorded(out) or (owner is not None and owner != os.getpid() and _alive(owner)):
                continue
            claims[key] = os.getpid()
        if log:
            log(f"[{i + 1}/{len(all_runs)}] {experiment} {key}")
        t0 = time.perf_counter()
        try:
            result = module.run_one(run_config, config, device=device, progress=progress)
        except BaseException:
            with _locked(out) as claims:
                claims.pop(key, None)
            raise
        wall = time.perf_counter() - t0
        with _locked(out) as claims:  # re-read the record: other processes may have added runs meanwhile
            claims.pop(key, None)
            record = load_path(out) if out.exists() else new_record
            record["runs"].append({"key": key, "config": run_config, "seed": run_config.get("seed"),
                                   **result, "wall_s": round(wall, 2)})
            # the sum of the runs' wall times (with several processes, more than the elapsed time)
            record["provenance"]["wall_s"] = round(record["provenance"]["wall_s"] + wall, 2)
            atomic_write_json(out, record)
    if not out.exists():
        atomic_write_json(out, new_record)
    return load_path(out)


def for_notebook(experiment: str, profile: str) -> dict[str, Any]:
    """What a chapter shows: recorded results for `profile="recorded"`, else a real run of `profile`.

    Real runs (CI's `smoke`) are written to a temporary folder, never over the recorded results.
    """
    if profile == "recorded":
        return load(experiment)
    out = Path(tempfile.mkdtemp(prefix="normlab-")) / f"{profile}.json"
    return sweep(experiment, profile, out=out, progress=False, log=None)


def runs_where(record: dict[str, Any], **conditions: Any) -> list[dict[str, Any]]:
    """The runs whose config matches every `key=value` given."""
    return [r for r in record["runs"] if all(r["config"].get(k) == v for k, v in conditions.items())]
