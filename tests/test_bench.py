"""gptfast bench: the CPU quick sweep end to end, OOM as a result, Ctrl-C, argument errors."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from gptfast import cli
from gptfast.bench import gpt, loader_suite, sweep
from gptfast.bench.nanogpt import NanoGPT
from gptfast.model import GPT, GPTConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"suite", "impl", "batch_size", "context_length", "status", "device", "versions",
            "git_commit", "run"}
GPT_MEASURES = {"mode", "tokens_per_s", "step_ms", "step_ms_p20", "step_ms_p80", "tflops", "mfu",
                "peak_mem_gb", "first_step_s", "warmup_s"}
# the tiny model on the CPU, two impls, the smallest steps that still make a grid
TINY = ["bench", "--device", "cpu", "--model", "tiny", "--impls", "gptfast-reference,nanogpt-eager",
        "--warmup", "1", "--repeats", "2"]


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def run_bench(out, *extra):
    return cli.main([*TINY, "--out", str(out), *extra])


def test_cpu_quick_sweep_writes_jsonl_markdown_and_plots(tmp_path, monkeypatch, capsys):
    from gptfast.bench import kernel_suite, nanochat_attention

    monkeypatch.setattr(loader_suite, "QUICK", loader_suite.LoaderSizes(
        tokens=20_000, sizes=((2, 16),), seconds=0.01))
    tiny = nanochat_attention.Case(1, 32, 1, 16, 8)
    monkeypatch.setattr(kernel_suite, "CPU", kernel_suite.dataclasses.replace(
        kernel_suite.CPU, nanochat=(tiny,)))
    monkeypatch.setenv("GPTFAST_BENCH_COMPILE_BACKEND", "aot_eager")
    assert run_bench(tmp_path, "--suite", "all", "--batch-sizes", "1,2",
                     "--context-lengths", "16,32") == 0
    printed = capsys.readouterr().out
    assert "kernels suite: the tiny nanochat attention cases only; the rest needs a CUDA" in printed
    assert re.search(r"train +gptfast-reference +B=1 +T=16 .* tok/s", printed)

    rows = read_rows(tmp_path)
    gpt_rows = [r for r in rows if r["suite"] == "gpt"]
    assert len(gpt_rows) == 2 * 2 * 2 * 2  # impls x modes x B x T
    for row in gpt_rows:
        assert ROW_KEYS | GPT_MEASURES <= set(row), row
        assert row["status"] == "ok" and row["device"] == "cpu" and row["dtype"] == "fp32"
        assert row["tokens_per_s"] > 0 and row["step_ms_p20"] <= row["step_ms"] <= row["step_ms_p80"]
        assert row["mfu"] is None and row["peak_mem_gb"] is None  # CPU: no peak, no memory stats
        assert set(row["versions"]) >= {"torch", "triton", "gptfast"}
    kernel_rows = [r for r in rows if r["suite"] == "kernels"]
    assert {r["kernel"] for r in kernel_rows} == {"nanochat_attention"}
    assert all(ROW_KEYS <= set(r) and r["shape"] == tiny.shape for r in kernel_rows)
    assert {r["impl"] for r in kernel_rows if r["status"] == "ok"} >= {
        "gptfast", "SDPA nanochat fallback"}
    loader_rows = [r for r in rows if r["suite"] == "loader"]
    assert {r["impl"] for r in loader_rows} == {"nanogpt-get_batch", "gptfast-TokenLoader"}
    assert all(ROW_KEYS <= set(r) and r["tokens_per_s"] > 0 for r in loader_rows)

    report = (tmp_path / "results.md").read_text()
    assert "## GPT training step" in report and "## GPT inference forward" in report
    assert "| T \\ B | 1 | 2 |" in report and "x)" in report  # speed-ups vs nanogpt-eager
    assert "## Token loading" in report and "### nanochat_attention (TFLOP/s)" in report
    assert (tmp_path / "kernels.png").read_bytes()[:8] == PNG_MAGIC
    for mode in gpt.MODES:
        for kind in ("tokens_vs_batch", "tokens_vs_context", "memory_vs_context"):
            png = tmp_path / f"gpt_{mode}_{kind}.png"
            assert png.read_bytes()[:8] == PNG_MAGIC, png


def _failing_step_for(monkeypatch, failing_cell, error):
    """Make the step of one cell raise ``error``; every other cell runs as usual."""
    real_make_step = gpt.make_step

    def make_step(cell, settings):
        if (cell.impl, cell.batch_size, cell.context_length) == failing_cell:
            def step():
                raise error
            return step
        return real_make_step(cell, settings)

    monkeypatch.setattr(gpt, "make_step", make_step)


def test_out_of_memory_is_a_result_and_the_sweep_goes_on(tmp_path, monkeypatch):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    _failing_step_for(monkeypatch, ("nanogpt-eager", 1, 16), oom)
    assert run_bench(tmp_path, "--suite", "gpt", "--modes", "infer", "--batch-sizes", "1,2",
                     "--context-lengths", "16") == 0
    rows = read_rows(tmp_path)
    status = {(r["impl"], r["batch_size"]): r["status"] for r in rows}
    assert status == {("gptfast-reference", 1): "ok", ("nanogpt-eager", 1): "oom",
                      ("gptfast-reference", 2): "ok", ("nanogpt-eager", 2): "ok"}
    assert "out of memory" in rows[1]["error"]
    assert "| 16 | oom |" in (tmp_path / "results.md").read_text()


def test_ctrl_c_keeps_the_rows_finished_before_it(tmp_path, monkeypatch, capsys):
    _failing_step_for(monkeypatch, ("gptfast-reference", 2, 16), KeyboardInterrupt())
    assert run_bench(tmp_path, "--suite", "gpt", "--modes", "infer", "--batch-sizes", "1,2,4",
                     "--context-lengths", "16") == 130
    rows = read_rows(tmp_path)
    assert [(r["impl"], r["batch_size"]) for r in rows] == [("gptfast-reference", 1),
                                                            ("nanogpt-eager", 1)]
    assert "INTERRUPTED" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "gpt_infer_tokens_vs_batch.png").read_bytes()[:8] == PNG_MAGIC
    assert "interrupted: keeping the 2 rows" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--impls", "gptfast,flash"], "unknown implementation 'flash'"),
    (["--suite", "everything"], "invalid choice: 'everything'"),
    (["--batch-sizes", "0,2"], "batch sizes must be positive, got 0"),
    (["--batch-sizes", "1;2"], "comma-separated integers"),
    (["--context-lengths", "128,1048576"], "larger than supported (at most 65536)"),
    (["--repeats", "0"], "must be >= 1"),
    (["--max-tokens", "8", "--batch-sizes", "4", "--context-lengths", "64"], "no gpt cell"),
    (["--attention", "causal,sliding"], "unknown attention 'sliding'"),
    (["--arch", "gpt2,llama"], "unknown arch 'llama'; choose from gpt2, nanochat"),
    (["--impls", "nanochat-eager"], "no --impls nanochat-eager runs under --arch gpt2"),
])
def test_bad_arguments_fail_before_anything_runs(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no output directory


def test_cuda_requested_without_cuda_is_an_argument_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_without_cuda_the_default_is_the_cpu_quick_sweep(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = cli.build_parser().parse_args(["bench", "--impls", "eager,reference"])
    assert args.impls == ("nanogpt-eager", "gptfast-reference")  # aliases
    plan = sweep.make_plan(cli.build_parser().parse_args(["bench"]))
    assert plan.device.type == "cpu" and plan.quick and plan.dtype == "fp32"
    assert plan.gpt.model == "tiny" and plan.impls == sweep.CPU_IMPLS
    assert plan.suites == ("gpt", "kernels", "loader")
    assert plan.out_dir.parent.name == "bench-results"


def test_nanogpt_baseline_is_the_same_model_as_gptfast_gpt():
    config = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=4, n_embd=64)
    baseline = NanoGPT(config)
    ours = GPT(config)
    ours.load_state_dict(baseline.state_dict(), strict=True)  # same names and shapes
    assert ours.num_params() == sum(p.numel() for p in baseline.parameters()) - 32 * 64
    idx = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        _, expected = baseline(idx, idx)
        _, loss = ours(idx, idx, return_logits=False)
    # the only difference is nanoGPT's exact GELU against GPT-2's tanh GELU
    torch.testing.assert_close(loss, expected, atol=1e-3, rtol=0)


def test_kernel_suite_turns_each_benchmark_table_into_rows(tmp_path, monkeypatch):
    """The kernel benchmarks need CUDA: feed the suite tables in their formats instead."""
    from gptfast.bench import (attention, cross_entropy, kernel_suite, layernorm,
                               nanochat_attention, plots, report, rotary)
    from gptfast.bench.common import Measured, Timing

    monkeypatch.setattr(layernorm, "implementations",
                        lambda param_dtype_is_x, op="layer_norm": {"gptfast": 0})
    monkeypatch.setattr(layernorm, "bench_size", lambda n, c, dtype, impls, op="layer_norm": {
        "N x C": f"{n} x {c}", "copy": 2000.0, "gptfast fwd": 1500.0 if op == "layer_norm" else 900.0,
        "gptfast fwd+bwd": None})
    monkeypatch.setattr(layernorm, "liger_unavailable", lambda op="layer_norm": "no liger here")
    monkeypatch.setattr(rotary, "implementations", lambda: {"gptfast": 0, "liger": "unavailable: x"})
    monkeypatch.setattr(rotary, "bench_shape", lambda shape, dtype, impls: {
        "copy": 2500.0, "gptfast fwd": 2000.0, "gptfast fwd+bwd": None, "liger fwd": None,
        "gptfast diff": 0.01, "measured": {
            "copy": Measured(Timing(1.0, 1.0, 1.0)), "gptfast fwd": Measured(Timing(1.0, 1.0, 1.0)),
            "gptfast fwd+bwd": Measured(status="oom", error="OutOfMemoryError: x"),
            "liger fwd": Measured(status="unavailable", error="unavailable: x")}})
    loss_table = {"gptfast": "2.00 / 0.1", "gptfast |dloss|": "1.0e-06", "eager": "OOM",
                  "eager |dloss|": None, "Liger": "n/a", "Liger |dloss|": None}
    for name in ("cross_entropy_providers", "linear_providers"):
        monkeypatch.setattr(cross_entropy, name, lambda: {"gptfast": 0, "eager": 0, "Liger": 0})
    monkeypatch.setattr(cross_entropy, "bench_cross_entropy", lambda n, v, dtype, providers: (
        {"N": n, "V": v, **loss_table}, [f"Liger N={n}: RuntimeError: no kernel"]))
    monkeypatch.setattr(cross_entropy, "bench_linear", lambda n, c, v, dtype, providers: (
        {"N": n, "C": c, "V": v, **loss_table}, []))
    monkeypatch.setattr(attention, "PROVIDERS", {"gptfast": 0, "SDPA flash": 0})
    monkeypatch.setattr(attention, "bench_shape", lambda hd, seq, tokens, dtype, providers: (
        {"hd": hd, "H": 12, "B": tokens // seq, "T": seq, "gptfast": "310 / 260", "SDPA flash": "n/a"},
        [f"SDPA flash hd{hd} T{seq}: RuntimeError: no flash"]))

    monkeypatch.setattr(nanochat_attention, "bench_case", _fake_nanochat_case)

    suite = kernel_suite.KernelSuite("bf16", kernel_suite.QUICK)
    rows = [row for _, run in suite.units() for row in run()]
    by = {(r["kernel"], r["impl"], r["pass"], r["size"]): r for r in rows}
    assert by["layer_norm", "copy", "copy", 16384 * 768]["throughput"] == 2000.0
    assert by["layer_norm", "gptfast", "fwd+bwd", 16384 * 768]["status"] == "error"
    for op in ("rms_norm", "add_rms_norm"):
        assert by[op, "gptfast", "fwd", 16384 * 768]["throughput"] == 900.0
        liger = by[op, "liger", "fwd+bwd", 16384 * 768]
        assert (liger["status"], liger["note"]) == ("n/a", "no liger here")
    ce = by["cross_entropy", "gptfast", "fwd+bwd", 8192]
    assert (ce["ms"], ce["extra_mb"]) == (2.0, 0.1)
    assert ce["throughput"] == pytest.approx(2 * 8192 * 50257 * 2 / 2e-3 / 1e9)  # GB/s
    assert by["cross_entropy", "eager", "fwd+bwd", 8192]["status"] == "oom"
    assert by["cross_entropy", "Liger", "fwd+bwd", 8192]["note"] == "RuntimeError: no kernel"
    linear = by["linear_cross_entropy", "gptfast", "fwd+bwd", 8192]
    assert linear["throughput"] == pytest.approx(6 * 8192 * 768 * 50257 / 2e-3 / 1e12)  # TFLOP/s
    attn = by["causal_attention", "gptfast", "fwd+bwd", 4096]
    assert (attn["throughput"], attn["batch_size"], attn["context_length"]) == (260.0, 4, 4096)
    assert by["causal_attention", "SDPA flash", "fwd", 1024]["note"] == "RuntimeError: no flash"
    rope = by["rotary_qk_norm", "gptfast", "fwd", 8 * 2048]
    assert (rope["throughput"], rope["status"], rope["max_abs_diff"]) == (2000.0, "ok", 0.01)
    assert rope["shape"] == "B8 T2048 H10 Hkv10 D128" and rope["unit"] == "GB/s"
    assert by["rotary_qk_norm", "gptfast", "fwd+bwd", 8 * 2048]["status"] == "oom"
    assert by["rotary_qk_norm", "liger", "fwd", 8 * 2048]["status"] == "n/a"
    assert by["rotary_qk_norm", "copy", "copy", 8 * 2048]["throughput"] == 2500.0

    nanochat = {(r["impl"], r["pass"], r["shape"]): r for r in rows
                if r["kernel"] == "nanochat_attention"}
    shapes = [case.shape for case in nanochat_attention.GPU_CASES]
    assert {shape for _, _, shape in nanochat} == set(shapes)
    assert shapes[0] == "B16 T2048 H10 D128 window 768"
    assert shapes[2] == "B1 T8192 H10 D128 varlen doc2048"
    ours = nanochat["gptfast", "fwd+bwd", shapes[0]]
    assert (ours["throughput"], ours["ms"], ours["extra_mb"], ours["status"]) == (
        300.0, 2.0, 64.0, "ok")
    assert (ours["window_left"], ours["doc_mean"], ours["rel_err"]) == (768, None, {"dq": 0.004})
    assert nanochat["SDPA nanochat fallback", "fwd", shapes[1]]["status"] == "oom"
    fa3 = nanochat["FA3", "fwd", shapes[2]]
    assert fa3["status"] == "n/a" and fa3["note"] == "flash_attn_interface does not import"

    meta = {"run": "2026-01-01T00:00:00", "device_name": "test GPU", "dtype": "bf16",
            "versions": {"torch": "t", "triton": "t", "gptfast": "g"}, "settings": "test"}
    text = report.markdown(rows, meta)
    assert "| B16 T2048 H10 D128 window 768 | 300 (2 ms, 64 MB) | oom | oom | n/a | n/a |" in text
    assert "| 16384x768 | 2000 | 1500 | error |" in text  # copy, gptfast fwd, gptfast fwd+bwd
    assert "| 8192x50257 | 823 (2 ms, 0.1 MB) | oom | error |" in text
    assert "| B4 H12 T4096 D64 | 310 | 260 | error | error |" in text
    assert "- Liger 8192x50257: RuntimeError: no kernel" in text
    (png,) = plots.write_plots(rows, tmp_path, meta)
    assert png.name == "kernels.png" and png.read_bytes()[:8] == PNG_MAGIC


def _fake_nanochat_case(case, dtype, device, meter):
    """nanochat_attention.bench_case's entries, as a GPU run would give them."""
    rows = []
    for provider, status in (("gptfast", "ok"), ("SDPA nanochat fallback", "oom"),
                             ("FA3", "unavailable")):
        for direction in ("fwd+bwd",) if provider == "gptfast" else ("fwd", "fwd+bwd"):
            ok = status == "ok"
            rows.append({"provider": provider, "direction": direction, "status": status,
                         "pairs": 1000, "ms": 2.0 if ok else None, "tflops": 300.0 if ok else None,
                         "extra_mb": 64.0 if ok else None,
                         "errors": {"dq": (0.004, 0.01)} if ok else None,
                         "error": {"oom": "CUDA out of memory",
                                   "unavailable": "flash_attn_interface does not import"}
                         .get(status)})
    return rows


