"""gptfast train: learning, exact resume, interrupts, NaN guard, atomic checkpoints, DDP, settings.

Every run is a tiny GPT (2 layers, 64 wide, T=32) on a generated corpus, on the CPU.
"""

import dataclasses
import json
import math
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptfast import cli
from gptfast import train as trainer
from gptfast.model import GPT, GPTConfig
from gptfast.prepare import write_shard

VOCAB = 100  # the model pads it to 128
PERIOD = 61  # the corpus repeats a random sequence of this length: learnable from context


def write_corpus(directory, train_tokens=40_000, val_tokens=4_000):
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, VOCAB - 1, PERIOD)
    stream = np.tile(pattern, (train_tokens + val_tokens) // PERIOD + 1)
    directory.mkdir(parents=True, exist_ok=True)
    write_shard(directory / "train_000000.bin", stream[:train_tokens].astype(np.uint16))
    val = stream[train_tokens:train_tokens + val_tokens]
    write_shard(directory / "val_000000.bin", val.astype(np.uint16))
    (directory / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "eot_token": VOCAB - 1,
                                                     "encoding": "gpt2", "tokenizer_file": None}))
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "data")


TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=4, grad_accum=2, lr=3e-3,
            min_lr=3e-4, warmup_iters=2, lr_decay_iters=100, eval_interval=1000, eval_iters=2,
            log_interval=1, device="cpu")


def flags(data, out, **settings):
    settings = {**TINY, "data": data, "out": out, **settings}
    argv = ["train"]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def train(data, out, **settings) -> int:
    return cli.main(flags(data, out, **settings))


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(r["iter"], r["loss"]) for r in metrics(out) if "loss" in r]


def val_losses(out):
    return [(r["iter"], r["val_loss"]) for r in metrics(out) if "val_loss" in r]


def checkpoint(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)


@pytest.fixture
def training_forward(monkeypatch):
    """Installs hook(call_number) to run before each training forward (eval forwards skipped)."""
    def install(hook):
        original = GPT.forward
        calls = []

        def forward(self, *args, **kwargs):
            if self.training:
                calls.append(None)
                hooked = hook(len(calls))
                if hooked is not None:
                    return hooked(original(self, *args, **kwargs))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(GPT, "forward", forward)
        return calls
    return install


# ------------------------------------------------------------------------- learning --

def test_loss_falls_and_every_output_is_written(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data, out, max_iters=100, grad_accum=1, batch_size=8, log_interval=10,
                 eval_interval=50, eval_iters=4) == 0
    records = metrics(out)
    train_lines = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train_lines] == list(range(0, 100, 10)) + [99]
    assert set(train_lines[0]) == {"iter", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "step_ms",
                                   "data_wait_ms", "peak_memory_gb", "elapsed_s"}
    assert train_lines[0]["mfu"] is None  # no GPU peak on a CPU
    assert all(r["tokens_per_sec"] > 0 and r["step_ms"] > 0 and r["data_wait_ms"] >= 0
               for r in train_lines)
    first, last = train_lines[0]["loss"], train_lines[-1]["loss"]
    assert first > math.log(VOCAB) - 0.5
    assert last < 0.7 * first, (first, last)
    assert [it for it, _ in val_losses(out)] == [0, 50, 100]
    assert val_losses(out)[-1][1] < 0.7 * val_losses(out)[0][1]
    printed = capsys.readouterr().out
    assert "iter 99 | loss" in printed and "eval iter 100: val loss" in printed

    state = checkpoint(out)  # loads with weights_only: no pickled objects
    assert state["iter_num"] == 100 and state["loader"]["position"] == 100
    assert state["model_args"]["vocab_size"] == 128  # 100 padded to a multiple of 64
    assert state["model_args"]["bias"] is False  # nanoGPT's train.py default
    assert not any(key.endswith(".bias") for key in state["model"])
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in state["model"])
    model = GPT.from_pretrained(out)  # nanoGPT-compatible: "model" + "model_args"
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], state["model"]["lm_head.weight"])


def test_learning_rate_is_nanogpts_schedule():
    cfg = trainer.TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert trainer.learning_rate(0, cfg) == pytest.approx(1 / 11)
    assert trainer.learning_rate(9, cfg) == pytest.approx(10 / 11)
    assert trainer.learning_rate(10, cfg) == pytest.approx(1.0)
    assert trainer.learning_rate(60, cfg) == pytest.approx(0.55)
    assert trainer.learning_rate(110, cfg) == pytest.approx(0.1)
    assert trainer.learning_rate(500, cfg) == 0.1


# --------------------------------------------------------------------------- resume --

RESUMABLE = dict(dropout=0.1, eval_interval=3, lr_decay_iters=8)  # dropout: the RNG must resume too


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train(data, out, max_iters=8, **RESUMABLE) == 0
    return out


