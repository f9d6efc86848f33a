"""TVM-generated CUDA kernels run on the CPU: a PrimFunc's GPU schedule, as TVM builds it.

The hand-written kernels reach cuda_emulator.h as source; the TIR ones (dlight's schedules of
the norms and rope, the decode attention's own schedule) exist as CUDA C++ only once TVM has
generated it. This builds a PrimFunc for sm_90a with common-subexpression elimination off
(so every kernel parameter is a buffer or a shape variable, by name), takes each `__global__`
kernel from the generated source, reads its launch grid off the scheduled TIR (the extents
of its thread-bound loops, evaluated at the call's shape values) and runs the kernels one
after another in the emulator on numpy arrays, as the GPU would in one stream.
"""
from __future__ import annotations

import re

import numpy as np
import tvm
from tvm.sym.analyzer import Analyzer
import tvm_ffi

from cuda_emulator import EmulatedFunction

_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\) \{')
_AXES = {"blockIdx": 0, "threadIdx": 1}


def generated_kernels(func: tvm.tirx.PrimFunc) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(name, source, [(C type, parameter name)]) of each kernel, in launch order."""
    from trimode.artifacts import resolve_target
    from trimode.compiler.cuda_env import cuda_build_context

    target = tvm.target.Target(resolve_target("cuda", "sm_90a"), host="llvm")
    with target, cuda_build_context(target), \
            tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    source = next(m for m in lib.mod.imports if m.kind == "cuda").inspect_source()
    kernels = []
    for match in _KERNEL.finditer(source):
        body = source[match.start():source.index("\n}\n", match.end()) + 3]
        # g++ wants an attribute before the storage class `__shared__` stands for
        body = re.sub(r"__shared__ alignas\((\d+)\)", r"alignas(\1) __shared__", body)
        params = []
        for p in match.group(2).split(","):
            c_type, name = p.replace("__restrict__", "").strip().rsplit(None, 1)
            params.append((c_type.strip(), name))
        kernels.append((match.group(1), body, params))
    return kernels


def launch_grids(func: tvm.tirx.PrimFunc) -> list[dict[str, tvm.tirx.PrimExpr]]:
    """Per kernel (a nest of thread-bound loops), the extent of each thread tag."""
    grids: list[dict] = []

    def walk(node, inside: bool):
        if node is None:
            return
        if isinstance(node, (list, tvm_ffi.Array)):
            for child in node:
                walk(child, inside)
            return
        tag = extent = None
        if isinstance(node, tvm.tirx.For) and node.thread_binding is not None:
            tag, extent = node.thread_binding.thread_tag, node.extent
        elif isinstance(node, tvm.tirx.AttrStmt) and node.attr_key == "thread_extent":
            tag, extent = node.node.thread_tag, node.value
        if tag is not None:
            if not inside:
                grids.append({})
            grids[-1].setdefault(tag, extent)
            inside = True
        for field in ("body", "seq", "then_case", "else_case", "block", "init"):
            if hasattr(node, field):
                walk(getattr(node, field), inside)

    walk(func.body, False)
    return grids


def _evaluate(expr, scalars: dict[str, int]) -> int:
    """A launch extent at the call's shape values (its variables looked up by name)."""
    analyzer = Analyzer()
    for var in tvm.tirx.analysis.undefined_vars(expr):
        analyzer.bind(var, tvm.tirx.IntImm(str(var.ty), scalars[var.name]))
    folded = analyzer.simplify(expr)
    if not isinstance(folded, tvm.tirx.IntImm):
        raise ValueError(f"launch extent {expr} did not fold to a constant ({folded})")
    return int(folded.value)


def run_primfunc(func: tvm.tirx.PrimFunc, buffers: dict[str, np.ndarray], scalars: dict[str, int],
                 reverse: bool = False, greedy: bool = False) -> None:
    """Runs every kernel of `func` on `buffers` (by buffer name; updated in place) with the
    shape and scalar variables `scalars` (by name)."""
    kernels, grids = generated_kernels(func), launch_grids(func)
    assert len(kernels) == len(grids), (len(kernels), len(grids))
    for (name, source, params), grid in zip(kernels, grids):
        dims = [[1, 1, 1], [1, 1, 1]]
        for tag, extent in grid.items():
            axis, letter = tag.split(".")
            dims[_AXES[axis]]["xyz".index(letter)] = _evaluate(extent, scalars)
        args = []
        for c_type, param in params:
            if c_type.endswith("*"):
                args.append(buffers[param.removesuffix("_ptr")])
            else:
                args.append(scalars[param])
        EmulatedFunction(source, name, [c for c, _ in params])(
            dims[0], dims[1], *args, reverse=reverse, greedy=greedy)
