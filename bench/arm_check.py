"""The Arm CPU build checked without an Arm machine: built here (x86, the TVM compiler, Debian's
g++-aarch64-linux-gnu), run under qemu-user by an aarch64 Python with only the runtime
libraries, as tests/test_int8_activations.py and test_compiled_model.py check the x86 builds:

    python bench/arm_check.py build DIR          # x86: kernels, tiny + default model builds
    qemu-aarch64-static -cpu max -L SYSROOT SYSROOT/usr/bin/python3.11 bench/arm_check.py run DIR

bench/arm_check.sh sets up the sysroot and runs both. Checked: the quantize kernel and the
sdot and fp32 Q8_0 matmuls against float64 at the tests' shapes; the tiny model's sdot build
against the int8 reference and its fp32 build against the float64 one, every entry; greedy
self-speculation == greedy AR on both; and the default model's logits on the README prompt
against the x86 int8 build's. Correctness only: qemu's speed says nothing about an Arm core's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "trimode/data/nld-tiny-code.gguf"
TRIPLE, MCPU = "aarch64-linux-gnu", "neoverse-n1"  # the first Neoverse core with dotprod
# The shapes of tests/test_int8_activations.py: full and partial packs, gated and plain,
# every remainder of the 4- and 6-row tiles
MATMULS = [(200, 96, "one", False), (200, 96, "block", False), (64, 128, "block", True),
           (48, 64, "many", True), (300, 64, "many", False)]
CTX = 256


def kernel_name(n, k, rows, gated, int8):
    return f"mm_{n}_{k}_{rows}_{int(gated)}_{int8 or 'fp32'}.so"


def build(out: Path) -> None:
    import tvm
    from tvm.support.cc import cross_compiler

    from bench.compile_for_cpu import compile_for
    from trimode.compiler.kernels.q8_matmul import INT8_DOTS, q8_matmul_cpu, quantize_rows
    from trimode.model.make_model import make_model

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "x86_default_logits.npy", default_model_logits(native_engine(DEFAULT_MODEL)))
    compiler = cross_compiler(f"{TRIPLE}-g++")
    for int8 in ("sdot", None):
        target = tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE, "mcpu": MCPU,
                                    "mattr": INT8_DOTS[int8].mattr if int8 else []})
        kernels = {kernel_name(*shape, int8): q8_matmul_cpu(*shape, int8=int8) for shape in MATMULS}
        if int8:
            kernels.update({f"quantize_{k}_{rows}.so": quantize_rows(k, rows)
                            for k in {128} | {shape[1] for shape in MATMULS} for rows in ("one", "block")})
        for name, func in kernels.items():
            tvm.compile(func.with_attr("global_symbol", "f"), target=target).export_library(
                str(out / name), fcompile=compiler)
    tiny = out / "tiny.gguf"
    make_model(tiny, "tiny", seed=0)
    builds = {f"{name}/{int8 or 'fp32'}": str(compile_for(str(model), MCPU, int8, out / "artifacts", TRIPLE))
              for name, model in (("tiny", tiny), ("default", DEFAULT_MODEL)) for int8 in ("sdot", None)}
    (out / "builds.json").write_text(json.dumps(builds, indent=1))


def native_engine(path: Path):
    """This machine's own int8 build of the model at `path`."""
    import os

    from trimode.model.gguf_file import load_model
    from trimode.runtime.engine import Engine

    os.environ["TRIMODE_INT8"] = "1"
    model = load_model(path)
    return Engine(model.config, model.weights, "llvm", model.metadata)


def default_model_logits(engine) -> np.ndarray:
    """The README prompt's rows: prefill, then a draft of 4 and a verify of 4."""
    ids = engine.tokenizer.encode("def fibonacci(n):")
    fwd = engine.new_sequence(CTX)
    rows = [fwd.causal(ids).logits(), fwd.bidirectional([ids[-1]] + [engine.config.mask_token_id] * 3).logits(),
            fwd.causal(ids[:4]).logits()]
    return np.concatenate(rows)


def rel_err_of_rows(got, want):
    return np.abs(got - want).max(axis=-1) / np.abs(want).max()


