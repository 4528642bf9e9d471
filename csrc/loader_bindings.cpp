// gptfast._C.LoaderCore: TokenLoaderCore plus ownership of the ring's buffers as Python
// objects (torch tensors), so a buffer can never be freed while a worker writes into it:
// the core's threads are joined before the buffers are released.
#include "loader_bindings.h"

#include <pybind11/stl.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "loader.h"

namespace py = pybind11;

namespace gptfast {

namespace {

struct BufferView {
  void* data;
  size_t bytes;
};

// A buffer is any object with data_ptr() and nbytes, i.e. a contiguous torch tensor.
BufferView view_of(const py::object& buffer, size_t needed) {
  if (!py::hasattr(buffer, "data_ptr") || !py::hasattr(buffer, "nbytes")) {
    throw py::type_error("a ring buffer must be a torch.Tensor (data_ptr() and nbytes)");
  }
  const auto address = buffer.attr("data_ptr")().cast<uintptr_t>();
  const auto bytes = buffer.attr("nbytes").cast<size_t>();
  if (address == 0 || bytes < needed) {
    throw py::value_error("a ring buffer must hold at least " + std::to_string(needed) +
                          " bytes, got " + std::to_string(bytes));
  }
  if (py::hasattr(buffer, "is_contiguous") && !buffer.attr("is_contiguous")().cast<bool>()) {
    throw py::value_error("a ring buffer must be contiguous");
  }
  return {reinterpret_cast<void*>(address), bytes};
}

OutputLayout parse_layout(const std::string& name) {
  if (name == "int64_pair") return OutputLayout::Int64Pair;
  if (name == "narrow") return OutputLayout::Narrow;
  throw std::invalid_argument("layout must be 'int64_pair' or 'narrow', got '" + name + "'");
}

class PyLoaderCore {
 public:
  PyLoaderCore(std::vector<std::string> paths, uint64_t batch_size, uint64_t block_size,
               const std::string& sampler, uint64_t seed, uint64_t rank, uint64_t world_size,
               const std::string& layout, size_t prefetch, size_t num_threads, uint64_t release_bytes,
               const std::string& align, uint64_t eot_token) {
    if (align != "none" && align != "eot") {
      throw std::invalid_argument("align must be 'none' or 'eot', got '" + align + "'");
    }
    LoaderConfig config;
    config.paths = std::move(paths);
    config.sampler = {parse_sampler(sampler), batch_size, block_size, seed, rank, world_size,
                      align == "eot", eot_token};
    config.layout = parse_layout(layout);
    config.prefetch = prefetch;
    config.num_threads = num_threads;
    config.release_bytes = release_bytes;
    py::gil_scoped_release nogil;  // opening many shards may touch the disk
    core_ = std::make_unique<TokenLoaderCore>(std::move(config));
  }

  // Threads first, buffers after: no worker may outlive the memory it writes. In a forked
  // child the core is abandoned instead (see TokenLoaderCore::in_forked_child).
  ~PyLoaderCore() {
    if (core_ && core_->in_forked_child()) {
      core_.release();
      return;
    }
    core_.reset();
  }

  void start(const py::list& buffers, uint64_t position) {
    if (buffers.size() != core_->prefetch()) {
      throw py::value_error("start needs " + std::to_string(core_->prefetch()) + " buffers, got " +
                            std::to_string(buffers.size()));
    }
    {
      py::gil_scoped_release nogil;
      core_->stop();
    }
    std::vector<py::object> owned;
    for (size_t slot = 0; slot < buffers.size(); ++slot) {
      owned.push_back(py::reinterpret_borrow<py::object>(buffers[slot]));
      core_->set_buffer(slot, view_of(owned.back(), core_->buffer_bytes()).data);
    }
    buffers_ = std::move(owned);
    core_->start(position);
  }

  // Waits for the next batch (GIL released, Ctrl-C honoured), gives its slot `replacement`
  // and returns the filled buffer, which now belongs to the caller alone.
  py::object next(const py::object& replacement) {
    const BufferView fresh = view_of(replacement, core_->buffer_bytes());
    size_t slot = 0;
    while (true) {
      bool ready;
      {
        py::gil_scoped_release nogil;
        ready = core_->wait_next(std::chrono::milliseconds(100), &slot);
      }
      if (ready) break;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    }
    py::object filled = std::move(buffers_[slot]);
    buffers_[slot] = replacement;
    core_->refill(slot, fresh.data);
    return filled;
  }

  void close() {
    if (core_->in_forked_child()) return;
    py::gil_scoped_release nogil;
    core_->stop();
  }

