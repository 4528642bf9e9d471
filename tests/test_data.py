"""TokenLoader (C++ gptfast._C) against the numpy reference, shard formats, bad input,
resumption, thread shutdown."""

import itertools
import os
import subprocess
import warnings
import sys

import numpy as np
import pytest
import torch

import gptfast
from gptfast import _C, data
from gptfast.data import TokenLoader, reference_batches, shard_layout

MAGIC16, MAGIC32 = 20240520, 20240801
B, T = 4, 16


def llmc_bytes(tokens, magic=MAGIC16, version=None, count=None) -> bytes:
    """An llm.c shard, optionally with a wrong version or token count."""
    header = np.zeros(256, "<i4")
    header[0] = magic
    header[1] = version if version is not None else {MAGIC16: 1, MAGIC32: 7}.get(magic, 1)
    header[2] = len(tokens) if count is None else count
    dtype = "<u4" if magic == MAGIC32 else "<u2"
    return header.tobytes() + np.asarray(tokens, dtype).tobytes()


def write(path, content: bytes):
    path.write_bytes(content)
    return str(path)


@pytest.fixture
def mixed_shards(tmp_path):
    """Three shards, one per format, of lengths that leave tails; token ids tell position
    apart: shard s holds s * 20000 + arange(n) (uint32 shard: 70000 + arange(n))."""
    write(tmp_path / "a.bin", llmc_bytes(np.arange(211), MAGIC16))                 # llm.c uint16
    (20000 + np.arange(150, dtype="<u2")).tofile(tmp_path / "b.bin")             # nanoGPT raw
    write(tmp_path / "c.bin", llmc_bytes(70000 + np.arange(187), MAGIC32))         # llm.c uint32
    return str(tmp_path / "*.bin")


def take(loader, n):
    return [(x.numpy().copy(), y.numpy().copy()) for x, y in itertools.islice(loader, n)]


def assert_same_batches(got, want):
    for k, ((x, y), (rx, ry)) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(x, rx, err_msg=f"x of batch {k}")
        np.testing.assert_array_equal(y, ry, err_msg=f"y of batch {k}")


# ----------------------------------------------------------------- loader vs reference --

@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("sampler", ["random", "sequential", "shuffle"])
def test_loader_matches_reference_every_rank(mixed_shards, sampler, world_size):
    for rank in range(world_size):
        with TokenLoader(mixed_shards, B, T, sampler=sampler, seed=7, rank=rank,
                         world_size=world_size) as loader:
            got = take(loader, 40)  # ~8 epochs at world_size 3: batches straddle epoch ends
            assert loader.position == 40
        want = itertools.islice(reference_batches(mixed_shards, B, T, sampler=sampler, seed=7,
                                                  rank=rank, world_size=world_size), 40)
        assert_same_batches(got, want)
        for x, y in got:
            assert x.shape == y.shape == (B, T) and x.dtype == np.int64
            np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
            # one shard per window: consecutive ids
            np.testing.assert_array_equal(np.diff(x, axis=1), 1)


@pytest.mark.parametrize("prefetch,workers", [(1, 1), (2, 2), (5, 3)])
def test_ring_sizes_and_thread_counts_give_the_same_stream(mixed_shards, prefetch, workers):
    with TokenLoader(mixed_shards, B, T, sampler="shuffle", seed=1, prefetch=prefetch,
                     num_workers=workers) as loader:
        got = take(loader, 30)
    assert_same_batches(got, itertools.islice(reference_batches(mixed_shards, B, T, sampler="shuffle",
                                                                seed=1), 30))


def test_batches_belong_to_the_caller(mixed_shards):
    """Holding on to batches: the workers never write into a tensor already handed out."""
    with TokenLoader(mixed_shards, B, T, sampler="sequential", prefetch=2) as loader:
        held = [next(loader) for _ in range(12)]
    want = list(itertools.islice(reference_batches(mixed_shards, B, T, sampler="sequential"), 12))
    assert_same_batches([(x.numpy(), y.numpy()) for x, y in held], want)
    x, y = held[0]
    assert x.is_contiguous() and y.is_contiguous()


def window_ids(path_glob, sampler, world_size, batches, seed=0):
    """Per stream position, the id of the window's first token (all ranks interleaved)."""
    per_rank = []
    for rank in range(world_size):
        with TokenLoader(path_glob, B, T, sampler=sampler, seed=seed, rank=rank,
                         world_size=world_size) as loader:
            per_rank.append([x[:, 0].tolist() for x, _ in itertools.islice(loader, batches)])
    ids = []
    for k in range(batches):
        for rank in range(world_size):
            ids += per_rank[rank][k]
    return ids


