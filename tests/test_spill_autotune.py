"""The spill-checked autotuner (gptfast.kernels._autotune): a config whose compiled kernel
spills is dropped before timing, whatever the static pruner kept.

On CPU the compiled kernels are fakes with the driver's attributes (``run`` loads the module,
then ``n_spills`` in 4-byte words and ``n_regs``), and the check is told it is not in the
interpreter. The last test compiles a real kernel for sm_90 (no GPU) in a subprocess and reads
the spills from the cubin.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

from gptfast.bench import autotune as bench_autotune  # noqa: E402
from gptfast.kernels import _autotune  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

# spill words (n_spills, 4 bytes each) and registers of each BLOCK's fake compiled kernel
SPILLS = {16: (0, 96), 32: (62, 255), 64: (0, 128), 128: (10, 255)}


class FakeCompiled:
    """What JITFunction.run(warmup=True) returns: loading it (``run``) sets n_spills/n_regs."""

    def __init__(self, block, loads=True):
        self.block, self.loads = block, loads

    @property
    def run(self):
        if not self.loads:
            raise OutOfResources(300000, 232448, "shared memory")
        self.n_spills, self.n_regs = SPILLS[self.block]
        return lambda *args: None


class FakeKernel:
    """Stands in for the tuner's jit function: compiles (warmup=True) or launches."""

    def __init__(self, unloadable=()):
        self.compiled, self.launched, self.unloadable = [], [], set(unloadable)

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            self.compiled.append(kwargs["BLOCK"])
            return FakeCompiled(kwargs["BLOCK"], kwargs["BLOCK"] not in self.unloadable)
        self.launched.append(kwargs["BLOCK"])
        return None


def _tuner(blocks, prune=None, unloadable=()):
    @triton.jit
    def tiled_kernel(x, n, BLOCK: triton.language.constexpr):
        pass

    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in blocks]
    tuner = _autotune.spill_checked_autotune(
        configs=configs, key=["n"],
        prune_configs_by={"early_config_prune": prune} if prune else None)(tiled_kernel)
    tuner.fn = FakeKernel(unloadable)
    timed = []

    def bench(*args, config, **kwargs):  # the spilling configs would be the fastest
        timed.append(config.kwargs["BLOCK"])
        return [1.0 if SPILLS[config.kwargs["BLOCK"]][0] else 2.0 + config.kwargs["BLOCK"]]
    tuner._bench = bench
    return tuner, timed


@pytest.fixture
def on_gpu(monkeypatch):
    """The check runs only outside the interpreter; these tests fake the compiled kernels."""
    monkeypatch.setattr(_autotune, "interpreter_enabled", lambda: False)


def _launch(tuner, n=1000):
    tuner[(1,)](object(), n)
    return tuner.best_config.kwargs["BLOCK"]


def test_spilling_configs_are_dropped_before_timing_and_logged(on_gpu, caplog):
    tuner, timed = _tuner([16, 32, 64, 128])
    with caplog.at_level(logging.WARNING, logger="gptfast.autotune"):
        best = _launch(tuner)
    assert sorted(tuner.fn.compiled) == [16, 32, 64, 128]  # every kept config compiled once
    assert sorted(timed) == [16, 64]                         # only the clean ones timed
    assert best == 16 and tuner.fn.launched == [16]
    dropped = [r.getMessage() for r in caplog.records if "drops" in r.getMessage()]
    assert len(dropped) == 2
    assert any("tiled_kernel" in m and "BLOCK: 32" in m and "248 B" in m and "255 registers" in m
               for m in dropped), dropped
    assert any("BLOCK: 128" in m and "40 B" in m for m in dropped), dropped
    # a second launch with the same key reuses the choice: no compile, no timing
    tuner.fn.compiled.clear()
    assert _launch(tuner) == 16 and tuner.fn.compiled == [] and sorted(timed) == [16, 64]


def test_the_check_runs_after_the_static_pruner(on_gpu):
    def keep_the_big_ones(configs, named_args, **kwargs):
        assert named_args["n"] == 1000 and kwargs["grid"] == (1,)
        return [c for c in configs if c.kwargs["BLOCK"] >= 32]

    tuner, timed = _tuner([16, 32, 64, 128], prune=keep_the_big_ones)
    # one clean config left: Triton runs it without timing (3.8 and 3.9; 3.6 times it alone)
    assert _launch(tuner) == 64
    assert sorted(tuner.fn.compiled) == [32, 64, 128] and set(timed) <= {64}