  TokenLoaderCore& core() { return *core_; }

 private:
  std::unique_ptr<TokenLoaderCore> core_;
  std::vector<py::object> buffers_;
};

py::dict inspect_shard(const std::string& path) {
  Shard shard(path);
  py::dict info;
  info["path"] = shard.path();
  info["num_tokens"] = shard.num_tokens();
  info["token_bytes"] = shard.token_bytes();
  info["format"] = shard.has_header() ? "llm.c" : "nanogpt";
  info["header_bytes"] = shard.has_header() ? kHeaderBytes : 0;
  return info;
}

}  // namespace

void register_loader(py::module_& m) {
  py::register_local_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const FileError& e) {
      // OSError(errno, strerror, filename) becomes FileNotFoundError etc. by errno
      py::object os_error = py::module_::import("builtins").attr("OSError")(
          e.error(), std::strerror(e.error()), e.path());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(os_error.ptr())), os_error.ptr());
    }
  });

  m.attr("LLMC_MAGIC_UINT16") = kMagicUint16;
  m.attr("LLMC_MAGIC_UINT32") = kMagicUint32;
  m.attr("LLMC_HEADER_BYTES") = kHeaderBytes;

  m.def("inspect_shard", &inspect_shard, py::arg("path"),
        "Validate one shard: dict(path, num_tokens, token_bytes, format, header_bytes).");

  py::class_<PyLoaderCore>(m, "LoaderCore",
                           "Engine of gptfast.TokenLoader: mapped shards, sampler, worker threads, "
                           "ring of caller-allocated buffers. Use gptfast.TokenLoader.")
      .def(py::init<std::vector<std::string>, uint64_t, uint64_t, const std::string&, uint64_t,
                    uint64_t, uint64_t, const std::string&, size_t, size_t, uint64_t,
                    const std::string&, uint64_t>(),
           py::arg("paths"), py::arg("batch_size"), py::arg("block_size"), py::arg("sampler"),
           py::arg("seed"), py::arg("rank"), py::arg("world_size"), py::arg("layout"),
           py::arg("prefetch"), py::arg("num_threads"), py::arg("release_bytes"),
           py::arg("align") = "none", py::arg("eot_token") = 50256)
      .def("start", &PyLoaderCore::start, py::arg("buffers"), py::arg("position"),
           "(Re)start the workers so that the next batch is `position`, with one buffer per slot.")
      .def("next", &PyLoaderCore::next, py::arg("replacement"),
           "Wait for the next batch; its slot keeps `replacement`; returns the filled buffer.")
      .def("close", &PyLoaderCore::close, "Join the worker threads (idempotent).")
      .def("fail_at_batch", [](PyLoaderCore& self, uint64_t batch) { self.core().fail_at_batch(batch); },
           py::arg("batch"), "Test hook: the worker filling `batch` raises.")
      .def("epoch_of", [](PyLoaderCore& self, uint64_t batch) { return self.core().sampler().epoch_of(batch); },
           py::arg("batch"))
      .def_property_readonly("position", [](PyLoaderCore& self) { return self.core().position(); })
      .def_property_readonly("running", [](PyLoaderCore& self) { return self.core().running(); })
      .def_property_readonly("buffer_bytes", [](PyLoaderCore& self) { return self.core().buffer_bytes(); })
      .def_property_readonly("narrow_token_bytes",
                             [](PyLoaderCore& self) { return self.core().narrow_token_bytes(); })
      .def_property_readonly("num_windows", [](PyLoaderCore& self) { return self.core().sampler().num_windows(); })
      .def_property_readonly("index_bytes", [](PyLoaderCore& self) { return self.core().sampler().index_bytes(); })
      .def_property_readonly("num_documents",
                             [](PyLoaderCore& self) { return self.core().align_stats().documents; })
      .def_property_readonly("covered_tokens",
                             [](PyLoaderCore& self) { return self.core().align_stats().covered_tokens; })
      .def_property_readonly("prefetch", [](PyLoaderCore& self) { return self.core().prefetch(); })
      .def_property_readonly("skipped_paths", [](PyLoaderCore& self) { return self.core().skipped_paths(); })
      .def_property_readonly("shard_paths",
                             [](PyLoaderCore& self) {
                               std::vector<std::string> paths;
                               for (const Shard& s : self.core().shards()) paths.push_back(s.path());
                               return paths;
                             })
      .def_property_readonly("shard_tokens", [](PyLoaderCore& self) {
        std::vector<uint64_t> tokens;
        for (const Shard& s : self.core().shards()) tokens.push_back(s.num_tokens());
        return tokens;
      });
}

}  // namespace gptfast