def test_resume_continues_bit_for_bit(data, tmp_path, uninterrupted):
    out = tmp_path / "resumed"
    assert train(data, out, max_iters=4, **RESUMABLE) == 0
    assert checkpoint(out)["iter_num"] == 4
    assert cli.main(["train", "--out", str(out), "--init", "resume", "--max-iters", "8"]) == 0
    assert losses(out) == losses(uninterrupted)  # exact float equality
    # the first run evaluated once more, at its end (iteration 4)
    assert [v for v in val_losses(out) if v[0] != 4] == val_losses(uninterrupted)
    for key, value in checkpoint(uninterrupted)["model"].items():
        assert torch.equal(checkpoint(out)["model"][key], value), key


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(
        data, tmp_path, uninterrupted, training_forward, capsys):
    out = tmp_path / "ctrl-c"
    # micro-batch 6 is the second of step 2: Ctrl-C there lets step 2 finish
    training_forward(lambda call: os.kill(os.getpid(), signal.SIGINT) if call == 6 else None)
    assert train(data, out, max_iters=8, **RESUMABLE) == 130
    assert "interrupted: checkpoint of iteration 3" in capsys.readouterr().out
    assert checkpoint(out)["iter_num"] == 3 and checkpoint(out)["loader"]["position"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert cli.main(["train", "--out", str(out), "--init", "resume"]) == 0
    assert losses(out) == losses(uninterrupted)


def test_keyboard_interrupt_mid_step_saves_the_last_complete_step(
        data, tmp_path, uninterrupted, training_forward):
    out = tmp_path / "raised"

    def interrupt(call):
        if call == 6:
            raise KeyboardInterrupt

    training_forward(interrupt)
    assert train(data, out, max_iters=8, **RESUMABLE) == 130
    assert checkpoint(out)["iter_num"] == 2 and checkpoint(out)["loader"]["position"] == 4
    assert cli.main(["train", "--out", str(out), "--init", "resume"]) == 0
    assert losses(out) == losses(uninterrupted)


class Trainer:
    """`python -m gptfast ARGV` in a subprocess, its stderr lines collected by a thread."""

    def __init__(self, argv):
        import queue
        import threading

        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "gptfast", *argv], env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, text, deadline_s=300):
        """The first stderr line holding text; fails if the process ends or deadline_s passes
        first (a generous bound against a hang, not a speed requirement)."""
        import queue

        try:
            while (line := self.lines.get(timeout=deadline_s)) is not None:
                if text in line:
                    return line
        except queue.Empty:
            pass
        pytest.fail(f"no stderr line with {text!r}; stderr so far:\n{''.join(self.stderr)[-3000:]}")

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def test_sigterm_during_a_long_evaluation_stops_it_saves_and_progress_is_shown(data, tmp_path):
    """A million val batches take far longer than the wait below: the run can only exit within
    it by stopping the evaluation midway."""
    out = tmp_path / "run"
    run = Trainer(flags(data, out, max_iters=5, eval_iters=1_000_000))
    try:
        progress = run.wait_for_line("val batches")
        assert progress.startswith("eval iter 0: ") and "/1,000,000 val batches in" in progress
        assert "s left" in progress
        run.process.send_signal(signal.SIGTERM)
        stdout, _ = run.process.communicate(timeout=120)
    finally:
        run.kill()
    assert run.process.returncode == 130, "".join(run.stderr)[-3000:]
    assert "evaluation at iteration 0 stopped" in stdout
    assert "interrupted: checkpoint of iteration 0 written" in stdout
    state = checkpoint(out)
    assert state["iter_num"] == 0 and state["loader"]["position"] == 0
    assert val_losses(out) == []  # the stopped evaluation logged nothing
    assert cli.main(["train", "--out", str(out), "--init", "resume", "--eval-iters", "2"]) == 0
    assert [it for it, _ in losses(out)] == [0, 1, 2, 3, 4]


