"""The book's experiments: one module per reproduction, run by `python -m normlab run NAME --profile P`.

An experiment module defines

- `PROFILES`: `{"smoke": config, "cpu": config, "full": config}`, plain JSON-able dicts;
- `runs(config) -> list[dict]`: one small JSON-able dict per run (its own settings, including `"seed"`);
  the dict is the run's identity in the result file, so a restarted sweep skips what is recorded;
- `run_one(run, config, device, progress[, checkpoint]) -> {"metrics": {...}, "history": [...]}`; an
  experiment that trains takes `checkpoint` (a file the sweep assigns to the run) and hands it to
  `normlab.train.Trainer`, so a killed run resumes where it stopped. A run that depends on other
  runs of the same record (e.g. one trained at the learning rate a recorded sweep chose) also takes
  `record` (the record as it stands when the run starts; the sweep passes it) and raises `NotReady`
  while the runs it needs are not recorded yet: the sweep then runs others first and comes back to it.

`get_experiment` also accepts a dotted module path (`mypkg.my_exp`) for experiments kept elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


class NotReady(RuntimeError):
    """Raised by `run_one` when the runs a run depends on are not in the record yet; the message says
    which. `normlab.sweep` defers such a run until they are recorded (by this or another process)."""


def available() -> list[str]:
    """Names of the experiments that ship with normlab."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_experiment(name: str) -> ModuleType:
    if "." in name:
        return importlib.import_module(name)
    if name not in available():
        raise ValueError(f"unknown experiment {name!r}; `python -m normlab list` shows: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}")
