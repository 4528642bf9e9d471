"""Build of gptfast-kernels: the pure-Python packages plus the C++ extension gptfast._C.

`kernels/` and `bench/` live at the top of the repository but install as
`gptfast.kernels` and `gptfast.bench` (package_dir), so nothing named `kernels` or
`bench` lands in site-packages. The extension is plain pybind11 C++ and never needs torch;
its CUDA part (csrc/*.cu) is compiled only where nvcc is found, and a failed CUDA compile
falls back to the CPU-only build with a warning rather than failing the install.
Set GPTFAST_NO_CUDA=1 to skip the CUDA part, GPTFAST_BUILD_JOBS=N to cap parallel compiles.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CPP_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))


def find_nvcc():
    """nvcc from CUDA_HOME/CUDA_PATH, else PATH, else /usr/local/cuda; None if absent."""
    if os.environ.get("GPTFAST_NO_CUDA", "0") not in ("", "0"):
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def cuda_home(nvcc):
    """The toolkit root holding include/ and lib64/ for the nvcc in use."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home)
    real = Path(nvcc).resolve().parent.parent
    if (real / "include" / "cuda_runtime.h").exists():
        return real
    return Path("/usr/local/cuda")


class BuildWithOptionalCuda(build_ext):
    """build_ext that first compiles csrc/*.cu with nvcc into objects linked into gptfast._C."""

    def build_extension(self, ext):
        nvcc = find_nvcc()
        if nvcc and CUDA_SOURCES:
            try:
                self._add_cuda(ext, nvcc)
            except (OSError, subprocess.CalledProcessError) as err:
                print(f"gptfast: CUDA part not built ({err}); building the CPU-only extension",
                      file=sys.stderr)
        else:
            print("gptfast: nvcc not found (or GPTFAST_NO_CUDA set); building the CPU-only extension",
                  file=sys.stderr)
        super().build_extension(ext)

    def _add_cuda(self, ext, nvcc):
        home = cuda_home(nvcc)
        lib_dir = next((d for d in (home / "lib64", home / "lib") if (d / "libcudart_static.a").exists()),
                       None)
        if lib_dir is None:
            raise OSError(f"libcudart_static.a not found under {home}")
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for source in CUDA_SOURCES:
            obj = out_dir / (source.stem + ".o")
            cmd = [nvcc, "-c", str(source), "-o", str(obj), "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC", f"-I{ROOT / 'csrc'}"]
            print("gptfast:", " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        ext.extra_objects += objects
        ext.define_macros += [("GPTFAST_WITH_CUDA", "1")]
        ext.include_dirs += [str(home / "include")]
        ext.library_dirs += [str(lib_dir)]
        # static cudart: the extension needs no libcudart.so at run time, only the driver
        ext.libraries += ["cudart_static", "rt", "pthread", "dl"]


# Compile the C++ sources in parallel (GPTFAST_BUILD_JOBS jobs; default: one per CPU).
ParallelCompile("GPTFAST_BUILD_JOBS").install()

setup(
    packages=["gptfast", "gptfast.patching", "gptfast.train", "gptfast.kernels", "gptfast.bench",
              "gptfast.bench.headline", "gptfast.bench.sm90"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels", "gptfast.bench": "bench"},
    ext_modules=[Pybind11Extension("gptfast._C", CPP_SOURCES, cxx_std=17,
                                   extra_compile_args=["-O3"])],
    cmdclass={"build_ext": BuildWithOptionalCuda},
    zip_safe=False,
)
