"""nanoGPT's meta.pkl read as plain data only, and the char-level codec built from it."""

import os
import pickle

import pytest
import torch

from gptfast.char_vocab import CharEncoding, MetaPickleError, read_meta_pkl

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
CHARS = sorted(set(TEXT))


def nanogpt_meta(chars=CHARS) -> dict:
    """What nanoGPT's data/shakespeare_char/prepare.py pickles."""
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    return {"vocab_size": len(chars), "itos": itos, "stoi": stoi}


def write_pickle(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


class RunsCode:
    """Unpickling this would call record_call: what a hostile meta.pkl does with os.system."""

    def __reduce__(self):
        return (record_call, ("ran",))


CALLS = []


def record_call(value):
    CALLS.append(value)
    return value


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_nanogpt_meta_pkl_reads_and_round_trips_text(tmp_path, protocol):
    path = write_pickle(tmp_path / "meta.pkl", nanogpt_meta(), protocol)
    meta = read_meta_pkl(path)
    assert meta == {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS))}
    encoding = CharEncoding.from_meta_pkl(path)
    ids = encoding.encode(TEXT, allowed_special={"<|endoftext|>"})
    assert ids == [CHARS.index(c) for c in TEXT]  # nanoGPT's [stoi[c] for c in s]
    assert encoding.decode(ids) == TEXT
    assert encoding.n_vocab == len(CHARS) and encoding.empty_prompt_token == CHARS.index("\n")


@pytest.mark.parametrize("payload", [
    RunsCode(),
    {"vocab_size": 3, "itos": {0: RunsCode()}},
    {"vocab_size": 3, "extra": torch.Size([2])},  # any class, however harmless
])
def test_a_pickle_with_any_global_is_refused_without_running_it(tmp_path, payload):
    path = write_pickle(tmp_path / "meta.pkl", payload)
    CALLS.clear()
    with pytest.raises(MetaPickleError, match=f"{path}.*was not loaded: it references"):
        read_meta_pkl(path)
    assert CALLS == []
    # the same file through plain pickle.load would have run it
    if isinstance(payload, RunsCode):
        with open(path, "rb") as f:
            pickle.load(f)
        assert CALLS == ["ran"]


@pytest.mark.parametrize("content,message", [
    (b"not a pickle", "was not loaded"),
    (pickle.dumps([1, 2, 3]), "expected a dict with a positive int 'vocab_size'"),
    (pickle.dumps({"vocab_size": "65"}), "expected a dict with a positive int 'vocab_size'"),
    (pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: "b"}}), "must both be dicts"),
    (pickle.dumps({"vocab_size": 2, "itos": {0: "a", 2: "b"}, "stoi": {"a": 0, "b": 2}}),
     "itos maps 2 to 'b'"),
    (pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 1, "b": 0}}),
     "'stoi' is not the inverse of 'itos'"),
])
def test_malformed_meta_pkl_names_the_file(tmp_path, content, message):
    path = tmp_path / "meta.pkl"
    path.write_bytes(content)
    with pytest.raises(MetaPickleError, match=message) as info:
        read_meta_pkl(path)
    assert str(path) in str(info.value)


def test_vocab_size_alone_is_enough_to_train_but_not_to_decode(tmp_path):
    path = write_pickle(tmp_path / "meta.pkl", {"vocab_size": 65})
    assert read_meta_pkl(path) == {"vocab_size": 65, "itos": None}
    with pytest.raises(MetaPickleError, match="no 'itos'/'stoi'"):
        CharEncoding.from_meta_pkl(path)


def test_unknown_characters_and_ids():
    encoding = CharEncoding({0: "a", 1: "b", 3: "d"}, n_vocab=5)
    with pytest.raises(ValueError, match="character 'z' at position 2"):
        encoding.encode("abz")
    assert encoding.decode([0, 2, 3, 4]) == "a\ufffdd\ufffd"  # ids the vocabulary does not name
    assert encoding.empty_prompt_token == 0  # no newline: the first id


def test_checkpoint_form_round_trips_through_weights_only_load(tmp_path):
    encoding = CharEncoding(dict(enumerate(CHARS)))
    torch.save({"tokenizer": encoding.tokenizer_info()}, tmp_path / "ckpt.pt")
    info = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    restored = CharEncoding.from_tokenizer_info(info)
    assert (restored.itos, restored.n_vocab) == (encoding.itos, encoding.n_vocab)


def test_oversized_file_is_refused_before_unpickling(tmp_path, monkeypatch):
    import gptfast.char_vocab as char_vocab

    path = write_pickle(tmp_path / "meta.pkl", nanogpt_meta())
    monkeypatch.setattr(char_vocab, "MAX_META_BYTES", os.path.getsize(path) - 1)
    with pytest.raises(MetaPickleError, match="too large"):
        read_meta_pkl(path)
