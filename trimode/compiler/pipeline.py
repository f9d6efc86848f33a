"""Relax module -> VM executable: one flat, ordered list of passes per target."""
from __future__ import annotations

import time

import tvm
from tvm import relax


def relax_passes(target: tvm.target.Target) -> list:
    from tvm.s_tir import dlight as dl

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
        # Kernels that arrive unscheduled (norms, rope, elementwise, fallbacks) get dlight's
        # default GPU schedules; hand-scheduled ones are left alone.
        passes.append(dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                              dl.gpu.GeneralReduction(), dl.gpu.Fallback()))
    passes += [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
    return passes


def build_executable(mod: tvm.IRModule, target_spec: dict, log) -> relax.VMExecutable:
    target = tvm.target.Target(target_spec, host="llvm") if target_spec["kind"] == "cuda" \
        else tvm.target.Target(target_spec)
    started = time.time()
    with target:
        mod = tvm.transform.Sequential(relax_passes(target))(mod)
        log(f"  lowered Relax in {time.time() - started:.1f}s; generating code...")
        if target_spec["kind"] == "cuda":
            from trimode.compiler.cuda_env import cuda_build_context

            with cuda_build_context(target):
                return tvm.compile(mod, target, relax_pipeline=None)
        return tvm.compile(mod, target, relax_pipeline=None)