# ------------------------------------------------------- document-masked attention --

def test_attended_pairs_count_exactly_what_the_dense_mask_allows():
    from gptfast.bench.document_attention import attended_pairs, dense_mask, random_document_ids

    ids = random_document_ids(3, 97, 9, seed=4)
    ids[0, 40:43] = ids[0, 40] + torch.arange(3)  # one-token documents
    ids[0, 43:] += 2
    for window in (None, 1, 2, 17, 96, 97, 500):
        assert attended_pairs(ids, window) == int(dense_mask(ids, window).sum()), window
    one_doc = random_document_ids(2, 50, None)
    assert attended_pairs(one_doc, None) == 2 * 50 * 51 // 2  # plain causal
    mask = dense_mask(ids, 5)
    assert mask.diagonal(dim1=1, dim2=2).all()  # every row sees itself
    i, j = torch.nonzero(mask[1], as_tuple=True)
    assert ((j <= i) & (i - j < 5) & (ids[1, i] == ids[1, j])).all()


def test_random_document_ids_are_packed_documents_of_the_asked_mean_length():
    from gptfast.bench.document_attention import random_document_ids

    ids = random_document_ids(4, 8192, 256, seed=1)
    assert ids.dtype == torch.int64 and (ids[:, 0] == 0).all()
    steps = ids.diff(dim=1)
    assert ((steps == 0) | (steps == 1)).all()
    mean = ids.shape[1] / (ids[:, -1] + 1).float().mean()
    assert 200 < mean < 320, mean
    assert torch.equal(ids, random_document_ids(4, 8192, 256, seed=1))
    with pytest.raises(ValueError, match="mean document length"):
        random_document_ids(1, 16, 0)


