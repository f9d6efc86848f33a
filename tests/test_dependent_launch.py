"""Programmatic dependent launch in the CUDA build (trimode/compiler/grid_dependency.py), checked
without a GPU: every kernel of the exported library is launched with the tag (read off the
library's own kernel table, what libtvm_runtime_cuda reads), and every kernel's code waits for
the previous kernel before touching anything but weights: TVM's kernels first thing, the
hand-written Q8_0 kernels in their own source (decode and block after asking for weights). The emulator
tests (test_q8_matmul_cuda_emulated.py, test_tvm_kernels_emulated.py) run the kernels with
everything but the weights poisoned until that wait."""
from __future__ import annotations

import re
import shutil
import struct

import pytest

tvm = pytest.importorskip("tvm")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)

from runtime_only import PREAMBLE  # noqa: E402
from trimode.compiler.grid_dependency import LAUNCH_TAG, TIR_PIPELINE  # noqa: E402
from trimode.model.config import GEOMETRIES  # noqa: E402

CFG = GEOMETRIES["tiny"]
DYNAMIC_SHARED = "tirx.use_dyn_shared_memory"


def kernel_launch_tags(library: bytes) -> dict[str, list[str]]:
    """The CUDA module's kernel table in an exported library: kernel name -> launch tags.
    Layout (TVM's CUDA module serialisation): "cuda", blob size, format, then per kernel its
    name twice, argument dtypes (4 bytes each), launch tags, extra argument tags (4 bytes each)."""
    at = library.index(struct.pack("<Q", 4) + b"cuda") + 12 + 8

    def u64():
        nonlocal at
        at += 8
        return struct.unpack_from("<Q", library, at - 8)[0]

    def text():
        nonlocal at
        size = u64()
        at += size
        return library[at - size:at].decode()

    def skip_words():  # a count, then that many 4-byte values
        nonlocal at
        count = u64()
        at += 4 * count

    text()  # the binary's format
    table = {}
    for _ in range(u64()):
        text()
        name = text()
        skip_words()
        table[name] = [text() for _ in range(u64())]
        skip_words()
    return table


def build_tiny(tmp_path, monkeypatch, pdl: str):
    from trimode.compiler.build import compile_model

    monkeypatch.setenv("TRIMODE_PDL", pdl)
    quantized = {"embed": True, "layers": True, "output": True}
    return compile_model(CFG, quantized, "cuda", "sm_90a", root=tmp_path, log=lambda msg: None)


RUNTIME_LOOKUP = PREAMBLE + """
def modules(module):
    yield module
    for imported in module.imports:
        yield from modules(imported)

library = tvm_ffi.load_module(sys.argv[1])
cuda = next(m for m in modules(library) if m.kind == "cuda")
for name in sys.argv[2:]:  # the runtime parses each kernel's launch tags here
    assert cuda.get_function(name) is not None, name
assert "tvm" not in sys.modules
print("looked up", len(sys.argv) - 2)
"""


def test_every_kernel_of_the_library_launches_dependent_and_the_switch_turns_it_off(tmp_path, monkeypatch):
    import subprocess
    import sys

    on = build_tiny(tmp_path, monkeypatch, "1")
    table = kernel_launch_tags((on / "model.so").read_bytes())
    assert len(table) > 20  # every kernel of four entries
    for name, tags in table.items():
        assert LAUNCH_TAG in tags, name
        if DYNAMIC_SHARED in tags:  # the runtime reads the shared-memory size off the last tag
            assert tags[-1] == DYNAMIC_SHARED, (name, tags)
    assert any(DYNAMIC_SHARED in tags for tags in table.values())  # the prefill GEMM
    # the GPU box's runtime (libtvm_runtime_cuda) accepts every kernel's tags
    looked_up = subprocess.run([sys.executable, "-c", RUNTIME_LOOKUP, str(on / "model.so"), *table],
                               capture_output=True, text=True)
    assert looked_up.returncode == 0 and f"looked up {len(table)}" in looked_up.stdout, looked_up.stderr[-2000:]

    off = build_tiny(tmp_path, monkeypatch, "0")
    assert off != on  # its own artifact key
    plain = kernel_launch_tags((off / "model.so").read_bytes())
    assert plain.keys() == table.keys()
    assert not any(LAUNCH_TAG in tags for tags in plain.values())


_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^)]*\) \{\n')


def test_every_kernel_waits_before_touching_what_earlier_kernels_wrote():
    from trimode.artifacts import resolve_target
    from trimode.compiler.cuda_env import cuda_build_context
    from trimode.compiler.kernel_table import Kernels
    from trimode.compiler.model import NLDModel, mark_static_arguments
    from trimode.compiler.pipeline import relax_passes

    model = NLDModel(CFG, {"embed": True, "layers": True, "output": True}, Kernels(CFG, "cuda"))
    mod, _ = model.export_tvm(spec=model.entry_specs())
    target = tvm.target.Target(resolve_target("cuda"), host="llvm")
    with target, cuda_build_context(target), \
            tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        mod = tvm.transform.Sequential(relax_passes(target))(mark_static_arguments(mod))
        lib = tvm.compile(mod, target, relax_pipeline=None, tir_pipeline=TIR_PIPELINE)
    def modules(module):
        yield module
        for imported in module.imports:
            yield from modules(imported)

    source = next(m for m in modules(lib.mod) if m.kind == "cuda").inspect_source()
    kernels = list(_KERNEL.finditer(source))
    assert len(kernels) > 20
    waiting_itself = set()
    for match in kernels:
        body = source[match.end():source.index("\n}\n", match.end())]
        if body.startswith("  tvm_builtin_ptx_griddepcontrol_wait();\n"
                           "  tvm_builtin_ptx_griddepcontrol_launch_dependents();\n"):
            continue
        # a hand-written kernel: its device function issues the wait (the decode and block
        # ones after asking for their first weights)
        called = re.findall(r"\b(trimode_q8_(?:gemv|splitk|mma|gemm)_\w+)\(", body)
        assert called, f"{match.group(1)} neither waits at entry nor calls a kernel that waits"
        device = source[source.index(f"void {called[0]}(const half*"):]
        device = device[:device.index("\n}\n")]
        assert f"  {called[0]}_wait_previous_kernels();\n" in device, called[0]
        waiting_itself.add(called[0].split("_n")[0])
    # decode's gemv, the blocks' split-K kernel and the short prompts' copy of it, the
    # prefill GEMM
    assert waiting_itself == {"trimode_q8_gemv", "trimode_q8_splitk", "trimode_q8_gemm"}
