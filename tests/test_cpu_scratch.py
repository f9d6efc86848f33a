"""Where a CPU build's kernels keep their scratch. TVM allocates a buffer of 1 KB or more, and
any scalar a kernel writes as `x = expr` in TVMScript (a local_scalar), with a call to
TVMBackendAllocWorkspace and one to TVMBackendFreeWorkspace each time the code runs: inside a
loop, once an iteration, and each call spills the vector registers (the Q8_0 matmul's prefetch
index did so once a block: the 3B's decode step 1.04-1.07x slower). Scalars are written as
`x: T.let[...] = expr`, and register blocks stay under 1 KB; this holds the whole tiny build
(every entry and kernel, AVX-512 with AMX and AVX2, int8 activations) to it, in LLVM's IR."""
from __future__ import annotations

import re

import pytest

from test_arm_build import compile_for_cpu

# TVMBackendAllocWorkspace(device type, device id, bytes, dtype code, dtype bits), as TVM calls it
WORKSPACE = re.compile(r"%([\w.]+) = (?:tail )?call ptr %\d+\(i32 1, i32 %?[\w.]+, i64 (\d+), i32")
# the attention's register blocks, by their TVMScript names
REGISTER_BLOCKS = {"part0", "part1", "row_acc"}


def cpu_build_ir(tmp_path, tiny_model, mcpu: str, int8: str, amx: bool) -> str:
    from trimode.compiler import build
    from trimode.model.weights import quantized_parts

    exported = []
    with compile_for_cpu.building_for(mcpu, int8, export=lambda exe, path, **kw: exported.append(exe), amx=amx):
        build.compile_model(tiny_model.config, quantized_parts(tiny_model.weights), "llvm",
                            root=tmp_path, log=lambda msg: None)
    (exe,) = exported
    return "\n".join(lib.inspect_source("ll") for lib in exe.mod.imports if lib.kind == "llvm")


@pytest.mark.parametrize("mcpu, int8, amx", [("sapphirerapids", "avx512vnni", True), ("alderlake", "avxvnni", False)])
def test_cpu_kernels_allocate_only_large_scratch(tmp_path, tiny_model, mcpu, int8, amx):
    ir = cpu_build_ir(tmp_path, tiny_model, mcpu, int8, amx)
    workspaces = [(name, int(size)) for name, size in WORKSPACE.findall(ir)]
    # (LLVM suffixes a name it has seen: tile_k, tile_k12)
    named = lambda prefix: [w for w in workspaces if w[0].startswith(prefix)]  # noqa: E731
    # the pattern finds the attention's tiles, rows and scores, so it reads TVM's calls right
    assert all(named(scratch) for scratch in ("tile_k", "tile_v", "qs", "acc", "scores")
               + (("scratch",) if amx else ()))
    assert ("tdpbsud" in ir) == amx
    assert [w for w in workspaces if w[1] < 1024] == []
    assert [w for block in REGISTER_BLOCKS for w in named(block)] == []
