"""bench/nanochat_attention.py on the CPU: nanochat's masks and pair counts, the provider glue
(FA layouts, varlen, the hub without downloads), unavailable peers and OOM as rows, and its
rows in the kernels suite and the headline's ``nanochat`` stage."""

import sys
import types

import pytest
import torch

from gptfast import reference
from gptfast.bench import common, nanochat_attention as na

SMALL = na.Case(1, 40, 2, 16, 9)                # a window narrower than T
WIDE = na.Case(1, 40, 2, 16, 40)                # nanochat's long layers: is_causal
VARLEN = na.Case(2, 48, 1, 16, -1, 10)          # documents packed in each row
TINY = na.Case(1, 16, 1, 16, 3)                 # one block: the row plumbing, cheaply


def cpu_meter():
    return common.Meter("cpu", warmup=0, repeats=10)  # one untimed call, one sample


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv(common.COMPILE_BACKEND_ENV, "aot_eager")


# ---------------------------------------------------------------------- the masks --

def test_cu_seqlens_pack_seeded_documents_of_the_asked_mean():
    cu = na.random_cu_seqlens(8192, 256, seed=3)
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 8192
    lengths = cu.diff()
    assert (lengths >= 1).all()
    assert 150 < lengths.float().mean() < 400, lengths.float().mean()
    assert torch.equal(cu, na.random_cu_seqlens(8192, 256, seed=3))
    assert not torch.equal(cu, na.random_cu_seqlens(8192, 256, seed=4))
    assert torch.equal(na.random_cu_seqlens(5, 1), torch.arange(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="mean_len"):
        na.random_cu_seqlens(16, 0)
    with pytest.raises(ValueError, match="total"):
        na.random_cu_seqlens(0, 4)


def test_case_documents_stay_inside_their_row_and_match_the_cu_seqlens():
    cu, ids = na.case_documents(VARLEN, seed=1)
    assert cu[-1] == VARLEN.batch * VARLEN.seq
    assert set(range(0, VARLEN.batch * VARLEN.seq + 1, VARLEN.seq)) <= set(cu.tolist())
    assert ids.shape == (VARLEN.batch, VARLEN.seq) and (ids[:, 0] == 0).all()
    flat = ids + torch.tensor([[0], [int(ids[0, -1]) + 1]])  # row 1 numbers from 0 again
    for doc, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert (flat.flatten()[start:end] == doc).all()
    assert na.case_documents(SMALL) == (None, None)


@pytest.mark.parametrize("case", [SMALL, WIDE, na.Case(2, 33, 1, 16, 0), VARLEN,
                                  na.Case(1, 48, 1, 16, 5, 10)])
def test_visible_pairs_are_what_flash_attention_rules_let_through(case):
    _, ids = na.case_documents(case, seed=2)
    mask = reference.flash_mask(case.seq, case.seq, causal=True, window_left=case.window_left,
                                document_ids=ids)
    expected = int(mask.expand(case.batch, 1, case.seq, case.seq).sum())
    assert na.visible_pairs(case, ids) == expected


@pytest.mark.parametrize("window", [-1, 0, 1, 7, 38, 39, 40, 100])
def test_nanochat_fallback_mask_is_flash_attentions_window(window):
    """nanochat's SDPA mask and FA's window_size=(w, 0) see the same keys (w + 1 of them)."""
    mask = na.nanochat_sdpa_mask(40, 40, window, "cpu")
    expected = reference.flash_mask(40, 40, causal=True, window_left=window)[0, 0]
    assert torch.equal(mask, expected)
    # after a KV cache (Tq < Tk) it aligns to the bottom right, as FA does
    assert torch.equal(na.nanochat_sdpa_mask(5, 40, window, "cpu"),
                       reference.flash_mask(5, 40, causal=True, window_left=window)[0, 0])


# ------------------------------------------------------------------------ providers --

@pytest.mark.parametrize("case", [SMALL, WIDE, VARLEN], ids=lambda c: c.label)
def test_ours_sdpa_fallback_and_flex_agree_with_the_reference(case, aot_eager):
    if na.flex_missing():
        pytest.skip(na.flex_missing())
    rows = na.bench_case(case, torch.float32, device="cpu", meter=cpu_meter(),
                         providers=("gptfast", "SDPA nanochat fallback", "FlexAttention"))
    by = {(r["provider"], r["direction"]): r for r in rows}
    _, ids = na.case_documents(case)
    pairs = na.visible_pairs(case, ids)
    for (provider, direction), r in by.items():
        if (provider, direction) == ("FlexAttention", "fwd+bwd"):
            assert r["status"] == "unavailable" and "no backward on a CPU" in r["error"]
            continue
        assert r["status"] == "ok", r
        assert r["pairs"] == pairs
        work = 4 * pairs * case.heads * case.head_dim * (3.5 if direction == "fwd+bwd" else 1)
        assert r["tflops"] == pytest.approx(work / r["ms"] / 1e9)
        checked = ("out",) if direction == "fwd" else ("dq", "dk", "dv")
        assert set(r["errors"]) == set(checked)
        for name in checked:
            rel, max_abs = r["errors"][name]
            assert rel < 1e-5 and max_abs < 1e-5, (provider, name, rel, max_abs)
    sdpa_note = by["SDPA nanochat fallback", "fwd"]["note"]
    if case is WIDE:  # the window covers the context: nanochat calls is_causal, no mask
        assert sdpa_note.startswith("is_causal=True")
    else:
        assert "explicit bool mask" in sdpa_note


def test_fa_glue_passes_flash_attentions_layout_window_and_cu_seqlens():
    """FA2/FA3 need CUDA: a stand-in module with FA's signatures, computing with the reference,
    checks what the runners hand over and that the output comes back in (B, T, H, D)."""
    calls = []

    def flash_attn_func(q, k, v, causal, window_size):
        calls.append(("func", q.shape, causal, window_size))
        out = reference.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=causal,
                                  window_left=window_size[0], window_right=window_size[1])
        return out.transpose(1, 2), torch.zeros(1)  # as FA3 builds that return the lse

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal, window_size):
        calls.append(("varlen", q.shape, cu_q.dtype, max_q, max_k, causal, window_size))
        assert cu_q is cu_k and cu_q.dtype == torch.int32
        ids = torch.searchsorted(cu_q[1:].long(), torch.arange(q.shape[0]), right=True)
        out = reference.attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), causal=causal,
                                  window_left=window_size[0], document_ids=ids[None])
        return out[0].transpose(0, 1)

    fake = types.SimpleNamespace(flash_attn_func=flash_attn_func,
                                 flash_attn_varlen_func=flash_attn_varlen_func)
    for case in (SMALL, VARLEN):
        cu, ids = na.case_documents(case, seed=5)
        q, k, v, _ = na.make_inputs(case, torch.float32, "cpu")
        out = na._fa_runner(fake, case, cu, "stand-in")(q, k, v)
        with torch.no_grad():
            longest = None if cu is None else int(cu.diff().max())
            expected = na._ours(q, k, v, case.window_left, cu, longest)
        assert out.shape == q.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert calls[0] == ("func", (1, 40, 2, 16), True, (9, 0))
    kind, shape, dtype, max_q, max_k, causal, window = calls[1]
    longest = int(na.case_documents(VARLEN, seed=5)[0].diff().max())
    assert (kind, shape, max_q, max_k, causal, window) == (
        "varlen", (96, 1, 16), longest, longest, True, (-1, 0))


