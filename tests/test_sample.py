"""gptfast sample: decoded text from a training checkpoint or a Hugging Face directory, offline."""

import base64
import json

import pytest
import tiktoken

from gptfast import cli, prepare
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
