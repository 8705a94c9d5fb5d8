"""Running a sweep: every run of an experiment's profile, recorded as it finishes, resumable, shared.

`sweep(EXP, PROFILE)` runs each run of `EXP.runs(PROFILES[PROFILE])` that `results/EXP/PROFILE.json`
does not hold yet and appends it to that file as soon as it finishes (`normlab.results` writes it
atomically). So a killed sweep loses at most the run in flight, and that one only up to its last
checkpoint: each run gets a checkpoint file under `results/EXP/.checkpoints/PROFILE/` (ignored by git),
which the trainer saves every epoch and every few minutes and resumes from; it is deleted once the run
is recorded. A `run_one` that takes `record` gets the record as it stands: its later runs can use what
earlier runs recorded (the learning rate a recorded sweep chose), and raise `NotReady` until it is there.

Several processes started with the same command share one sweep: each claims a run before starting it
(`PROFILE.json.claims`, under an exclusive `fcntl` lock); a claim left by a dead process is taken over.
On a machine with c cores, c single-threaded processes finish a sweep of small models about c times
sooner than one; on a GPU, several processes share the device. `launch(..., parallel=K)` starts K such
processes and waits for them (`python -m normlab run EXP --profile P --parallel K`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from .results import atomic_write_json, finite, load_path, provenance, result_path, run_key
from .utils import default_device

try:
    import fcntl
except ImportError:  # Windows: no file locks; one process per sweep there
    fcntl = None


def checkpoint_path(out: Path, key: str) -> Path:
    """Where the run `key` of the record `out` keeps its checkpoint (an ignored folder beside `out`)."""
    return out.parent / ".checkpoints" / out.stem / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")


def _only(all_runs: list[dict[str, Any]], only: dict[str, Any], name: str) -> Callable[[dict[str, Any]], bool]:
    """The filter `only` stands for, after checking that it names config keys and selects some run."""
    keys = sorted({k for rc in all_runs for k in rc})
    for k, v in only.items():
        if k not in keys:
            raise ValueError(f"--only {k}=...: the runs of {name} have no {k!r}; their keys are {keys}")
        if not any(rc.get(k) == v for rc in all_runs):
            values = sorted({json.dumps(rc[k]) for rc in all_runs if k in rc})
            raise ValueError(f"--only {k}={json.dumps(v)} selects no run of {name}; its {k} values are "
                             f"{', '.join(values)}")
    return lambda rc: all(rc.get(k) == v for k, v in only.items())


def parse_only(items: list[str]) -> dict[str, Any]:
    """`["batch_size=2", "norm=bn"]` -> `{"batch_size": 2, "norm": "bn"}`: values are read as JSON
    (numbers, true/false, null), else kept as strings."""
    only = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--only takes KEY=VALUE (e.g. --only batch_size=2), got {item!r}")
        try:
            only[key] = json.loads(value)
        except json.JSONDecodeError:
            only[key] = value
    return only


def _checkpointed_s(ckpt: Path) -> float:
    """The training time a checkpoint says its run had spent (the trainer's `elapsed_s`); 0 if it has none.
    An unreadable checkpoint is the trainer's to report, with the fix: here it only counts as 0 s."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception:
        return 0.0
    return float(state.get("elapsed_s", 0.0)) if isinstance(state, dict) else 0.0


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
    poll_s: float = 30.0,
    only: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every run of `experiment`'s `profile` not yet in `out`, recording each as it finishes.

    `only` (`{"batch_size": 2, "epochs": 60}`) limits this process to the runs whose config has those
    values; the record is still the profile's and is complete only when every run is in it. It lets a
    recording that spans sessions start the runs that need a whole session while there is one.

    `out` defaults to `results/EXP/PROFILE.json`. Returns the complete record. Runs that another live
    process of the same sweep has claimed are left to it (start one process per core to share a sweep).
    A run whose `run_one` raises `NotReady` (it needs runs not recorded yet) is tried again after each
    run this process records, or every `poll_s` seconds while other processes are running runs.
    """
    from .experiments import NotReady, get_experiment

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
    # under torchrun every process runs the sweep; rank 0 claims runs, tells the others, and records
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    new_record = {"experiment": experiment, "profile": profile,
                  "provenance": provenance(profile, device), "config": config, "complete": not module.runs(config),
                  "runs": []}
    all_runs = module.runs(config)
    mine = _only(all_runs, only or {}, f"{experiment}/{profile}")
    done = {r["key"] for r in existing["runs"]} if existing is not None else set()
    if log and done:
        log(f"{experiment}/{profile}: {len(done)} runs already recorded, {len(all_runs) - len(done)} to go")
    # experiments that train take a checkpoint file (benchmarks and probes do not); runs that depend on
    # other runs of the record take the record and raise NotReady until those are in it
    resumable = "checkpoint" in inspect.signature(module.run_one).parameters
    wants_record = "record" in inspect.signature(module.run_one).parameters

    def attempt(i: int, run_config: dict[str, Any]) -> str:
        """Claim, run and record one run: "recorded", "skipped" (recorded or another process's) or "not ready"."""
        key = run_key(run_config)
        if not _agreed(_claim(out, key) if rank0 else None):
            return "skipped"
        if log and rank0:
            log(f"[{i + 1}/{len(all_runs)}] {experiment} {key}")
        t0 = time.perf_counter()
        ckpt = checkpoint_path(out, key)
        earlier_s = _checkpointed_s(ckpt) if ckpt.exists() else None  # training time of earlier processes
        if log and earlier_s is not None:
            log(f"  resuming from checkpoint {ckpt}")
        kwargs: dict[str, Any] = {"checkpoint": ckpt} if resumable else {}
        if wants_record:  # every process of a torchrun job sees rank 0's copy, so all decide alike
            kwargs["record"] = _shared(load_path(out) if rank0 and out.exists() else new_record)
        try:
            result = module.run_one(run_config, config, device=device, progress=progress, **kwargs)
        except BaseException as e:
            if rank0:
                with _locked(out) as claims:
                    claims.pop(key, None)
            if isinstance(e, NotReady):
                if log and rank0:
                    log(f"  not ready ({e}); later")
                waiting[key] = str(e)
                return "not ready"
            raise
        wall = time.perf_counter() - t0
        if not rank0:  # under torchrun, rank 0 records what all processes trained together
            return "recorded"
        result, nonfinite = finite(result)
        if nonfinite:  # JSON has no NaN/inf: they became null, and the run says why
            result.setdefault("metrics", {}).setdefault("diverged", True)
        with _locked(out) as claims:  # re-read the record: other processes may have added runs meanwhile
            claims.pop(key, None)
            record = load_path(out) if out.exists() else new_record
            # a recording may span sessions, commits and machines: each run says which code produced it where
            code = {k: new_record["provenance"][k]
                    for k in ("git_commit", "git_dirty", "torch", "libraries", "device", "device_name", "num_threads")}
            if earlier_s is not None:  # the time the killed process spent after its last checkpoint is lost
                code["resumed"] = True
                wall += earlier_s
            record["runs"].append({"key": key, "config": run_config, "seed": run_config.get("seed"),
                                   **result, "wall_s": round(wall, 2), "provenance": code})
            record["complete"] = {run_key(r) for r in all_runs} <= {r["key"] for r in record["runs"]}
            # the sum of the runs' wall times (with several processes, more than the elapsed time)
            record["provenance"]["wall_s"] = round(record["provenance"]["wall_s"] + wall, 2)
            atomic_write_json(out, record)
        ckpt.unlink(missing_ok=True)  # recorded: the checkpoint has done its job
        return "recorded"

    waiting: dict[str, str] = {}  # run key -> why it is not ready
    outcomes = [attempt(i, rc) for i, rc in enumerate(all_runs) if run_key(rc) not in done and mine(rc)]
    # Some runs were not ready: go over every unrecorded run again (a dead process's claims are taken
    # over) as long as runs get recorded, and wait while another process runs something (it may be what
    # they need); when nothing is running, what they need will never come: an error.
    while "not ready" in outcomes:
        seen = _recorded(out) if rank0 else set()
        pending = _shared([(i, rc) for i, rc in enumerate(all_runs) if run_key(rc) not in seen and mine(rc)]
                          if rank0 else None)
        outcomes = [attempt(i, rc) for i, rc in pending]
        if "not ready" in outcomes and "recorded" not in outcomes:
            # Another process may have recorded what they need after they read the record, and now be
            # between two runs, holding no claim. Its claims are looked at first: a run's claim is dropped
            # in the same locked step that records it, so with no claim left, all it recorded is on disk.
            if _agreed(_others_running(out) if rank0 else None):
                time.sleep(poll_s)
            elif _agreed(_recorded(out) != seen if rank0 else None):
                continue  # something new was recorded during this pass: try again at once
            else:
                why = "; ".join(f"{run_key(rc)}: {waiting[run_key(rc)]}"
                                for (i, rc), o in zip(pending, outcomes) if o == "not ready")
                raise RuntimeError(f"run(s) of {experiment}/{profile} wait for runs that are neither recorded nor "
                                   f"running: {why}. Check that runs() lists every run they need")
    if rank0 and not out.exists():
        atomic_write_json(out, new_record)
    if dist.is_initialized():
        dist.barrier()  # the others read the record only once rank 0 has written it
    return load_path(out)


def _claim(out: Path, key: str) -> bool:
    """Claim the run `key` for this process, unless it was recorded or a live process claimed it."""
    with _locked(out) as claims:
        owner = claims.get(key)
        if key in _recorded(out) or (owner is not None and owner != os.getpid() and _alive(owner)):
            return False
        claims[key] = os.getpid()
        return True


def _others_running(out: Path) -> bool:
    """Whether a live process other than this one holds a claim on a run of `out`."""
    with _locked(out) as claims:
        return any(pid != os.getpid() and _alive(pid) for pid in claims.values())


def _shared(obj: Any) -> Any:
    """Rank 0's `obj` on every process of a torchrun job (`obj` itself without one)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _agreed(decision: bool | None) -> bool:
    """Rank 0's `decision`, on every process of a torchrun job (as it is, without one)."""
    if not dist.is_initialized():
        return bool(decision)
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def launch(experiment: str, profile: str, parallel: int, out: str | Path | None = None,
           device: str | None = None, threads: int | None = None, only: list[str] | None = None) -> int:
    """Start `parallel` processes sharing one sweep (`python -m normlab run ...`) and wait for them all.

    Each gets `threads` intra-op threads (default: the CPU count divided among them; on a GPU the
    device does the work). Returns the first non-zero exit code, else 0.
    """
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    cmd = [sys.executable, "-m", "normlab", "run", experiment, "--profile", profile, "--no-progress", "--quiet",
           "--threads", str(threads)]
    cmd += ["--out", str(out)] if out is not None else []
    cmd += ["--device", device] if device is not None else []
    cmd += [a for item in only or [] for a in ("--only", item)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(cmd, env=env) for _ in range(parallel)]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)