def test_missing_fa2_and_fa3_are_unavailable_rows_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # as if not installed
    rows = na.bench_case(SMALL, torch.float32, device="cpu", meter=cpu_meter(),
                         providers=("FA2", "FA3", "SDPA nanochat fallback"), check=False)
    by = {(r["provider"], r["direction"]): r for r in rows}
    for direction in ("fwd", "fwd+bwd"):
        fa2, fa3 = by["FA2", direction], by["FA3", direction]
        assert fa2["status"] == fa3["status"] == "unavailable"
        assert fa2["tflops"] is None and "flash_attn does not import" in fa2["error"]
        assert "CUDA only" in fa3["error"]
        assert by["SDPA nanochat fallback", direction]["status"] == "ok"


def test_fa3_loader_never_downloads_and_says_why_it_failed(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "kernels", types.ModuleType("kernels"))  # not HF's
    with pytest.raises(na.Unavailable) as info:
        na.load_fa3()
    assert "flash_attn_interface does not import" in str(info.value)
    assert "is not Hugging Face's kernels package" in str(info.value)

    seen = []

    def get_kernel(repo_id, version):
        seen.append((repo_id, version, constants.HF_HUB_OFFLINE))
        raise FileNotFoundError("not in the local cache")

    hub = types.ModuleType("kernels")
    hub.get_kernel = get_kernel
    monkeypatch.setitem(sys.modules, "kernels", hub)
    offline_before = constants.HF_HUB_OFFLINE
    with pytest.raises(na.Unavailable, match="not loadable without a download"):
        na.load_fa3()
    assert seen == [(na.HUB_FA3, na.HUB_FA3_VERSION, True)]  # asked offline: cache only
    assert constants.HF_HUB_OFFLINE == offline_before

    hub.get_kernel = lambda repo_id, version: types.SimpleNamespace(flash_attn_interface="fa3")
    assert na.load_fa3() == ("fa3", f"{na.HUB_FA3} (hub cache)")