def test_flex_attention_with_the_block_mask_matches_the_dense_mask_on_cpu(monkeypatch):
    from gptfast.bench import common, document_attention as da

    monkeypatch.setenv(common.COMPILE_BACKEND_ENV, "aot_eager")
    if da.flex_attention_missing():
        pytest.skip(da.flex_attention_missing())
    meter = common.Meter("cpu", warmup=0, repeats=10)
    rows = da.bench_case(da.Case(12, 7), 80, 16, 2, 160, torch.float32, device="cpu", meter=meter,
                         providers=("SDPA dense mask", "FlexAttention"))
    by = {(r["provider"], r["direction"]): r for r in rows}
    flex = by["FlexAttention", "fwd"]
    assert flex["status"] == "ok" and flex["max_abs_diff"] < 1e-5
    assert flex["pairs"] == by["SDPA dense mask", "fwd"]["pairs"] < 2 * 80 * 81 // 2
    assert flex["tflops"] == pytest.approx(4 * flex["pairs"] * 2 * 16 / flex["ms"] / 1e9)
    assert by["FlexAttention", "fwd+bwd"]["status"] == "unavailable"  # no CPU backward
    assert by["SDPA dense mask", "fwd+bwd"]["status"] == "ok"


def test_missing_flex_attention_is_reported_not_a_crash(monkeypatch, capsys):
    from gptfast.bench import common, document_attention as da

    monkeypatch.setattr(da, "flex_attention_missing", lambda: "FlexAttention unavailable in torch 0.0")
    rows = da.bench_case(da.Case(8, None), 32, 16, 1, 32, torch.float32, device="cpu",
                         meter=common.Meter("cpu", warmup=0, repeats=10),
                         providers=("FlexAttention", "SDPA dense mask"))
    flex = [r for r in rows if r["provider"] == "FlexAttention"]
    assert [r["status"] for r in flex] == ["unavailable", "unavailable"]
    assert "FlexAttention unavailable in torch 0.0" in flex[0]["error"]
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "SDPA dense mask")
    if not torch.cuda.is_available():
        assert da.main([]) == 0
        assert "FlexAttention unavailable in torch 0.0" in capsys.readouterr().out


