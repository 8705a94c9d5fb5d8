"""Command line: `python -m normlab list | run EXP --profile P [--parallel K] [--device D] | show EXP [--profile P]`."""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys

import torch

from . import results, stats, sweep
from .train import init_distributed
from .experiments import available, get_experiment


def _show(record: dict) -> str:
    lines = [f"{record['experiment']} / {record['profile']}: {len(record['runs'])} runs",
             f"  {results.header(record)}, started {record['provenance'].get('started')}"]
    for run in record["runs"]:
        metrics = {k: v for k, v in run.get("metrics", {}).items() if isinstance(v, (int, float, bool))}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        lines.append(f"  {json.dumps(run['config'], sort_keys=True)}  {shown}")
    walls = [r.get("wall_s", 0) for r in record["runs"]]
    if walls:
        lines.append(f"  median wall per run {statistics.median(walls):.1f} s")
    seeds = results.seed_summary(record)
    if seeds["cells"]:
        counts = collections.Counter(seeds["cells"].values())
        lines.append(f"  {len(seeds['cells'])} cells (configs without the seed); seeds per cell: "
                     + ", ".join(f"{n} in {k} cell{'s' * (k > 1)}" for n, k in sorted(counts.items())))
        few = [c for c, n in seeds["cells"].items() if n < stats.MIN_SEEDS]
        if few:
            lines.append(f"  fewer than {stats.MIN_SEEDS} seeds (the book's minimum for a verdict): " + "; ".join(few))
    for arm, by_lr in seeds["sweep"].items():
        lines.append(f"  lr sweep {arm}: " + ", ".join(f"{lr:g} ({n} seed{'s' * (n > 1)})" for lr, n in by_lr.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normlab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list experiments and their recorded profiles")
    run = sub.add_parser("run", help="run (or resume) an experiment's sweep and record it under results/")
    run.add_argument("experiment")
    run.add_argument("--profile", default="smoke",
                     help=f"one of the experiment's profiles ({', '.join(results.PROFILES)}, or its own)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    run.add_argument("--out", default=None, help="result file (default: results/EXP/PROFILE.json)")
    run.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    run.add_argument("--quiet", action="store_true", help="no per-run log lines and no summary")
    run.add_argument("--parallel", type=int, default=1, metavar="K",
                     help="K processes sharing the sweep (CPU: the cores are divided among them; "
                          "GPU: they share the device)")
    run.add_argument("--threads", type=int, default=None, metavar="T",
                     help="intra-op CPU threads per process (default: torch's, or the cores divided by K)")
    run.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                     help="take only the runs whose config has KEY=VALUE (repeatable; e.g. --only batch_size=2 "
                          "--only epochs=60); the record stays the profile's")
    show = sub.add_parser("show", help="print a recorded result")
    show.add_argument("experiment")
    show.add_argument("--profile", default=None,
                      help="default: the profile the book shows (the first complete of full, cpu_converged, "
                           "cpu_long, cpu)")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "list":
            for name in available():
                recorded = [p for p in results.PROFILES if results.result_path(name, p).exists()]
                try:
                    doc = (get_experiment(name).__doc__ or "").strip().splitlines()
                    summary = doc[0] if doc else ""
                except Exception as e:  # one broken experiment must not hide the others
                    summary = f"(cannot import: {type(e).__name__}: {e})"
                print(f"{name:24s} recorded: {', '.join(recorded) or '-':24s} {summary}")
        elif args.cmd == "run" and args.parallel > 1:
            sweep.parse_only(args.only)  # a bad --only fails here, not in each of the K processes
            code = sweep.launch(args.experiment, args.profile, args.parallel, out=args.out, device=args.device,
                                threads=args.threads, only=args.only)
            if code:
                return code
            out = args.out or results.result_path(args.experiment, args.profile)
            print(_show(results.load_path(out)))
        elif args.cmd == "run":
            if args.threads:
                torch.set_num_threads(args.threads)
            device = init_distributed(args.device)  # under torchrun: join the job (one device per process)
            rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
            log = None if args.quiet or not rank0 else print
            record = sweep.sweep(args.experiment, args.profile, out=args.out, device=device,
                                 progress=not args.no_progress and rank0, log=log, only=sweep.parse_only(args.only))
            if not args.quiet and rank0:
                print(_show(record))
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        elif args.cmd == "show":
            print(_show(results.load(args.experiment, args.profile)))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
