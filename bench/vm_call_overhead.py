"""Host cost of one Relax VM call against the number of packed parameters it checks.

Each entry of the compiled model takes the weights as one packed tuple, and the VM checks
every element's type, dtype, device and shape at every call, on the host, before the first
kernel (or CUDA graph) starts: at decode that time is serial with the GPU. This builds
functions that take 1 and as many parameters as the model (the 14B: 405) and do nothing but
a 4-element add, and times calls on llvm (the checks are host code, the same whatever the
device). Needs the TVM compiler.

    python bench/vm_call_overhead.py [--geometry 14b] [--calls 2000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def time_call(n_params: int, calls: int) -> float:
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import spec

    class Holder(nn.Module):
        def __init__(self, n: int):
            self.weights = nn.ModuleList([nn.Module() for _ in range(n)])
            for module in self.weights:
                module.q = nn.Parameter((64, 32), "int8")

        def f(self, x):
            return x + x

    mod, params = Holder(n_params).export_tvm(spec={"f": {
        "x": spec.Tensor([4], "float32"), "$": {"param_mode": "packed", "effect_mode": "none"}}})
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    packed = tvm_ffi.convert([tvm.runtime.tensor(np.zeros(p.shape, p.dtype)) for _, p in params])
    x, f = tvm.runtime.tensor(np.ones(4, "float32")), vm["f"]
    for _ in range(20):
        f(x, packed)
    started = time.perf_counter()
    for _ in range(calls):
        f(x, packed)
    return (time.perf_counter() - started) / calls


def model_param_count(geometry: str) -> int:
    from trimode.compiler.kernel_table import Kernels
    from trimode.compiler.model import NLDModel
    from trimode.model.config import GEOMETRIES

    cfg = GEOMETRIES[geometry]
    model = NLDModel(cfg, {"embed": True, "layers": True, "output": True}, Kernels(cfg, "llvm"))
    return len(list(model.named_parameters()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="14b")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    count = model_param_count(args.geometry)
    one, many = time_call(1, args.calls), time_call(count, args.calls)
    print(f"VM call, 1 packed parameter: {one * 1e6:.1f} us; {count} ({args.geometry}): "
          f"{many * 1e6:.1f} us; {(many - one) / (count - 1) * 1e9:.0f} ns per parameter")


if __name__ == "__main__":
    main()