def run(out: Path) -> int:
    from trimode.model.gguf_file import load_model
    from trimode.model.reference import ReferenceForward, ReferenceModel
    from trimode.runtime.engine import Engine
    from trimode.runtime.generation import DecodeParams, GenerationRequest, generate
    from trimode.runtime.tvm_runtime import Device

    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            failures.append(what)

    device = Device("llvm")
    run_kernels(out, device, check)
    builds = json.loads((out / "builds.json").read_text())
    tiny = load_model(out / "tiny.gguf")
    for int8 in ("sdot", "fp32"):
        engine = Engine(tiny.config, tiny.weights, "llvm", tiny.metadata, artifact=builds[f"tiny/{int8}"])
        check(engine.manifest["int8_dot"] == (None if int8 == "fp32" else int8), f"tiny {int8}: manifest")
        cfg, fwd = engine.config, engine.new_sequence(CTX)
        refs = [ReferenceForward(ReferenceModel(cfg, tiny.weights, int8_activations=q), CTX) for q in (True, False)]
        tokens = np.random.default_rng(0).integers(4, cfg.vocab, 70).tolist()
        steps = [lambda f: f.causal(tokens), lambda f: f.causal([7]),
                 lambda f: f.bidirectional([cfg.mask_token_id] * 6 + [3]), lambda f: f.causal(tokens[:9])]
        errors, moves = [], []
        for step in steps:
            got, int8_ref, float_ref = (step(f).logits() for f in (fwd, *refs))
            want = int8_ref if int8 == "sdot" else float_ref
            errors.append(rel_err_of_rows(got, want))
            moves.append(rel_err_of_rows(int8_ref, float_ref))
        errors, moves = np.concatenate(errors), np.concatenate(moves)
        if int8 == "sdot":  # tests/test_int8_activations.py's bounds
            check(np.median(errors) < 1e-4 and errors.max() < 2 * moves.max(),
                  f"tiny sdot: 87 rows vs the int8 reference, median {np.median(errors):.1e}, "
                  f"max {errors.max():.1e} (quantization moves rows up to {moves.max():.1e})")
        else:  # test_compiled_model.py's
            check(errors.max() < 1e-3, f"tiny fp32: 87 rows vs the float64 reference, max {errors.max():.1e}")
        prompt = tuple(np.random.default_rng(5).integers(4, cfg.vocab, 30).tolist())

        def tokens_of(mode):
            request = GenerationRequest(prompt_ids=prompt, max_tokens=40, loop_detection=False,
                                        decode=DecodeParams(mode=mode, draft_length=4))
            *_, done = generate(engine.new_sequence(CTX), engine.tokenizer, request)
            return done.tokens
        ar = tokens_of("ar")
        check(len(ar) == 40 and tokens_of("spec") == ar, f"tiny {int8}: greedy spec == greedy AR, 40 tokens")
    default = load_model(DEFAULT_MODEL)
    engine = Engine(default.config, default.weights, "llvm", default.metadata, artifact=builds["default/sdot"])
    got, x86 = default_model_logits(engine), np.load(out / "x86_default_logits.npy")
    diff = rel_err_of_rows(got, x86)
    check(diff.max() < 1e-4 and (got.argmax(-1) == x86.argmax(-1)).all(),
          f"default model sdot vs this x86's int8 build: {len(diff)} rows, max {diff.max():.1e}, "
          f"{int((diff == 0).sum())} rows bit-identical, argmax equal")
    print(f"{len(failures)} failed" if failures else "all passed")
    return 1 if failures else 0


def run_kernels(out: Path, device, check) -> None:
    """The kernels alone, as test_int8_activations.py and test_q8_matmul_cpu.py hold them."""
    from trimode.model.reference import int8_rows
    from trimode.model.weights import Q8Matrix, Q8_BLOCK, packed, packed_for_int8_dot

    def load(name):
        return device.load_library(out / name)["f"]

    def quantized(x, rows):
        m, k = x.shape
        outs = [device.empty(s, t) for s, t in
                (([m, k], "int8"), ([m, k // Q8_BLOCK], "float32"), ([m, k // Q8_BLOCK], "int32"))]
        load(f"quantize_{k}_{'one' if rows == 'one' else 'block'}.so")(device.upload(x), *outs)
        return outs

    rng = np.random.default_rng(0)
    for rows in ("one", "block"):
        m = 1 if rows == "one" else 5
        x = (rng.standard_normal((m, 128)) * np.array([1e-3, 1, 30, 1e3])[None].repeat(32, 1)).astype(np.float32)
        values, scales, sums = (device.download(t) for t in quantized(x, rows))
        dequantized = (values.reshape(m, -1, 32) * scales[..., None].astype(np.float64)).reshape(m, -1)
        check(np.array_equal(dequantized, int8_rows(x)) and np.array_equal(
            sums, 128 * values.reshape(m, -1, 32).astype(np.int32).sum(-1)), f"quantize {rows}: rounds as the reference")
    for n, k, rows, gated in MATMULS:
        w = Q8Matrix.quantize(np.random.default_rng(n + k).standard_normal((n, k)).astype(np.float32))
        for int8 in ("sdot", None):
            mm = load(kernel_name(n, k, rows, gated, int8))
            weights = [device.upload(packed_for_int8_dot(w.q) if int8 else packed(w.q)), device.upload(packed(w.scale))]
            worst = 0.0
            for m in [1] if rows == "one" else range(1, 14):
                x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
                y = device.empty([m, n // 2 if gated else n], "float32")
                mm(*(quantized(x, rows) if int8 else [device.upload(x)]), *weights, y)
                want = (int8_rows(x) if int8 else x.astype(np.float64)) @ w.dequantize(np.float64).T
                if gated:
                    gate, up = want[:, 0::2], want[:, 1::2]
                    want = gate / (1 + np.exp(-gate)) * up
                worst = max(worst, np.abs(device.download(y) - want).max() / np.abs(want).max())
            # int8: exact int32 sums, scaled once; fp32: float32 sums (test_q8_matmul_cpu.py's bound)
            check(worst <= (1e-5 if int8 else 1e-4), f"matmul {int8 or 'fp32'} {n}x{k} {rows}{' gated' if gated else ''}: "
                  f"max rel err {worst:.1e} vs float64")


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "build":
        build(folder)
    else:
        sys.exit(run(folder))
