"""gptfast sample: decoded text from a training checkpoint or a Hugging Face directory, offline."""

import base64
import dataclasses
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import tiktoken
import torch

from gptfast import cli, prepare
from gptfast.model import GPT, GPTConfig
from gptfast.sample import SEPARATOR, decode

MERGES = [b"th", b"he", b"the", b" t", b" the", b"at", b" c", b" cat", b" s", b" sat"]


def write_rank_file(path):
    ranks = {bytes([i]): i for i in range(256)}
    for merge in MERGES:
        ranks[merge] = len(ranks)
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on sentences prepared with a local rank file (no network)."""
    root = tmp_path_factory.mktemp("sample")
    ranks = write_rank_file(root / "test.tiktoken")
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": "the cat sat on the mat. " * (3 + i % 4)}) + "\n")
    prepare.prepare([root / "corpus.jsonl"], root / "data", tokenizer_file=ranks, val_fraction=0.1,
                    workers=1, progress=False)
    out = root / "out"
    argv = ["train", "--data", str(root / "data"), "--out", str(out), "--n-layer", "2", "--n-head", "2",
            "--n-embd", "64", "--block-size", "32", "--batch-size", "8", "--grad-accum", "1",
            "--max-iters", "60", "--lr", "3e-3", "--warmup-iters", "5", "--lr-decay-iters", "60",
            "--eval-iters", "2", "--eval-interval", "1000", "--log-interval", "30", "--device", "cpu"]
    assert cli.main(argv) == 0
    return root


def samples(text):
    return [s.strip("\n") for s in text.split(SEPARATOR + "\n")[:-1]]


def test_samples_decode_with_the_checkpoints_tokenizer(trained, capsys):
    capsys.readouterr()
    assert cli.main(["sample", "--ckpt", str(trained / "out"), "--start", "the cat",
                     "--num-samples", "3", "--max-new-tokens", "40", "--device", "cpu",
                     "--seed", "1"]) == 0
    drawn = samples(capsys.readouterr().out)
    assert len(drawn) == 3
    assert all(s.startswith("the cat") and len(s) > len("the cat") + 10 for s in drawn)
    assert sum(" sat on the mat" in s for s in drawn) >= 2  # it learned the sentence


def test_start_from_a_file_greedy_and_seeded(trained, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the mat. the")
    argv = ["sample", "--ckpt", str(trained / "out" / "ckpt.pt"), "--start", f"FILE:{prompt}",
            "--num-samples", "2", "--max-new-tokens", "12", "--device", "cpu", "--temperature", "0"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    first, second = samples(capsys.readouterr().out)
    assert first == second and first.startswith("the mat. the")
    assert cli.main(argv[:-2] + ["--temperature", "0.9", "--seed", "3"]) == 0
    seeded = capsys.readouterr().out
    assert cli.main(argv[:-2] + ["--temperature", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out == seeded


def test_hugging_face_directory_with_a_tokenizer_file(trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=267,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert cli.main(["sample", "--ckpt", str(tmp_path / "hf"), "--start", "hello", "--num-samples", "1",
                     "--max-new-tokens", "30", "--device", "cpu",
                     "--tokenizer-file", str(trained / "test.tiktoken")]) == 0
    (drawn,) = samples(capsys.readouterr().out)
    assert drawn.startswith("hello")  # the prompt survives a 16-token context being outgrown


def test_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["sample", "--ckpt", str(tmp_path / "missing"),
                     "--tokenizer-file", str(write_rank_file(tmp_path / "r.tiktoken"))]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["sample", "--ckpt", str(tmp_path), "--start", "FILE:/no/such/prompt",
                     "--tokenizer-file", str(tmp_path / "r.tiktoken")]) == 1
    assert "cannot read the prompt file" in capsys.readouterr().err


def test_ids_beyond_the_tokenizer_decode_as_replacement_characters():
    ranks = {bytes([i]): i for i in range(256)}
    encoding = tiktoken.Encoding("t", pat_str=prepare.GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 256})
    ids = encoding.encode("ab") + [300] + encoding.encode("c")
    assert decode(encoding, ids) == "ab\ufffdc"


# ------------------------------------------------------------ char-level vocabularies --

CHAR_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
CHARS = sorted(set(CHAR_TEXT))
GREEDY = ["--num-samples", "2", "--max-new-tokens", "15", "--device", "cpu", "--temperature", "0"]


def write_meta_pkl(path, meta=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if meta is None:  # nanoGPT's data/shakespeare_char/prepare.py
        meta = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
                "stoi": {c: i for i, c in enumerate(CHARS)}}
    with open(path, "wb") as f:
        pickle.dump(meta, f)
    return path


def greedy_text(ckpt, start, new_tokens=15):
    """What greedy decoding must print: the model's own continuation, decoded with CHARS."""
    model = GPT.from_pretrained(ckpt).eval()
    idx = torch.tensor([[CHARS.index(c) for c in start]])
    with torch.no_grad():
        out = model.generate(idx, new_tokens, temperature=0)
    return "".join(CHARS[i] for i in out[0].tolist())


