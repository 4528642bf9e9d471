"""Spill-checked autotuning: a config whose compiled kernel spills is never timed.

``spill_checked_autotune`` is ``triton.autotune`` whose Autotuner, after the kernel's own
``early_config_prune``, compiles every config it kept (``warmup``: no launch) and drops those
whose compiled kernel reports spills, before any is timed. The static pruners predict spills
from a register model measured on some Triton versions; another Triton (or ptxas) may
allocate differently, and then the fastest-looking config on a short benchmark could be a
spilling one. With the check, no Triton version can pick one: the pruner keeps the search
short, the compiled kernel has the last word.

- A dropped config is logged (logger ``gptfast.autotune``, WARNING) with the kernel, the
  config, the spilled bytes and registers.
- If every kept config spills, the one that spills least (then the fewest registers) is
  kept, with a RuntimeWarning naming all of them: a kernel still runs, loudly.
- A config that cannot load (``OutOfResources``: shared memory, threads) or compile
  (``PTXASError``, a compile-time assertion) is dropped the same way, as Triton's timing
  would give it an infinite time; if nothing compiles or loads, the pruner's list goes to the timing unchanged,
  where Triton reports the failure as before.
- Never in the interpreter (``TRITON_INTERPRET=1``: nothing is compiled there), and the
  kernels build no autotuner there anyway.

Spills are read by ``spill_reader(compiled_kernel) -> (spill_bytes, registers)``. The default,
:func:`loaded_spills`, loads the kernel on the current GPU and reads the driver's figures
(``CompiledKernel.n_spills``: local memory per thread in 4-byte words, and ``n_regs``; the
same names on Triton 3.6 to 3.9). :func:`cubin_spills` reads the same figures from the cubin
with the ``cuobjdump`` in Triton's wheel, without a GPU (tests, and compiles for a target
this machine lacks).

The Autotuner is subclassed at one method, ``prune_configs(kwargs)``, which Triton 3.6 to 3.9
call with the launch's keyword arguments after setting ``self.nargs`` (from ``run`` for a new
key and from ``warmup``); its result is what ``run`` times (one config: no timing at all).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import warnings

from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.autotuner import Autotuner
from triton.runtime.errors import OutOfResources, PTXASError

from gptfast.backend import interpreter_enabled

log = logging.getLogger("gptfast.autotune")


def loaded_spills(kernel) -> tuple[int, int]:
    """(spill bytes, registers) of a compiled kernel, as the GPU driver reports them once it
    is loaded. Raises what loading raises (``OutOfResources`` when it cannot run here)."""
    kernel.run  # noqa: B018 - the property loads the module (CompiledKernel._init_handles)
    return 4 * int(kernel.n_spills), int(kernel.n_regs)


_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)")


def cubin_spills(kernel) -> tuple[int, int]:
    """(spill bytes, registers) from the kernel's cubin (NVIDIA only), with no GPU: the stack
    frame and local memory per thread, as ``cuobjdump --dump-resource-usage`` lists them."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    found = _RESOURCES.findall(out)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out[-2000:]}")
    regs, stack, local = (int(x) for x in found[-1])
    return stack + local, regs


_UNUSABLE = (OutOfResources, CompileTimeAssertionFailure, PTXASError)


def _kernel_name(tuner) -> str:
    return getattr(tuner.base_fn, "__name__", "kernel")


def _describe(config) -> str:
    return str(config)


class SpillCheckedAutotuner(Autotuner):
    """``triton.runtime.autotuner.Autotuner`` that drops spilling configs before timing."""

    spill_check = True          # the sm_90 report turns it off (it compiles every kept config)
    spill_reader = staticmethod(loaded_spills)

    def prune_configs(self, kwargs):
        kept = super().prune_configs(kwargs)
        if not self.spill_check or interpreter_enabled() or not self.nargs:
            return kept
        return self.drop_spilling(kept, kwargs)

    def drop_spilling(self, configs, kwargs):
        """The configs whose compiled kernel does not spill (see the module docstring)."""
        args = tuple(self.nargs.values())  # self.nargs = dict(zip(arg_names, args))
        launch = {k: v for k, v in kwargs.items() if k != "warmup"}
        name = _kernel_name(self)
        measured, clean = [], []
        for config in configs:
            try:
                kernel = self.fn.run(*args, **launch, **config.all_kwargs(), warmup=True)
                spill_bytes, regs = self.spill_reader(kernel)
            except _UNUSABLE as err:  # what Triton's own timing turns into an infinite time
                log.warning("gptfast autotune: %s drops [%s]: %s: %s", name, _describe(config),
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                continue
            measured.append((spill_bytes, regs, config))
            if spill_bytes:
                log.warning("gptfast autotune: %s drops [%s]: spills %d B (%d registers)",
                            name, _describe(config), spill_bytes, regs)
            else:
                clean.append(config)
        if clean:
            return clean
        if not measured:
            warnings.warn(f"gptfast autotune: {name}: no config compiled and loaded for the spill "
                          f"check; timing the {len(configs)} the pruner kept", RuntimeWarning,
                          stacklevel=2)
            return configs
        spill_bytes, regs, least = min(measured, key=lambda m: (m[0], m[1]))
        spilled = "; ".join(f"[{_describe(c)}] {s} B" for s, _, c in measured)
        warnings.warn(f"gptfast autotune: {name}: every config spills ({spilled}); running "
                      f"[{_describe(least)}], which spills least ({spill_bytes} B, {regs} registers)",
                      RuntimeWarning, stacklevel=2)
        log.error("gptfast autotune: %s: every config spills; falling back to [%s] (%d B)",
                  name, _describe(least), spill_bytes)
        return [least]


def spill_checked_autotune(configs, key, prune_configs_by=None, reset_to_zero=None,
                           restore_value=None, **options):
    """``triton.autotune`` with :class:`SpillCheckedAutotuner` (same arguments)."""
    def decorator(fn):
        tuner = SpillCheckedAutotuner(fn, fn.arg_names, configs, key, reset_to_zero, restore_value,
                                      prune_configs_by=prune_configs_by, **options)
        return tuner
    return decorator
