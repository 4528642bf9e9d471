"""Token shards in, (x, y) batches out: ``TokenLoader`` and its pure-numpy reference.

Shard formats (little-endian), read by both:

    nanoGPT raw .bin   uint16 tokens, no header
    llm.c shard        int32 header[256] (1024 bytes), then tokens;
                       header[0] = 20240520 and header[1] = 1: uint16 tokens
                       header[0] = 20240801 and header[1] = 7: uint32 tokens
                       header[2] = token count (the file is exactly 1024 + count * width bytes)

A file whose first int32 is one of the two magics is an llm.c shard; one without a known magic
whose header[2] is a positive count matching the file size is an llm.c shard with a bad magic
(an error); anything else is raw nanoGPT uint16. (GPT-2 token streams can't look like a
magic: read as uint16 pairs the magics contain 55128 and 55329, beyond GPT-2's 50256.)

Samplers, ranks and epochs are defined exactly in ``csrc/sampler.h``; in short:

- ``"random"``: B windows at uniformly random offsets (nanoGPT's get_batch); a shard is
  picked in proportion to its number of valid offsets. Batch k on rank r is a pure function
  of (seed, r, k) through splitmix64.
- ``"sequential"``: non-overlapping windows (window j of a shard starts at token j*T; a tail
  shorter than T+1 tokens is skipped; windows never span shards), in order, forever.
- ``"shuffle"``: the same windows, each exactly once per epoch, in a Fisher-Yates permutation
  seeded by (seed, epoch); a new permutation every epoch.

For sequential and shuffle, batch k on rank r holds the stream positions
(k*world_size + r)*B ... + B-1; a batch that runs past the end of an epoch continues with the
first positions of the next epoch (so every rank sees the same number of windows and all ranks
together take each window exactly once per epoch).

Shards shorter than block_size + 1 tokens are skipped with a warning; if none is long enough,
``ValueError``.

``align="eot"`` (all three samplers; defined exactly in ``csrc/documents.h``): windows start
at document starts. A document starts at position 0 of the stream (token 0 of the first shard
file given) and at every end-of-text token ``eot_token`` (default 50256, GPT-2's
``<|endoftext|>``): the end-of-text token is the first token of the document it precedes, the
rule ``GPTConfig(attention="document")`` uses for its document ids, so x[:, 0] is always the
first token of a document.

- ``"random"`` draws among the usable document starts (those with block_size + 1 tokens
  after them in their shard), numbered across shards; a shard is picked in proportion to them.
- ``"sequential"``/``"shuffle"`` use greedy non-overlapping aligned windows: a shard's first
  usable start, then each time the first usable start at least block_size tokens after the
  previous window's start. The text between a window's end and the next document start is not
  read that epoch (long documents are read from their start only).

The index of starts is built in C++ by one scan of every shard when the loader opens (on up to
num_workers threads; the shard's pages are released afterwards) and kept compact in memory:
4 bytes per usable start (random) or aligned window (sequential, shuffle), 8 for shards of
2^32 tokens or more. A shard with no usable document start, or data where no end-of-text token
starts a window at all (wrong ``eot_token``), is a ``ValueError``.

Coverage: the tokens the aligned windows can ever read (the union of the block_size + 1 tokens
at every usable start, or at every aligned window) are ``covered_tokens``. When they are less
than half of the tokens (few, long documents: only their openings are read), opening the
loader warns with the numbers (:class:`DocumentCoverageWarning`).
"""

from __future__ import annotations

import atexit
import errno
import glob
import os
import stat
import warnings
import weakref
from collections import deque
from typing import Iterator, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

SAMPLERS = ("random", "sequential", "shuffle")
ALIGNS = (None, "eot")
GPT2_EOT = 50256
LLMC_MAGIC_UINT16 = 20240520
LLMC_MAGIC_UINT32 = 20240801
LLMC_VERSION = {LLMC_MAGIC_UINT16: 1, LLMC_MAGIC_UINT32: 7}
LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4

# Workers drop the mapped pages from the process after reading this many bytes of windows
# (the page cache keeps them), so a long run's resident memory does not grow with the data.
RSS_RELEASE_BYTES = 256 << 20

STATE_VERSION = 1

# align="eot" warns when its windows can read less than this fraction of the tokens
MIN_ALIGNED_COVERAGE = 0.5


class DocumentCoverageWarning(UserWarning):
    """align="eot": the document-aligned windows cover little of the data (few, long documents)."""


# ------------------------------------------------------------------------------ files --

