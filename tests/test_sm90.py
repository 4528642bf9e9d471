"""The sm_90 compile gate: every kernel, every kept autotune config, compiled for H100 on CPU.

The report (``python -m gptfast.bench.sm90``) runs in a subprocess without TRITON_INTERPRET
(this process has it on, and triton.jit decided interpretation when the kernels were
imported). It compiles the headline shapes; ``--subset full`` adds D=256, a ragged T, fp32
LayerNorm at every width and more vocabularies. Results are cached by kernel source hash, so
only a changed kernel recompiles.
"""

import ast
import inspect
import json
import os
import subprocess
import sys

import pytest

from gptfast.bench import sm90

triton = pytest.importorskip("triton")
try:
    from triton.backends.nvidia import compiler as _nvidia  # noqa: F401
except ImportError:  # pragma: no cover - wheels without the CUDA backend
    pytest.skip("this triton has no NVIDIA backend to compile for sm_90", allow_module_level=True)

SUBSET = os.environ.get("GPTFAST_SM90_SUBSET", "headline")


def _compile_env():
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    proc = subprocess.run([sys.executable, "-m", "gptfast.bench.sm90", "--subset", SUBSET,
                           "--json", str(out)], env=_compile_env(), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads(out.read_text())
    assert records, "the report compiled nothing"
    return records


def _where(r):
    return f"{r['case']} {r['shape']} {r['dtype']} {r['kernel']} [{r['config']}]"


def _entry_kernels(module):
    """The module's @triton.jit functions that no other jit function calls: its kernels."""
    from triton.runtime.jit import JITFunction
    jitted = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
    called = set()
    for fn in jitted.values():
        tree = ast.parse(inspect.getsource(fn.fn).lstrip())
        called |= {node.func.id for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    return {obj.fn.__name__ for name, obj in jitted.items() if name not in called}


def test_report_covers_every_kernel_and_both_dq_paths(report):
    from gptfast.kernels import attention, cross_entropy, layernorm, rotary
    expected = set()
    for module in (attention, layernorm, cross_entropy, rotary):
        expected |= _entry_kernels(module)
    compiled = {r["kernel"] for r in report}
    assert expected - compiled == set(), f"kernels the report never compiled: {expected - compiled}"
    dkdv = [r for r in report if r["kernel"] == "_attn_bwd_dkdv_kernel"]
    assert {r["constexprs"]["ATOMIC_DQ"] for r in dkdv} == {True, False}
    assert {r["constexprs"]["BLOCK_D"] for r in dkdv} >= {64, 128}
    assert all(r["triton"] == triton.__version__ for r in report)


def test_tma_candidates_compile_to_tma(report):
    """Each tuned attention kernel has tensor-descriptor candidates beside its pointer
    configs, and the flag is what the PTX does: TMA copies exactly where TMA is set (the
    spill, shared memory and wgmma gates below cover these configs too)."""
    tuned = [r for r in report if r["kernel"] in
             ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")]
    for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        paths = {r["constexprs"]["TMA"] for r in tuned if r["kernel"] == kernel}
        assert paths == {True, False}, f"{kernel}: data paths compiled {paths}"
    assert {r["constexprs"]["TMA_OK"] for r in tuned} == {True}
    wrong = [f"{_where(r)}: TMA={r['constexprs']['TMA']} but tma in PTX {r['tma']}"
             for r in tuned if r["tma"] != r["constexprs"]["TMA"]]
    assert not wrong, "\n".join(wrong)
    untuned = [_where(r) for r in report if r["tma"] and r not in tuned]
    assert not untuned, "\n".join(untuned)


def test_no_kept_config_spills(report):
    spills = [f"{_where(r)}: {r['spill_bytes']} B spill stores, {r['spill_loads']} B loads"
              for r in report if r["spill_bytes"] or r["spill_loads"]]
    assert not spills, "\n".join(spills)


def test_shared_memory_fits_and_pruner_does_not_underestimate(report):
    over = [f"{_where(r)}: {r['smem_bytes']} B" for r in report
            if r["smem_bytes"] > sm90.SMEM_PER_BLOCK]
    assert not over, "over the 227 KB a block may use:\n" + "\n".join(over)
    tuned = [r for r in report if r["kernel"] in
             ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")]
    assert tuned and all(r["smem_estimate"] is not None for r in tuned)
    under = [f"{_where(r)}: estimate {r['smem_estimate']} B < compiled {r['smem_bytes']} B"
             for r in tuned if r["smem_estimate"] < r["smem_bytes"]]
    assert not under, "\n".join(under)


def test_every_dot_is_wgmma(report):
    """Except the head-dim-256 dK/dV tiles triton >= 3.9 falls back to (no wgmma tile of that
    kernel fits its registers there): only there, and still spill-free (gated above)."""
    with_dots = [r for r in report if r["dots"]]
    assert with_dots, "no kernel with tl.dot was compiled"
    expected = [r for r in with_dots if sm90.mma_sync_expected(r["kernel"], r["constexprs"])]
    newer = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9)
    assert all(newer for r in expected), [_where(r) for r in expected]
    slow = [f"{_where(r)}: {r['mma']}, {r['wgmma_dots']} of {r['dots']} dots wgmma"
            for r in with_dots if (r["mma"] != "wgmma" or r["wgmma_dots"] != r["dots"])
            and r not in expected]
    assert not slow, "\n".join(slow)


def test_autotune_keys_cover_every_caller_constexpr():
    """A constexpr the caller passes (neither tuned by a config nor set by a heuristic) changes
    the compiled kernel, so it must be part of the autotune key; otherwise two paths share one
    cached winner, timed on the other path."""
    code = ("import json; from gptfast.bench import sm90; "
            "print(json.dumps(sm90.autotune_key_gaps()))")
    proc = subprocess.run([sys.executable, "-c", code], env=_compile_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tuners"] >= 3, result
    assert not result["gaps"], "\n".join(result["gaps"])


def test_dot_classification():
    ttir = "%1 = tt.dot %a, %b, %c : x\n%2 = tt.dot %d, %e, %f : y\n"
    wgmma_ttgir = "%1 = ttng.warp_group_dot %a\n%2 = ttng.warp_group_dot %d\n"
    assert sm90.count_dots(ttir, wgmma_ttgir, "wgmma.mma_async.sync.aligned") == (2, 2, "wgmma")
    mixed_ttgir = "%1 = ttng.warp_group_dot %a\n%2 = tt.dot %d, %e, %f\n"
    ptx = "wgmma.mma_async.sync.aligned\nmma.sync.aligned.m16n8k16"
    assert sm90.count_dots(ttir, mixed_ttgir, ptx)[2] == "mixed"
    assert sm90.count_dots(ttir, ttir, "mma.sync.aligned.m16n8k16")[2] == "mma.sync"
    assert sm90.count_dots("", "", "")[2] == "none"


def test_ptxas_log_and_occupancy():
    log = ("ptxas info    : Function properties for k\n"
           "    184 bytes stack frame, 248 bytes spill stores, 304 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert sm90.parse_ptxas_log(log) == (255, 248, 304, 184)
    with pytest.raises(RuntimeError):
        sm90.parse_ptxas_log("nothing here")
    # 168 registers (5376 a warp): 12 warps, three blocks of 4, fit the 64K register file
    assert sm90.resident_warps(168, 0, 4) == 12
    # shared memory: 131072 B + 1 KB reserved per block, 228 KB per SM -> one block
    assert sm90.resident_warps(64, 131072, 8) == 8
    assert sm90.resident_warps(32, 0, 4) == 64


@pytest.mark.parametrize("triton_3_9", [False, True])
def test_pruner_keeps_the_head_dim_256_dkdv_tiles_of_its_triton(monkeypatch, triton_3_9):
    """The static model per Triton version, without compiling: at head dim 256 the dK/dV
    pruner keeps the 16x64 wgmma tiles below 3.9 and only the 32-key tiles from 3.9 (where
    every 64-key tile spills); nowhere else a 32-key dK/dV tile (mma.sync), and no tile that
    spills on 3.9 at head dim 128 on any version."""
    import torch
    from gptfast.kernels import attention as attn
    monkeypatch.setattr(attn, "_TRITON_3_9", triton_3_9)
    prune = attn._pruner("dkdv")
    q = torch.empty(0, dtype=torch.bfloat16)

    def kept(block_d, **flags):
        args = dict(Q=q, BLOCK_D=block_d, T_BUCKET=1024, TMA_OK=True, ATOMIC_DQ=False, **flags)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.kwargs["TMA"])
                for c in prune(attn._DKDV_CONFIGS, args)}

    narrow = {(16, 32, 2, False), (16, 32, 3, False), (16, 32, 3, True)}
    assert kept(256) == (narrow if triton_3_9 else {(16, 64, 3, False), (16, 64, 2, False),
                                                    (16, 64, 3, True)})
    for block_d in (64, 128):
        for flags in ({}, {"DOCUMENTS": True, "SLIDING": True}):
            configs = kept(block_d, **flags)
            assert configs and all(n >= 64 for _, n, _, _ in configs), (block_d, configs)
            if block_d == 128:
                assert not any(m >= 64 and n >= 128 for m, n, _, _ in configs), configs
    dq = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in attn._pruner("dq")(
        attn._DQ_CONFIGS, dict(Q=q, BLOCK_D=256, T_BUCKET=1024, TMA_OK=True))}
    assert dq == {(64, 32)}
