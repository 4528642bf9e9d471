"""gptfast bench --arch: our modern GPT at a nanochat preset against nanochat's own model code.

nanochat is not on PyPI and is never vendored: these tests inject a stand-in ``nanochat.gpt``
(our own tiny model with nanochat's constructor, ``init_weights`` and ``forward(idx, targets)``)
through ``sys.modules``, or make the import fail."""

import dataclasses
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptfast import cli
from gptfast.bench import gpt

ROW_KEYS = {"suite", "mode", "impl", "arch", "model", "batch_size", "context_length", "status",
            "device", "versions", "run"}
GPT_MEASURES = {"tokens_per_s", "step_ms", "step_ms_p20", "step_ms_p80", "tflops", "mfu",
                "peak_mem_gb", "first_step_s", "warmup_s"}
SMALL = ["bench", "--suite", "gpt", "--device", "cpu", "--batch-sizes", "1",
         "--context-lengths", "16", "--modes", "train", "--warmup", "1", "--repeats", "1"]


def _stand_in_nanochat(compute_dtype=torch.float32) -> types.ModuleType:
    """A module shaped like nanochat/gpt.py: GPTConfig, GPT(config) built on the meta device,
    init_weights(), forward(idx, targets) returning the softcapped fp32 loss."""
    module = types.ModuleType("nanochat.gpt")
    module.COMPUTE_DTYPE = compute_dtype
    module.built = []

    @dataclasses.dataclass
    class GPTConfig:
        sequence_len: int = 2048
        vocab_size: int = 32768
        n_layer: int = 12
        n_head: int = 6
        n_kv_head: int = 6
        n_embd: int = 768
        window_pattern: str = "SSSL"

    class GPT(nn.Module):
        def __init__(self, config, pad_vocab_size_to=64):
            super().__init__()
            self.config = config
            self.initialised = False
            padded = -(-config.vocab_size // pad_vocab_size_to) * pad_vocab_size_to
            self.wte = nn.Embedding(padded, config.n_embd)
            self.h = nn.ModuleList(nn.Linear(config.n_embd, config.n_embd, bias=False)
                                   for _ in range(config.n_layer))
            self.lm_head = nn.Linear(config.n_embd, padded, bias=False)
            module.built.append(self)

        @torch.no_grad()
        def init_weights(self):
            for p in self.parameters():
                nn.init.normal_(p, std=0.02)
            self.initialised = True

        def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
            x = F.rms_norm(self.wte(idx), (self.config.n_embd,))
            for layer in self.h:
                x = x + F.relu(layer(x)).square()
            logits = self.lm_head(F.rms_norm(x, (self.config.n_embd,)))
            logits = 15 * torch.tanh(logits[..., :self.config.vocab_size].float() / 15)
            if targets is None:
                return logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1, reduction=loss_reduction)

    module.GPTConfig, module.GPT = GPTConfig, GPT
    return module


