#include "documents.h"

#include <sys/mman.h>

#include <limits>

namespace gptfast {

namespace {

template <typename Token>
void scan(const Token* tokens, uint64_t n, uint64_t last_start, uint64_t eot_token,
          bool stream_start, DocumentStarts& out) {
  if (stream_start && tokens[0] != eot_token) {
    out.starts.push_back(0);
    ++out.documents;
  }
  for (uint64_t p = 0; p <= last_start; ++p) {
    if (tokens[p] == eot_token) {
      out.starts.push_back(p);
      ++out.eot_starts;
    }
  }
  out.documents += out.eot_starts;
  for (uint64_t p = last_start + 1; p < n; ++p) out.documents += tokens[p] == eot_token;
}

template <typename Visit>
void visit_aligned_windows(const OffsetList& starts, uint64_t block_size, Visit visit) {
  bool any = false;
  uint64_t next_allowed = 0;
  for (size_t i = 0; i < starts.size(); ++i) {
    const uint64_t start = starts[i];
    if (any && start < next_allowed) continue;
    visit(start);
    any = true;
    next_allowed = start + block_size;
  }
}

}  // namespace

DocumentStarts find_document_starts(const Shard& shard, uint64_t eot_token, uint64_t block_size,
                                    bool stream_start) {
  const uint64_t n = shard.num_tokens();
  DocumentStarts out{OffsetList(n > std::numeric_limits<uint32_t>::max())};
  if (n < block_size + 1) return out;
  const uint64_t last_start = n - block_size - 1;
  shard.advise(MADV_SEQUENTIAL);
  if (shard.token_bytes() == 2) {
    scan(static_cast<const uint16_t*>(shard.tokens()), n, last_start, eot_token, stream_start, out);
  } else {
    scan(static_cast<const uint32_t*>(shard.tokens()), n, last_start, eot_token, stream_start, out);
  }
  shard.release_pages();  // the scan read the whole shard; keep resident memory low
  out.starts.shrink_to_fit();
  return out;
}

OffsetList aligned_windows(const OffsetList& starts, uint64_t block_size) {
  OffsetList windows(starts.wide());
  visit_aligned_windows(starts, block_size, [&](uint64_t start) { windows.push_back(start); });
  windows.shrink_to_fit();
  return windows;
}

uint64_t count_aligned_windows(const OffsetList& starts, uint64_t block_size) {
  uint64_t count = 0;
  visit_aligned_windows(starts, block_size, [&](uint64_t) { ++count; });
  return count;
}

uint64_t covered_tokens(const OffsetList& offsets, uint64_t window_tokens) {
  uint64_t covered = 0;
  for (size_t i = 0; i < offsets.size(); ++i) {
    const uint64_t gap = i + 1 < offsets.size() ? offsets[i + 1] - offsets[i] : window_tokens;
    covered += gap < window_tokens ? gap : window_tokens;
  }
  return covered;
}

}  // namespace gptfast