def resolve_paths(path_or_glob: PathLike | Sequence[PathLike]) -> list[str]:
    """Shard paths from a path, a glob pattern, or a list of them (globs sorted by name)."""
    items = [path_or_glob] if isinstance(path_or_glob, (str, os.PathLike)) else list(path_or_glob)
    if not items:
        raise ValueError("path_or_glob: no shard files given")
    paths = []
    for item in items:
        item = os.fspath(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(errno.ENOENT, "no shard files match the pattern", item)
            paths += matches
        elif os.path.isdir(item):
            raise ValueError(f"{item}: is a directory; pass a glob such as "
                             f"{os.path.join(item, 'train_*.bin')!r}")
        elif not os.path.exists(item):
            raise FileNotFoundError(errno.ENOENT, "no such shard file", item)
        else:
            paths.append(item)
    return paths


def shard_layout(path: PathLike) -> tuple[np.dtype, int, int]:
    """(token dtype, header bytes, token count) of a shard, by the rule in the module doc."""
    path = os.fspath(path)
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):  # open() of a FIFO would wait for a writer forever
        raise ValueError(f"{path}: not a regular file (a FIFO, socket or device can't be "
                         f"memory-mapped)")
    size = info.st_size
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(LLMC_HEADER_BYTES) + bytes(LLMC_HEADER_BYTES), "<i4",
                               count=LLMC_HEADER_INTS)
    magic = int(header[0]) if size >= 4 else 0
    if magic in LLMC_VERSION:
        dtype = np.dtype("<u2" if magic == LLMC_MAGIC_UINT16 else "<u4")
        if size < LLMC_HEADER_BYTES:
            raise ValueError(f"{path}: llm.c shard (magic {magic}) is truncated: {size} bytes, "
                             f"shorter than its {LLMC_HEADER_BYTES}-byte header")
        if int(header[1]) != LLMC_VERSION[magic]:
            raise ValueError(f"{path}: llm.c shard with magic {magic} has version {int(header[1])}; "
                             f"expected {LLMC_VERSION[magic]}")
        count = int(header[2])
        if count < 0 or size - LLMC_HEADER_BYTES != count * dtype.itemsize:
            raise ValueError(f"{path}: llm.c header says {count} tokens but the file holds "
                             f"{size - LLMC_HEADER_BYTES} bytes after the header")
        return dtype, LLMC_HEADER_BYTES, count
    count = int(header[2])
    if size > LLMC_HEADER_BYTES and count > 0 and size - LLMC_HEADER_BYTES in (2 * count, 4 * count):
        raise ValueError(f"{path}: looks like an llm.c shard (header token count {count} matches "
                         f"the file size) but has unknown magic {magic}")
    if size % 2:
        raise ValueError(f"{path}: raw nanoGPT file of {size} bytes is not a whole number of "
                         f"uint16 tokens")
    return np.dtype("<u2"), 0, size // 2


def open_shard(path: PathLike) -> np.ndarray:
    """The tokens of a shard as a read-only numpy memmap (uint16 or uint32)."""
    dtype, offset, count = shard_layout(path)
    if count == 0:
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