def test_rotary_bench_measures_every_implementation_on_cpu(monkeypatch, capsys):
    """bench/rotary.py's measuring code at a tiny shape on the CPU (the kernel through the
    interpreter), Liger reported as unavailable, and its no-CUDA entry point."""
    from gptfast.bench import common, rotary

    monkeypatch.setenv(common.COMPILE_BACKEND_ENV, "aot_eager")
    monkeypatch.setattr(rotary, "_liger", lambda: (None, "liger_kernel does not import (test)"))
    shape = (1, 4, 2, 1, 8)
    row = rotary.bench_shape(shape, torch.float32, rotary.implementations(), device="cpu",
                             meter=common.Meter("cpu", warmup=0, repeats=10))
    for name in ("gptfast", "eager", "compile"):
        for direction in ("fwd", "fwd+bwd"):
            assert row["measured"][f"{name} {direction}"].status == "ok", (name, direction)
        assert row[f"{name} diff"] < 1e-5
    assert row["bytes"]["gptfast fwd+bwd"] == 5 * 1 * 4 * (2 + 1) * 8 * 4
    assert row["liger fwd"] is None and row["measured"]["liger fwd"].status == "unavailable"
    if not torch.cuda.is_available():
        assert rotary.main([]) == 0
        out = capsys.readouterr().out
        assert "(ok)" in out and "liger: unavailable" in out