def test_an_interrupt_during_a_periodic_evaluation_saves_that_iteration(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = trainer.Trainer.evaluate

    def evaluate(self, it=0, stop=None):
        if it == 4:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during the evaluation after step 4
        return original(self, it, stop)

    monkeypatch.setattr(trainer.Trainer, "evaluate", evaluate)
    assert train(data, out, max_iters=8, eval_interval=2, eval_iters=50) == 130
    printed = capsys.readouterr().out
    assert "evaluation at iteration 4 stopped" in printed
    assert "interrupted: checkpoint of iteration 4 written" in printed
    assert checkpoint(out)["iter_num"] == 4
    assert [it for it, _ in val_losses(out)] == [0, 2]


def test_a_signal_mid_batch_stops_the_evaluation_inside_that_batch(data, tmp_path, monkeypatch, capsys):
    """A single process drops the evaluation at once: a long val batch is not finished."""
    out = tmp_path / "run"
    original = GPT.forward
    started, finished = [], []

    def forward(self, *args, **kwargs):
        if self.training:
            return original(self, *args, **kwargs)
        started.append(None)
        if len(started) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
        result = original(self, *args, **kwargs)
        finished.append(None)
        return result

    monkeypatch.setattr(GPT, "forward", forward)
    assert train(data, out, max_iters=4, eval_iters=50) == 130
    assert (len(started), len(finished)) == (3, 2)
    assert "interrupted: checkpoint of iteration 0 written" in capsys.readouterr().out
    assert checkpoint(out)["iter_num"] == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


# -------------------------------------------------------------------------- failure --

def times(factor):
    """A hook result for training_forward: multiplies the model's loss by factor."""
    return lambda result: (result[0], result[1] * factor)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, training_forward, capsys):
    out = tmp_path / "nan"
    # from step 5 on (micro-batch 11) the loss is NaN; steps 5..9 log nothing (log interval
    # 10), so the guard that trips is the one before the checkpoint of step 6
    training_forward(lambda call: times(float("nan")) if call >= 11 else None)
    assert train(data, out, max_iters=20, eval_interval=2, log_interval=10) == 1
    message = capsys.readouterr().err
    assert "NaN/inf" in message and "last good checkpoint" in message and "iteration 6" in message
    state = checkpoint(out)
    assert state["iter_num"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_seen_at_a_log_line_stops_at_once(data, tmp_path, training_forward, capsys):
    out = tmp_path / "nan-log"
    training_forward(lambda call: times(float("inf")) if call >= 3 else None)
    assert train(data, out, max_iters=20) == 1
    message = capsys.readouterr().err
    assert "the loss became inf at iteration 1" in message and "no checkpoint was written" in message
    assert [it for it, _ in losses(out)] == [0]
    assert not (out / "ckpt.pt").exists()


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    trainer.save_checkpoint(path, {"version": 1, "weights": torch.arange(4)})
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path, {"version": 1, "weights": torch.zeros(4)})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- DDP --

def test_two_gloo_ranks_match_one_process_with_doubled_grad_accum(data, tmp_path):
    """Sequential sampler: batch k of rank r holds windows (k*world + r)*B .. +B-1, so step i
    of the 2-rank run (one micro-batch per rank) covers windows 2iB .. 2iB+2B-1, the same as
    micro-batches 2i and 2i+1 of the 1-process run with grad_accum 2. DDP averages the two
    ranks' gradients, accumulation averages the two micro-batches: the same step."""
    same = dict(sampler="sequential", max_iters=3, eval_iters=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "gptfast", *flags(data, tmp_path / "ddp", grad_accum=1, **same)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert train(data, tmp_path / "single", grad_accum=2, **same) == 0
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [it for it, _ in ddp] == [0, 1, 2]  # rank 0 alone writes metrics
    np.testing.assert_allclose([v for _, v in ddp], [v for _, v in single], rtol=1e-5)
    assert done.stdout.count("iter 2 | loss") == 1
    state = checkpoint(tmp_path / "ddp")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in state["model"])


# ------------------------------------------------------------------- settings, init --

def test_config_file_then_flags_override(tmp_path, data):
    toml = tmp_path / "run.toml"
    toml.write_text('batch-size = 5\nlr = 1\nsampler = "shuffle"\ncompile = true\n')
    gpu = {"data": str(data), "out": "o", "device": "cuda"}  # a GPU run: nanoGPT's defaults
    cfg, resumed = trainer.resolve_config({**gpu, "lr": 0.5}, toml)
    assert resumed is None
    assert (cfg.batch_size, cfg.lr, cfg.sampler, cfg.compile) == (5, 0.5, "shuffle", True)
    assert cfg.out == os.path.abspath("o") and cfg.grad_accum == 40  # nanoGPT's default
    toml.write_text("batch_sise = 5\n")
    with pytest.raises(trainer.TrainError, match="unknown setting 'batch_sise'"):
        trainer.resolve_config({"data": "d", "out": "o"}, toml)
    toml.write_text('max_iters = "many"\n')
    with pytest.raises(trainer.TrainError, match="max_iters must be int"):
        trainer.resolve_config({"data": "d", "out": "o"}, toml)
    with pytest.raises(trainer.TrainError, match="dtype must be one of"):
        trainer.resolve_config({"data": "d", "out": "o", "dtype": "float8"})


def test_cpu_defaults_fill_only_what_the_run_does_not_set(tmp_path, data):
    base = {"data": str(data), "out": str(tmp_path / "o"), "device": "cpu"}
    cfg, _, applied = trainer.resolve(base)
    assert applied == trainer.CPU_DEFAULTS
    assert {k: getattr(cfg, k) for k in applied} == trainer.CPU_DEFAULTS
    toml = tmp_path / "run.toml"
    toml.write_text("eval_iters = 7\n")
    cfg, _, applied = trainer.resolve({**base, "batch_size": 3, "max_iters": 500}, toml)
    assert (cfg.batch_size, cfg.eval_iters, cfg.max_iters) == (3, 7, 500)  # set: they win
    assert not {"batch_size", "eval_iters", "max_iters"} & set(applied)
    assert cfg.lr_decay_iters == applied["lr_decay_iters"] == 500  # follows the given max_iters
    assert cfg.n_layer == 4 and cfg.eval_interval == 250
    cfg, _, applied = trainer.resolve({**base, "lr_decay_iters": 30})
    assert cfg.warmup_iters == 30 and "lr_decay_iters" not in applied
    for decided in ({"model": "gpt2-medium"}, {"init": str(tmp_path / "hf")}):
        cfg, _, applied = trainer.resolve({**base, **decided})
        assert not set(trainer.ARCHITECTURE) & set(applied) and cfg.n_layer is None
        assert cfg.block_size == 1024 and applied["eval_iters"] == 20
    cfg, _, applied = trainer.resolve({**base, "device": "cuda"})
    assert applied == {} and (cfg.eval_iters, cfg.batch_size) == (200, 12)


