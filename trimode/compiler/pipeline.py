"""Relax module -> VM executable: one flat, ordered list of passes per target."""
from __future__ import annotations

import contextlib
import time

import tvm
from tvm import relax

from trimode.compiler.kernels.q8_matmul import INT8_DOTS
from trimode.compiler.kernels.q8_matmul_amx import MATTR as AMX_MATTR


@tvm.transform.module_pass(opt_level=0, name="ScheduleUnscheduledKernels")
def schedule_unscheduled_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Kernels that arrive unscheduled (norms, rope, elementwise, argmax) get dlight's GPU
    schedules; hand-scheduled ones are left alone. A dlight rule that does not fit a kernel
    raises instead of declining (TVM.md), so each kernel tries rule lists in order."""
    from tvm.s_tir import dlight as dl

    rule_lists = [
        [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()],
        [dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()],
        [dl.gpu.GeneralReduction(), dl.gpu.Fallback()],
        [dl.gpu.Fallback()],
    ]
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled")):
            continue
        single = tvm.IRModule({gvar: func})
        errors = []
        for rules in rule_lists:
            try:
                mod[gvar] = dl.ApplyDefaultSchedule(*rules)(single)[gvar]
                break
            except Exception as err:  # noqa: BLE001 (dlight raises anything)
                errors.append(f"{type(err).__name__}: {err}")
        else:
            raise RuntimeError(f"no GPU schedule fits kernel {gvar.name_hint}: {errors[-1]}")
    return mod


def relax_passes(target: tvm.target.Target) -> list:
    gpu = "gpu" in target.keys
    passes = [
        # Library ops (add, silu, split, reshape) become TIR and fuse with their neighbours;
        # our own kernels arrive as call_tir and stay as written.
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if gpu:
        passes.append(schedule_unscheduled_kernels)
    passes += [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        # Regions of kernels whose arguments are all static (weights, the sequence's tensors
        # after num_input, statically planned buffers) become CUDA graphs, captured per VM on
        # first call and replayed after; a no-op unless relax.backend.use_cuda_graph is set.
        relax.transform.RewriteCUDAGraph(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
    return passes


def cpu_target(target_spec: dict, int8_dot: str | None, amx: bool = False) -> tvm.target.Target:
    """The llvm target of this CPU's instruction set (AVX2/AVX-512: 1.5-2x on the Q8_0
    matmuls), with the int8 matmuls' dot product where one is used, and AMX's tiles."""
    from tvm.target import codegen

    cpu = {"mcpu": codegen.llvm_get_system_cpu()}
    if int8_dot:  # the processor's flags say so even where -mcpu does not
        cpu["mattr"] = INT8_DOTS[int8_dot].mattr + (AMX_MATTR if amx else [])
    return tvm.target.Target({**target_spec, **cpu})


def register_lanes(target: tvm.target.Target) -> int:
    """fp32 lanes of the vector registers the CPU kernels are written for: AVX-512's 16 where
    the target has it (and its 32 registers), else AVX2's 8 (on Arm, pairs of NEON's 4)."""
    from tvm.target import codegen

    with target:
        return 16 if codegen.target_has_features("avx512f") else 8


def build_library(mod: tvm.IRModule, target_spec: dict, library: str, log,
                  cuda_graphs: bool = False, dependent_launch: bool = False,
                  int8_dot: str | None = None, amx: bool = False) -> list[str]:
    """Compiles and exports the VM library; returns the entries that run CUDA graphs. CUDA
    builds run inside cuda_build_context, so the library embeds GPU machine code even on a
    machine without a GPU (TVM.md). dependent_launch: every kernel may start while the one
    before it drains (grid_dependency.py). int8_dot: a CPU build of int8 matmuls, on
    that dot product (q8_matmul.INT8_DOTS), and amx: its block and prefill matmuls on AMX tiles."""
    if target_spec["kind"] == "cuda":
        target = tvm.target.Target(target_spec, host="llvm")
    else:
        target = cpu_target(target_spec, int8_dot, amx)
    started = time.time()
    with target, tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": cuda_graphs}):
        mod = tvm.transform.Sequential(relax_passes(target))(mod)
        log(f"  lowered Relax in {time.time() - started:.1f}s; generating code...")
        graph_entries = sorted({gvar.name_hint.split("_cuda_graph_capture")[0]
                                for gvar in mod.functions if "_cuda_graph_capture" in gvar.name_hint})
        tir_pipeline = "default"
        if target_spec["kind"] == "cuda":
            from trimode.compiler import grid_dependency
            from trimode.compiler.cuda_env import cuda_build_context

            codegen_scope = cuda_build_context(target)
            tir_pipeline = grid_dependency.tir_pipeline(dependent_launch)
        else:
            codegen_scope = contextlib.nullcontext()
        with codegen_scope:
            tvm.compile(mod, target, relax_pipeline=None, tir_pipeline=tir_pipeline).export_library(library)
    return graph_entries