def test_kernel_suite_attention_axis_makes_document_rows(tmp_path, monkeypatch):
    from gptfast.bench import document_attention as da, kernel_suite, plots, report

    def fake_case(case, seq, head_dim, heads, tokens, dtype):
        rows = []
        for provider, ms in (("gptfast", 1.0), ("FlexAttention", None), ("gptfast causal", 4.0)):
            for direction in ("fwd", "fwd+bwd"):
                rows.append({"provider": provider, "direction": direction, "B": 2, "H": heads,
                             "pairs": 1000, "ms": ms, "tflops": None if ms is None else 5.0 / ms,
                             "status": "ok" if ms else "unavailable",
                             "error": None if ms else "FlexAttention unavailable in torch x"})
        return rows

    monkeypatch.setattr(da, "bench_case", fake_case)
    suite = kernel_suite.KernelSuite("bf16", kernel_suite.QUICK, attention=("document",))
    units = [(label, run) for label, run in suite.units()
             if "attention" in label and "nanochat" not in label]
    labels = [label for label, _ in units]
    assert labels and all("document_attention" in label for label in labels)  # no causal sweep
    assert any("doc2048" in label for label in labels) and any("window 1024" in label for label in labels)
    rows = [row for _, run in units for row in run()]
    doc = [r for r in rows if r["kernel"] == "document_attention"]
    assert {r["impl"] for r in doc} == {"gptfast", "FlexAttention", "gptfast causal"}
    ours = next(r for r in doc if r["impl"] == "gptfast" and r["pass"] == "fwd")
    assert (ours["throughput"], ours["ms"], ours["pairs"], ours["context_length"]) == (5.0, 1.0, 1000, 8192)
    flex = next(r for r in doc if r["impl"] == "FlexAttention")
    assert flex["status"] == "n/a" and "unavailable" in flex["note"]
    causal_only = kernel_suite.KernelSuite("bf16", kernel_suite.QUICK)
    causal_labels = [label for label, _ in causal_only.units()]
    assert any("causal_attention" in label for label in causal_labels)
    assert not any("document" in label for label in causal_labels)

    meta = {"run": "2026-01-01T00:00:00", "device_name": "test GPU", "dtype": "bf16",
            "versions": {"torch": "t", "triton": "t", "gptfast": "g"}, "settings": "test"}
    text = report.markdown(rows, meta)
    assert "### document_attention (TFLOP/s)" in text and "5 (1 ms)" in text
    (png,) = plots.write_plots(rows, tmp_path, meta)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_gpt_suite_attention_axis():
    cells = gpt.cells(("gptfast-reference", "nanogpt-eager"), ("train",), (1,), (32,),
                      attentions=("causal", "document"))
    assert [(c.impl, c.attention) for c in cells] == [
        ("gptfast-reference", "causal"), ("nanogpt-eager", "causal"),
        ("gptfast-reference", "document")]  # nanoGPT has no document mask
    settings = gpt.GPTSettings(model="micro", device=torch.device("cpu"), dtype="fp32",
                               warmup=1, repeats=1)
    row = gpt.run_cell(cells[-1], settings)
    assert row["status"] == "ok", row
    assert (row["impl"], row["attention"]) == ("gptfast-reference document", "document")