def test_cpu_defaults_give_a_first_log_line_that_names_them(tmp_path, data):
    out = tmp_path / "run"
    run = Trainer(["train", "--data", str(data), "--out", str(out), "--device", "cpu",
                   "--max-iters", "3"])
    try:
        stdout, _ = run.process.communicate(timeout=300)
    finally:
        run.kill()
    assert run.process.returncode == 0, "".join(run.stderr)[-3000:]
    lines = stdout.splitlines()
    assert lines[0].startswith("gptfast train: ") and "(n_layer 4, n_head 4, n_embd 128" in lines[0]
    assert lines[1] == ("CPU defaults (no GPU; a flag or --config setting overrides each): "
                        "--n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12 "
                        "--grad-accum 1 --lr-decay-iters 3 --warmup-iters 3 --eval-interval 250 "
                        "--eval-iters 20 --log-interval 10")
    assert lines[2].startswith("eval iter 0: val loss") and lines[3].startswith("iter 0 | loss")
    assert checkpoint(out)["config"]["eval_iters"] == 20  # saved: a resume keeps them


def test_cli_reports_user_errors_without_a_traceback(tmp_path, data, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--init", "resume"]) == 1
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert cli.main(flags(tmp_path / "empty", tmp_path / "y", max_iters=1)) == 1
    assert "holds no train shards" in capsys.readouterr().err
    assert cli.main(flags(data, tmp_path / "z", max_iters=1, model="gpt5")) == 1
    assert "unknown preset 'gpt5'" in capsys.readouterr().err


def test_init_from_a_local_hugging_face_gpt2(tmp_path, data):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=VOCAB,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "finetune"
    settings = {k: v for k, v in TINY.items() if k not in ("n_layer", "n_head", "n_embd")}
    argv = flags(data, out, **{**settings, "max_iters": 2, "init": tmp_path / "hf"})
    assert cli.main(argv) == 0
    state = checkpoint(out)
    assert state["model_args"]["block_size"] == 32  # cropped from 64 to --block-size
    assert state["model"]["transformer.wpe.weight"].shape == (32, 64)
    assert cli.main(argv + ["--n-layer", "3"]) == 1


def test_unwrap_model_strips_the_compile_wrapper():
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    assert trainer.unwrap_model(torch.compile(model)) is model
    assert trainer.unwrap_model(model) is model


# ------------------------------------------------------------------------------ bias --

def scratch_config(data, **settings):
    cfg, _ = trainer.resolve_config({**TINY, "data": str(data), "out": "o", **settings})
    return cfg


@pytest.mark.parametrize("bias", [None, False, True])
def test_bias_flag_for_a_scratch_model(data, bias):
    model = trainer.build_model(scratch_config(data, bias=bias), VOCAB, None)
    has_bias = bias is True  # unset: nanoGPT's train.py default, no biases
    assert model.config.bias is has_bias
    biases = [name for name, _ in model.named_parameters() if name.endswith(".bias")]
    assert bool(biases) is has_bias and (model.transformer.ln_f.bias is not None) is has_bias


def test_bias_flag_on_the_command_line(tmp_path, data):
    parser = cli.build_parser()
    assert parser.parse_args(flags(data, "o") + ["--bias"]).bias is True
    assert parser.parse_args(flags(data, "o") + ["--no-bias"]).bias is False
    assert not hasattr(parser.parse_args(flags(data, "o")), "bias")  # unset: the model decides
    out = tmp_path / "biased"
    assert cli.main(flags(data, out, max_iters=1) + ["--bias"]) == 0
    state = checkpoint(out)
    assert state["model_args"]["bias"] is True and "transformer.ln_f.bias" in state["model"]


def test_bias_comes_from_a_checkpoint_and_a_conflicting_flag_is_an_error(data):
    unbiased = trainer.build_model(scratch_config(data), VOCAB, None)
    saved = {"model_args": dataclasses.asdict(unbiased.config), "model": unbiased.state_dict()}
    assert trainer.build_model(scratch_config(data), VOCAB, saved).config.bias is False
    with pytest.raises(trainer.TrainError, match="bias True differs from the model of the "
                                                 "checkpoint being resumed \\(False\\)"):
        trainer.build_model(scratch_config(data, bias=True), VOCAB, saved)


def test_bias_of_pretrained_weights_and_a_conflicting_flag(tmp_path, data):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=VOCAB,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    sizes = dict(n_layer=None, n_head=None, n_embd=None, init=str(tmp_path / "hf"))
    assert trainer.build_model(scratch_config(data, **sizes), VOCAB, None).config.bias is True
    with pytest.raises(trainer.TrainError, match="bias False differs from the model of --init"):
        trainer.build_model(scratch_config(data, bias=False, **sizes), VOCAB, None)


# ------------------------------------------------------------- nanoGPT's char data --

CHAR_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
CHARS = sorted(set(CHAR_TEXT))


def write_shakespeare_char(directory, meta=None):
    """nanoGPT's data/shakespeare_char: raw uint16 train.bin / val.bin and meta.pkl."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = np.array([CHARS.index(c) for c in CHAR_TEXT * 40], dtype=np.uint16)
    ids[:2000].tofile(directory / "train.bin")
    ids[2000:].tofile(directory / "val.bin")
    if meta is None:
        meta = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
                "stoi": {c: i for i, c in enumerate(CHARS)}}
    with open(directory / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return directory


def test_nanogpt_char_data_trains_with_its_exact_vocab_and_saves_its_characters(tmp_path):
    char_data = write_shakespeare_char(tmp_path / "data" / "shakespeare_char")
    out = tmp_path / "run"
    assert train(char_data, out, max_iters=2, eval_iters=1) == 0
    state = checkpoint(out)
    assert state["model_args"]["vocab_size"] == len(CHARS)  # nanoGPT's rule: not padded to 64
    assert state["model"]["lm_head.weight"].shape[0] == len(CHARS)
    assert state["tokenizer"] == {"encoding": "char", "vocab_size": len(CHARS), "itos": CHARS}
    assert state["config"]["dataset"] == "shakespeare_char"  # what nanoGPT's sample.py reads
    assert [it for it, _ in val_losses(out)] == [0, 2]  # val.bin found


def test_meta_json_wins_over_meta_pkl(tmp_path, data):
    both = write_shakespeare_char(tmp_path / "both")
    (both / "meta.json").write_text((data / "meta.json").read_text())
    assert trainer.read_data_meta(both)["vocab_size"] == VOCAB
    assert trainer.model_vocab_size(trainer.read_data_meta(both)) == 128


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_a_meta_pkl_with_globals_is_an_error_naming_the_file(tmp_path, capsys):
    char_data = write_shakespeare_char(tmp_path / "evil", meta={"vocab_size": 65, "x": RunsCode()})
    assert train(char_data, tmp_path / "run", max_iters=1) == 1
    captured = capsys.readouterr()
    assert f"{char_data / 'meta.pkl'} was not loaded: it references" in captured.err
    assert "should never run" not in captured.out + captured.err
    assert not (tmp_path / "run" / "ckpt.pt").exists()


# ------------------------------------------------------------------ llm.c shard names --

def touch(directory, *names):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


@pytest.mark.parametrize("names,train_names,val_names", [
    (["fineweb_train_000002.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"],
     ["fineweb_train_000001.bin", "fineweb_train_000002.bin"], ["fineweb_val_000000.bin"]),
    (["edu_fineweb_train_000001.bin", "edu_fineweb_val_000000.bin"],
     ["edu_fineweb_train_000001.bin"], ["edu_fineweb_val_000000.bin"]),
    (["tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin", "meta.json"],
     ["tiny_shakespeare_train.bin"], ["tiny_shakespeare_val.bin"]),
    (["tinyshakespeare_train.bin", "tinyshakespeare_val.bin"],
     ["tinyshakespeare_train.bin"], ["tinyshakespeare_val.bin"]),
    (["train_000000.bin", "train_000001.bin", "val_000000.bin"],
     ["train_000000.bin", "train_000001.bin"], ["val_000000.bin"]),
    (["train.bin", "val.bin", "meta.pkl"], ["train.bin"], ["val.bin"]),
    (["fineweb_train_000001.bin", "notes_training.bin", "retrain.bin"],
     ["fineweb_train_000001.bin"], []),
])
def test_shards_are_found_by_gptfast_nanogpt_and_llmc_names(tmp_path, names, train_names, val_names):
    directory = touch(tmp_path / "d", *names)
    for split, want in (("train", train_names), ("val", val_names)):
        assert trainer.shard_paths(directory, split) == [str(directory / n) for n in want]


def test_two_datasets_in_one_directory_are_an_error_not_a_mix(tmp_path):
    directory = touch(tmp_path / "d", "tiny_shakespeare_train.bin", "TinyStories_train.bin")
    with pytest.raises(trainer.TrainError, match="train shards of 2 datasets .* --train-files GLOB"):
        trainer.shard_paths(directory, "train")
    touch(directory, "train_000000.bin")
    with pytest.raises(trainer.TrainError, match="3 datasets"):
        trainer.shard_paths(directory, "train")


def write_llmc_dir(directory, train_name="fineweb_train_{:06d}.bin", val_name="fineweb_val_000000.bin"):
    """The corpus of `data`, in llm.c's fineweb names, without meta.json (GPT-2 vocab assumed)."""
    rng = np.random.default_rng(0)
    stream = np.tile(rng.integers(0, VOCAB - 1, PERIOD), 200).astype(np.uint16)
    directory.mkdir(parents=True, exist_ok=True)
    write_shard(directory / train_name.format(1), stream[:5000])
    write_shard(directory / train_name.format(2), stream[5000:10000])
    write_shard(directory / val_name, stream[10000:11000])
    return directory


def test_training_on_llmc_named_shards_finds_train_and_val(tmp_path):
    llmc = write_llmc_dir(tmp_path / "fineweb10B")
    out = tmp_path / "run"
    assert train(llmc, out, max_iters=1, eval_iters=1, n_layer=1, n_embd=32) == 0
    assert [it for it, _ in val_losses(out)] == [0, 1]
    state = checkpoint(out)
    assert state["model_args"]["vocab_size"] == 50304  # no meta: GPT-2's, padded as nanoGPT


def test_train_and_val_globs_select_shards_explicitly(tmp_path, capsys):
    shards = write_llmc_dir(tmp_path / "shards", train_name="part{:02d}.tokens.bin",
                            val_name="heldout.tokens.bin")
    (shards / "meta.json").write_text(json.dumps({"vocab_size": VOCAB}))
    out = tmp_path / "run"
    settings = {**TINY, "n_layer": 1, "n_embd": 32, "out": out, "max_iters": 1, "eval_iters": 1}
    argv = ["train"] + [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    globs = ["--train-files", str(shards / "part*.tokens.bin"),
             "--val-files", str(shards / "heldout*.bin")]
    assert cli.main(argv + globs) == 0  # no --data: the vocabulary comes from the shards' directory
    state = checkpoint(out)
    assert state["model_args"]["vocab_size"] == 128
    assert [it for it, _ in val_losses(out)] == [0, 1]
    assert state["config"]["train_files"] == str(shards / "part*.tokens.bin")
    capsys.readouterr()
    assert cli.main(argv + ["--train-files", str(shards / "nothing*.bin")]) == 1
    assert f"--train-files '{shards / 'nothing*.bin'}' matches no file" in capsys.readouterr().err
    assert cli.main(argv + globs[:2] + ["--val-files", str(shards / "none*.bin")]) == 1
    assert "--val-files" in capsys.readouterr().err
    assert cli.main(argv) == 1
    assert "--data DIR (or --train-files GLOB) is required" in capsys.readouterr().err


# ------------------------------------------------------- document attention, align eot --

EOT = VOCAB - 1  # the corpus' meta.json eot_token


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """The periodic corpus cut into documents: an end-of-text token about every 24 tokens."""
    directory = write_corpus(tmp_path_factory.mktemp("documents") / "data")
    rng = np.random.default_rng(1)
    for name in ("train_000000.bin", "val_000000.bin"):
        path = directory / name
        header, tokens = path.read_bytes()[:1024], np.fromfile(path, "<u2", offset=1024)
        tokens[rng.random(len(tokens)) < 1 / 24] = EOT
        path.write_bytes(header + tokens.tobytes())
    return directory


def test_document_attention_window_and_aligned_windows_train_and_resume_exactly(documents, tmp_path):
    masks = dict(attention="document", window=8, align="eot", sampler="shuffle", grad_accum=1)
    whole, half = tmp_path / "whole", tmp_path / "half"
    assert train(documents, whole, max_iters=6, **masks) == 0
    assert train(documents, half, max_iters=3, **masks) == 0
    state = checkpoint(half)
    assert {k: state["config"][k] for k in ("attention", "window", "align")} == \
        {"attention": "document", "window": 8, "align": "eot"}
    assert {k: state["model_args"][k] for k in ("attention", "window", "eot_token")} == \
        {"attention": "document", "window": 8, "eot_token": EOT}
    assert state["loader"]["align"] == "eot" and state["loader"]["eot_token"] == EOT
    # resume with no mask flags: the checkpoint's settings come back
    assert cli.main(["train", "--out", str(half), "--init", "resume", "--max-iters", "6"]) == 0
    assert losses(half) == losses(whole)
    resumed = checkpoint(half)
    assert resumed["config"]["attention"] == "document" and resumed["config"]["align"] == "eot"
    model = GPT.from_pretrained(half)  # what gptfast sample loads
    assert (model.config.attention, model.config.window, model.config.eot_token) == ("document", 8, EOT)


def test_attention_flags_change_the_loss_and_plain_checkpoints_stay_nanogpt_shaped(documents, tmp_path):
    runs = {}
    for name, masks in {"causal": {}, "document": dict(attention="document")}.items():
        assert train(documents, tmp_path / name, max_iters=2, grad_accum=1, **masks) == 0
        runs[name] = losses(tmp_path / name)
    assert runs["causal"][0][1] != runs["document"][0][1]  # same weights and batch, other mask
    plain = checkpoint(tmp_path / "causal")["model_args"]
    assert not {"attention", "window", "eot_token"} & set(plain)  # nanoGPT's GPTConfig loads it


@pytest.mark.parametrize("settings,message", [
    (dict(attention="sliding"), "attention must be one of causal, document"),
    (dict(align="bos"), "align must be one of none, eot"),
    (dict(window=-2), "window must be >= 1"),
])
def test_bad_attention_flags_are_errors(documents, tmp_path, capsys, settings, message):
    assert train(documents, tmp_path / "run", max_iters=1, **settings) == 1
    assert message in capsys.readouterr().err


def test_document_attention_needs_an_eot_token_in_the_vocabulary(tmp_path, capsys):
    data = write_corpus(tmp_path / "data")
    (data / "meta.json").write_text(json.dumps({"vocab_size": VOCAB}))  # no eot_token: GPT-2's
    assert train(data, tmp_path / "run", max_iters=1, attention="document") == 1
    assert "--attention document" in capsys.readouterr().err
    assert train(data, tmp_path / "run", max_iters=1, align="eot") == 1  # no 50256 in the data
    assert "no end-of-text token (id 50256)" in capsys.readouterr().err


def test_train_help_lists_the_attention_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--attention", "--window", "--align"):
        assert flag in text


def test_align_eot_on_few_long_documents_warns_with_the_numbers(tmp_path, documents, capsys):
    data = write_corpus(tmp_path / "data")
    path = data / "train_000000.bin"
    header, tokens = path.read_bytes()[:1024], np.fromfile(path, "<u2", offset=1024)
    tokens[[10_000, 20_000]] = EOT  # three documents of 40,000 tokens: the stream start, two EOTs
    path.write_bytes(header + tokens.tobytes())
    assert train(data, tmp_path / "few", max_iters=1, align="eot") == 0
    percent = 100 * 3 * (TINY["block_size"] + 1) / 40_000
    assert (f"warning: train shards: align='eot': usable windows cover {percent:.1f}% of the "
            f"40,000 tokens (3 documents, block 32): the model trains on document openings "
            f"only") in capsys.readouterr().err
    assert train(documents, tmp_path / "many", max_iters=1, align="eot") == 0
    assert "usable windows cover" not in capsys.readouterr().err


# -------------------------------------------------------- --preset, --optimizer muon --

PRESET_RUN = dict(preset="nanochat-d12", grad_accum=1, dropout=0.1, eval_interval=2,
                  lr_decay_iters=4)  # TINY's sizes override the preset's; dropout: RNG resumes


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_preset_run_trains_resumes_bit_for_bit_and_samples(tmp_path, optimizer, capsys):
    char_data = write_shakespeare_char(tmp_path / "data" / "shakespeare_char")
    whole, half = tmp_path / "whole", tmp_path / "half"
    assert train(char_data, whole, max_iters=4, optimizer=optimizer, **PRESET_RUN) == 0
    assert train(char_data, half, max_iters=2, optimizer=optimizer, **PRESET_RUN) == 0
    assert cli.main(["train", "--out", str(half), "--init", "resume", "--max-iters", "4"]) == 0
    assert losses(half) == losses(whole)  # exact float equality
    first, last = losses(whole)[0][1], losses(whole)[-1][1]
    assert last < first - 0.05, (first, last)
    state = checkpoint(half)
    for key, value in checkpoint(whole)["model"].items():
        assert torch.equal(state["model"][key], value), key
    assert state["config"]["optimizer"] == optimizer and ("muon" in state) is (optimizer == "muon")
    cfg = trainer.TrainConfig(**{k: v for k, v in state["config"].items() if k != "dataset"})
    shape = trainer.learning_rate(3, cfg) / cfg.lr  # the last step's point on the schedule
    groups = state["optimizer"]["param_groups"] + state.get("muon", {}).get("param_groups", [])
    if optimizer == "muon":  # every group at its own peak times the schedule's shape
        scale = (64 / 768) ** -0.5
        assert [g["peak_lr"] for g in groups] == [0.008 * scale, 0.3 * scale, 0.02]
        assert [g["lr"] for g in groups] == [g["peak_lr"] * shape for g in groups]
    else:
        assert [g["lr"] for g in groups] == [trainer.learning_rate(3, cfg)] * 2
    args = state["model_args"]
    assert (args["norm"], args["position"], args["mlp"], args["qk_norm"], args["logit_softcap"],
            args["tie_embeddings"], args["window_pattern"]) == \
        ("rmsnorm", "rotary", "relu2", True, 15.0, False, "SSSL")
    assert (args["n_layer"], args["n_embd"], args["block_size"]) == (2, 64, 32)  # the flags won
    assert "lm_head.weight" in state["model"] and "transformer.wpe.weight" not in state["model"]
    assert f"optimizer {optimizer}" in capsys.readouterr().out

    model = GPT.from_pretrained(half)  # what gptfast sample loads
    assert type(model).__name__ == "ModernGPT" and model.config.logit_softcap == 15.0
    assert cli.main(["sample", "--ckpt", str(half), "--start", "First", "--num-samples", "2",
                     "--max-new-tokens", "12", "--device", "cpu"]) == 0
    drawn = [text[:-1] for text in capsys.readouterr().out.split("---------------\n")[:-1]]
    assert len(drawn) == 2  # print's newline dropped: 12 new characters after the prompt
    assert all(text.startswith("First") and len(text) == len("First") + 12
               and set(text) <= set(CHARS) for text in drawn), drawn


def test_muon_takes_the_block_matrices_and_adamw_the_rest_at_nanochats_rates(data):
    from gptfast.optim import muon_and_adamw, split_parameters

    cfg = scratch_config(data, preset="nanochat-d12", n_layer=2, n_head=2, n_embd=64)
    model = trainer.build_model(cfg, VOCAB, None)
    roles = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in roles["matrices"]) == sorted(
        n for n in names.values() if n.startswith("transformer.h.") and n.endswith(".weight"))
    assert [names[id(p)] for p in roles["head"]] == ["lm_head.weight"]
    assert [names[id(p)] for p in roles["embeddings"]] == ["transformer.wte.weight"]
    adamw, muon = muon_and_adamw(model, weight_decay=0.28)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    scale = (64 / 768) ** -0.5
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in adamw.param_groups] == \
        [(0.008 * scale, (0.8, 0.96), 0.01), (0.3 * scale, (0.8, 0.995), 0.001)]
    (group,) = muon.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"], group["ns_steps"]) == \
        (0.02, 0.95, 0.28, 5)
    assert sum(len(g["params"]) for o in (adamw, muon) for g in o.param_groups) == len(names)
    # GPT-2 with a tied head: the shared matrix is the head's, wpe an embedding, biases vectors
    gpt2 = trainer.build_model(scratch_config(data, bias=True), VOCAB, None)
    roles = split_parameters(gpt2)
    assert [p is gpt2.lm_head.weight for p in roles["head"]] == [True]
    assert len(roles["embeddings"]) == 1 and roles["vectors"]


