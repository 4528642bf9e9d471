// Python bindings of the token loader (gptfast._C.LoaderCore, gptfast._C.inspect_shard).
#pragma once

#include <pybind11/pybind11.h>

namespace gptfast {

void register_loader(pybind11::module_& m);

}  // namespace gptfast
