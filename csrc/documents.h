// Document alignment (TokenLoader align="eot"): where documents start in a shard, and the
// windows that start there. Defined exactly so that gptfast/data.py reproduces it.
//
// A document starts at position 0 of the stream (token 0 of the first shard file given, even
// when it is not an end-of-text token) and at every end-of-text token: the end-of-text token
// is the first token of the document it precedes, as the model's document ids have it
// (GPTConfig(attention="document")). A start p of a shard of n tokens is usable when a window
// of block_size + 1 tokens fits there: p + T + 1 <= n.
//
// random      draws among the usable starts of all shards, numbered consecutively across
//             shards (a shard is chosen in proportion to its usable starts).
// sequential  aligned windows, greedy and non-overlapping like the unaligned ones: the first
// shuffle     usable start of a shard, then each time the first usable start at least T tokens
//             after the previous window's start (windows share at most their last/first token,
//             as unaligned windows do). The text between the end of a window and the next
//             document start is not read in that epoch.
//
// The index is compact, in memory: one offset per usable start (random) or per aligned window
// (sequential, shuffle), 4 bytes each when the shard has fewer than 2^32 tokens, else 8. It is
// built by one sequential scan of every shard when the loader opens them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "shard.h"

namespace gptfast {

// Token offsets within one shard, 4 bytes each when they fit, else 8.
class OffsetList {
 public:
  explicit OffsetList(bool wide = false) : wide_(wide) {}
  void push_back(uint64_t offset) {
    if (wide_) {
      wide_offsets_.push_back(offset);
    } else {
      narrow_offsets_.push_back(static_cast<uint32_t>(offset));
    }
  }
  uint64_t operator[](size_t i) const { return wide_ ? wide_offsets_[i] : narrow_offsets_[i]; }
  size_t size() const { return wide_ ? wide_offsets_.size() : narrow_offsets_.size(); }
  bool empty() const { return size() == 0; }
  size_t bytes() const { return narrow_offsets_.capacity() * 4 + wide_offsets_.capacity() * 8; }
  void shrink_to_fit() {
    narrow_offsets_.shrink_to_fit();
    wide_offsets_.shrink_to_fit();
  }
  bool wide() const { return wide_; }

 private:
  bool wide_;
  std::vector<uint32_t> narrow_offsets_;
  std::vector<uint64_t> wide_offsets_;
};

struct DocumentStarts {
  OffsetList starts;          // usable document starts, ascending
  uint64_t eot_starts = 0;    // how many of them are end-of-text tokens (not the stream start)
  uint64_t documents = 0;     // every document start in the shard, usable or not
};

// One sequential scan of `shard` (madvise sequential, pages released afterwards).
DocumentStarts find_document_starts(const Shard& shard, uint64_t eot_token, uint64_t block_size,
                                    bool stream_start);

// The greedy aligned windows over `starts` (see above).
OffsetList aligned_windows(const OffsetList& starts, uint64_t block_size);
uint64_t count_aligned_windows(const OffsetList& starts, uint64_t block_size);

// Tokens read by windows of `window_tokens` tokens at `offsets` (ascending): the length of the
// union of [offset, offset + window_tokens). With the usable starts (random) or the aligned
// windows (sequential, shuffle) and block_size + 1, the tokens an aligned loader can ever read.
uint64_t covered_tokens(const OffsetList& offsets, uint64_t window_tokens);

}  // namespace gptfast