def test_preset_block_size_and_bad_optimizer_settings_are_errors(data, tmp_path, capsys,
                                                                  monkeypatch):
    cfg = scratch_config(data, preset="nanochat-d12", optimizer="muon", device="cpu")
    assert (cfg.block_size, cfg.n_layer) == (32, 2)  # TINY's flags beat the preset's 2048
    cfg, _, applied = trainer.resolve({"data": str(data), "out": "o", "device": "cpu",
                                       "preset": "nanochat-d20"})
    assert cfg.block_size == 2048 and not set(trainer.ARCHITECTURE) & set(applied)
    with pytest.raises(trainer.TrainError, match="optimizer must be one of adamw, muon"):
        scratch_config(data, optimizer="sgd")
    with pytest.raises(trainer.TrainError, match="--preset nanochat-d12 and --model gpt2-xl"):
        scratch_config(data, preset="nanochat-d12", model="gpt2-xl")
    out = tmp_path / "adamw"
    assert train(data, out, max_iters=1, preset="nanochat-d12") == 0
    argv = ["train", "--out", str(out), "--init", "resume", "--max-iters", "2"]
    assert cli.main(argv + ["--optimizer", "muon"]) == 1
    assert "trained with --optimizer adamw" in capsys.readouterr().err
    monkeypatch.delattr(torch.optim, "Muon")
    assert train(data, tmp_path / "old-torch", max_iters=1, optimizer="muon") == 1
    assert f"needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}" in \
        capsys.readouterr().err