def test_every_config_spills_falls_back_to_the_least_spilling_loudly(on_gpu, caplog):
    tuner, timed = _tuner([32, 128])
    with pytest.warns(RuntimeWarning, match=r"every config spills.*\[BLOCK: 128.*40 B"):
        with caplog.at_level(logging.WARNING, logger="gptfast.autotune"):
            assert _launch(tuner) == 128
    assert set(timed) <= {128}
    assert any(r.levelno == logging.ERROR and "falling back" in r.getMessage()
               for r in caplog.records)


def test_a_config_that_cannot_load_is_dropped_like_a_spilling_one(on_gpu, caplog):
    tuner, timed = _tuner([16, 64], unloadable=[16])
    with caplog.at_level(logging.WARNING, logger="gptfast.autotune"):
        assert _launch(tuner) == 64
    assert 16 not in timed
    assert any("BLOCK: 16" in r.getMessage() and "OutOfResources" in r.getMessage()
               for r in caplog.records)


def test_nothing_loads_leaves_the_pruners_choice_to_the_timing(on_gpu):
    tuner, timed = _tuner([16, 64], unloadable=[16, 64])
    with pytest.warns(RuntimeWarning, match="no config compiled and loaded"):
        _launch(tuner)
    assert sorted(timed) == [16, 64]


def test_never_compiles_in_the_interpreter():
    from gptfast.backend import interpreter_enabled
    assert interpreter_enabled()  # tests/conftest.py: CPU tests interpret
    tuner, timed = _tuner([16, 32, 64, 128])
    assert _launch(tuner) == 32 and tuner.fn.compiled == [] and sorted(timed) == [16, 32, 64, 128]


def test_the_check_can_be_switched_off(on_gpu):
    tuner, timed = _tuner([16, 32])
    tuner.spill_check = False  # what the sm_90 report does: it gates the static pruner alone
    assert _launch(tuner) == 32 and tuner.fn.compiled == []


def test_the_bench_clock_counts_the_check_but_not_as_timed_configs(on_gpu):
    tuner, timed = _tuner([16, 32, 64])
    clock = bench_autotune.AutotuneClock().install({"k": tuner})
    bench_autotune.AutotuneClock().install({"k": tuner})  # a second clock does not wrap again
    _launch(tuner)
    assert clock.configs == len(timed) == 2 and clock.seconds > 0
    assert bench_autotune.restrict(2, {"k": tuner}) == {"k": (2, 3)}


_SM90_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, logging, re
    import torch, triton, triton.language as tl
    from triton import knobs
    from triton.runtime import driver
    from gptfast.bench import sm90
    from gptfast.kernels import _autotune, attention

    @triton.jit
    def rows_over_sum(X, Y, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
        s = tl.sum(x * x, 1)
        m = tl.max(tl.exp(x), 1)
        tl.store(Y + offs[:, None] * BLOCK + offs[None, :], x / s[:, None] + m[:, None] * x)

    # the same tile twice: capped at 32 registers a thread it spills, uncapped it does not
    configs = [triton.Config({"BLOCK": 32}, num_warps=1, maxnreg=32),
               triton.Config({"BLOCK": 32}, num_warps=1)]
    tuner = _autotune.spill_checked_autotune(configs=configs, key=[])(rows_over_sum)
    tuner.spill_reader = _autotune.cubin_spills  # no GPU to load the kernel on
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("gptfast.autotune").addHandler(handler)
    driver.set_active(sm90._CompileTarget())
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    x = torch.empty(32 * 32, device="meta")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kept = tuner.warmup(x, x, grid=(1,))
    frames = [int(f) for f in re.findall(r"(\\d+) bytes stack frame", log.getvalue())]
    print(json.dumps(dict(
        kept=[k.metadata.maxnreg for k in kept], lines=lines, ptxas_frames=frames,
        attention=[type(t).__name__ for t in
                   (attention._attn_fwd, attention._attn_bwd_dkdv, attention._attn_bwd_dq)])))
""")


def test_real_sm90_compile_drops_the_spilling_config(tmp_path):
    """Compiles for sm_90 on CPU (Triton's ptxas, the sm_90 report's driver stand-in): the
    config capped at 32 registers spills and is dropped, with the bytes ptxas reports."""
    try:
        from triton.backends.nvidia import compiler as _nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend to compile for sm_90")
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = tmp_path / "spill_check_sm90.py"  # triton.jit needs its source in a file
    script.write_text(_SM90_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kept"] == [None], result           # the uncapped config only
    spilled = max(result["ptxas_frames"])
    assert spilled > 0 and min(result["ptxas_frames"]) == 0, result
    assert len(result["lines"]) == 1, result
    assert "rows_over_sum drops" in result["lines"][0]
    assert "maxnreg: 32" in result["lines"][0] and f"spills {spilled} B" in result["lines"][0]
    assert result["attention"] == ["SpillCheckedAutotuner"] * 3