def all_window_ids(mixed_shards):
    lengths = {0: 211, 20000: 150, 70000: 187}
    return sorted(base + j * T for base, n in lengths.items() for j in range((n - 1) // T))


@pytest.mark.parametrize("world_size", [1, 3])
def test_shuffle_takes_every_window_once_per_epoch_across_ranks(mixed_shards, world_size):
    windows = all_window_ids(mixed_shards)
    n = len(windows)  # 13 + 9 + 11 = 33, not a multiple of B * world_size
    ids = window_ids(mixed_shards, "shuffle", world_size, batches=4 * n // (B * world_size) + 1)
    epochs = [ids[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == windows
    assert epochs[0] != epochs[1] != epochs[2], "a new permutation every epoch"
    assert epochs[0] != windows


def test_sequential_walks_the_windows_in_order(mixed_shards):
    windows = all_window_ids(mixed_shards)
    ids = window_ids(mixed_shards, "sequential", world_size=3, batches=6)
    assert ids == (windows * 3)[:len(ids)]


def test_random_offsets_cover_every_shard_in_proportion(mixed_shards):
    with TokenLoader(mixed_shards, 64, T, sampler="random", seed=3) as loader:
        firsts = np.concatenate([x[:, 0].numpy() for x, _ in itertools.islice(loader, 50)])
    shard = np.select([firsts >= 70000, firsts >= 20000], [2, 1], 0)
    share = np.bincount(shard, minlength=3) / len(firsts)
    valid = np.array([211 - T, 150 - T, 187 - T])
    np.testing.assert_allclose(share, valid / valid.sum(), atol=0.05)
    in_shard = firsts - np.array([0, 20000, 70000])[shard]
    assert in_shard.min() >= 0 and (in_shard + T + 1 <= np.array([211, 150, 187])[shard]).all()


def test_seeds_and_ranks_give_different_random_streams(mixed_shards):
    def first(**kw):
        with TokenLoader(mixed_shards, B, T, **kw) as loader:
            return next(loader)[0]
    assert not torch.equal(first(seed=0), first(seed=1))
    assert not torch.equal(first(world_size=2, rank=0), first(world_size=2, rank=1))
    assert torch.equal(first(seed=5), first(seed=5))


# ------------------------------------------------------------------------- resumption --

@pytest.mark.parametrize("sampler", ["random", "sequential", "shuffle"])
def test_resume_mid_epoch_gives_exactly_the_next_batches(mixed_shards, sampler):
    kw = dict(sampler=sampler, seed=11, rank=1, world_size=2)
    with TokenLoader(mixed_shards, B, T, **kw) as original:
        take(original, 3)  # mid-epoch (5.5 batches per epoch per rank); workers ran ahead
        state = original.state_dict()
        assert state["position"] == 3 and state["epoch"] == 0
        expected = take(original, 12)
        original.load_state_dict(state)  # rewinding the same loader works too
        assert_same_batches(take(original, 12), expected)
    with TokenLoader(mixed_shards, B, T, **kw) as resumed:
        resumed.load_state_dict(state)
        assert resumed.position == 3
        assert_same_batches(take(resumed, 12), expected)
        assert resumed.epoch == (15 * 2 + 1) * B // resumed.num_windows


def test_state_from_another_configuration_is_refused(mixed_shards, tmp_path):
    with TokenLoader(mixed_shards, B, T, sampler="shuffle") as loader:
        state = loader.state_dict()
    with TokenLoader(mixed_shards, B, T + 1, sampler="shuffle") as other:
        with pytest.raises(ValueError, match="block_size"):
            other.load_state_dict(state)
    with TokenLoader(str(tmp_path / "a.bin"), B, T, sampler="shuffle") as fewer_shards:
        with pytest.raises(ValueError, match="shard_tokens"):
            fewer_shards.load_state_dict(state)
    with TokenLoader(mixed_shards, B, T, sampler="random") as other_sampler:
        with pytest.raises(ValueError, match="sampler"):
            other_sampler.load_state_dict(state)


def test_epoch_and_position_follow_the_stream(mixed_shards):
    with TokenLoader(mixed_shards, B, T, sampler="sequential") as loader:
        assert loader.num_windows == 33 and (loader.epoch, loader.position) == (0, 0)
        take(loader, 9)  # 36 windows consumed
        assert (loader.epoch, loader.position) == (1, 9)


# ----------------------------------------------------------------------------- formats --

def test_formats_read_alike_by_cpp_and_numpy(tmp_path):
    tokens16 = np.array([0, 1, 50256, 65535, 7], "<u2")
    tokens32 = np.array([0, 65536, 2**32 - 1, 100_000, 3], "<u4")
    raw = tmp_path / "raw.bin"
    tokens16.tofile(raw)
    v1 = write(tmp_path / "v1.bin", llmc_bytes(tokens16, MAGIC16))
    v7 = write(tmp_path / "v7.bin", llmc_bytes(tokens32, MAGIC32))
    for path, tokens, fmt in [(str(raw), tokens16, "nanogpt"), (v1, tokens16, "llm.c"),
                              (v7, tokens32, "llm.c")]:
        info = _C.inspect_shard(path)
        assert (info["format"], info["num_tokens"], info["token_bytes"]) == (fmt, 5, tokens.itemsize)
        dtype, header, count = shard_layout(path)
        assert (dtype.itemsize, header, count) == (tokens.itemsize, info["header_bytes"], 5)
        np.testing.assert_array_equal(data.open_shard(path), tokens)
        with TokenLoader(path, 1, 4, sampler="sequential") as loader:
            x, y = next(loader)
        np.testing.assert_array_equal(x[0].numpy(), tokens[:4].astype(np.int64))
        np.testing.assert_array_equal(y[0].numpy(), tokens[1:].astype(np.int64))


def test_empty_raw_file_is_a_shard_without_windows(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    assert _C.inspect_shard(str(tmp_path / "empty.bin"))["num_tokens"] == 0
    assert len(data.open_shard(tmp_path / "empty.bin")) == 0


# --------------------------------------------------------------------------- bad input --

BAD_SHARDS = {
    "odd_size": (np.arange(10, dtype="<u2").tobytes() + b"\x01", "whole number of uint16"),
    "bad_version": (llmc_bytes(np.arange(40), MAGIC16, version=7), "version 7"),
    "bad_version_uint32": (llmc_bytes(np.arange(40), MAGIC32, version=1), "version 1"),
    "short_header": (llmc_bytes(np.arange(40), MAGIC16)[:600], "truncated"),
    "count_too_big": (llmc_bytes(np.arange(40), MAGIC16, count=41), "header says 41 tokens"),
    "count_too_small": (llmc_bytes(np.arange(40), MAGIC32, count=39), "header says 39 tokens"),
    "truncated_tokens": (llmc_bytes(np.arange(40), MAGIC16)[:-2], "header says 40 tokens"),
    "unknown_magic": (llmc_bytes(np.arange(40), magic=20240999), "unknown magic 20240999"),
}


@pytest.mark.parametrize("name", sorted(BAD_SHARDS))
def test_corrupt_shards_raise_value_error_naming_the_file(tmp_path, name):
    content, message = BAD_SHARDS[name]
    path = write(tmp_path / f"{name}.bin", content)
    with pytest.raises(ValueError, match=message) as err:
        TokenLoader(path, B, T)
    assert path in str(err.value)
    with pytest.raises(ValueError, match=message):
        _C.inspect_shard(path)
    with pytest.raises(ValueError, match=message):
        shard_layout(path)


def test_missing_files_and_empty_globs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        TokenLoader(str(tmp_path / "nope.bin"), B, T)
    with pytest.raises(FileNotFoundError, match=r"train_\*\.bin"):
        TokenLoader(str(tmp_path / "train_*.bin"), B, T)
    with pytest.raises(ValueError, match="is a directory"):
        TokenLoader(str(tmp_path), B, T)
    with pytest.raises(ValueError, match="no shard files"):
        TokenLoader([], B, T)
    with pytest.raises(FileNotFoundError):  # from C++: the OS error keeps its errno type
        _C.inspect_shard(str(tmp_path / "gone.bin"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size"),
    (dict(block_size=0), "block_size"),
    (dict(rank=3, world_size=3), "rank"),
    (dict(rank=-1), "rank"),
    (dict(world_size=0), "world_size"),
    (dict(sampler="epochs"), "sampler"),
    (dict(prefetch=0), "prefetch"),
    (dict(num_workers=0), "num_workers"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_raise_value_error_naming_them(mixed_shards, kwargs, message):
    args = dict(path_or_glob=mixed_shards, batch_size=B, block_size=T)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        TokenLoader(args.pop("path_or_glob"), args.pop("batch_size"), args.pop("block_size"), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_or_pinning_without_cuda_is_a_value_error(mixed_shards):
    with pytest.raises(ValueError, match="CUDA is not available"):
        TokenLoader(mixed_shards, B, T, device="cuda")
    with pytest.raises(ValueError, match="pin_memory"):
        TokenLoader(mixed_shards, B, T, pin_memory=True)


def test_block_size_longer_than_every_shard_is_an_error(mixed_shards):
    with pytest.raises(ValueError, match=r"block_size 211 needs shards of at least 212 tokens.*a\.bin"):
        TokenLoader(mixed_shards, B, 211)


def test_shards_too_short_for_a_window_are_skipped_with_a_warning(mixed_shards):
    with pytest.warns(UserWarning, match=r"skipping 2 shard\(s\).*b\.bin.*c\.bin"):
        loader = TokenLoader(mixed_shards, B, 200, sampler="shuffle")
    with loader:
        assert [os.path.basename(p) for p in loader.shard_paths] == ["a.bin"]
        got = take(loader, 3)
    assert_same_batches(got, reference_batches(mixed_shards, B, 200, sampler="shuffle"))


# ----------------------------------------------------------------- threads and shutdown --

def test_worker_errors_reach_python(mixed_shards):
    loader = TokenLoader(mixed_shards, B, T, prefetch=4, num_workers=2)
    first = take(loader, 1)
    loader._core.fail_at_batch(6)
    # every batch before the failed one still arrives, whichever worker got there first
    before = first + take(loader, 5)
    assert_same_batches(before, reference_batches(mixed_shards, B, T))
    with pytest.raises(RuntimeError, match="injected failure while filling batch 6"):
        next(loader)
    with pytest.raises(RuntimeError, match="injected failure"):
        next(loader)  # stays failed
    loader.close()


def test_close_is_idempotent_and_final(mixed_shards):
    loader = TokenLoader(mixed_shards, B, T)
    next(loader)
    loader.close()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


EXIT_SCRIPT = """
import sys, gc, gptfast
from gptfast.data import TokenLoader
pattern = sys.argv[1]
GLOBAL = TokenLoader(pattern, 4, 16, prefetch=3)           # alive at exit, never closed
next(GLOBAL)
cycle = TokenLoader(pattern, 4, 16, sampler="shuffle")      # kept alive by a reference cycle
cycle.self_ref = cycle
next(cycle)
del cycle
for _ in range(3):                                           # created and dropped
    loader = TokenLoader(pattern, 64, 16, num_workers=2)
    next(loader)
print("done", flush=True)
sys.exit(0)
"""

FORK_SCRIPT = """
import os, sys
from gptfast.data import TokenLoader
loader = TokenLoader(sys.argv[1], 4, 16, prefetch=2)
next(loader)
pid = os.fork()
if pid == 0:
    try:
        next(loader)
        print("child: next() worked", flush=True)
    except RuntimeError as err:
        print("child:", err, flush=True)
    del loader
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print("parent: child exit", os.waitstatus_to_exitcode(status), flush=True)
print("parent still works:", next(loader)[0].shape, flush=True)
"""


def test_interpreter_exit_joins_workers_without_hanging(mixed_shards):
    out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, mixed_shards], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"


def test_forked_child_gets_a_clear_error_and_exits(mixed_shards):
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT, mixed_shards], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "child: TokenLoader was created in another process" in out.stdout
    assert "parent: child exit 0" in out.stdout
    assert "parent still works: torch.Size([4, 16])" in out.stdout


def _rss_file_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_resident_memory_stays_bounded_over_a_long_read(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    np.random.default_rng(0).integers(0, 50257, 16 << 20, dtype=np.uint16).tofile(path)  # 32 MiB
    monkeypatch.setattr(data, "RSS_RELEASE_BYTES", 2 << 20)
    before = _rss_file_kb()
    with TokenLoader(str(path), 16, 1024, sampler="sequential", prefetch=2) as loader:
        peak = 0
        for x, _ in itertools.islice(loader, (16 << 20) // (16 * 1024)):  # the whole file
            peak = max(peak, _rss_file_kb() - before)
    assert peak < 12 << 10, f"file-backed RSS grew by {peak} kB reading a 32 MiB shard"


# ---------------------------------------------------- the device (narrow) path, on CPU --

def test_narrow_gather_and_widen_reproduce_the_batches(mixed_shards):
    """The CUDA path's pieces: uint16/uint32 (B, T+1) gather in C++, int64 widening."""
    core = _C.LoaderCore(data.resolve_paths(mixed_shards), B, T, "shuffle", 2, 0, 1, "narrow",
                         2, 2, 0)
    assert core.narrow_token_bytes == 4  # one shard is uint32
    make = lambda: torch.empty((B, T + 1), dtype=torch.int32)  # noqa: E731
    core.start([make(), make()], 0)
    got = []
    for _ in range(10):
        x, y = data.widen_tokens(core.next(make()))
        assert x.is_contiguous() and y.is_contiguous()
        got.append((x.numpy(), y.numpy()))
    core.close()
    assert_same_batches(got, reference_batches(mixed_shards, B, T, sampler="shuffle", seed=2))


def test_widen_tokens_restores_unsigned_ids():
    narrow16 = torch.tensor([[1, 40000, 65535]], dtype=torch.uint16).view(torch.int16)
    x, y = data.widen_tokens(narrow16)
    assert x.tolist() == [[1, 40000]] and y.tolist() == [[40000, 65535]] and x.dtype == torch.int64
    narrow32 = torch.tensor([[5, 2**32 - 2]], dtype=torch.int64).to(torch.int32)
    assert data.widen_tokens(narrow32)[1].tolist() == [[2**32 - 2]]


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["random", "shuffle"])
def test_cuda_loader_matches_reference(mixed_shards, sampler):
    with TokenLoader(mixed_shards, B, T, sampler=sampler, device="cuda", prefetch=2) as loader:
        got = []
        for x, y in itertools.islice(loader, 20):
            assert x.device.type == "cuda" and x.dtype == torch.int64 and x.is_contiguous()
            got.append((x.cpu().numpy(), y.cpu().numpy()))
    assert_same_batches(got, reference_batches(mixed_shards, B, T, sampler=sampler))


def test_token_loader_is_exported_lazily():
    assert gptfast.TokenLoader is TokenLoader


# ----------------------------------------------------------- files that change or block --

def _error_without_blocking(fn, fifo):
    """The exception fn() raises; fails if fn blocked opening the FIFO. A shell opens the FIFO
    read-write after 20 s (which never blocks, and gives a blocked reader its writer), so a
    regression fails the test instead of hanging it; a thread could not help, since a call
    blocked in C++ may hold the GIL."""
    rescue = subprocess.Popen(["sh", "-c", 'sleep 20; exec 3<>"$0"', fifo])
    try:
        try:
            fn()
            error = None
        except Exception as caught:  # noqa: BLE001
            error = caught
        blocked = rescue.poll() is not None
    finally:
        rescue.kill()
        rescue.wait()
    assert not blocked, "opening a FIFO blocked until a writer came"
    return error


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("opener", ["TokenLoader", "inspect_shard", "shard_layout"])
def test_fifo_fails_fast_with_value_error(tmp_path, opener):
    fifo = str(tmp_path / "train_000.bin")
    os.mkfifo(fifo)
    fn = {"TokenLoader": lambda: TokenLoader(fifo, B, T), "inspect_shard": lambda: _C.inspect_shard(fifo),
          "shard_layout": lambda: shard_layout(fifo)}[opener]
    error = _error_without_blocking(fn, fifo)
    assert isinstance(error, ValueError) and "not a regular file" in str(error), repr(error)
    assert fifo in str(error)


def test_shard_truncated_between_epochs_raises_instead_of_crashing(tmp_path):
    """Shrinks the shard by one token (the last page stays mapped, so no SIGBUS either way):
    the size check at the next epoch reports it."""
    tokens = np.arange(8 * T + 1, dtype="<u2")  # 8 windows: 2 batches an epoch
    path = write(tmp_path / "train.bin", tokens.tobytes())
    with TokenLoader(path, B, T, sampler="sequential", prefetch=1, num_workers=1) as loader:
        next(loader)  # the worker then fills batch 1 and waits for its slot
        os.truncate(path, tokens.nbytes - 2)
        next(loader)  # still epoch 0, filled before the truncation was checked
        with pytest.raises(RuntimeError, match=f"{path}: the shard shrank from 258 to 256 bytes"):
            next(loader)  # batch 2 starts epoch 1: its worker checks first
    with pytest.raises(RuntimeError, match="shrank"):  # and on a restart
        with TokenLoader(path, B, T, sampler="sequential") as loader:
            os.truncate(path, tokens.nbytes - 4)
            loader.load_state_dict(loader.state_dict())


def test_shard_replaced_by_rename_keeps_the_mapped_contents(tmp_path):
    tokens = np.arange(8 * T + 1, dtype="<u2")
    path = write(tmp_path / "train.bin", tokens.tobytes())
    with TokenLoader(path, B, T, sampler="sequential", prefetch=1, num_workers=1) as loader:
        first = next(loader)[0].clone()
        write(tmp_path / "new.bin", tokens[:T + 1].tobytes())
        os.replace(tmp_path / "new.bin", path)
        batches = [next(loader)[0] for _ in range(3)]  # through epoch 1, no error
    torch.testing.assert_close(batches[1], first)  # batch 2 repeats batch 0


# -------------------------------------------------------------------- align="eot" --

EOT = 50256


def with_documents(tokens, rng, rate=0.08, runs=True):
    """tokens with end-of-text tokens at random positions (never at 0): documents of random
    length, including one-token documents (runs of end-of-text tokens) when `runs`."""
    tokens = np.array(tokens)
    marks = np.flatnonzero(rng.random(len(tokens)) < rate)
    marks = marks[marks > 0]
    tokens[marks] = EOT
    if runs and len(marks):
        tokens[marks[0]:marks[0] + 3] = EOT
    return tokens


@pytest.fixture
def document_shards(tmp_path):
    """mixed_shards with documents: a.bin (first file, stream start: token 0 is not an
    end-of-text token), b.bin raw, c.bin uint32; odd lengths; ids tell positions apart."""
    rng = np.random.default_rng(18)
    write(tmp_path / "a.bin", llmc_bytes(with_documents(np.arange(1, 212), rng), MAGIC16))
    with_documents(20000 + np.arange(150), rng).astype("<u2").tofile(tmp_path / "b.bin")
    write(tmp_path / "c.bin", llmc_bytes(with_documents(70000 + np.arange(187), rng), MAGIC32))
    return str(tmp_path / "*.bin")


def aligned(**kwargs):
    return dict(align="eot", **kwargs)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("sampler", ["random", "sequential", "shuffle"])
def test_eot_aligned_loader_matches_reference(document_shards, sampler, world_size):
    for rank in range(world_size):
        kw = aligned(sampler=sampler, seed=5, rank=rank, world_size=world_size)
        with TokenLoader(document_shards, B, T, **kw) as loader:
            got = take(loader, 30)
        assert_same_batches(got, itertools.islice(reference_batches(document_shards, B, T, **kw), 30))
        for x, y in got:
            np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
            # every window starts a document: at an end-of-text token or at the stream start
            assert ((x[:, 0] == EOT) | (x[:, 0] == 1)).all(), x[:, 0]


def test_eot_aligned_windows_are_the_greedy_ones(document_shards):
    paths = data.resolve_paths(document_shards)
    expected = []
    for i, path in enumerate(paths):
        tokens = data.open_shard(path)
        starts = data.reference_document_starts(tokens, T, EOT, stream_start=i == 0)
        windows = data.reference_aligned_windows(starts, T)
        # the rule, restated: ascending, >= T apart, each the first start at or after the bound
        assert (np.diff(windows) >= T).all() and windows[0] == starts[0]
        for previous, window in zip(windows, windows[1:]):
            assert window == starts[starts >= previous + T][0]
        assert tokens[0] != EOT and (0 in starts) == (i == 0)
        assert (tokens[starts[starts > 0]] == EOT).all() and (starts + T + 1 <= len(tokens)).all()
        expected += [(i, int(w)) for w in windows]
    with TokenLoader(document_shards, 1, T, sampler="sequential", align="eot") as loader:
        assert loader.num_windows == len(expected)
        firsts = [x[0, :2].tolist() for x, _ in itertools.islice(loader, len(expected))]
    want = [data.open_shard(paths[s])[o:o + 2].astype(np.int64).tolist() for s, o in expected]
    assert firsts == want


@pytest.mark.parametrize("world_size", [1, 3])
def test_eot_aligned_shuffle_takes_every_window_once_per_epoch_across_ranks(document_shards, world_size):
    with TokenLoader(document_shards, B, T, sampler="sequential", align="eot") as loader:
        n = loader.num_windows
        windows = sorted(tuple(x[0].tolist()) for x, _ in itertools.islice(
            TokenLoader(document_shards, 1, T, sampler="sequential", align="eot"), n))
    per_rank = []
    batches = 3 * n // (B * world_size) + 1
    for rank in range(world_size):
        with TokenLoader(document_shards, B, T, sampler="shuffle", align="eot", seed=9, rank=rank,
                         world_size=world_size) as loader:
            per_rank.append([[tuple(row) for row in x.tolist()] for x, _ in itertools.islice(loader, batches)])
    stream = [row for k in range(batches) for rank in range(world_size) for row in per_rank[rank][k]]
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == windows  # disjoint across ranks, all of them, once
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("sampler", ["random", "shuffle"])
def test_eot_aligned_resume_mid_epoch(document_shards, sampler):
    kw = aligned(sampler=sampler, seed=4, rank=1, world_size=2)
    with TokenLoader(document_shards, B, T, **kw) as original:
        take(original, 2)
        state = original.state_dict()
        assert state["align"] == "eot" and state["eot_token"] == EOT
        assert state["epoch"] == (2 * 2 + 1) * B // original.num_windows
        expected = take(original, 10)
    with TokenLoader(document_shards, B, T, **kw) as resumed:
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 10), expected)
    assert_same_batches(expected, reference_batches(document_shards, B, T, start=2, **kw))
    with TokenLoader(document_shards, B, T, sampler=sampler, seed=4, rank=1, world_size=2) as plain:
        with pytest.raises(ValueError, match="align"):
            plain.load_state_dict(state)


def test_state_saved_before_align_existed_resumes_unaligned(mixed_shards):
    with TokenLoader(mixed_shards, B, T, sampler="shuffle") as loader:
        take(loader, 2)
        state = loader.state_dict()
        expected = take(loader, 3)
    del state["align"]
    with TokenLoader(mixed_shards, B, T, sampler="shuffle") as resumed:
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 3), expected)


def test_eot_random_picks_documents_uniformly_across_shards(document_shards):
    paths = data.resolve_paths(document_shards)
    starts = [data.reference_document_starts(data.open_shard(p), T, EOT, i == 0) for i, p in enumerate(paths)]
    with TokenLoader(document_shards, 64, T, sampler="random", align="eot", seed=2) as loader:
        assert loader.index_bytes >= 4 * sum(map(len, starts))  # uint32 offsets
        seconds = np.concatenate([x[:, 1].numpy() for x, _ in itertools.islice(loader, 40)])
    seconds = seconds[seconds != EOT]  # the id after the start tells the shard
    shard = np.select([seconds >= 70000, seconds >= 20000], [2, 1], 0)
    share = np.bincount(shard, minlength=3) / len(shard)
    counts = np.array([len(s) for s in starts])
    np.testing.assert_allclose(share, counts / counts.sum(), atol=0.06)


def test_eot_edges_of_a_shard(tmp_path):
    """A start is usable iff block_size + 1 tokens follow from it; only the first file's
    position 0 starts a document without an end-of-text token; uint32 token ids work."""
    n = 3 * T + 5
    first = np.arange(1, n + 1)
    first[[n - T - 1, n - T]] = EOT                      # the last usable position, one past it
    second = np.arange(100_000, 100_000 + n)             # uint32 ids, position 0 is no start
    second[[T + 2, n - T - 1]] = 70_000_000              # a uint32 end-of-text id
    second[0] = 70_000_000 + 1
    a = write(tmp_path / "a.bin", llmc_bytes(first, MAGIC32))
    b = write(tmp_path / "b.bin", llmc_bytes(second, MAGIC32))
    with TokenLoader([a], 1, T, sampler="sequential", align="eot") as loader:
        assert loader.num_windows == 2
        firsts = [x[0, :2].tolist() for x, _ in itertools.islice(loader, 2)]
    assert firsts == [[1, 2], [EOT, EOT]]
    with TokenLoader([b], 1, T, sampler="random", align="eot", eot_token=70_000_000) as loader:
        seen = {tuple(x[0, :2].tolist()) for x, _ in itertools.islice(loader, 60)}
    assert seen == {(70_000_001, 100_001), (70_000_000, 100_000 + T + 3),
                    (70_000_000, 100_000 + n - T)}
    with pytest.raises(ValueError, match="a.bin: align='eot' found no document start"):
        TokenLoader([b, a], 1, T, align="eot", eot_token=70_000_000)


def test_eot_bad_inputs_are_clear_errors(tmp_path, document_shards):
    with pytest.raises(ValueError, match="align must be None or 'eot'"):
        TokenLoader(document_shards, B, T, align="bos")
    with pytest.raises(ValueError, match="align must be None or 'eot'"):
        TokenLoader(document_shards, B, T, align="none")
    with pytest.raises(ValueError, match="eot_token"):
        TokenLoader(document_shards, B, T, align="eot", eot_token=-1)
    with pytest.raises(TypeError, match="eot_token"):
        TokenLoader(document_shards, B, T, align="eot", eot_token=1.5)
    # no end-of-text token anywhere (e.g. a character-level dataset): the stream start alone
    # would be a single window forever
    plain = write(tmp_path / "plain.bin", np.arange(300, dtype="<u2").tobytes())
    with pytest.raises(ValueError, match="no end-of-text token \\(id 50256\\)"):
        TokenLoader(plain, B, T, align="eot")
    with pytest.raises(ValueError, match="no end-of-text token"):
        next(reference_batches(plain, B, T, align="eot"))
    # a later shard without a usable start: named
    late = np.arange(300, dtype="<u2")
    late[300 - T] = EOT  # one token too late for a window
    later = write(tmp_path / "z_late.bin", late.tobytes())
    first = np.arange(300, dtype="<u2")
    first[40] = EOT
    earlier = write(tmp_path / "y_first.bin", first.tobytes())
    with pytest.raises(ValueError, match="z_late.bin: align='eot' found no document start"):
        TokenLoader([earlier, later], B, T, align="eot")
    with pytest.raises(ValueError, match="z_late.bin: align='eot' found no document start"):
        next(reference_batches([earlier, later], B, T, align="eot"))
    with pytest.warns(data.DocumentCoverageWarning, match="2 documents"):
        loader = TokenLoader([earlier], 1, T, sampler="sequential", align="eot")
    with loader:
        assert loader.num_windows == 2  # the stream start and token 40


def covered(n_tokens, offsets, width):
    """Tokens inside some window of `width` tokens at `offsets`, counted on a mask."""
    mask = np.zeros(n_tokens, bool)
    for offset in offsets:
        mask[offset:offset + width] = True
    return int(mask.sum())


@pytest.mark.parametrize("sampler", ["random", "sequential", "shuffle"])
def test_eot_coverage_of_many_short_documents_is_counted_and_not_warned(document_shards, sampler):
    paths = data.resolve_paths(document_shards)
    want_covered = want_documents = 0
    for i, path in enumerate(paths):
        tokens = data.open_shard(path)
        starts = data.reference_document_starts(tokens, T, EOT, stream_start=i == 0)
        offsets = starts if sampler == "random" else data.reference_aligned_windows(starts, T)
        want_covered += covered(len(tokens), offsets.tolist(), T + 1)
        want_documents += int((tokens == EOT).sum()) + (i == 0 and tokens[0] != EOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # many short documents: no coverage warning
        with TokenLoader(document_shards, B, T, sampler=sampler, align="eot") as loader:
            assert loader.covered_tokens == want_covered
            assert loader.num_documents == want_documents
            total = sum(len(data.open_shard(p)) for p in paths)
            assert want_covered >= data.MIN_ALIGNED_COVERAGE * total
    with TokenLoader(document_shards, B, T, sampler=sampler) as plain:
        assert (plain.covered_tokens, plain.num_documents) == (0, 0)


@pytest.mark.parametrize("sampler", ["random", "sequential"])
def test_eot_warns_with_the_numbers_when_few_long_documents_leave_most_tokens_unread(tmp_path, sampler):
    block, length = 64, 2000
    tokens = np.arange(3 * length) % 1000
    tokens[[length, 2 * length]] = EOT  # three documents: the stream start and two EOTs
    path = write(tmp_path / "long.bin", llmc_bytes(tokens, MAGIC16))
    with pytest.warns(data.DocumentCoverageWarning) as caught:
        loader = TokenLoader(path, 2, block, sampler=sampler, align="eot")
    with loader:
        assert loader.covered_tokens == 3 * (block + 1) and loader.num_documents == 3
    message = str(caught[0].message)
    percent = 100 * 3 * (block + 1) / (3 * length)
    assert (f"align='eot': usable windows cover {percent:.1f}% of the 6,000 tokens "
            f"(3 documents, block 64): the model trains on document openings only") in message
    assert caught[0].filename == __file__  # points at the caller's line
