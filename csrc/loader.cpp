#include "loader.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>

namespace gptfast {

namespace {

void validate(const LoaderConfig& config) {
  const SamplerConfig& s = config.sampler;
  if (config.paths.empty()) throw std::invalid_argument("no shard files given");
  if (s.batch_size < 1) throw std::invalid_argument("batch_size must be >= 1");
  if (s.block_size < 1) throw std::invalid_argument("block_size must be >= 1");
  if (s.world_size < 1) throw std::invalid_argument("world_size must be >= 1");
  if (s.rank >= s.world_size) {
    throw std::invalid_argument("rank " + std::to_string(s.rank) + " must be < world_size " +
                                std::to_string(s.world_size));
  }
  if (config.prefetch < 1) throw std::invalid_argument("prefetch must be >= 1");
  if (config.num_threads < 1) throw std::invalid_argument("num_workers must be >= 1");
}

std::vector<Shard> open_usable_shards(const LoaderConfig& config, std::vector<std::string>& skipped) {
  const uint64_t needed = config.sampler.block_size + 1;
  std::vector<Shard> usable;
  uint64_t longest = 0;
  std::string longest_path;
  for (const std::string& path : config.paths) {
    Shard shard(path);
    if (shard.num_tokens() >= longest) {
      longest = shard.num_tokens();
      longest_path = path;
    }
    if (shard.num_tokens() < needed) {
      skipped.push_back(path);
    } else {
      usable.push_back(std::move(shard));
    }
  }
  if (usable.empty()) {
    throw std::invalid_argument(
        "block_size " + std::to_string(config.sampler.block_size) + " needs shards of at least " +
        std::to_string(needed) + " tokens, but the longest of the " +
        std::to_string(config.paths.size()) + " file(s) has " + std::to_string(longest) + " (" +
        longest_path + ")");
  }
  return usable;
}

// The access pattern of the samplers' reads, set once the shards are opened and indexed.
void advise_reads(const LoaderConfig& config, const std::vector<Shard>& shards) {
  const int advice = config.sampler.kind == SamplerKind::Sequential ? MADV_SEQUENTIAL : MADV_RANDOM;
  for (const Shard& shard : shards) shard.advise(advice);
}

// align="eot": per usable shard its usable document starts (random) or aligned windows
// (sequential, shuffle), found by scanning the shards on up to num_threads threads. Throws
// std::invalid_argument naming the shard when one has no usable document start, and when no
// end-of-text token starts a window anywhere (wrong eot_token, or data without separators).
// Fills `stats` (documents found, tokens the windows cover).
std::vector<OffsetList> document_index(const LoaderConfig& config, const std::vector<Shard>& shards,
                                       AlignStats& stats) {
  std::vector<OffsetList> index;
  if (!config.sampler.align_eot) return index;
  const uint64_t T = config.sampler.block_size, eot = config.sampler.eot_token;
  std::vector<DocumentStarts> found(shards.size());
  std::atomic<size_t> next_shard{0};
  std::vector<std::exception_ptr> errors(std::min(config.num_threads, shards.size()));
  std::vector<std::thread> scanners;
  for (size_t t = 0; t < errors.size(); ++t) {
    scanners.emplace_back([&, t] {
      try {
        for (size_t s = next_shard++; s < shards.size(); s = next_shard++) {
          // position 0 of the stream: the first file given, if it is usable
          const bool stream_start = s == 0 && shards[0].path() == config.paths[0];
          found[s] = find_document_starts(shards[s], eot, T, stream_start);
        }
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (std::thread& scanner : scanners) scanner.join();
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  uint64_t eot_starts = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    if (found[s].starts.empty()) {
      throw std::invalid_argument(
          shards[s].path() + ": align='eot' found no document start (end-of-text token " +
          std::to_string(eot) + ") with block_size + 1 = " + std::to_string(T + 1) +
          " tokens after it in this shard; check eot_token, or leave this shard out");
    }
    eot_starts += found[s].eot_starts;
  }
  if (eot_starts == 0) {
    throw std::invalid_argument(
        "align='eot': no end-of-text token (id " + std::to_string(eot) + ") starts a window of " +
        std::to_string(T + 1) + " tokens in any of the " + std::to_string(shards.size()) +
        " shard(s); check eot_token (GPT-2's is 50256) or use align=None");
  }
  for (DocumentStarts& shard : found) {
    stats.documents += shard.documents;
    if (config.sampler.kind == SamplerKind::Random) {
      index.push_back(std::move(shard.starts));
    } else {
      index.push_back(aligned_windows(shard.starts, T));
      shard.starts = OffsetList();  // free the starts now
    }
    stats.covered_tokens += covered_tokens(index.back(), T + 1);
  }
  return index;
}

std::vector<uint64_t> token_counts(const std::vector<Shard>& shards) {
  std::vector<uint64_t> counts;
  for (const Shard& shard : shards) counts.push_back(shard.num_tokens());
  return counts;
}

int widest_token_bytes(const std::vector<Shard>& shards) {
  int width = 2;
  for (const Shard& shard : shards) width = std::max(width, shard.token_bytes());
  return width;
}

// x[t] = window[t], y[t] = window[t + 1]: one read of the window, both outputs int64.
template <typename Src>
void gather_pair(const Src* __restrict__ window, uint64_t T, int64_t* __restrict__ x,
                 int64_t* __restrict__ y) {
  for (uint64_t t = 0; t < T; ++t) {
    x[t] = static_cast<int64_t>(window[t]);
    y[t] = static_cast<int64_t>(window[t + 1]);
  }
}

template <typename Src, typename Dst>
void gather_narrow(const Src* __restrict__ window, uint64_t count, Dst* __restrict__ out) {
  if constexpr (sizeof(Src) == sizeof(Dst)) {
    std::memcpy(out, window, count * sizeof(Src));
  } else {
    for (uint64_t t = 0; t < count; ++t) out[t] = static_cast<Dst>(window[t]);
  }
}

}  // namespace

TokenLoaderCore::TokenLoaderCore(LoaderConfig config)
    : config_((validate(config), std::move(config))),
      shards_(open_usable_shards(config_, skipped_paths_)),
      narrow_token_bytes_(widest_token_bytes(shards_)),
      sampler_(config_.sampler, token_counts(shards_), document_index(config_, shards_, align_stats_)),
      slots_(config_.prefetch) {
  config_.num_threads = std::min(config_.num_threads, config_.prefetch);
  advise_reads(config_, shards_);
}

TokenLoaderCore::~TokenLoaderCore() { stop(); }

size_t TokenLoaderCore::buffer_bytes() const {
  const uint64_t B = config_.sampler.batch_size, T = config_.sampler.block_size;
  if (config_.layout == OutputLayout::Int64Pair) return 2 * B * T * sizeof(int64_t);
  return B * (T + 1) * static_cast<uint64_t>(narrow_token_bytes_);
}

void TokenLoaderCore::set_buffer(size_t slot, void* data) {
  if (running()) throw std::logic_error("set_buffer while the workers run");
  if (slot >= slots_.size()) throw std::out_of_range("slot out of range");
  slots_[slot].data = data;
}

void TokenLoaderCore::start(uint64_t position) {
  stop();
  for (const Slot& slot : slots_) {
    if (slot.data == nullptr) throw std::logic_error("start: a ring slot has no buffer");
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (Slot& slot : slots_) slot.state = SlotState::Free;
    next_to_fill_ = position;
    next_to_take_ = position;
    stopping_ = false;
    worker_error_ = nullptr;
  }
  for (const Shard& shard : shards_) shard.check_not_truncated();
  checked_epoch_.store(sampler_.epoch_of(position));
  owner_pid_ = static_cast<int>(::getpid());
  for (size_t i = 0; i < config_.num_threads; ++i) threads_.emplace_back(&TokenLoaderCore::worker_loop, this);
}

bool TokenLoaderCore::in_forked_child() const {
  return owner_pid_ != 0 && static_cast<int>(::getpid()) != owner_pid_;
}

void TokenLoaderCore::stop() {
  if (!threads_.empty() && in_forked_child()) {
    // Forked child: the threads (and maybe a lock they held) were not copied. Joining would
    // hang and destroying a joinable std::thread terminates, so the handles are leaked.
    new std::vector<std::thread>(std::move(threads_));
    threads_.clear();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  slot_free_.notify_all();
  slot_ready_.notify_all();
  for (std::thread& thread : threads_) thread.join();
  threads_.clear();
}

uint64_t TokenLoaderCore::position() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return next_to_take_;
}

bool TokenLoaderCore::wait_next(std::chrono::milliseconds timeout, size_t* slot_index) {
  std::unique_lock<std::mutex> lock(mutex_);
  const size_t index = next_to_take_ % slots_.size();
  Slot& slot = slots_[index];
  // After a worker failed, the batches claimed before the failed one still arrive (their
  // fills finish); the error is raised in place of the first batch that never will.
  const auto ready = [&] { return slot.state == SlotState::Ready && slot.batch == next_to_take_; };
  const auto failed = [&] { return worker_error_ && slot.state != SlotState::Filling; };
  const bool woke = slot_ready_.wait_for(lock, timeout, [&] { return ready() || failed() || stopping_; });
  if (!woke) return false;
  if (!ready()) {
    if (failed()) std::rethrow_exception(worker_error_);
    throw std::runtime_error("the loader is closed");
  }
  slot.state = SlotState::Taken;
  slot.data = nullptr;
  ++next_to_take_;
  *slot_index = index;
  return true;
}

void TokenLoaderCore::refill(size_t slot_index, void* data) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (slot_index >= slots_.size() || slots_[slot_index].state != SlotState::Taken) {
      throw std::logic_error("refill of a slot that was not taken");
    }
    slots_[slot_index].data = data;
    slots_[slot_index].state = SlotState::Free;
  }
  slot_free_.notify_all();
}

void TokenLoaderCore::worker_loop() {
  std::vector<WindowRef> windows(config_.sampler.batch_size);
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    // Batches are claimed in order; the next one waits for its slot to come back Free.
    slot_free_.wait(lock, [&] {
      return stopping_ || worker_error_ || slots_[next_to_fill_ % slots_.size()].state == SlotState::Free;
    });
    if (stopping_ || worker_error_) return;
    const uint64_t batch = next_to_fill_++;
    Slot& slot = slots_[batch % slots_.size()];
    slot.state = SlotState::Filling;
    slot.batch = batch;
    void* data = slot.data;
    lock.unlock();
    try {
      fill(batch, data, windows);
    } catch (...) {
      lock.lock();
      slot.state = SlotState::Free;  // never to be Ready: the consumer raises here
      worker_error_ = std::current_exception();
      lock.unlock();
      slot_ready_.notify_all();
      slot_free_.notify_all();
      return;
    }
    lock.lock();
    slot.state = SlotState::Ready;
    slot_ready_.notify_all();
  }
}

void TokenLoaderCore::fill(uint64_t batch, void* data, std::vector<WindowRef>& windows) {
  if (batch == fail_at_batch_.load()) {
    throw std::runtime_error("injected failure while filling batch " + std::to_string(batch));
  }
  check_shards_once_per_epoch(batch);
  const uint64_t B = config_.sampler.batch_size, T = config_.sampler.block_size;
  sampler_.batch_windows(batch, windows.data());
  uint64_t bytes_read = 0;
  for (uint64_t i = 0; i < B; ++i) {
    const Shard& shard = shards_[windows[i].shard];
    const int width = shard.token_bytes();
    const char* window = static_cast<const char*>(shard.tokens()) + windows[i].offset * width;
    bytes_read += (T + 1) * width;
    if (config_.layout == OutputLayout::Int64Pair) {
      int64_t* x = static_cast<int64_t*>(data) + i * T;
      int64_t* y = static_cast<int64_t*>(data) + (B + i) * T;
      if (width == 2) {
        gather_pair(reinterpret_cast<const uint16_t*>(window), T, x, y);
      } else {
        gather_pair(reinterpret_cast<const uint32_t*>(window), T, x, y);
      }
    } else if (narrow_token_bytes_ == 2) {
      uint16_t* row = static_cast<uint16_t*>(data) + i * (T + 1);
      gather_narrow(reinterpret_cast<const uint16_t*>(window), T + 1, row);
    } else {
      uint32_t* row = static_cast<uint32_t*>(data) + i * (T + 1);
      if (width == 2) {
        gather_narrow(reinterpret_cast<const uint16_t*>(window), T + 1, row);
      } else {
        gather_narrow(reinterpret_cast<const uint32_t*>(window), T + 1, row);
      }
    }
  }
  count_bytes_read(bytes_read);
}

void TokenLoaderCore::check_shards_once_per_epoch(uint64_t batch) {
  const uint64_t epoch = sampler_.epoch_of(batch);
  uint64_t checked = checked_epoch_.load();
  // One worker claims each new epoch's check; the others go on reading meanwhile.
  if (checked != UINT64_MAX && epoch <= checked) return;
  if (!checked_epoch_.compare_exchange_strong(checked, epoch)) return;
  for (const Shard& shard : shards_) shard.check_not_truncated();
}

void TokenLoaderCore::count_bytes_read(uint64_t bytes) {
  if (config_.release_bytes == 0) return;
  if (bytes_since_release_.fetch_add(bytes) + bytes < config_.release_bytes) return;
  // One worker wins the reset and releases; the mappings stay valid for concurrent readers.
  if (bytes_since_release_.exchange(0) >= config_.release_bytes) {
    for (const Shard& shard : shards_) shard.release_pages();
  }
}

}  // namespace gptfast
