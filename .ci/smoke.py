"""Smoke test of an installed gptfast-kernels (CI's package leg): run it from outside the checkout.

python smoke.py WORKDIR
Checks that gptfast and gptfast._C import from site-packages (not from a source tree), that
`gptfast info` runs, that one Triton kernel runs through the interpreter and matches the
reference, and that TokenLoader reads a batch from a tiny shard it writes into WORKDIR.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: kernels run on the CPU

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gptfast  # noqa: E402
import gptfast._C  # noqa: E402
from gptfast.data import TokenLoader, reference_batches  # noqa: E402
from gptfast.prepare import write_shard  # noqa: E402


def check_installed():
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for module in (gptfast, gptfast._C):
        where = Path(module.__file__).resolve()
        assert site in where.parents, f"{module.__name__} imported from {where}, not from {site}"
        print(f"smoke: {module.__name__} from {where}")


def check_info():
    script = Path(sys.executable).parent / "gptfast"  # the console script the wheel installed
    out = subprocess.run([str(script), "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"gptfast info exited {out.returncode}:\n{out.stdout}{out.stderr}"
    print(out.stdout.rstrip())


def check_kernel():
    torch.manual_seed(0)
    x = torch.randn(5, 37, dtype=torch.float32)
    weight, bias = torch.randn(37), torch.randn(37)
    with gptfast.use_backend("triton"):
        got = gptfast.layer_norm(x, weight, bias)
    want = gptfast.reference.layer_norm(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    print("smoke: layer_norm (triton, interpreter) matches the reference")


def check_loader(workdir: Path):
    tokens = (np.arange(1000) * 7 % 50257).astype(np.uint16)
    shard = workdir / "smoke_train_000.bin"
    write_shard(shard, tokens)
    with TokenLoader(str(shard), 2, 8, sampler="sequential", prefetch=1) as loader:
        x, y = next(loader)
    want_x, want_y = next(reference_batches(str(shard), 2, 8, sampler="sequential"))
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64, (x.shape, x.dtype)
    assert np.array_equal(x.numpy(), want_x) and np.array_equal(y.numpy(), want_y), (x, want_x)
    print(f"smoke: TokenLoader batch from {shard.name} matches the reference loader")


def main():
    workdir = Path(sys.argv[1])
    workdir.mkdir(parents=True, exist_ok=True)
    check_installed()
    check_info()
    check_kernel()
    check_loader(workdir)
    print("smoke: all checks passed")


if __name__ == "__main__":
    main()
