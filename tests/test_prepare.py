"""gptfast prepare: documents -> llm.c shards, with tiktoken encodings built offline here."""

import base64
import glob
import json
import os
import pickle

import numpy as np
import pytest
import tiktoken

from gptfast import cli, prepare as prep
from gptfast.data import TokenLoader, open_shard, shard_layout

EOT = "<|endoftext|>"
MERGES = [b"th", b"he", b"the", b"in", b" t", b" the", b"er", b"an", b"ll", b"hello"]


def rank_table() -> dict:
    ranks = {bytes([i]): i for i in range(256)}
    for merge in MERGES:
        ranks[merge] = len(ranks)
    return ranks


def make_encoding(eot_id=None) -> tiktoken.Encoding:
    ranks = rank_table()
    return tiktoken.Encoding(name="test-bpe", pat_str=prep.GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks) if eot_id is None else eot_id})


DOCUMENTS = [
    "the theme in the hello",
    "Hello, world! It's 2024 and   spaces\n\nnewlines\ttabs.",
    "ünïcödé ✓ 🎉 中文 — and a literal <|endoftext|> inside",
    "",
    "short",
    *[f"document number {i}: the {'ll' * (i % 7)} end" for i in range(40)],
]


@pytest.fixture
def corpus(tmp_path):
    """DOCUMENTS spread over a .txt file, a .jsonl file and a directory of both."""
    root = tmp_path / "corpus"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "first.txt").write_text(DOCUMENTS[0], encoding="utf-8")
    with open(root / "second.jsonl", "w", encoding="utf-8") as f:
        for text in DOCUMENTS[1:4]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n\n")
    (root / "nested" / "a.txt").write_text(DOCUMENTS[4], encoding="utf-8")
    with open(root / "nested" / "deeper" / "b.jsonl", "w", encoding="utf-8") as f:
        for text in DOCUMENTS[5:]:
            f.write(json.dumps({"text": text}) + "\n")
    (root / "nested" / "ignored.csv").write_text("not a document")
    inputs = [root / "first.txt", root / "second.jsonl", root / "nested"]
    return [str(p) for p in inputs]


def expected_split(n_docs, val_fraction):
    """The documented rule: hash per document, the last one fills an empty split."""
    splits = ["val" if prep.is_val_document(i, val_fraction) else "train" for i in range(n_docs)]
    head = splits[:-1]
    if "train" not in head:
        splits[-1] = "train"
    elif "val" not in head and val_fraction > 0:
        splits[-1] = "val"
    return splits


def split_tokens(out, split):
    paths = sorted(glob.glob(os.path.join(out, f"{split}_*.bin")))
    return np.concatenate([open_shard(p) for p in paths]) if paths else np.empty(0, np.uint16)


def document_tokens(encoding, text, eot="prepend"):
    """llm.c's fineweb.py: [eot] + encode_ordinary(text); --eot append puts it after."""
    body = encoding.encode_ordinary(text)
    return [encoding.eot_token] + body if eot == "prepend" else body + [encoding.eot_token]


def check_round_trip(out, encoding, documents, val_fraction, eot="prepend"):
    splits = expected_split(len(documents), val_fraction)
    for split in ("train", "val"):
        docs = [d for d, s in zip(documents, splits) if s == split]
        tokens = split_tokens(out, split)
        want = [t for d in docs for t in document_tokens(encoding, d, eot)]
        np.testing.assert_array_equal(tokens, want)
        text = "".join(EOT + d if eot == "prepend" else d + EOT for d in docs)
        assert encoding.decode(tokens.tolist()) == text
    return splits


