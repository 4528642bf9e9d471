#include "shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace gptfast {

namespace {

[[noreturn]] void throw_os_error(int error, const std::string& path, const char* call) {
  throw FileError(error, path, path + ": " + call + " failed: " + std::strerror(error));
}

[[noreturn]] void throw_bad_shard(const std::string& path, const std::string& reason) {
  throw std::invalid_argument(path + ": " + reason);
}

// Reads up to kHeaderBytes from the start of the file; returns the bytes read.
size_t read_header(int fd, const std::string& path, int32_t* header) {
  size_t done = 0;
  char* out = reinterpret_cast<char*>(header);
  while (done < kHeaderBytes) {
    ssize_t got = ::pread(fd, out + done, kHeaderBytes - done, static_cast<off_t>(done));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw_os_error(errno, path, "read");
    }
    if (got == 0) break;
    done += static_cast<size_t>(got);
  }
  return done;
}

struct Layout {
  bool has_header;
  int token_bytes;
  uint64_t num_tokens;
};

Layout parse_layout(const std::string& path, const int32_t* header, size_t header_read,
                    uint64_t file_bytes) {
  const int32_t magic = file_bytes >= 4 ? header[0] : 0;
  if (magic == kMagicUint16 || magic == kMagicUint32) {
    const bool wide = magic == kMagicUint32;
    const int width = wide ? 4 : 2;
    if (file_bytes < kHeaderBytes || header_read < kHeaderBytes) {
      throw_bad_shard(path, "llm.c shard (magic " + std::to_string(magic) + ") is truncated: " +
                                std::to_string(file_bytes) + " bytes, shorter than its " +
                                std::to_string(kHeaderBytes) + "-byte header");
    }
    const int32_t expected_version = wide ? kVersionUint32 : kVersionUint16;
    if (header[1] != expected_version) {
      throw_bad_shard(path, "llm.c shard with magic " + std::to_string(magic) + " has version " +
                                std::to_string(header[1]) + "; expected " +
                                std::to_string(expected_version));
    }
    if (header[2] < 0) {
      throw_bad_shard(path, "llm.c header token count is negative (" + std::to_string(header[2]) + ")");
    }
    const uint64_t count = static_cast<uint64_t>(header[2]);
    const uint64_t payload = file_bytes - kHeaderBytes;
    if (payload != count * width) {
      throw_bad_shard(path, "llm.c header says " + std::to_string(count) + " tokens (" +
                                std::to_string(count * width) + " bytes) but the file holds " +
                                std::to_string(payload) + " bytes after the header");
    }
    return {true, width, count};
  }
  if (header_read >= 3 * sizeof(int32_t) && file_bytes > kHeaderBytes && header[2] > 0) {
    const uint64_t payload = file_bytes - kHeaderBytes;
    const uint64_t count = static_cast<uint64_t>(header[2]);
    if (payload == count * 2 || payload == count * 4) {
      throw_bad_shard(path, "looks like an llm.c shard (header token count " + std::to_string(count) +
                                " matches the file size) but has unknown magic " +
                                std::to_string(magic) + "; known: " + std::to_string(kMagicUint16) +
                                " (uint16), " + std::to_string(kMagicUint32) + " (uint32)");
    }
  }
  if (file_bytes % 2 != 0) {
    throw_bad_shard(path, "raw nanoGPT file of " + std::to_string(file_bytes) +
                              " bytes is not a whole number of uint16 tokens");
  }
  return {false, 2, file_bytes / 2};
}

}  // namespace

Shard::Shard(std::string path) : path_(std::move(path)) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
  // It changes nothing for the regular files that pass the check below.
  int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw_os_error(errno, path_, "open");
  try {
    struct stat info;
    if (::fstat(fd, &info) != 0) throw_os_error(errno, path_, "stat");
    if (!S_ISREG(info.st_mode)) {
      throw_bad_shard(path_, "not a regular file (a FIFO, socket or device can't be memory-mapped)");
    }
    device_ = static_cast<uint64_t>(info.st_dev);
    inode_ = static_cast<uint64_t>(info.st_ino);
    const uint64_t file_bytes = static_cast<uint64_t>(info.st_size);

    int32_t header[kHeaderInts] = {};
    const size_t header_read = read_header(fd, path_, header);
    const Layout layout = parse_layout(path_, header, header_read, file_bytes);
    has_header_ = layout.has_header;
    token_bytes_ = layout.token_bytes;
    num_tokens_ = layout.num_tokens;

    if (file_bytes > 0) {
      mapping_bytes_ = static_cast<size_t>(file_bytes);
      mapping_ = ::mmap(nullptr, mapping_bytes_, PROT_READ, MAP_SHARED, fd, 0);
      if (mapping_ == MAP_FAILED) {
        mapping_ = nullptr;
        throw_os_error(errno, path_, "mmap");
      }
      tokens_ = static_cast<const char*>(mapping_) + (has_header_ ? kHeaderBytes : 0);
    }
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);  // the mapping keeps the file open
}

Shard::Shard(Shard&& other) noexcept
    : path_(std::move(other.path_)),
      device_(other.device_),
      inode_(other.inode_),
      mapping_(other.mapping_),
      mapping_bytes_(other.mapping_bytes_),
      tokens_(other.tokens_),
      num_tokens_(other.num_tokens_),
      token_bytes_(other.token_bytes_),
      has_header_(other.has_header_) {
  other.mapping_ = nullptr;
  other.mapping_bytes_ = 0;
  other.tokens_ = nullptr;
}

Shard::~Shard() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_bytes_);
}

void Shard::advise(int advice) const {
  if (mapping_ != nullptr) ::madvise(mapping_, mapping_bytes_, advice);
}

void Shard::release_pages() const { advise(MADV_DONTNEED); }

void Shard::check_not_truncated() const {
  struct stat info;
  if (mapping_ == nullptr || ::stat(path_.c_str(), &info) != 0) return;  // gone: mapping intact
  if (static_cast<uint64_t>(info.st_dev) != device_ || static_cast<uint64_t>(info.st_ino) != inode_) {
    return;
  }
  const uint64_t now = static_cast<uint64_t>(info.st_size);
  if (now < mapping_bytes_) {
    throw std::runtime_error(path_ + ": the shard shrank from " + std::to_string(mapping_bytes_) +
                             " to " + std::to_string(now) +
                             " bytes while the loader maps it; reading past its new end would kill "
                             "the process (SIGBUS). Don't modify shards in place while a "
                             "TokenLoader reads them: write a new file and rename it.");
  }
}

}  // namespace gptfast