# ------------------------------------------------------------------- reference (numpy) --

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(z) -> np.ndarray:
    """splitmix64's output function of z + golden, elementwise over uint64 (mod 2^64)."""
    z = np.asarray(z, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    """mix(...mix(mix(p0) ^ p1)... ^ pn), the keys of csrc/sampler.h."""
    key = splitmix64(parts[0])
    for part in parts[1:]:
        key = splitmix64(key ^ np.uint64(part))
    return key[0]


def _draws(key: np.uint64, count: int) -> np.ndarray:
    """The first `count` outputs of the splitmix64 generator seeded with key."""
    with np.errstate(over="ignore"):
        return splitmix64(key + np.arange(count, dtype=np.uint64) * _GOLDEN)


def reference_permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle sampler's permutation of epoch `epoch` (Fisher-Yates, csrc/sampler.h)."""
    perm = np.arange(num_windows, dtype=np.int64)
    draws = _draws(_key(seed, epoch), max(num_windows - 1, 0))
    for m in range(num_windows - 1):
        i = num_windows - 1 - m
        j = int(draws[m] % np.uint64(i + 1))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def reference_document_starts(tokens: np.ndarray, block_size: int, eot_token: int,
                              stream_start: bool) -> np.ndarray:
    """Usable document starts of one shard (align="eot"): 0 if it starts the stream, and
    every end-of-text position p with p + block_size + 1 <= len(tokens)."""
    usable = max(len(tokens) - block_size, 0)
    starts = set(np.flatnonzero(np.asarray(tokens[:usable]) == eot_token).tolist())
    if stream_start and usable > 0:
        starts.add(0)
    return np.array(sorted(starts), dtype=np.int64)


def reference_aligned_windows(starts: np.ndarray, block_size: int) -> np.ndarray:
    """Greedy aligned windows: the first start, then the first start >= previous + block_size."""
    windows = []
    for start in starts.tolist():
        if not windows or start >= windows[-1] + block_size:
            windows.append(start)
    return np.array(windows, dtype=np.int64)


def reference_batches(path_or_glob, batch_size: int, block_size: int, *, sampler: str = "random",
                      seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                      align: str | None = None,
                      eot_token: int = GPT2_EOT) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batches TokenLoader yields, from batch `start` on, as int64 numpy (x, y): an
    independent, slow, obviously-correct implementation for tests."""
    T, B = block_size, batch_size
    paths = resolve_paths(path_or_glob)
    opened = [(i, open_shard(p)) for i, p in enumerate(paths)]
    usable = [(i, s) for i, s in opened if len(s) >= T + 1]
    shards = [s for _, s in usable]
    if not shards:
        raise ValueError(f"block_size {T}: no shard has {T + 1} tokens")
    if align == "eot":
        starts = [reference_document_starts(s, T, eot_token, stream_start=i == 0)
                  for i, s in usable]
        for (i, _), found in zip(usable, starts):
            if len(found) == 0:
                raise ValueError(f"{paths[i]}: align='eot' found no document start")
        if not any((np.asarray(s)[found] == eot_token).any() for s, found in zip(shards, starts)):
            raise ValueError(f"align='eot': no end-of-text token (id {eot_token}) starts a window")
        windows = [reference_aligned_windows(found, T) for found in starts]
        window_offsets = lambda shard, j: int(windows[shard][j])  # noqa: E731
        start_offsets = lambda shard, j: int(starts[shard][j])  # noqa: E731
        windows_per_shard = [len(w) for w in windows]
        offsets_per_shard = [len(found) for found in starts]
    elif align is None:
        window_offsets = lambda shard, j: j * T  # noqa: E731
        start_offsets = lambda shard, j: j  # noqa: E731
        windows_per_shard = [(len(s) - 1) // T for s in shards]
        offsets_per_shard = [len(s) - T for s in shards]
    else:
        raise ValueError(f"align must be None or 'eot', got {align!r}")
    window_start = np.concatenate([[0], np.cumsum(windows_per_shard)])
    offset_start = np.concatenate([[0], np.cumsum(offsets_per_shard)])
    num_windows = int(window_start[-1])
    permutations: dict[int, np.ndarray] = {}

    def window(index):
        shard = int(np.searchsorted(window_start, index, side="right")) - 1
        return shard, window_offsets(shard, index - int(window_start[shard]))

    def batch_refs(k):
        if sampler == "random":
            numbers = _draws(_key(seed, rank, k), B) % np.uint64(offset_start[-1])
            refs = []
            for number in map(int, numbers):
                shard = int(np.searchsorted(offset_start, number, side="right")) - 1
                refs.append((shard, start_offsets(shard, number - int(offset_start[shard]))))
            return refs
        refs = []
        for position in range((k * world_size + rank) * B, (k * world_size + rank + 1) * B):
            epoch, index = divmod(position, num_windows)
            if sampler == "shuffle":
                if epoch not in permutations:
                    permutations.clear()
                    permutations[epoch] = reference_permutation(num_windows, seed, epoch)
                index = int(permutations[epoch][index])
            refs.append(window(index))
        return refs

    k = start
    while True:
        rows = np.stack([shards[s][o:o + T + 1].astype(np.int64) for s, o in batch_refs(k)])
        yield rows[:, :-1].copy(), rows[:, 1:].copy()
        k += 1


# ------------------------------------------------------------------------ TokenLoader --

_OPEN_LOADERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_loaders():
    for loader in list(_OPEN_LOADERS):
        loader.close()


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def widen_tokens(narrow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) int16/int32 holding uint16/uint32 token bits -> int64 (x, y), each (B, T)
    and contiguous, views of one (2, B, T) tensor on narrow's device."""
    batch, width = narrow.shape
    out = torch.empty((2, batch, width - 1), dtype=torch.int64, device=narrow.device)
    out[0].copy_(narrow[:, :-1])
    out[1].copy_(narrow[:, 1:])
    # int16/int32 -> int64 sign-extends; the mask restores the unsigned token ids
    out.bitwise_and_(0xFFFF if narrow.dtype == torch.int16 else 0xFFFFFFFF)
    return out[0], out[1]


class TokenLoader:
    """Endless iterator of (x, y) int64 batches of shape (batch_size, block_size) on `device`.

    ``TokenLoader(path_or_glob, batch_size, block_size, *, sampler="random", seed=0, rank=0,
    world_size=1, device="cpu", prefetch=4, pin_memory=None, num_workers=None, align=None,
    eot_token=50256)``

    path_or_glob: a shard, a glob (``"data/train_*.bin"``, sorted by name) or a list of them.
    prefetch: batches gathered ahead by the C++ workers (the ring's slots); num_workers:
    gathering threads (default min(prefetch, 4, CPU count)). pin_memory: page-locked host
    buffers; default on when `device` is CUDA. align: None (windows anywhere) or ``"eot"``
    (every window starts at a document start: see the module doc); eot_token: the
    end-of-text token id that ``"eot"`` looks for.

    On CPU the workers write int64 x and y directly into the tensors you get back (no extra
    pass). On CUDA they gather uint16/uint32 (B, T+1) windows into pinned buffers, which are
    copied non_blocking on the current stream and widened on the GPU; x and y are views of
    one (2, B, T) device tensor. Every batch's buffer is yours: the loader never writes into a
    tensor it has handed out (its ring slot takes a fresh buffer), and a pinned buffer is kept
    until the CUDA event recorded after its copy has completed.

    ``epoch``/``position``: the epoch and index of the next batch. ``state_dict()`` /
    ``load_state_dict()`` resume with exactly the batches that would have come next; the state
    holds the shared batch position, so a state saved on any rank resumes every rank.

    Shards must be regular files: a FIFO, socket or device raises ValueError at once (it is
    never opened for a blocking read). The shards are memory-mapped, so they must not change
    while a loader reads them: truncating a mapped shard makes the next read past its new end
    raise SIGBUS, which kills the process, and no Python exception can catch that. The
    workers re-check every shard's size at start and once per epoch and raise RuntimeError
    (from the next ``next()``) if one shrank, which catches a truncation between epochs but
    not one racing with the reads. Replacing a shard by writing a new file and renaming it
    over the old one is safe (the mapping keeps the old file); the loader keeps reading the
    old contents until it is recreated.
    """

    def __init__(self, path_or_glob, batch_size: int, block_size: int, *, sampler: str = "random",
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", prefetch: int = 4,
                 pin_memory: bool | None = None, num_workers: int | None = None,
                 align: str | None = None, eot_token: int = GPT2_EOT):
        self._core = None
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.block_size = _check_int("block_size", block_size, 1)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.sampler = sampler
        if align not in ALIGNS:
            raise ValueError(f"align must be None or 'eot', got {align!r}")
        self.align = align
        self.eot_token = _check_int("eot_token", eot_token, 0, 2**32 - 1)
        self.seed = _check_int("seed", seed, 0, 2**64 - 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size ({self.world_size}), got {self.rank}")
        self.prefetch = _check_int("prefetch", prefetch, 1)
        num_workers = min(self.prefetch, 4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.num_workers = _check_int("num_workers", num_workers, 1)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available")
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA, which is not available")
        paths = resolve_paths(path_or_glob)

        try:
            from . import _C
        except ImportError as err:
            raise ImportError("TokenLoader needs the compiled extension gptfast._C; reinstall "
                              "gptfast with pip to build it") from err
        self._layout = "int64_pair" if self.device.type == "cpu" else "narrow"
        self._core = _C.LoaderCore(paths, self.batch_size, self.block_size, sampler, self.seed,
                                   self.rank, self.world_size, self._layout, self.prefetch,
                                   self.num_workers, RSS_RELEASE_BYTES, align or "none",
                                   self.eot_token)
        if self._core.skipped_paths:
            warnings.warn(f"TokenLoader: skipping {len(self._core.skipped_paths)} shard(s) shorter "
                          f"than block_size + 1 = {self.block_size + 1} tokens: "
                          f"{', '.join(self._core.skipped_paths)}", stacklevel=2)
        if self.align == "eot":
            self._warn_if_poorly_covered()
        self._narrow_dtype = torch.int16 if self._core.narrow_token_bytes == 2 else torch.int32
        self._in_flight: deque = deque()  # (CUDA event, pinned buffer) of copies not yet done
        self._pid = os.getpid()
        self._core.start([self._new_buffer() for _ in range(self.prefetch)], 0)
        _OPEN_LOADERS.add(self)

    def _warn_if_poorly_covered(self) -> None:
        total = sum(self._core.shard_tokens)
        covered = self._core.covered_tokens
        if covered >= MIN_ALIGNED_COVERAGE * total:
            return
        warnings.warn(f"align='eot': usable windows cover {100 * covered / total:.1f}% of the "
                      f"{total:,} tokens ({self._core.num_documents:,} documents, block "
                      f"{self.block_size}): the model trains on document openings only; use "
                      f"shorter documents, a smaller block_size, or no align",
                      DocumentCoverageWarning, stacklevel=3)

    # -- iteration --

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        core = self._live_core()
        buffer = core.next(self._new_buffer())
        if self._layout == "int64_pair":
            return buffer[0], buffer[1]
        return self._to_device(buffer)

    def _new_buffer(self) -> torch.Tensor:
        B, T = self.batch_size, self.block_size
        if self._layout == "int64_pair":
            return torch.empty((2, B, T), dtype=torch.int64, pin_memory=self.pin_memory)
        return torch.empty((B, T + 1), dtype=self._narrow_dtype, pin_memory=self.pin_memory)

    def _to_device(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        narrow = buffer.to(self.device, non_blocking=self.pin_memory)
        if self.device.type == "cuda" and self.pin_memory:
            while self._in_flight and self._in_flight[0][0].query():
                self._in_flight.popleft()
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._in_flight.append((event, buffer))
        return widen_tokens(narrow)

    def _live_core(self):
        if self._core is None or not self._core.running:
            raise RuntimeError("TokenLoader is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("TokenLoader was created in another process (its worker threads "
                               "do not survive fork); create the loader after forking")
        return self._core

    # -- position and resumption --

    @property
    def position(self) -> int:
        """Index of the next batch this loader yields (batches yielded so far)."""
        return self._live_core().position

    @property
    def epoch(self) -> int:
        """Epoch of the next batch's first window: (position*world_size + rank)*B // num_windows."""
        core = self._live_core()
        return core.epoch_of(core.position)

    @property
    def num_windows(self) -> int:
        """Non-overlapping windows of block_size + 1 tokens over the usable shards (one epoch)."""
        return self._core.num_windows

    @property
    def index_bytes(self) -> int:
        """Host memory held by the align="eot" document index (0 without align)."""
        return self._core.index_bytes

    @property
    def num_documents(self) -> int:
        """align="eot": document starts in the shards in use (0 without align)."""
        return self._core.num_documents

    @property
    def covered_tokens(self) -> int:
        """align="eot": tokens inside some window this sampler can produce (0 without align)."""
        return self._core.covered_tokens

    @property
    def shard_paths(self) -> list[str]:
        """The shards in use (shorter ones skipped)."""
        return list(self._core.shard_paths)

    def _identity(self) -> dict:
        identity = {"sampler": self.sampler, "seed": self.seed, "batch_size": self.batch_size,
                    "block_size": self.block_size, "world_size": self.world_size,
                    "shard_tokens": list(self._core.shard_tokens), "align": self.align}
        if self.align == "eot":
            identity["eot_token"] = self.eot_token
        return identity

    def state_dict(self) -> dict:
        core = self._live_core()
        return {"version": STATE_VERSION, "position": core.position,
                "epoch": core.epoch_of(core.position), **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state["position"]; everything else in the state must match this loader."""
        core = self._live_core()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} is not {STATE_VERSION}")
        state = {"align": None, **state}  # states saved before align existed
        for name, mine in self._identity().items():
            if name not in state:
                raise ValueError(f"state has no {name!r}")
            if state[name] != mine:
                raise ValueError(f"state was saved with {name}={state[name]!r}, this loader has "
                                 f"{name}={mine!r}; construct it with the same arguments and data")
        position = _check_int("state['position']", state.get("position"), 0)
        core.start([self._new_buffer() for _ in range(self.prefetch)], position)

    # -- shutdown --

    def close(self) -> None:
        """Joins the worker threads; the loader can't be used afterwards. Idempotent."""
        if self._core is not None:
            self._core.close()
        _OPEN_LOADERS.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_core", None) is not None and os.getpid() == getattr(self, "_pid", None):
            self._core.close()

    def __repr__(self):
        return (f"TokenLoader({len(self._core.shard_paths) if self._core else 0} shards, "
                f"batch_size={self.batch_size}, block_size={self.block_size}, "
                f"sampler={self.sampler!r}, rank={self.rank}/{self.world_size}, device={self.device}"
                + (f", align={self.align!r}, eot_token={self.eot_token}" if self.align else "") + ")")
