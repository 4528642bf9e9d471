// The token loader's engine: worker threads gather the windows the Sampler picks out of
// memory-mapped Shards into a ring of host buffers that Python allocates (with torch) and
// hands over by pointer. Knows nothing of Python or torch; loader.cpp binds it.
//
// Buffer layouts (row-major, B = batch_size, T = block_size):
//   Int64Pair  int64 [2][B][T]: [0] = x, [1] = y = x shifted by one. Both halves contiguous,
//              so a CPU batch comes out int64 with no extra pass.
//   Narrow     [B][T+1] tokens at the narrow width (2 bytes, or 4 when any shard is uint32),
//              for a device copy that is widened to int64 on the device.
//
// Ring protocol. The ring has `prefetch` slots; batch k always lives in slot k % prefetch.
//   Free     has a buffer, waiting for a worker
//   Filling  a worker is writing batch `batch` into it
//   Ready    holds batch `batch`
//   Taken    the consumer took its buffer; refill() gives the slot a fresh one (-> Free)
// The consumer never gets back a buffer a worker may still write: a taken buffer belongs to
// the caller, and the slot continues with the replacement. Workers claim batches in order,
// so at most `prefetch` batches are in flight ahead of the consumer.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "sampler.h"
#include "shard.h"

namespace gptfast {

enum class OutputLayout { Int64Pair, Narrow };

struct LoaderConfig {
  std::vector<std::string> paths;
  SamplerConfig sampler;
  OutputLayout layout = OutputLayout::Int64Pair;
  size_t prefetch = 4;
  size_t num_threads = 1;
  // After this many bytes of windows have been read, the workers drop the mappings' pages
  // from this process (the page cache keeps them) so resident memory stays bounded. 0: never.
  uint64_t release_bytes = 0;
};

// align="eot" only: what the document index covers (zeros without align).
struct AlignStats {
  uint64_t documents = 0;       // document starts in the usable shards, usable or not
  uint64_t covered_tokens = 0;  // tokens inside some window the sampler can produce
};

class TokenLoaderCore {
 public:
  // Opens and validates every shard. Shards shorter than block_size + 1 tokens are skipped
  // (see skipped_paths()); if none is long enough, throws std::invalid_argument.
  explicit TokenLoaderCore(LoaderConfig config);
  ~TokenLoaderCore();
  TokenLoaderCore(const TokenLoaderCore&) = delete;
  TokenLoaderCore& operator=(const TokenLoaderCore&) = delete;

  size_t buffer_bytes() const;
  int narrow_token_bytes() const { return narrow_token_bytes_; }
  const Sampler& sampler() const { return sampler_; }
  const std::vector<Shard>& shards() const { return shards_; }
  const std::vector<std::string>& skipped_paths() const { return skipped_paths_; }
  const AlignStats& align_stats() const { return align_stats_; }
  size_t prefetch() const { return slots_.size(); }

  // Gives slot `slot` its buffer (at least buffer_bytes()); only while the workers are stopped.
  void set_buffer(size_t slot, void* data);
  // Starts the workers so that the next batch handed out is `position`. Every slot needs a
  // buffer. Anything prefetched before is dropped.
  void start(uint64_t position);
  // Joins the workers (a fill in progress finishes first). Idempotent. In a child process
  // forked after start() the workers don't exist: their handles are abandoned, not joined.
  void stop();
  bool running() const { return !threads_.empty(); }
  // True in a child forked after start(): the workers, and the waiters counted in the
  // condition variables, exist only in the parent, so this object must not be destroyed here.
  bool in_forked_child() const;

  // Waits up to `timeout` for batch position(); true: *slot holds it, the slot is Taken and
  // position() advanced. Rethrows a worker's error; throws std::runtime_error when stopped.
  bool wait_next(std::chrono::milliseconds timeout, size_t* slot);
  // Hands a Taken slot a fresh buffer and lets the workers fill it again.
  void refill(size_t slot, void* data);
  uint64_t position() const;

  // Test hook: the worker that fills batch `batch` throws instead.
  void fail_at_batch(uint64_t batch) { fail_at_batch_.store(batch); }

 private:
  enum class SlotState { Free, Filling, Ready, Taken };
  struct Slot {
    void* data = nullptr;
    SlotState state = SlotState::Free;
    uint64_t batch = 0;
  };

  void worker_loop();
  void fill(uint64_t batch, void* data, std::vector<WindowRef>& windows);
  // Shard::check_not_truncated on every shard, once per epoch (the first batch of an epoch
  // that a worker fills) and at start(); throws like it.
  void check_shards_once_per_epoch(uint64_t batch);
  void count_bytes_read(uint64_t bytes);

  LoaderConfig config_;
  std::vector<std::string> skipped_paths_;  // before shards_: filled while opening them
  std::vector<Shard> shards_;
  int narrow_token_bytes_ = 2;
  AlignStats align_stats_;  // before sampler_: filled while building its document index
  Sampler sampler_;

  mutable std::mutex mutex_;
  std::condition_variable slot_free_;   // workers wait on it
  std::condition_variable slot_ready_;  // the consumer waits on it
  std::vector<Slot> slots_;
  uint64_t next_to_fill_ = 0;
  uint64_t next_to_take_ = 0;
  bool stopping_ = false;
  std::exception_ptr worker_error_;
  std::vector<std::thread> threads_;
  int owner_pid_ = 0;  // the process that started threads_

  std::atomic<uint64_t> bytes_since_release_{0};
  std::atomic<uint64_t> checked_epoch_{UINT64_MAX};
  std::atomic<uint64_t> fail_at_batch_{UINT64_MAX};
};

}  // namespace gptfast