def test_without_matplotlib_the_sweep_still_writes_results_and_says_why_no_plots(
        tmp_path, monkeypatch, uninstall, capsys):
    import gptfast.bench

    uninstall("matplotlib")  # as if not installed
    monkeypatch.delitem(sys.modules, "gptfast.bench.plots", raising=False)
    monkeypatch.delattr(gptfast.bench, "plots", raising=False)
    assert run_bench(tmp_path, "--suite", "gpt", "--modes", "infer", "--batch-sizes", "1",
                     "--context-lengths", "16") == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.out.splitlines() if "plots skipped" in line]
    assert skipped and all(line == skipped[0] for line in skipped), captured.out
    assert 'pip install "gptfast-kernels[bench]"' in skipped[0]
    assert "Traceback" not in captured.err
    assert len(read_rows(tmp_path)) == 2  # two impls, one cell
    assert "plots skipped" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_microbenchmarks_without_pytest_benchmark_say_which_extra(tmp_path):
    """README's `python -m pytest bench/test_microbench.py --benchmark-only`, plugin missing."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['pytest_benchmark'] = None\n"  # as if not installed
            "import pytest\n"
            "raise SystemExit(pytest.main(['bench/test_microbench.py', '--benchmark-only', "
            "'-p', 'no:cacheprovider']))")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # the plugin's entry point too
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 4, done.stdout + done.stderr
    output = (done.stdout + done.stderr).strip()
    assert output.count("\n") == 0 and "Traceback" not in output, output
    assert 'needs pytest-benchmark' in output and 'pip install "gptfast-kernels[test]"' in output


# ------------------------------------------------- bench/ANCHORS.md and the paths we point to --

ROOT = Path(__file__).resolve().parents[1]
# a path in the repository: one of its top-level folders, then a file name with an extension
REPO_PATH = re.compile(r"(?<![\w./-])(?:bench|tests|gptfast|kernels|csrc|\.ci)/[\w./-]*\w\.\w+")
ANCHORS_MENTION = re.compile(r"(?<![\w./-])[\w./-]*ANCHORS\.md")


def _missing_paths(text, root=ROOT):
    mentioned = set(REPO_PATH.findall(text)) | set(ANCHORS_MENTION.findall(text))
    return sorted(path for path in mentioned if not (root / path).exists())


def test_anchors_holds_the_report_ceilings_and_every_goal_it_checks():
    from gptfast.bench.headline import report as headline_report

    anchors = (ROOT / "bench" / "ANCHORS.md").read_text()
    assert headline_report.ANCHORS_FILE == ROOT / "bench" / "ANCHORS.md"
    assert f"| {headline_report.ANCHOR_COPY_TBPS:g} TB/s |" in anchors
    assert f"| {headline_report.ANCHOR_MATMUL_TFLOPS:g} TFLOP/s " in anchors
    for goal in headline_report.verdict([], "NVIDIA H100 80GB HBM3"):
        assert f"| {goal['goal']} |" in anchors, goal["goal"]
    assert "## Where the figures come from" in anchors


def test_every_path_readme_and_help_mention_exists(capsys):
    readme = (ROOT / "README.md").read_text()
    assert "bench/ANCHORS.md" in readme
    assert _missing_paths(readme) == []
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        help_text = capsys.readouterr().out
        assert "bench/ANCHORS.md" in help_text, argv
        assert _missing_paths(help_text) == [], argv


def test_the_headline_report_links_to_anchors(tmp_path):
    import datetime

    from gptfast.bench import headline

    plan = headline.Plan(out_dir=tmp_path, budget_s=1.0, stages=("env",), dry_run=True,
                         autotune_keep=3, triton_cache=str(tmp_path), command="gptfast bench",
                         started=datetime.datetime.now())
    headline._finish(plan, [], [], 0.0, False)
    report = (tmp_path / "headline.md").read_text()
    links = re.findall(r"\[([^\]]+)\]\(([^)]+)\)", report)
    assert ("bench/ANCHORS.md", "ANCHORS.md") in links
    for _, target in links:  # the links work from the report's folder
        assert (tmp_path / target).is_file(), target
    assert (tmp_path / "ANCHORS.md").read_text() == (ROOT / "bench" / "ANCHORS.md").read_text()
    # every other mention is a path in the repository
    assert _missing_paths(re.sub(r"\]\([^)]+\)", "]", report)) == []
