"""Autotuning that fits a benchmark's time budget, without touching the kernels.

The attention kernels are autotuned (18 forward, 19 dK/dV and 13 dQ configs in
``gptfast.kernels.attention``, 3 of each on the TMA data path, 2 persistent forward and dK/dV ones). A new key (head-dim bucket, T bucket, dtypes) compiles and times
every config the kernel's own pruner keeps: a couple of seconds per config, so a run that visits
a handful of keys spends minutes there. For a run on a lent GPU this module

- keeps only the first ``keep`` configs of each autotuner (:func:`restrict`), in the order the
  kernel lists them, plus the first tensor-descriptor (``TMA``) and the first persistent-grid
  (``PERSISTENT``) candidate when none of those is one, so the run still times each; the
  kernel's pruner still runs on what is kept (and falls back to the smallest of them when it
  drops all);
- counts the seconds spent tuning, compilation of the candidates included, and the configs
  timed (:class:`AutotuneClock`), so a report can give them apart from the timings. The
  kernels' autotuners compile every config the pruner keeps and drop the spilling ones
  before timing (``gptfast.kernels._autotune``): those seconds count too, the dropped
  configs are not counted as timed.

In the Triton interpreter (a CPU run) the kernels are not autotuned: there is nothing to find.
Reaching into ``Autotuner.configs`` and ``Autotuner._bench`` works on triton 3.6 to 3.9; the
durable fix is a knob in the kernels themselves (see bench/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time

KEEP_ENV = "GPTFAST_AUTOTUNE_KEEP"  # the configs each autotuner keeps; 0 or unset: all
KERNEL_MODULES = ("gptfast.kernels.attention", "gptfast.kernels.layernorm",
                  "gptfast.kernels.cross_entropy")


def autotuners() -> dict:
    """"module.name" -> the triton Autotuner objects defined in the kernel modules."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                found[f"{module_name.rsplit('.', 1)[-1]}.{name}"] = value
    return found


def keep_from_env() -> int:
    value = os.environ.get(KEEP_ENV, "0").strip() or "0"
    try:
        keep = int(value)
    except ValueError:
        raise ValueError(f"{KEEP_ENV} must be a whole number of configs, got {value!r}") from None
    if keep < 0:
        raise ValueError(f"{KEEP_ENV} must be >= 0, got {keep}")
    return keep


def restrict(keep: int, tuners: dict | None = None) -> dict:
    """Keep the first ``keep`` configs of each autotuner (0: all), and its first TMA and first
    PERSISTENT config where they hold none; returns name -> (kept, listed). Call it before the first launch:
    keys tuned earlier keep their choice."""
    tuners = autotuners() if tuners is None else tuners
    counts = {}
    for name, tuner in tuners.items():
        listed = len(tuner.configs)
        if keep and listed > keep:
            kept = list(tuner.configs[:keep])
            for flag in ("TMA", "PERSISTENT"):
                flagged = [c for c in tuner.configs if c.kwargs.get(flag, False)]
                if flagged and not any(c.kwargs.get(flag, False) for c in kept):
                    kept.append(flagged[0])
            tuner.configs = kept
        counts[name] = (len(tuner.configs), listed)
    return counts


@dataclasses.dataclass
class AutotuneClock:
    """Seconds spent in the autotuners' candidate runs (compile + timing) and configs timed."""

    seconds: float = 0.0
    configs: int = 0

    def install(self, tuners: dict | None = None) -> "AutotuneClock":
        tuners = autotuners() if tuners is None else tuners
        for tuner in tuners.values():
            if getattr(tuner, "_gptfast_clock", None) is None:
                tuner._bench = self._timed(tuner._bench)
                if hasattr(tuner, "drop_spilling"):  # the spill check's compiles
                    tuner.drop_spilling = self._timed(tuner.drop_spilling, count=False)
                tuner._gptfast_clock = self
        return self

    def _timed(self, bench, count=True):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return bench(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.configs += count
        return timed

    def snapshot(self) -> tuple:
        return self.seconds, self.configs
