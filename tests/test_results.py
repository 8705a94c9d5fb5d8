"""The result store: provenance, atomic writes, resumable sweeps (killed for real), the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from normlab import results, sweep
from normlab.__main__ import main

# An experiment kept outside the package (a dotted module path), slow enough to be killed mid-sweep.
SLOW_EXPERIMENT = textwrap.dedent('''
    """A test experiment: each run sleeps, then records a value derived from its config."""
    import os, time
    PROFILES = {"smoke": {"n": 8, "sleep": 0.3}, "cpu": {"n": 2, "sleep": 0.0}, "full": {"n": 2, "sleep": 0.0}}

    def runs(config):
        return [{"i": i, "seed": 0} for i in range(config["n"])]

    def run_one(run, config, device, progress=False):
        with open(os.environ["SLOWEXP_LOG"], "a") as f:  # which runs were started, by which process
            f.write(f"{os.getpid()} {run['i']}\\n")
        time.sleep(config["sleep"])
        return {"metrics": {"square": run["i"] ** 2}, "history": [run["i"]]}
''')


@pytest.fixture
def slow_exp(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "extexp").mkdir(parents=True)
    (pkg / "extexp" / "__init__.py").write_text("")
    (pkg / "extexp" / "slowexp.py").write_text(SLOW_EXPERIMENT)
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("SLOWEXP_LOG", str(tmp_path / "started.log"))
    monkeypatch.setenv("NORMLAB_RESULTS", str(tmp_path / "results"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")])}
    return tmp_path, env


def test_provenance_fields():
    prov = results.provenance("smoke", torch.device("cpu"))
    for key in ("git_commit", "git_dirty", "torch", "device", "device_name", "profile", "started", "wall_s"):
        assert key in prov
    assert prov["torch"] == torch.__version__ and prov["profile"] == "smoke"
    import numpy
    import PIL
    assert prov["libraries"]["pillow"] == PIL.__version__ and prov["libraries"]["numpy"] == numpy.__version__
    # which kernels torch runs: a seeded run repeats bit for bit only on one kind of CPU
    assert f"torch {torch.backends.cpu.get_cpu_capability()} kernels" in prov["device_name"]
    assert prov["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results.atomic_write_json(path, {"v": 1})

    def broken_dump(obj, f, **kw):
        f.write('{"v": 2, "trunc')  # a partial write, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(results.json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        results.atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "temporary file left behind"


def test_sweep_records_and_skips(slow_exp):
    tmp_path, _ = slow_exp
    rec = sweep.sweep("extexp.slowexp", "cpu", log=None)
    assert [r["metrics"]["square"] for r in rec["runs"]] == [0, 1]
    assert rec["provenance"]["profile"] == "cpu" and rec["config"] == {"n": 2, "sleep": 0.0}
    assert rec["complete"] and all(r["provenance"]["git_commit"] == rec["provenance"]["git_commit"] for r in rec["runs"])
    here = results.device_name(torch.device("cpu"))
    assert all(r["provenance"]["device_name"] == rec["provenance"]["device_name"] == here
               and r["provenance"]["device"] == "cpu" for r in rec["runs"])
    started = (tmp_path / "started.log").read_text().splitlines()
    rec2 = sweep.sweep("extexp.slowexp", "cpu", log=None)
    assert rec2["runs"] == rec["runs"]
    assert (tmp_path / "started.log").read_text().splitlines() == started, "a recorded run was run again"
    assert results.load("extexp.slowexp", "cpu") == rec2


def test_only_takes_a_subset_of_the_runs_and_the_record_stays_the_profiles(slow_exp, capsys):
    rec = sweep.sweep("extexp.slowexp", "cpu", log=None, only={"i": 1})
    assert [r["config"]["i"] for r in rec["runs"]] == [1] and not rec["complete"]
    assert main(["run", "extexp.slowexp", "--profile", "cpu", "--only", "i=0", "--quiet", "--no-progress"]) == 0
    rec = results.load("extexp.slowexp", "cpu")
    assert [r["config"]["i"] for r in rec["runs"]] == [1, 0] and rec["complete"]
    with pytest.raises(ValueError, match=r"have no 'j'; their keys are \['i', 'seed'\]"):
        sweep.sweep("extexp.slowexp", "cpu", log=None, only={"j": 1})
    with pytest.raises(ValueError, match=r"--only i=5 selects no run of extexp.slowexp/cpu; its i values are 0, 1"):
        sweep.sweep("extexp.slowexp", "cpu", log=None, only={"i": 5})
    assert main(["run", "extexp.slowexp", "--profile", "cpu", "--only", "i"]) == 2
    assert "--only takes KEY=VALUE (e.g. --only batch_size=2), got 'i'" in capsys.readouterr().err


def test_parallel_processes_get_the_same_only(monkeypatch):
    started = []

    class Proc:
        def __init__(self, cmd, env):
            started.append(cmd)

        def wait(self):
            return 0
    monkeypatch.setattr(sweep.subprocess, "Popen", Proc)
    assert sweep.launch("gn_batch_size", "cpu_converged", 2, only=["batch_size=2", "epochs=60"]) == 0
    assert len(started) == 2 and all(c[-4:] == ["--only", "batch_size=2", "--only", "epochs=60"] for c in started)


def test_parse_only_reads_values_as_json_else_strings():
    assert sweep.parse_only(["batch_size=2", "norm=bn", "lr=0.1", "sync=true", "tag=a=b"]) == {
        "batch_size": 2, "norm": "bn", "lr": 0.1, "sync": True, "tag": "a=b"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweep.parse_only(["=2"])


# Runs that depend on other runs of the record: "total" is listed first but needs every square.
DEPENDENT_EXPERIMENT = textwrap.dedent('''
    """A test experiment: the run "total" sums the squares the other runs recorded."""
    from normlab.experiments import NotReady
    # "late": square 3 is seed 1's, recorded by another process (here: from inside "total", right after it
    # read the record) which then holds no claim, as between two of its runs
    PROFILES = {"cpu": {"n": 3, "need": 3}, "orphan": {"n": 3, "need": 4}, "late": {"n": 3, "need": 4, "late": True}}

    def runs(config):
        late = [{"i": 3, "seed": 1}] if config.get("late") else []
        return [{"i": "total", "seed": 0}] + [{"i": i, "seed": 0} for i in range(config["n"])] + late

    def record_elsewhere(run):
        from normlab import results, sweep
        out = results.result_path(__name__, "late")
        with sweep._locked(out):
            rec = results.load_path(out)
            rec["runs"].append({"key": results.run_key(run), "config": run, "seed": run["seed"],
                                "metrics": {"square": run["i"] ** 2}, "history": []})
            results.atomic_write_json(out, rec)

    def run_one(run, config, device, progress=False, record=None):
        if run["i"] != "total":
            return {"metrics": {"square": run["i"] ** 2}, "history": []}
        got = [r["metrics"]["square"] for r in record["runs"] if r["config"]["i"] != "total"]
        if len(got) < config["need"]:
            if config.get("late") and len(got) == 3:
                record_elsewhere({"i": 3, "seed": 1})
            raise NotReady(f"{len(got)} of {config['need']} squares recorded")
        return {"metrics": {"sum": sum(got)}, "history": []}
''')


@pytest.fixture
def dependent_exp(slow_exp):
    import importlib

    tmp_path, _ = slow_exp
    (tmp_path / "pkg" / "depexp").mkdir()
    (tmp_path / "pkg" / "depexp" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "depexp" / "dependent.py").write_text(DEPENDENT_EXPERIMENT)
    importlib.invalidate_caches()
    return tmp_path


def test_a_run_that_is_not_ready_waits_for_the_runs_it_needs(dependent_exp):
    rec = sweep.sweep("depexp.dependent", "cpu", log=None)
    assert [r["config"]["i"] for r in rec["runs"]] == [0, 1, 2, "total"]
    assert rec["runs"][-1]["metrics"]["sum"] == 0 + 1 + 4 and rec["complete"]
    assert not json.loads(results.result_path("depexp.dependent", "cpu").with_name("cpu.json.claims").read_text())


def test_a_run_waits_for_what_another_process_recorded_after_it_read_the_record(dependent_exp):
    """The other process recorded the last square after "total" read the record, and holds no claim when
    this one looks: not an error, since the record grew during the pass; "total" is tried again."""
    rec = sweep.sweep("depexp.dependent", "late", log=None, only={"seed": 0}, poll_s=0.1)
    assert sorted(r["config"]["i"] for r in rec["runs"] if r["config"]["i"] != "total") == [0, 1, 2, 3]
    assert rec["runs"][-1]["config"]["i"] == "total" and rec["runs"][-1]["metrics"]["sum"] == 0 + 1 + 4 + 9
    assert rec["complete"]


def test_a_run_whose_needs_never_come_is_an_error_after_others_finish(dependent_exp):
    """Nothing left that could record what "total" needs: an error naming the run and its reason; but
    only once no other process runs anything (a sleeping process holds a claim for a while)."""
    out = results.result_path("depexp.dependent", "orphan")
    import threading

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    threading.Thread(target=other.wait, daemon=True).start()  # reaped when it ends: no zombie looks alive
    with sweep._locked(out) as claims:
        claims["some other run"] = other.pid
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"neither recorded nor running.*total.*3 of 4 squares"):
        sweep.sweep("depexp.dependent", "orphan", log=None, poll_s=0.1)
    assert time.perf_counter() - t0 > 1.0, "gave up while another process was still running"
    assert [r["config"]["i"] for r in results.load("depexp.dependent", "orphan")["runs"]] == [0, 1, 2]


def test_sweep_refuses_a_changed_config(slow_exp):
    sweep.sweep("extexp.slowexp", "cpu", log=None)
    path = results.result_path("extexp.slowexp", "cpu")
    data = json.loads(path.read_text())
    data["config"]["n"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="another configuration.*move it away"):
        sweep.sweep("extexp.slowexp", "cpu", log=None)


def test_killed_sweep_resumes_without_losing_or_repeating_runs(slow_exp):
    """SIGKILL a real `python -m normlab run` mid-sweep; the restart completes it, losing nothing."""
    tmp_path, env = slow_exp
    path = tmp_path / "results" / "extexp.slowexp" / "smoke.json"
    cmd = [sys.executable, "-m", "normlab", "run", "extexp.slowexp", "--profile", "smoke", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        if path.exists() and len(json.loads(path.read_text())["runs"]) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads(path.read_text())  # still valid JSON: writes are atomic
    assert 3 <= len(before["runs"]) < 8, "the sweep was not killed mid-way"
    first_pid = (tmp_path / "started.log").read_text().split()[0]

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"{len(before['runs'])} runs already recorded" in out.stdout
    after = json.loads(path.read_text())
    assert after["runs"][: len(before["runs"])] == before["runs"]
    assert [r["config"]["i"] for r in after["runs"]] == list(range(8))
    assert [r["metrics"]["square"] for r in after["runs"]] == [i * i for i in range(8)]
    restarted = [int(line.split()[1]) for line in (tmp_path / "started.log").read_text().splitlines()
                 if line.split()[0] != first_pid]
    assert min(restarted) >= len(before["runs"]), "the restart re-ran runs that were already recorded"


def test_two_processes_share_a_sweep(slow_exp):
    """Two `python -m normlab run` processes of one sweep split its runs: each run once, all recorded."""
    tmp_path, env = slow_exp
    path = tmp_path / "results" / "extexp.slowexp" / "smoke.json"
    cmd = [sys.executable, "-m", "normlab", "run", "extexp.slowexp", "--profile", "smoke", "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    started = [line.split() for line in (tmp_path / "started.log").read_text().splitlines()]
    assert sorted(int(i) for _, i in started) == list(range(8)), "a run was started twice (or never)"
    assert len({pid for pid, _ in started}) == 2, "one process did all the work"
    record = json.loads(path.read_text())
    assert sorted(r["config"]["i"] for r in record["runs"]) == list(range(8))
    assert all(r["metrics"]["square"] == r["config"]["i"] ** 2 for r in record["runs"])


def test_parallel_launches_k_processes_sharing_one_sweep(slow_exp, capsys, monkeypatch):
    """`run --parallel 2`: two worker processes split the sweep; every run once; one summary at the end."""
    tmp_path, env = slow_exp
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    assert main(["run", "extexp.slowexp", "--profile", "smoke", "--parallel", "2"]) == 0
    started = [line.split() for line in (tmp_path / "started.log").read_text().splitlines()]
    assert sorted(int(i) for _, i in started) == list(range(8)), "a run was started twice (or never)"
    assert len({pid for pid, _ in started}) == 2, "one process did all the work"
    assert "extexp.slowexp / smoke: 8 runs" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--parallel must be >= 1"):
        sweep.launch("extexp.slowexp", "smoke", 0)


def test_results_are_strict_json_and_non_finite_numbers_become_null(tmp_path):
    path = tmp_path / "r.json"
    value, bad = results.finite({"metrics": {"loss": float("nan"), "ok": 1.5}, "history": [float("inf"), 2]})
    assert bad and value == {"metrics": {"loss": None, "ok": 1.5}, "history": [None, 2]}
    results.atomic_write_json(path, value)
    assert json.loads(path.read_text()) == value
    with pytest.raises(ValueError, match="Out of range float"):
        results.atomic_write_json(path, {"x": float("nan")})
    assert json.loads(path.read_text()) == value  # the failed write left the old file


def test_a_dead_process_claim_is_taken_over(slow_exp):
    """A run claimed by a process that died (killed mid-run) is run by the next sweep, not skipped."""
    tmp_path, _ = slow_exp
    out = results.result_path("extexp.slowexp", "cpu")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with sweep._locked(out) as claims:
        claims[results.run_key({"i": 1, "seed": 0})] = dead.pid
    rec = sweep.sweep("extexp.slowexp", "cpu", log=None)
    assert [r["config"]["i"] for r in rec["runs"]] == [0, 1]


def test_load_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_RESULTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python -m normlab run nothing_here --profile cpu"):
        results.load("nothing_here")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cpu.json").write_text('{"runs": [')
    with pytest.raises(ValueError, match="not valid JSON.*delete it and rerun"):
        results.load("broken")


def test_cli_list_run_show(slow_exp, capsys):
    assert main(["list"]) == 0
    assert "signal_propagation" in capsys.readouterr().out
    assert main(["run", "extexp.slowexp", "--profile", "cpu", "--no-progress"]) == 0
    assert main(["show", "extexp.slowexp", "--profile", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "extexp.slowexp / cpu: 2 runs" in out and "square=1" in out


def test_cli_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_RESULTS", str(tmp_path))
    assert main(["run", "no_such_experiment"]) == 2
    assert "unknown experiment 'no_such_experiment'" in capsys.readouterr().err
    assert main(["show", "signal_propagation"]) == 2
    assert "python -m normlab run signal_propagation" in capsys.readouterr().err
    assert main(["run", "signal_propagation", "--profile", "huge"]) == 2
    assert "has no profile 'huge'" in capsys.readouterr().err


def test_the_book_never_shows_a_record_still_being_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_RESULTS", str(tmp_path))
    for profile, complete in (("cpu", True), ("cpu_converged", False)):
        results.atomic_write_json(results.result_path("exp", profile), {"runs": [], "complete": complete})
    assert results.best_profile("exp") == "cpu"
    results.atomic_write_json(results.result_path("exp", "cpu_converged"), {"runs": [], "complete": True})
    assert results.best_profile("exp") == "cpu_converged"


def test_header_says_where_a_record_came_from():
    prov = {"git_commit": "0123456789abcdef", "git_dirty": True, "torch": "2.14", "device": "cpu",
            "device_name": "Some CPU", "num_threads": 1, "world_size": 2}
    record = {"profile": "cpu_converged", "provenance": prov, "complete": False,
              "runs": [{"wall_s": 90.0}, {"wall_s": 30.0}]}
    line = results.header(record)
    assert line == ("profile cpu_converged: 2 runs, still recording, commit 0123456789 (uncommitted changes), "
                    "torch 2.14, cpu (Some CPU, 1 thread(s) x 2 processes), 2 min of compute")
    record.update(complete=True, provenance={**prov, "git_dirty": False, "world_size": 1})
    assert "still recording" not in results.header(record) and "uncommitted" not in results.header(record)


def test_header_names_every_commit_a_recording_spans():
    prov = {"git_commit": "aaaaaaaaaaaa", "git_dirty": False, "torch": "2.14", "device": "cpu", "num_threads": 1}
    def run(commit=None, dirty=False):
        return {"wall_s": 1.0, "provenance": {"git_commit": commit, "git_dirty": dirty} if commit else {}}
    record = {"profile": "cpu", "provenance": prov, "runs": [run(), run("aaaaaaaaaaaa")]}
    assert results.commits(record) == "commit aaaaaaaaaa"  # a run without provenance is the record's
    record["runs"] = [run(), run("bbbbbbbbbbbb"), run("bbbbbbbbbbbb", dirty=True)]
    assert results.commits(record) == "commits aaaaaaaaaa: 1 run; bbbbbbbbbb (uncommitted changes): 2 runs"
    assert ", commits aaaaaaaaaa: 1 run; bbbbbbbbbb (uncommitted changes): 2 runs, torch 2.14" in results.header(record)
    assert results.commits({**record, "runs": []}) == "commit aaaaaaaaaa"


def test_compute_counts_the_time_a_resumed_run_spent_before_it_was_killed():
    assert results.compute_s({"wall_s": 30.0, "history": [{"time_s": 10.0}, {"time_s": 95.5}]}) == 95.5
    assert results.compute_s({"wall_s": 100.0, "history": [{"time_s": 95.5}]}) == 100.0  # eval after the loop
    assert results.compute_s({"wall_s": 2.0, "history": [0, 1]}) == 2.0  # histories that are not rows
    record = {"profile": "cpu", "provenance": {"device_name": "CPU", "num_threads": 1},
              "runs": [{"wall_s": 30.0, "history": [{"time_s": 150.0}]}, {"wall_s": 90.0, "history": []}]}
    assert results.header(record).endswith("4 min of compute")


def test_header_names_every_machine_a_record_spans():
    prov = {"git_commit": "0123456789abcdef", "git_dirty": False, "torch": "2.14", "device": "cpu",
            "device_name": "CPU A", "num_threads": 1}
    def run(name=None):
        return {"wall_s": 60.0, "provenance": {"git_commit": "0123", **({"device_name": name} if name else {})}}
    record = {"profile": "cpu", "provenance": prov, "runs": [run(), run()]}
    assert "(CPU A, 1 thread(s))" in results.header(record)  # runs that name no machine: the record's
    record["runs"] = [run("CPU A"), run("CPU A")]
    assert results.machines(record) == "CPU A"
    record["runs"] = [run(), run("CPU B"), run("CPU A"), run("CPU B")]
    assert results.machines(record) == "CPU A: 1 run; CPU B: 2 runs; 1 run without a recorded machine"
    assert "(CPU A: 1 run; CPU B: 2 runs; 1 run without a recorded machine, 1 thread(s))" in results.header(record)


def test_finished_keeps_runs_that_reached_the_end_without_diverging():
    def run(seed, epochs, diverged=False, metric="test_error"):
        return {"seed": seed, "metrics": {"diverged": diverged},
                "history": [{"epoch": e, metric: 50.0 - e} for e in range(1, epochs + 1)]}
    runs = [run(0, 5), run(1, 3), run(2, 5, diverged=True), run(3, 5, metric="train_loss"), run(4, 5)]
    assert [r["seed"] for r in results.finished(runs, "test_error", 5)] == [0, 4]
    assert [r["seed"] for r in results.finished(runs, "test_error", 3)] == [0, 1, 4]
    band = results.band(results.finished(runs, "test_error", 5), "test_error")
    assert band["epoch"] == [1, 2, 3, 4, 5] and band["n"] == 2  # seed 1's short curve does not cut it


def test_seed_summary_counts_seeds_per_cell_and_per_swept_lr(capsys):
    def run(seed, **config):
        return {"config": {**config, "seed": seed}, "seed": seed, "metrics": {"test_error": 1.0}, "wall_s": 1.0}
    runs = [run(s, norm="bn", batch_size=32) for s in (0, 1, 2)] + [run(s, norm="gn", batch_size=32) for s in (0, 1)]
    runs += [run(100, phase="sweep", variant="bn", lr=lr) for lr in (0.1, 0.3)] + [run(101, phase="sweep", variant="bn", lr=0.1)]
    runs += [run(0, kind="final", model="nf")]
    record = {"experiment": "x", "profile": "cpu", "provenance": {}, "config": {}, "runs": runs}
    s = results.seed_summary(record)
    assert s["cells"] == {'{"batch_size": 32, "norm": "bn"}': 3, '{"batch_size": 32, "norm": "gn"}': 2,
                          '{"kind": "final", "model": "nf"}': 1}
    assert s["sweep"] == {'{"variant": "bn"}': {0.1: 2, 0.3: 1}}
    from normlab.__main__ import _show
    shown = _show(record)
    assert "3 cells (configs without the seed); seeds per cell: 1 in 1 cell, 2 in 1 cell, 3 in 1 cell" in shown
    assert 'fewer than 3 seeds (the book\'s minimum for a verdict): {"batch_size": 32, "norm": "gn"}; ' in shown
    assert 'lr sweep {"variant": "bn"}: 0.1 (2 seeds), 0.3 (1 seed)' in shown
