// Which windows of the token stream make up batch k on a given rank: the three samplers,
// defined exactly so that the numpy reference (gptfast/data.py) reproduces them bit for bit.
//
// Terms. Shards are the usable shards in order (those with at least block_size + 1 tokens);
// n_s is the token count of shard s and T the block size. A window is T + 1 consecutive
// tokens of one shard (x = the first T, y = the last T); windows never span shards.
//
// Randomness is splitmix64 (Steele et al.; the generator java.util.SplittableRandom uses):
//   mix(z):  z += 0x9E3779B97F4A7C15; z = (z ^ z>>30) * 0xBF58476D1CE4E5B9;
//            z = (z ^ z>>27) * 0x94D049BB133111EB; return z ^ z>>31      (all mod 2^64)
//   draw(key, m) = mix(key + m * 0x9E3779B97F4A7C15): the m-th output (m = 0, 1, ...) of the
//   splitmix64 generator seeded with key. Integers in [0, n) are draw % n (bias < n / 2^64).
//
// random      offsets o in [0, n_s - T) of every shard, numbered consecutively across shards
//             (V = sum of n_s - T offsets), so a shard is chosen in proportion to its offsets.
//             Batch k on rank r: key = mix(mix(mix(seed) ^ r) ^ k); row i is offset number
//             draw(key, i) % V. Independent of every other batch, so resuming is free.
// sequential  non-overlapping windows: shard s has floor((n_s - 1) / T) of them, window j of it
//             starting at token j * T (a tail shorter than T + 1 tokens is skipped); windows
//             are numbered across shards in order, N in all. The stream of window positions
//             p = 0, 1, 2, ... runs through the windows in order, epoch after epoch:
//             position p is window p % N of epoch p / N.
// shuffle     the same windows and the same stream, but position p is window perm_e[p % N]
//             with e = p / N: perm_e is a Fisher-Yates shuffle of 0..N-1 with
//             key = mix(mix(seed) ^ e): for m = 0 .. N-2, i = N-1-m, j = draw(key, m) % (i+1),
//             swap(perm[i], perm[j]). A fresh permutation every epoch, the same on every rank.
//
// Ranks (sequential and shuffle): batch k on rank r holds stream positions
// (k * world_size + r) * B + i, i = 0..B-1. All ranks together take every position exactly
// once, so each window is used exactly once per epoch across ranks. A batch that reaches past
// the end of an epoch simply continues into the next epoch (the stream has no seams); the
// epoch of batch k is that of its first position. The random sampler uses the same formula
// for its epoch (windows' worth of samples drawn so far, over N).
//
// Aligned (align="eot", documents.h): the same three samplers over document-aligned windows.
// random draws offset numbers among the usable document starts instead of all offsets;
// sequential and shuffle walk the greedy aligned windows instead of the windows at j * T; N is
// the number of aligned windows for all three. Everything else (keys, ranks, epochs) is as above.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "documents.h"

namespace gptfast {

enum class SamplerKind { Random, Sequential, Shuffle };

// "random" | "sequential" | "shuffle"; throws std::invalid_argument otherwise.
SamplerKind parse_sampler(const std::string& name);

inline constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64(uint64_t z) {
  z += kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t splitmix64_draw(uint64_t key, uint64_t m) { return splitmix64(key + m * kGolden); }

struct WindowRef {
  uint32_t shard;   // index into the usable shards
  uint64_t offset;  // first token of the window within the shard
};

struct SamplerConfig {
  SamplerKind kind = SamplerKind::Random;
  uint64_t batch_size = 1;
  uint64_t block_size = 1;
  uint64_t seed = 0;
  uint64_t rank = 0;
  uint64_t world_size = 1;
  bool align_eot = false;
  uint64_t eot_token = 50256;
};

class Sampler {
 public:
  // shard_tokens: token counts of the usable shards, each >= block_size + 1.
  // aligned: empty unless config.align_eot; then per usable shard its usable document starts
  // (random) or its aligned windows (sequential, shuffle), each list non-empty.
  Sampler(SamplerConfig config, const std::vector<uint64_t>& shard_tokens,
          std::vector<OffsetList> aligned = {});

  uint64_t num_windows() const { return window_start_.back(); }
  // Bytes held by the document index (0 when not aligned).
  size_t index_bytes() const { return aligned_bytes_; }
  uint64_t epoch_of(uint64_t batch) const;
  // Fills out[0..batch_size) with the windows of `batch` on this rank. Thread-safe.
  void batch_windows(uint64_t batch, WindowRef* out) const;

 private:
  WindowRef window(uint64_t index) const;
  WindowRef offset_number(uint64_t number) const;
  std::shared_ptr<const std::vector<uint32_t>> permutation(uint64_t epoch) const;

  SamplerConfig config_;
  std::vector<uint64_t> window_start_;  // [s] = windows in shards before s; back() = N
  std::vector<uint64_t> offset_start_;  // [s] = random offsets in shards before s; back() = V
  std::vector<OffsetList> aligned_;      // see the constructor; empty when not aligned
  size_t aligned_bytes_ = 0;
  mutable std::mutex cache_mutex_;
  // the permutations of the last two epochs asked for (a batch can straddle two epochs)
  mutable std::deque<std::pair<uint64_t, std::shared_ptr<const std::vector<uint32_t>>>> cache_;
};

}  // namespace gptfast
