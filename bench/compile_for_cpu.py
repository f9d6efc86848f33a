"""Compiles a model's CPU build for another x86 processor whose instructions this one runs, to
time here what that processor's build does (with bench/artifact_ab.py):

    python bench/compile_for_cpu.py MODEL --mcpu alderlake --int8 avxvnni --root DIR
    python bench/compile_for_cpu.py MODEL --mcpu alderlake --root DIR     # fp32 activations

--mcpu is LLVM's processor name (alderlake: AVX2 and AVX-VNNI, no AVX-512); --int8 the dot
product of a build with int8 activations (q8_matmul.INT8_DOTS), none for fp32 activations.
MODEL is a GGUF file or a geometry name. Prints the artifact folder. Builds go under --root
(the build key fingerprints this processor, not --mcpu, so they must not share the cache).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trimode import artifacts  # noqa: E402
from trimode.compiler.build import compile_model  # noqa: E402
from trimode.model.config import GEOMETRIES  # noqa: E402
from trimode.model.gguf_file import load_model  # noqa: E402
from trimode.model.weights import quantized_parts  # noqa: E402
from trimode.runtime.bench import tiled_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--mcpu", required=True)
    parser.add_argument("--int8", choices=sorted(artifacts.INT8_DOT_FLAGS))
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()

    from tvm.target import codegen

    if args.model in GEOMETRIES:
        cfg, weights = GEOMETRIES[args.model], tiled_weights(GEOMETRIES[args.model])
    else:
        model = load_model(args.model)
        cfg, weights = model.config, model.weights
    codegen.llvm_get_system_cpu = lambda: args.mcpu
    artifacts.cpu_int8_dot = lambda: args.int8
    os.environ["TRIMODE_INT8"] = "1" if args.int8 else "0"
    print(compile_model(cfg, quantized_parts(weights), "llvm", root=args.root / args.mcpu))


if __name__ == "__main__":
    main()
