"""Compiles a model's CPU build for another processor: an x86 one whose instructions this one
runs, to time here what that processor's build does (with bench/artifact_ab.py), or, with
--triple, another architecture's (an Arm build, run under qemu by bench/arm_check.py):

    python bench/compile_for_cpu.py MODEL --mcpu alderlake --int8 avxvnni --root DIR
    python bench/compile_for_cpu.py MODEL --mcpu alderlake --root DIR     # fp32 activations
    python bench/compile_for_cpu.py MODEL --mcpu neoverse-n1 --int8 sdot --triple aarch64-linux-gnu --root DIR

--mcpu is LLVM's processor name (alderlake: AVX2 and AVX-VNNI, no AVX-512); --int8 the dot
product of a build with int8 activations (q8_matmul.INT8_DOTS), none for fp32 activations;
--triple links with that triple's g++ (Debian's g++-aarch64-linux-gnu). MODEL is a GGUF file
or a geometry name. Prints the artifact folder. Builds go under --root (the build key
fingerprints this processor, not --mcpu, so they must not share the cache).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trimode import artifacts  # noqa: E402
from trimode.compiler import build  # noqa: E402
from trimode.model.config import GEOMETRIES  # noqa: E402
from trimode.model.gguf_file import load_model  # noqa: E402
from trimode.model.weights import quantized_parts  # noqa: E402
from trimode.runtime.bench import tiled_weights  # noqa: E402


def cross_target(triple: str):
    """Makes every CPU build target `triple` and link with its g++; returns that compiler."""
    import tvm
    from tvm.support.cc import cross_compiler

    compiler = cross_compiler(f"{triple}-g++")
    resolve = build.resolve_target
    build.resolve_target = lambda name, arch=None: {**resolve(name, arch), "mtriple": triple}
    export = tvm.runtime.Executable.export_library
    tvm.runtime.Executable.export_library = lambda self, path, **kw: export(
        self, path, **{"fcompile": compiler, **kw})
    return compiler


def compile_for(model: str, mcpu: str, int8: str | None, root: Path, triple: str | None = None) -> Path:
    from tvm.target import codegen

    if model in GEOMETRIES:
        cfg, weights = GEOMETRIES[model], tiled_weights(GEOMETRIES[model])
    else:
        loaded = load_model(model)
        cfg, weights = loaded.config, loaded.weights
    if triple:
        cross_target(triple)
    codegen.llvm_get_system_cpu = lambda: mcpu
    artifacts.cpu_int8_dot = lambda: int8
    os.environ["TRIMODE_INT8"] = "1" if int8 else "0"
    return build.compile_model(cfg, quantized_parts(weights), "llvm", root=root / mcpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--mcpu", required=True)
    parser.add_argument("--int8", choices=sorted(artifacts.INT8_DOT_FLAGS))
    parser.add_argument("--triple")
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    print(compile_for(args.model, args.mcpu, args.int8, args.root, args.triple))


if __name__ == "__main__":
    main()
