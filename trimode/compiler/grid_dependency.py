"""Programmatic dependent launch (Hopper and later): each CUDA kernel may start while the one
before it in the stream drains.

A decode step is ~360 kernels in a row (40 layers x 9), many of them a few microseconds
long; without this each one's launch, block scheduling and first memory requests wait for
the previous kernel's last block to finish and its writes to flush, and the GPU's memory
system idles in every gap. With it, TVM launches each kernel with the driver's
programmatic-stream-serialization attribute (the launch tag below; inside a CUDA graph
capture the edge becomes a programmatic one), and the kernel keeps the stream's order itself:

- `griddepcontrol.wait` returns once every kernel it depends on has completed and its memory
  is visible. Nothing before it may read what an earlier kernel writes, or write what one
  reads; reading the weights is safe (they change only between steps, by copies, which keep
  full stream order).
- `griddepcontrol.launch_dependents` lets the next kernel's blocks be scheduled once every
  block of this one has issued it (they then sit at their own wait).

Every kernel gets both at its start, unless its TIR marks it with WAITS_IN_KERNEL: its
hand-written source issues them itself (cuda_ptx's wait_previous_kernels; every Q8_0 kernel).
The block split-K kernel and the decode gemv (unless tuned to wait first) ask for their first
weights before it, so the weight stream is already running when the previous kernel's results
become visible.
A kernel launched this way after a non-kernel operation, or launched without the tag, keeps
plain stream order, so mixing is safe. TRIMODE_PDL=0 builds without it (artifacts.py).
"""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.tirx.compilation_pipeline import get_tir_pipeline, register_tir_pipeline

from trimode.compiler.kernels.cuda_ptx import WAITS_IN_KERNEL

LAUNCH_TAG = "tirx.use_programtic_dependent_launch"  # TVM's spelling
LAUNCH_PARAMS = "tirx.kernel_launch_params"
TIR_PIPELINE = "trimode_pdl"
_DEVICE_KERNEL = 2  # calling_conv of a device kernel launched from the host


def _is_cuda(func) -> bool:
    target = func.attrs.get("target") if func.attrs else None
    return target is not None and target.kind.name == "cuda"


@tvm.transform.module_pass(opt_level=0, name="RequestDependentLaunch")
def request_dependent_launch(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Before the host/device split: every CUDA kernel is launched with the tag (TVM carries it
    from the function to the host's launch call and the device kernel's launch parameters)."""
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and _is_cuda(func):
            tags = [str(tag) for tag in func.attrs.get(LAUNCH_PARAMS, [])]
            if LAUNCH_TAG not in tags:
                mod[gvar] = func.with_attr(LAUNCH_PARAMS, tags + [LAUNCH_TAG])
    return mod


def waits_itself(kernel: tirx.PrimFunc) -> bool:
    return f'"{WAITS_IN_KERNEL}"' in kernel.script()


@tvm.transform.module_pass(opt_level=0, name="InsertGridDependencyWaits")
def insert_grid_dependency_waits(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """After the split: each device kernel launched with the tag starts with the wait and the
    trigger, unless it is marked as waiting itself."""
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc) or not func.attrs or \
                func.attrs.get("calling_conv") != _DEVICE_KERNEL or not _is_cuda(func):
            continue
        if LAUNCH_TAG not in [str(tag) for tag in func.attrs.get(LAUNCH_PARAMS, [])]:
            continue
        if waits_itself(func):
            continue
        body = tirx.SeqStmt([tirx.Evaluate(T.ptx.griddepcontrol.wait()),
                             tirx.Evaluate(T.ptx.griddepcontrol.launch_dependents()), func.body])
        mod[gvar] = func.with_body(body)
    return mod


def tir_pipeline(dependent_launch: bool) -> str:
    """The TIR pipeline `tvm.compile` takes for a CUDA build: ours, or TVM's plain one."""
    return TIR_PIPELINE if dependent_launch else "default"


def _pipeline():
    lower, finalize_host, finalize_device = get_tir_pipeline("default")
    return (tvm.transform.Sequential([request_dependent_launch, lower, insert_grid_dependency_waits]),
            finalize_host, finalize_device)


register_tir_pipeline(TIR_PIPELINE, _pipeline)