def nanogpt_checkpoint(path, dataset="shakespeare_char"):
    """A checkpoint as nanoGPT's train.py writes it (model_args, config with its dataset)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=32,
                       bias=False)
    model_args = dataclasses.asdict(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": GPT(config).state_dict(), "optimizer": {}, "model_args": model_args,
                "iter_num": 0, "best_val_loss": 1e9,
                "config": {"dataset": dataset, "batch_size": 4, "bias": False}}, path)
    return path


def test_a_gptfast_char_checkpoint_decodes_without_its_data_dir(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data" / "shakespeare_char"
    write_meta_pkl(data / "meta.pkl")
    ids = np.array([CHARS.index(c) for c in CHAR_TEXT * 30], dtype=np.uint16)
    ids.tofile(data / "train.bin")
    out = tmp_path / "out"
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--n-layer", "1", "--n-head",
                     "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
                     "--grad-accum", "1", "--max-iters", "3", "--device", "cpu"]) == 0
    shutil.rmtree(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["sample", "--ckpt", str(out), "--start", "Fir", *GREEDY]) == 0
    drawn = samples(capsys.readouterr().out)
    assert drawn == [greedy_text(out, "Fir").strip("\n")] * 2
    assert set("".join(drawn)) <= set(CHARS)
    capsys.readouterr()
    assert cli.main(["sample", "--ckpt", str(out), "--start", "", *GREEDY]) == 0  # empty prompt
    assert all(set(s) <= set(CHARS) for s in samples(capsys.readouterr().out))


def test_a_nanogpt_char_checkpoint_decodes_with_data_dataset_meta_pkl(tmp_path, monkeypatch, capsys):
    ckpt = nanogpt_checkpoint(tmp_path / "out-shakespeare-char" / "ckpt.pt")
    write_meta_pkl(tmp_path / "data" / "shakespeare_char" / "meta.pkl")
    monkeypatch.chdir(tmp_path)  # nanoGPT's rule: data/<dataset>/meta.pkl from the working dir
    capsys.readouterr()
    assert cli.main(["sample", "--ckpt", str(ckpt.parent), "--start", "hear", *GREEDY]) == 0
    want = greedy_text(ckpt, "hear").strip("\n")
    assert samples(capsys.readouterr().out) == [want] * 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    meta = tmp_path / "data" / "shakespeare_char" / "meta.pkl"
    assert cli.main(["sample", "--ckpt", str(ckpt), "--meta", str(meta), "--start", "hear",
                     *GREEDY]) == 0
    assert samples(capsys.readouterr().out) == [want] * 2


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_char_vocabulary_errors(tmp_path, capsys):
    ckpt = nanogpt_checkpoint(tmp_path / "out" / "ckpt.pt")
    meta = write_meta_pkl(tmp_path / "meta.pkl")
    run = ["sample", "--ckpt", str(ckpt), "--device", "cpu", "--max-new-tokens", "2"]
    capsys.readouterr()
    assert cli.main(run + ["--meta", str(meta), "--start", "Zebra"]) == 1
    assert "--start: character 'Z' at position 0 is not in the" in capsys.readouterr().err
    evil = write_meta_pkl(tmp_path / "evil.pkl", {"vocab_size": 3, "x": RunsCode()})
    assert cli.main(run + ["--meta", str(evil)]) == 1
    captured = capsys.readouterr()
    assert f"{evil} was not loaded: it references" in captured.err
    assert "should never run" not in captured.out + captured.err
    ranks = write_rank_file(tmp_path / "r.tiktoken")
    assert cli.main(run + ["--meta", str(meta), "--tokenizer-file", str(ranks)]) == 1
    assert "--meta or --tokenizer-file, not both" in capsys.readouterr().err
    # a byte-level tokenizer for a char model: the prompt's ids overflow the model's vocabulary
    assert cli.main(run + ["--tokenizer-file", str(ranks), "--start", "the cat"]) == 1
    assert f"beyond the model's {len(CHARS)}-token vocabulary" in capsys.readouterr().err
