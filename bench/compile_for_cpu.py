"""Compiles a model's CPU build for another processor: an x86 one whose instructions this one
runs, to time here what that processor's build does (with bench/artifact_ab.py), or, with
--triple, another architecture's (an Arm build, run under qemu by bench/arm_check.py):

    python bench/compile_for_cpu.py MODEL --mcpu alderlake --int8 avxvnni --root DIR
    python bench/compile_for_cpu.py MODEL --mcpu alderlake --root DIR     # fp32 activations
    python bench/compile_for_cpu.py MODEL --mcpu neoverse-n1 --int8 sdot --triple aarch64-linux-gnu --root DIR
    python bench/compile_for_cpu.py MODEL --mcpu sapphirerapids --int8 avx512vnni --amx --root DIR

--mcpu is LLVM's processor name (alderlake: AVX2 and AVX-VNNI, no AVX-512); --int8 the dot
product of a build with int8 activations (q8_matmul.INT8_DOTS), none for fp32 activations;
--triple links with that triple's g++ (Debian's g++-aarch64-linux-gnu); --amx runs the block and
prefill matmuls on AMX tiles (q8_matmul_amx.py). MODEL is a GGUF file
or a geometry name. Prints the artifact folder. Builds go under --root (the build key
fingerprints this processor, not --mcpu, so they must not share the cache).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trimode import artifacts  # noqa: E402
from trimode.compiler import build  # noqa: E402
from trimode.model.config import GEOMETRIES  # noqa: E402
from trimode.model.gguf_file import load_model  # noqa: E402
from trimode.model.weights import quantized_parts  # noqa: E402
from trimode.runtime.bench import tiled_weights  # noqa: E402


@contextlib.contextmanager
def building_for(mcpu: str, int8: str | None, triple: str | None = None, export=None, amx: bool = False):
    """Inside it, compile_model builds for the processor LLVM calls `mcpu`, with the int8 dot
    product `int8` (None: fp32 activations), block and prefill matmuls on AMX tiles if `amx`, and for `triple`
    when given, linked by that triple's g++ unless `export(executable, path, **kw)` replaces
    the library's export."""
    import tvm
    from tvm.support.cc import cross_compiler
    from tvm.target import codegen

    resolve = build.resolve_target
    with contextlib.ExitStack() as stack:
        def patch(owner, name, value):
            stack.enter_context(mock.patch.object(owner, name, value))
        patch(codegen, "llvm_get_system_cpu", lambda: mcpu)
        patch(artifacts, "cpu_int8_dot", lambda: int8)
        patch(artifacts, "cpu_amx", lambda: amx)
        stack.enter_context(mock.patch.dict(os.environ, {"TRIMODE_INT8": "1" if int8 else "0"}))
        if triple:
            patch(build, "resolve_target", lambda name, arch=None: {**resolve(name, arch), "mtriple": triple})
            if export is None:
                compiler, original = cross_compiler(f"{triple}-g++"), tvm.runtime.Executable.export_library
                export = lambda exe, path, **kw: original(exe, path, **{"fcompile": compiler, **kw})  # noqa: E731
        if export is not None:
            patch(tvm.runtime.Executable, "export_library", export)
        yield


def compile_for(model: str, mcpu: str, int8: str | None, root: Path, triple: str | None = None,
                amx: bool = False) -> Path:
    if model in GEOMETRIES:
        cfg, weights = GEOMETRIES[model], tiled_weights(GEOMETRIES[model])
    else:
        loaded = load_model(model)
        cfg, weights = loaded.config, loaded.weights
    with building_for(mcpu, int8, triple, amx=amx):
        return build.compile_model(cfg, quantized_parts(weights), "llvm", root=root / mcpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--mcpu", required=True)
    parser.add_argument("--int8", choices=sorted(artifacts.INT8_DOT_FLAGS))
    parser.add_argument("--triple")
    parser.add_argument("--amx", action="store_true",
                        help="block and prefill matmuls on AMX tiles (with --int8 avx512vnni)")
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    if args.amx and args.int8 != "avx512vnni":
        parser.error("--amx needs --int8 avx512vnni")
    print(compile_for(args.model, args.mcpu, args.int8, args.root, args.triple, args.amx))


if __name__ == "__main__":
    main()
