#include "sampler.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>

namespace gptfast {

SamplerKind parse_sampler(const std::string& name) {
  if (name == "random") return SamplerKind::Random;
  if (name == "sequential") return SamplerKind::Sequential;
  if (name == "shuffle") return SamplerKind::Shuffle;
  throw std::invalid_argument("sampler must be 'random', 'sequential' or 'shuffle', got '" + name + "'");
}

Sampler::Sampler(SamplerConfig config, const std::vector<uint64_t>& shard_tokens,
                 std::vector<OffsetList> aligned)
    : config_(config), aligned_(std::move(aligned)) {
  const uint64_t T = config_.block_size;
  if (config_.align_eot != !aligned_.empty() || (!aligned_.empty() && aligned_.size() != shard_tokens.size())) {
    throw std::logic_error("Sampler: one aligned offset list per shard when (and only when) aligned");
  }
  window_start_.assign(1, 0);
  offset_start_.assign(1, 0);
  for (size_t s = 0; s < shard_tokens.size(); ++s) {
    const uint64_t n = shard_tokens[s];
    if (n < T + 1) throw std::logic_error("Sampler: shard shorter than block_size + 1");
    uint64_t windows = (n - 1) / T, offsets = n - T;
    if (config_.align_eot) {
      const OffsetList& list = aligned_[s];
      if (list.empty()) throw std::logic_error("Sampler: shard without an aligned window");
      aligned_bytes_ += list.bytes();
      const bool starts = config_.kind == SamplerKind::Random;
      windows = starts ? count_aligned_windows(list, T) : list.size();
      offsets = starts ? list.size() : 0;
    }
    window_start_.push_back(window_start_.back() + windows);
    offset_start_.push_back(offset_start_.back() + offsets);
  }
  if (shard_tokens.empty()) throw std::logic_error("Sampler: no shards");
  if (config_.kind == SamplerKind::Shuffle &&
      num_windows() > std::numeric_limits<uint32_t>::max()) {
    throw std::invalid_argument("sampler 'shuffle' supports at most 2^32 - 1 windows, got " +
                                std::to_string(num_windows()) +
                                "; use a larger block_size or sampler='random'");
  }
}

uint64_t Sampler::epoch_of(uint64_t batch) const {
  return (batch * config_.world_size + config_.rank) * config_.batch_size / num_windows();
}

WindowRef Sampler::window(uint64_t index) const {
  // the last shard whose first window is <= index
  auto it = std::upper_bound(window_start_.begin(), window_start_.end(), index);
  const size_t shard = static_cast<size_t>(it - window_start_.begin()) - 1;
  const uint64_t local = index - window_start_[shard];
  if (config_.align_eot) return {static_cast<uint32_t>(shard), aligned_[shard][local]};
  return {static_cast<uint32_t>(shard), local * config_.block_size};
}

WindowRef Sampler::offset_number(uint64_t number) const {
  auto it = std::upper_bound(offset_start_.begin(), offset_start_.end(), number);
  const size_t shard = static_cast<size_t>(it - offset_start_.begin()) - 1;
  const uint64_t local = number - offset_start_[shard];
  if (config_.align_eot) return {static_cast<uint32_t>(shard), aligned_[shard][local]};
  return {static_cast<uint32_t>(shard), local};
}

std::shared_ptr<const std::vector<uint32_t>> Sampler::permutation(uint64_t epoch) const {
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    for (const auto& [cached_epoch, perm] : cache_) {
      if (cached_epoch == epoch) return perm;
    }
  }
  // Computed outside the lock: another worker may be reading the other cached epoch.
  const uint64_t n = num_windows();
  auto perm = std::make_shared<std::vector<uint32_t>>(n);
  std::iota(perm->begin(), perm->end(), 0u);
  const uint64_t key = splitmix64(splitmix64(config_.seed) ^ epoch);
  for (uint64_t m = 0; m + 1 < n; ++m) {
    const uint64_t i = n - 1 - m;
    const uint64_t j = splitmix64_draw(key, m) % (i + 1);
    std::swap((*perm)[i], (*perm)[j]);
  }
  std::lock_guard<std::mutex> lock(cache_mutex_);
  for (const auto& [cached_epoch, cached] : cache_) {
    if (cached_epoch == epoch) return cached;  // another worker finished first
  }
  cache_.emplace_back(epoch, perm);
  if (cache_.size() > 2) cache_.pop_front();
  return perm;
}

void Sampler::batch_windows(uint64_t batch, WindowRef* out) const {
  const uint64_t B = config_.batch_size;
  if (config_.kind == SamplerKind::Random) {
    const uint64_t key = splitmix64(splitmix64(splitmix64(config_.seed) ^ config_.rank) ^ batch);
    const uint64_t offsets = offset_start_.back();
    for (uint64_t i = 0; i < B; ++i) out[i] = offset_number(splitmix64_draw(key, i) % offsets);
    return;
  }
  const uint64_t n = num_windows();
  const uint64_t first = (batch * config_.world_size + config_.rank) * B;
  std::shared_ptr<const std::vector<uint32_t>> perm;
  uint64_t perm_epoch = 0;
  for (uint64_t i = 0; i < B; ++i) {
    const uint64_t position = first + i;
    const uint64_t epoch = position / n;
    uint64_t index = position % n;
    if (config_.kind == SamplerKind::Shuffle) {
      if (!perm || perm_epoch != epoch) {
        perm = permutation(epoch);
        perm_epoch = epoch;
      }
      index = (*perm)[index];
    }
    out[i] = window(index);
  }
}

}  // namespace gptfast
