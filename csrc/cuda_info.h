// What the CUDA part of gptfast._C was built against and what it sees at run time.
// Compiled by nvcc (cuda_info.cu) only where nvcc exists; see setup.py.
#pragma once

namespace gptfast {

// CUDA runtime version the extension was compiled with, e.g. 13000 for 13.0.
int cuda_runtime_version();

// Version of the installed driver (0 when there is no driver).
int cuda_driver_version();

// Number of visible CUDA devices; 0 when there is no driver or no device.
int cuda_device_count();

}  // namespace gptfast