@pytest.fixture
def stand_in(monkeypatch):
    module = _stand_in_nanochat()
    package = types.ModuleType("nanochat")
    package.gpt = module
    monkeypatch.setitem(sys.modules, "nanochat", package)
    monkeypatch.setitem(sys.modules, "nanochat.gpt", module)
    return module


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_without_nanochat_its_cells_are_unavailable_rows_and_ours_still_run(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setitem(sys.modules, "nanochat", None)  # import nanochat raises ImportError
    assert cli.main([*SMALL, "--arch", "gpt2,nanochat", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert [(r["arch"], r["impl"], r["model"], r["status"]) for r in rows] == [
        ("gpt2", "gptfast-reference", "tiny", "ok"),
        ("gpt2", "nanogpt-eager", "tiny", "ok"),
        ("nanochat", "gptfast-reference nanochat", "nanochat-tiny", "ok"),
        ("nanochat", "nanochat-eager", "nanochat-tiny", "unavailable")]
    for r in rows:
        assert ROW_KEYS <= set(r), r
        if r["status"] == "ok":
            assert GPT_MEASURES <= set(r) and r["tokens_per_s"] > 0
    assert "import nanochat.gpt failed" in rows[-1]["error"]
    assert "PYTHONPATH" in rows[-1]["error"]
    printed = capsys.readouterr().out
    assert "nanochat-tiny (2 layers, 2 heads, 128 wide" in printed
    assert "unavailable: import nanochat.gpt failed" in printed
    assert "| nanochat-eager | 1 | 16 | unavailable: import nanochat.gpt" in \
        (tmp_path / "results.md").read_text()


def test_the_default_gpt2_arch_runs_no_nanochat_cell(tmp_path):
    assert cli.main([*SMALL, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert {(r["arch"], r["impl"]) for r in rows} == {("gpt2", "gptfast-reference"),
                                                       ("gpt2", "nanogpt-eager")}


def test_stand_in_nanochat_is_built_at_our_preset_shapes_and_timed(tmp_path, monkeypatch,
                                                                   stand_in):
    monkeypatch.setenv("GPTFAST_BENCH_COMPILE_BACKEND", "aot_eager")
    assert cli.main([*SMALL, "--arch", "nanochat", "--modes", "train,infer", "--impls",
                     "gptfast-reference,nanochat-eager,nanochat-compile,nanogpt-eager",
                     "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (impl, mode) for impl in ("gptfast-reference nanochat", "nanochat-eager",
                                  "nanochat-compile") for mode in ("train", "infer")}
    for r in rows:
        assert r["status"] == "ok", r
        assert ROW_KEYS | GPT_MEASURES <= set(r) and r["tokens_per_s"] > 0
        assert r["arch"] == "nanochat" and r["model"] == "nanochat-tiny"
    ours = gpt.model_config("nanochat-tiny", 16)
    assert len(stand_in.built) == 4 and all(m.initialised for m in stand_in.built)
    for model in stand_in.built:
        c = model.config
        assert (c.sequence_len, c.vocab_size, c.n_layer, c.n_head, c.n_kv_head, c.n_embd,
                c.window_pattern) == (ours.block_size, ours.vocab_size, ours.n_layer,
                                      ours.n_head, ours.kv_heads, ours.n_embd,
                                      ours.window_pattern)
    report = (tmp_path / "results.md").read_text()
    assert "speed-up vs nanochat-eager in the same cell" in report
    assert "x)" in report


def test_nanochat_in_another_compute_dtype_is_unavailable(monkeypatch, stand_in):
    stand_in.COMPUTE_DTYPE = torch.bfloat16
    settings = gpt.GPTSettings(model="tiny", device=torch.device("cpu"), dtype="fp32", warmup=1,
                               repeats=1, nanochat_model="nanochat-tiny")
    row = gpt.run_cell(gpt.GPTCell("train", "nanochat-eager", 1, 16, arch="nanochat"), settings)
    assert row["status"] == "unavailable"
    assert "nanochat computes in torch.bfloat16" in row["error"] and "NANOCHAT_DTYPE" in row["error"]
    assert not stand_in.built  # refused before building anything


def test_each_arch_runs_its_own_impls():
    impls = tuple(gpt.IMPLS)
    cells = gpt.cells(impls, ("train",), (1,), (16,), archs=("gpt2", "nanochat"))
    by_arch = {arch: [c.row_impl for c in cells if c.arch == arch] for arch in gpt.ARCHS}
    assert by_arch == {
        "gpt2": ["gptfast", "gptfast-reference", "gptfast-compile", "nanogpt-eager",
                 "nanogpt-compile"],
        "nanochat": ["gptfast nanochat", "gptfast-reference nanochat", "gptfast-compile nanochat",
                     "nanochat-eager", "nanochat-compile"]}


def test_nanochat_models_come_from_the_preset_family():
    d20 = gpt.model_config("nanochat-d20", 2048)
    assert (d20.n_layer, d20.n_embd, d20.vocab_size, d20.logit_softcap) == (20, 1280, 32768, 15.0)
    tiny = gpt.model_config("nanochat-tiny", 4096)
    assert tiny.is_modern and tiny.block_size == 4096 and tiny.window_pattern == "SSSL"


def test_headline_nanochat_step_rows_compare_ours_with_the_stand_in(monkeypatch, stand_in):
    from gptfast.bench.headline import stages as headline_stages
    from gptfast.bench.common import Meter

    stand_in.COMPUTE_DTYPE = torch.bfloat16  # the headline step is bf16
    sizes = headline_stages.DRY
    ctx = headline_stages.Context("gpt", sizes, torch.device("cpu"), Meter("cpu"), True)
    rows = [r for impl in ("gptfast", "nanochat-eager")
            for r in headline_stages._gpt_cell(ctx, impl, None, arch="nanochat")]
    headline_stages.add_gpt_ratios(rows)
    speed = {r["impl"]: r for r in rows if r["metric"] == "tokens_per_s"}
    assert set(speed) == {"gptfast nanochat", "nanochat-eager"}
    assert all(r["status"] == "ok" and r["value"] > 0 for r in speed.values())
    assert speed["gptfast nanochat"]["best_peer"] == "nanochat-eager"
    assert speed["gptfast nanochat"]["ratio_to_best_peer"] > 0
    model, batch, seq = sizes.nanochat_gpt
    assert stand_in.built[0].config.n_layer == gpt.model_config(model, seq).n_layer
    assert speed["nanochat-eager"]["name"] == f"{model} train B{batch} T{seq}"