def test_a_reference_that_does_not_fit_leaves_the_timings_and_says_so(monkeypatch):
    def too_big(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(na, "reference_outputs", too_big)
    rows = na.bench_case(SMALL, torch.float32, device="cpu", meter=cpu_meter(),
                         providers=("SDPA nanochat fallback",))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all("no fp32 reference" in r["errors"]["error"] for r in rows)


def test_out_of_memory_and_failures_are_rows(monkeypatch):
    def oom_builder(case, document_ids, cu_seqlens, device):
        def run(q, k, v):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        run.note = None
        return run

    def broken_builder(case, document_ids, cu_seqlens, device):
        raise RuntimeError("no kernel image")

    monkeypatch.setitem(na.BUILDERS, "FA2", oom_builder)
    monkeypatch.setitem(na.BUILDERS, "FA3", broken_builder)
    rows = na.bench_case(SMALL, torch.float32, device="cpu", meter=cpu_meter(),
                         providers=("FA2", "FA3"))
    status = {(r["provider"], r["direction"]): (r["status"], r["error"]) for r in rows}
    assert status["FA2", "fwd"][0] == status["FA2", "fwd+bwd"][0] == "oom"
    assert "out of memory" in status["FA2", "fwd+bwd"][1]
    assert status["FA3", "fwd"] == ("error", "RuntimeError: no kernel image")


# ------------------------------------------------------- the kernels suite, the headline --

def test_kernel_suite_on_a_cpu_runs_the_nanochat_cases_as_rows(monkeypatch, aot_eager):
    from gptfast.bench import kernel_suite, report

    sizes = kernel_suite.dataclasses.replace(kernel_suite.CPU, nanochat=(TINY,))
    suite = kernel_suite.KernelSuite("fp32", sizes, attention=(), device="cpu")
    units = suite.units()
    assert [label for label, _ in units] == [f"kernels nanochat_attention {TINY.shape}"]
    rows = [r for _, run in units for r in run()]
    assert {(r["impl"], r["pass"]) for r in rows} == {
        (p, d) for p in na.PROVIDERS for d in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["suite"] == "kernels" and r["kernel"] == "nanochat_attention"
        assert r["unit"] == "TFLOP/s" and r["shape"] == TINY.shape and r["size"] == 16
        assert (r["batch_size"], r["context_length"], r["heads"]) == (1, 16, 1)
        assert r["window_left"] == 3 and r["pairs"] == na.visible_pairs(TINY, None)
    by = {(r["impl"], r["pass"]): r for r in rows}
    ours = by["gptfast", "fwd+bwd"]
    assert ours["status"] == "ok" and ours["throughput"] > 0 and ours["ms"] > 0
    assert set(ours["rel_err"]) == {"dq", "dk", "dv"} and max(ours["rel_err"].values()) < 1e-5
    assert by["FA3", "fwd"]["status"] == "n/a" and "CUDA only" in by["FA3", "fwd"]["note"]
    text = report.markdown(rows, {"run": "t", "device_name": "cpu", "dtype": "fp32",
                                  "versions": {"torch": "t", "triton": "t", "gptfast": "g"},
                                  "settings": "test"})
    assert "### nanochat_attention (TFLOP/s)" in text and f"| {TINY.shape} |" in text


def test_headline_stage_rows_follow_the_schema(aot_eager, monkeypatch):
    from gptfast.bench import autotune, headline
    from gptfast.bench.headline import nanochat, stages as headline_stages
    from gptfast.bench.headline.report import STAGES, validate

    assert "nanochat" in STAGES and headline.stage_list("nanochat") == ("nanochat",)
    monkeypatch.setattr(na, "CPU_CASES", (TINY,))
    ctx = headline_stages.Context("nanochat", headline_stages.DRY, torch.device("cpu"),
                                  cpu_meter(), dry_run=True)
    (unit,) = nanochat.nanochat_units(ctx, autotune.AutotuneClock())
    rows = unit.run()
    assert validate(rows) == []
    assert all(r["stage"] == "nanochat" and r["shape"] == TINY.shape for r in rows)
    timed = [r for r in rows if r["impl"] == "gptfast" and r["metric"] == "tflops"]
    assert {r["direction"] for r in timed} == {"fwd", "fwd+bwd"}
    assert all(r["status"] == "ok" and r["best_peer"] == "SDPA nanochat fallback" for r in timed)
    checks = [r for r in rows if r["metric"] == "rel_err"]
    assert {r["impl"] for r in checks} == {"gptfast", "SDPA nanochat fallback", "FlexAttention"}
    assert all(r["status"] == "ok" and r["value"] <= r["tolerance"] for r in checks)
    assert {r["name"].rsplit(" ", 1)[1] for r in checks if r["impl"] == "gptfast"} == {
        "out", "dq", "dk", "dv"}
    unavailable = {(r["impl"], r["direction"]) for r in rows if r["status"] == "unavailable"}
    assert unavailable == {("FA2", "fwd"), ("FA2", "fwd+bwd"), ("FA3", "fwd"),
                           ("FA3", "fwd+bwd"), ("FlexAttention", "fwd+bwd")}
