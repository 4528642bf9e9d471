// gptfast._C: the compiled half of gptfast. Plain pybind11, no torch headers, so building it
// needs neither torch nor a GPU. The token loader (csrc/loader*) lands here too.
#include <pybind11/pybind11.h>

#include "loader_bindings.h"

#ifdef GPTFAST_WITH_CUDA
#include "cuda_info.h"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#ifdef GPTFAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_runtime_version"] = gptfast::cuda_runtime_version();
#else
  info["cuda"] = false;
  info["cuda_runtime_version"] = py::none();
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gptfast compiled extension (C++ token loader; CUDA runtime queries where built with nvcc)";
  m.def("build_info", &build_info,
        "dict: cuda (built with the CUDA part), cuda_runtime_version, compiler");
  gptfast::register_loader(m);
#ifdef GPTFAST_WITH_CUDA
  m.def("cuda_driver_version", &gptfast::cuda_driver_version,
        "installed CUDA driver version, 0 without a driver");
  m.def("cuda_device_count", &gptfast::cuda_device_count,
        "visible CUDA devices, 0 without a driver or device");
#endif
}