def test_two_gloo_ranks_with_muon_match_one_process_with_doubled_grad_accum(data, tmp_path):
    """As test_two_gloo_ranks_match_one_process_with_doubled_grad_accum, for a preset model
    trained with Muon + AdamW. The losses came out equal here; the bound leaves room for
    Muon's bf16 orthogonalisation rounding the (all-reduced vs accumulated) gradients apart."""
    same = dict(sampler="sequential", max_iters=3, eval_iters=1, preset="nanochat-d12",
                optimizer="muon")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "gptfast", *flags(data, tmp_path / "ddp", grad_accum=1, **same)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert train(data, tmp_path / "single", grad_accum=2, **same) == 0
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [it for it, _ in ddp] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in ddp], [v for _, v in single], rtol=1e-4)
    state = checkpoint(tmp_path / "ddp")
    assert state["world_size"] == 2 and "muon" in state


def test_a_plain_gpt2_checkpoint_keeps_nanogpts_model_args_only():
    """Today's fields at GPT-2's values stay out of model_args (nanoGPT's GPTConfig(**args))."""
    assert set(trainer.saved_model_args(GPTConfig())) == \
        {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}
    modern = trainer.saved_model_args(GPTConfig(norm="rmsnorm", n_kv_head=4))
    assert (modern["norm"], modern["n_kv_head"]) == ("rmsnorm", 4) and "mlp" not in modern
    assert GPT(GPTConfig(**{**modern, "n_layer": 1, "n_embd": 32, "n_head": 4, "n_kv_head": 2}))