@pytest.mark.parametrize("workers,eot", [(1, "prepend"), (2, "prepend"), (2, "append")])
def test_prepare_round_trips_txt_jsonl_and_directories(corpus, tmp_path, workers, eot):
    encoding = make_encoding()
    out = tmp_path / "out"
    meta = prep.prepare(corpus, out, encoder=encoding, val_fraction=0.2, shard_tokens=97,
                        workers=workers, progress=False, eot=eot)
    splits = check_round_trip(out, encoding, DOCUMENTS, 0.2, eot)
    assert meta["eot"] == eot
    assert meta == json.loads((out / "meta.json").read_text())
    train = split_tokens(out, "train")
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(split_tokens(out, "val"))
    assert meta["train_documents"] == splits.count("train") and meta["val_documents"] == splits.count("val")
    assert (meta["encoding"], meta["vocab_size"], meta["eot_token"]) == ("test-bpe", 267, 266)
    assert (meta["dtype"], meta["magic"], meta["format"], meta["tokenizer_file"]) == (
        "uint16", 20240520, "llm.c", None)
    assert meta["train_shards"] == [f"train_{i:06d}.bin" for i in range(-(-len(train) // 97))]
    for name in meta["train_shards"][:-1]:  # full shards; documents run across boundaries
        assert shard_layout(out / name)[1:] == (1024, 97)
    assert sorted(os.listdir(out)) == sorted(["meta.json", *meta["train_shards"], *meta["val_shards"]])


def test_parallel_and_serial_write_identical_files(corpus, tmp_path):
    encoding = make_encoding()
    for workers in (1, 3):
        prep.prepare(corpus, tmp_path / f"w{workers}", encoder=encoding, val_fraction=0.1,
                     shard_tokens=50, workers=workers, progress=False)
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == sorted(os.listdir(tmp_path / "w3"))
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes()


def test_prepared_shards_feed_the_loader(corpus, tmp_path):
    encoding = make_encoding()
    prep.prepare(corpus, tmp_path, encoder=encoding, val_fraction=0.2, shard_tokens=120,
                 workers=1, progress=False)
    with TokenLoader(str(tmp_path / "train_*.bin"), 2, 8, sampler="sequential") as loader:
        x, y = next(loader)
    first = split_tokens(tmp_path, "train")[:9].astype(np.int64)
    np.testing.assert_array_equal(x[0].numpy(), first[:8])
    np.testing.assert_array_equal(y[0].numpy(), first[1:])


def test_vocabularies_beyond_uint16_write_uint32_shards(tmp_path):
    (tmp_path / "doc.txt").write_text("hello there")
    encoding = make_encoding(eot_id=70_000)
    meta = prep.prepare([tmp_path / "doc.txt"], tmp_path / "out", encoder=encoding,
                        val_fraction=0.0, workers=1, progress=False)
    assert (meta["dtype"], meta["magic"], meta["eot_token"]) == ("uint32", 20240801, 70_000)
    tokens = open_shard(tmp_path / "out" / "train_000000.bin")
    assert tokens.dtype == np.uint32 and tokens[0] == 70_000
    assert encoding.decode(tokens.tolist()) == EOT + "hello there"


@pytest.mark.parametrize("n_docs,fraction,want", [
    (2, 0.0005, ["train", "val"]),  # tiny fraction: val still gets a document
    (3, 0.0, ["train"] * 3),        # no val asked for
    (1, 0.5, ["train"]),            # one document: train
])
def test_val_split_is_non_empty_with_two_documents(tmp_path, n_docs, fraction, want):
    for i in range(n_docs):
        (tmp_path / f"d{i}.txt").write_text(f"doc {i}")
    meta = prep.prepare([tmp_path / f"d{i}.txt" for i in range(n_docs)], tmp_path / "out",
                        encoder=make_encoding(), val_fraction=fraction, workers=1, progress=False)
    assert expected_split(n_docs, fraction) == want
    assert (meta["train_documents"], meta["val_documents"]) == (want.count("train"), want.count("val"))
    assert bool(meta["val_shards"]) == ("val" in want)


def test_val_rule_is_a_seeded_hash_spread_over_the_corpus():
    picks = [i for i in range(20000) if prep.is_val_document(i, 0.05)]
    assert 800 < len(picks) < 1200
    assert picks[0] < 200 and picks[-1] > 19800  # not the tail of the corpus
    assert picks == [i for i in range(20000) if prep.is_val_document(i, 0.05)]


# ------------------------------------------------------------------ tokenizer file, CLI --

def write_rank_file(path, ranks):
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def test_cli_prepare_with_a_local_tokenizer_file(corpus, tmp_path, capsys):
    rank_file = tmp_path / "test.tiktoken"
    write_rank_file(rank_file, rank_table())
    out = tmp_path / "out"
    code = cli.main(["prepare", *corpus, "--out", str(out), "--tokenizer-file", str(rank_file),
                     "--val-fraction", "0.1", "--shard-tokens", "64", "--workers", "2"])
    assert code == 0
    assert "train tokens" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["encoding"], meta["tokenizer_file"]) == ("gpt2", str(rank_file))
    assert (meta["vocab_size"], meta["eot_token"]) == (267, 266)  # <|endoftext|> = n_vocab of the file
    encoding = prep.load_encoding("gpt2", rank_file)
    assert encoding.encode("the hello") == make_encoding().encode("the hello")
    check_round_trip(out, encoding, DOCUMENTS, 0.1)
    assert meta["eot"] == "prepend"  # llm.c's convention by default


def test_cli_eot_append_and_bad_choice(corpus, tmp_path, capsys):
    rank_file = tmp_path / "test.tiktoken"
    write_rank_file(rank_file, rank_table())
    out = tmp_path / "out"
    argv = ["prepare", *corpus, "--out", str(out), "--tokenizer-file", str(rank_file),
            "--val-fraction", "0.1", "--workers", "1"]
    assert cli.main(argv + ["--eot", "append"]) == 0
    assert json.loads((out / "meta.json").read_text())["eot"] == "append"
    check_round_trip(out, prep.load_encoding("gpt2", rank_file), DOCUMENTS, 0.1, "append")
    with pytest.raises(SystemExit):
        cli.main(argv + ["--eot", "both"])
    assert "invalid choice: 'both'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eot must be one of prepend, append"):
        prep.prepare(corpus, out, encoder=make_encoding(), eot="both", progress=False)


def test_gpt2_pattern_is_tiktokens():
    public = pytest.importorskip("tiktoken_ext.openai_public")
    assert prep.GPT2_PATTERN == public.r50k_pat_str


def test_rank_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(base64.b64encode(b"a") + b" 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:2"):
        prep.load_rank_file(bad)
    with pytest.raises(ValueError, match="GPT-2-family"):
        prep.load_encoding("cl100k_base", bad)


def test_offline_encoding_failure_points_to_tokenizer_file(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="--tokenizer-file"):
        prep.load_encoding("gpt2")


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"txt": "x"}\n', r"bad\.jsonl:2: expected a JSON object"),
    ('{"text": "ok"}\nnot json\n', r"bad\.jsonl:2"),
    ('{"text": 5}\n', r"bad\.jsonl:1: \"text\" is int"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        prep.prepare([tmp_path / "bad.jsonl"], tmp_path / "out", encoder=make_encoding(),
                     workers=1, progress=False)
    assert not list((tmp_path / "out").iterdir())


def test_bad_inputs_and_arguments(tmp_path, capsys):
    encoding = make_encoding()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prep.prepare([tmp_path / "missing.txt"], tmp_path / "out", encoder=encoding, progress=False)
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(ValueError, match="data.csv"):
        prep.prepare([tmp_path / "data.csv"], tmp_path / "out", encoder=encoding, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        prep.prepare([tmp_path / "empty"], tmp_path / "out", encoder=encoding, progress=False)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        prep.prepare([tmp_path / "blank.jsonl"], tmp_path / "out", encoder=encoding, progress=False)
    for kwargs in (dict(val_fraction=1.0), dict(shard_tokens=0), dict(workers=0)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            prep.prepare([tmp_path / "blank.jsonl"], tmp_path / "out", encoder=encoding,
                         progress=False, **kwargs)
    assert cli.main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "missing.txt" in capsys.readouterr().err


# ---------------------------------------------------------------------------- atomicity --

def test_failure_midway_leaves_only_complete_shards(corpus, tmp_path, monkeypatch):
    encoding = make_encoding()
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # from an earlier run
    real_encode, calls = prep._encode_document, []

    def failing_encode(text):
        calls.append(text)
        if len(calls) == 30:
            raise OSError("disk on fire")
        return real_encode(text)

    monkeypatch.setattr(prep, "_encode_document", failing_encode)
    with pytest.raises(OSError, match="disk on fire"):
        prep.prepare(corpus, out, encoder=encoding, val_fraction=0.0, shard_tokens=40,
                     workers=1, progress=False)
    names = os.listdir(out)
    assert names, "the documents before the failure filled some shards"
    assert not [n for n in names if n.endswith(".tmp")]
    assert "meta.json" not in names, "meta.json marks a complete run only"
    for name in names:
        assert shard_layout(out / name)[1:] == (1024, 40), f"{name} is not a complete shard"


def test_rerun_replaces_the_previous_output(corpus, tmp_path):
    encoding = make_encoding()
    out = tmp_path / "out"
    prep.prepare(corpus, out, encoder=encoding, val_fraction=0.0, shard_tokens=30, workers=1,
                 progress=False)
    meta = prep.prepare(corpus, out, encoder=encoding, val_fraction=0.0, shard_tokens=300,
                        workers=1, progress=False)
    assert sorted(os.listdir(out)) == sorted(["meta.json", *meta["train_shards"]])
    check_round_trip(out, encoding, DOCUMENTS, 0.0)


def test_write_shard_is_atomic_and_readable(tmp_path):
    prep.write_shard(tmp_path / "s.bin", np.arange(5, dtype=np.uint16))
    assert os.listdir(tmp_path) == ["s.bin"]
    np.testing.assert_array_equal(open_shard(tmp_path / "s.bin"), np.arange(5))


# ------------------------------------------------------------------ --tokenizer char|byte --

CHAR_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. ü✓\n"


def nanogpt_char_data(text):
    """nanoGPT's data/shakespeare_char/prepare.py, restated: sorted characters, a 90/10 split."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = len(text)
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    return ids[:int(n * 0.9)], ids[int(n * 0.9):], meta


def test_char_writes_nanogpts_train_val_and_meta_pkl(tmp_path, capsys):
    from gptfast.char_vocab import read_meta_pkl
    from gptfast.train import read_data_meta, shard_paths

    (tmp_path / "a.txt").write_text(CHAR_TEXT * 3, encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "Second document."}) + "\n")
    out = tmp_path / "out"
    out.mkdir()  # holding a previous tiktoken run's files
    prep.write_shard(out / "train_000000.bin", np.arange(10, dtype=np.uint16))
    (out / "meta.json").write_text("{}")
    assert cli.main(["prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--out", str(out),
                     "--tokenizer", "char"]) == 0
    assert "train.bin, val.bin and meta.pkl" in capsys.readouterr().out
    train, val, meta = nanogpt_char_data(CHAR_TEXT * 3 + "Second document.")
    assert sorted(os.listdir(out)) == ["meta.pkl", "train.bin", "val.bin"]  # stale files gone
    np.testing.assert_array_equal(np.fromfile(out / "train.bin", np.uint16), train)  # no header
    np.testing.assert_array_equal(np.fromfile(out / "val.bin", np.uint16), val)
    with open(out / "meta.pkl", "rb") as f:
        assert pickle.load(f) == meta
    assert read_meta_pkl(out / "meta.pkl")["itos"] == meta["itos"]  # the safe reader takes it
    assert read_data_meta(out)["vocab_size"] == meta["vocab_size"]
    assert shard_paths(out, "train") == [str(out / "train.bin")]
    # and back: a tiktoken run removes the char run's files
    prep.prepare([tmp_path / "a.txt"], out, encoder=make_encoding(), workers=1, progress=False)
    assert sorted(os.listdir(out)) == ["meta.json", "train_000000.bin"]


def test_char_val_fraction_and_errors(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abcabcabca", encoding="utf-8")
    out = tmp_path / "out"
    meta = prep.prepare([tmp_path / "a.txt"], out, tokenizer="char", val_fraction=0.0)
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (10, 0, 3)
    assert sorted(os.listdir(out)) == ["meta.pkl", "train.bin"]
    assert prep.prepare([tmp_path / "a.txt"], out, tokenizer="char", val_fraction=0.5)["val_tokens"] == 5
    with pytest.raises(ValueError, match="leave nothing to train on"):
        (tmp_path / "one.txt").write_text("x")
        prep.prepare([tmp_path / "one.txt"], out, tokenizer="char")
    assert cli.main(["prepare", str(tmp_path / "a.txt"), "--out", str(out), "--tokenizer", "char",
                     "--eot", "append"]) == 1
    assert "--eot do not apply" in capsys.readouterr().err


def test_byte_tokens_are_utf8_bytes_and_eot_256(corpus, tmp_path):
    from gptfast.byte_vocab import ByteEncoding

    out = tmp_path / "out"
    meta = prep.prepare(corpus, out, tokenizer="byte", val_fraction=0.2, workers=2, progress=False)
    assert (meta["encoding"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == (
        "byte", 257, 256, "uint16")
    splits = expected_split(len(DOCUMENTS), 0.2)
    for split in ("train", "val"):
        docs = [d for d, s in zip(DOCUMENTS, splits) if s == split]
        want = [t for d in docs for t in [256, *d.encode("utf-8")]]
        np.testing.assert_array_equal(split_tokens(out, split), want)
        assert ByteEncoding().decode(want) == "".join(EOT + d for d in docs)


def test_byte_encoding_round_trips_and_marks_bad_bytes():
    from gptfast.byte_vocab import ByteEncoding

    encoding = ByteEncoding()
    text = "ünïcödé ✓ 🎉 and a literal <|endoftext|>"
    assert encoding.encode_ordinary(text) == list(text.encode("utf-8"))
    assert encoding.decode(encoding.encode_ordinary(text)) == text
    assert encoding.encode("a<|endoftext|>b", allowed_special={EOT}) == [97, 256, 98]
    assert encoding.encode("a<|endoftext|>b") == list(b"a<|endoftext|>b")
    assert encoding.decode([0xF0, 0x9F, 104, 300]) == "\ufffdh\ufffd"  # cut UTF-8, beyond vocab
    assert encoding.encode_single_token(EOT) == 256 and encoding.n_vocab == 257


def test_tokenizer_flag_names_a_tiktoken_encoding_or_a_rank_file(corpus, tmp_path, monkeypatch, capsys):
    rank_file = tmp_path / "test.tiktoken"
    write_rank_file(rank_file, rank_table())
    assert cli.main(["prepare", *corpus, "--out", str(tmp_path / "file"), "--tokenizer", str(rank_file),
                     "--val-fraction", "0.1", "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "file" / "meta.json").read_text())
    assert (meta["encoding"], meta["tokenizer_file"], meta["vocab_size"]) == ("gpt2", str(rank_file), 267)
    asked = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: asked.append(name) or make_encoding())
    assert cli.main(["prepare", *corpus, "--out", str(tmp_path / "named"), "--tokenizer", "gpt2",
                     "--workers", "1"]) == 0
    assert asked == ["gpt2"]
    capsys.readouterr()
    for argv, message in [
        (["--tokenizer", "byte", "--encoding", "gpt2"], "--tokenizer byte takes no --encoding"),
        (["--tokenizer", "gpt2", "--encoding", "r50k_base"], "pass one of them"),
        (["--tokenizer", str(rank_file), "--tokenizer-file", str(rank_file)], "pass one of them"),
        (["--tokenizer", str(tmp_path / "missing.tiktoken")], "no such rank file"),
    ]:
        assert cli.main(["prepare", *corpus, "--out", str(tmp_path / "x"), *argv]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_char_and_byte_data_train_and_sample_decodes_them(tmp_path, kind, capsys):
    (tmp_path / "input.txt").write_text(CHAR_TEXT * 40, encoding="utf-8")
    data, out = tmp_path / "data", tmp_path / "run"
    assert cli.main(["prepare", str(tmp_path / "input.txt"), "--out", str(data), "--tokenizer", kind,
                     "--workers", "1"] + (["--val-fraction", "0"] if kind == "byte" else [])) == 0
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--n-layer", "1", "--n-head", "2",
                     "--n-embd", "32", "--block-size", "16", "--batch-size", "4", "--max-iters", "3",
                     "--device", "cpu", "--eval-iters", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["sample", "--ckpt", str(out), "--start", "Speak", "--num-samples", "2",
                     "--max-new-tokens", "30", "--device", "cpu"]) == 0
    drawn = [s.strip("\n") for s in capsys.readouterr().out.split("---------------\n")[:-1]]
    assert len(drawn) == 2 and all(s.startswith("Speak") for s in drawn)
    if kind == "char":  # every id decodes to a character of the text
        assert all(set(s) <= set(CHAR_TEXT) for s in drawn)
        assert torch_vocab(out) == len(set(CHAR_TEXT))  # meta.pkl's vocab_size, exactly
    else:
        assert torch_vocab(out) == 320  # 257 padded to a multiple of 64


def torch_vocab(out):
    import torch

    return torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["model_args"]["vocab_size"]
