// One token shard on disk, memory-mapped read-only.
//
// Two on-disk layouts are read (all integers little-endian):
//
//   nanoGPT raw .bin   uint16 tokens, no header
//
//   llm.c shard        int32 header[256] (1024 bytes), then the tokens
//                      header[0] magic    20240520 -> header[1] = 1, uint16 tokens
//                                         20240801 -> header[1] = 7, uint32 tokens
//                      header[2] token count; the file is exactly 1024 + count * width bytes
//
// Telling them apart: a file whose first int32 is one of the two magics is an llm.c shard.
// A file without a known magic whose header[2] is a positive count matching the file size
// (1024 + count * 2 or * 4) is an llm.c shard with an unknown magic and is rejected. Anything
// else is a raw nanoGPT file. Raw files of GPT-2 tokens can't be mistaken for llm.c shards:
// the magics read as uint16 token pairs contain 55128 and 55329, above GPT-2's 50256.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace gptfast {

inline constexpr int32_t kMagicUint16 = 20240520;  // llm.c version 1
inline constexpr int32_t kMagicUint32 = 20240801;  // llm.c version 7
inline constexpr int32_t kVersionUint16 = 1;
inline constexpr int32_t kVersionUint32 = 7;
inline constexpr size_t kHeaderInts = 256;
inline constexpr size_t kHeaderBytes = kHeaderInts * sizeof(int32_t);

// An OS call on `path` failed with `error` (an errno); the bindings raise OSError, which
// Python turns into FileNotFoundError, PermissionError, ... by errno.
class FileError : public std::runtime_error {
 public:
  FileError(int error, std::string path, const std::string& what)
      : std::runtime_error(what), error_(error), path_(std::move(path)) {}
  int error() const { return error_; }
  const std::string& path() const { return path_; }

 private:
  int error_;
  std::string path_;
};

class Shard {
 public:
  // Opens, validates and maps `path`. Throws FileError when the OS refuses and
  // std::invalid_argument (-> ValueError) naming the file when its contents are not a shard.
  explicit Shard(std::string path);
  ~Shard();
  Shard(Shard&& other) noexcept;
  Shard& operator=(Shard&&) = delete;
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  const std::string& path() const { return path_; }
  uint64_t num_tokens() const { return num_tokens_; }
  int token_bytes() const { return token_bytes_; }  // 2 (uint16) or 4 (uint32)
  bool has_header() const { return has_header_; }
  const void* tokens() const { return tokens_; }

  // madvise(advice) over the mapping (MADV_RANDOM, MADV_SEQUENTIAL, ...); best effort.
  void advise(int advice) const;
  // Drops this process's page-table entries for the mapping (MADV_DONTNEED). The data stays
  // in the page cache, so the next read is a minor fault; resident memory stops growing.
  void release_pages() const;
  // Throws std::runtime_error naming the file when the mapped file (same device and inode
  // at `path`) is now shorter than the mapping. Reading a mapped page past a file's end
  // raises SIGBUS, which kills the process; this check (one stat) catches a truncation that
  // happened before it ran, not one racing with the reads. A file replaced at `path` (a new
  // inode) is fine: the mapping keeps the old one.
  void check_not_truncated() const;

 private:
  std::string path_;
  uint64_t device_ = 0;
  uint64_t inode_ = 0;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  const void* tokens_ = nullptr;
  uint64_t num_tokens_ = 0;
  int token_bytes_ = 2;
  bool has_header_ = false;
};

}  // namespace gptfast
