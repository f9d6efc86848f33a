"""The CPU build with int8 activations (x86 processors with AVX2, AVX-VNNI or AVX-512 VNNI): its two kernels against
float64, and the whole model against the reference that quantizes as it does.

Each Q8_0 matmul's input is quantized per 32 (compiler/kernels/q8_matmul.quantize_rows) and
multiplied with int8 dot products (q8_matmul_cpu(int8=dot)), each dot product this processor
has. The kernels are exact given
their quantized inputs, so they are held to float32 rounding. The whole model is held to the
reference with int8_activations=True, which rounds the same way; where the two disagree it is
an activation within ~1e-7 of a rounding boundary going the other way (conftest.py). On the
tiny random model that is chaotic: such a row's K/V moves the rows after it ~1e-6, enough for
some of them to round other activations otherwise, and their logits then move as far as the
quantization itself moves them (~5e-3). So the model bound is on most rows, and all rows
within the quantization's reach.
"""
from __future__ import annotations

import numpy as np
import pytest

from trimode.artifacts import cpu_int8_dots
from trimode.model.reference import ReferenceForward, ReferenceModel, int8_rows
from trimode.model.weights import Q8Matrix, packed, packed_for_int8_dot

DOTS = cpu_int8_dots()
pytestmark = pytest.mark.skipif(not DOTS, reason="no int8 dot product here: CPU builds keep fp32 activations")

CTX = 256
# The processor each dot product's kernels are built for: AVX-VNNI's for a client core
# without AVX-512 (Alder Lake), AVX-512BW's for the first server core with it and no VNNI
# (Skylake-SP), AVX2's for the first with AVX2 (Haswell), so no kernel leans on what its
# processors lack
KERNEL_CPU = {"avxvnni": "alderlake", "avx512bw": "skylake-avx512", "avx2": "haswell"}


@pytest.fixture(scope="module", params=DOTS)
def tvm_cpu(request):
    import tvm
    from tvm.target import codegen

    from trimode.compiler.kernels.q8_matmul import INT8_DOTS

    dot = request.param
    target = tvm.target.Target({"kind": "llvm", "mcpu": KERNEL_CPU.get(dot, codegen.llvm_get_system_cpu()),
                                "mattr": INT8_DOTS[dot].mattr})
    return tvm, target, dot


def build(tvm_cpu, func):
    tvm, target, _ = tvm_cpu
    return tvm.compile(func.with_attr("global_symbol", "f"), target=target)["f"]


def quantized(tvm_cpu, x: np.ndarray, rows: str) -> list[np.ndarray]:
    """The quantize kernel's outputs for x: values, scales, 128 x the values' block sums."""
    from trimode.compiler.kernels.q8_matmul import int8_activation_specs, quantize_rows

    tvm = tvm_cpu[0]
    m, k = x.shape
    outs = [tvm.runtime.tensor(np.zeros(s, t), tvm.cpu()) for s, t in int8_activation_specs(m, k)]
    build(tvm_cpu, quantize_rows(k, rows))(tvm.runtime.tensor(x, tvm.cpu()), *outs)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("rows", ["one", "block"])
def test_quantize_kernel_rounds_as_the_reference(tvm_cpu, rows):
    rng = np.random.default_rng(0)
    m = 1 if rows == "one" else 5
    x = (rng.standard_normal((m, 128)) * np.array([1e-3, 1, 30, 1e3])[None].repeat(32, 1)).astype(np.float32)
    x[0, 32:64] = 0  # an all-zero block: scale 0, values 0
    values, scales, offsets = quantized(tvm_cpu, x, rows)
    dequantized = values.reshape(m, -1, 32) * scales[..., None].astype(np.float64)
    np.testing.assert_array_equal(dequantized.reshape(m, -1), int8_rows(x))
    assert np.abs(values).max() == 127 and not values[0, 32:64].any()
    np.testing.assert_array_equal(offsets, 128 * values.reshape(m, -1, 32).astype(np.int32).sum(-1))
    # rint rounds half to even, as numpy does: 2.5 -> 2 (ties between quanta)
    tie = np.zeros((1, 32), np.float32)
    tie[0, :3] = [127, 2.5, 3.5]
    assert quantized(tvm_cpu, tie, rows)[0][0, :3].tolist() == [127, 2, 4]


@pytest.mark.parametrize("n,k,rows,gated", [(200, 96, "one", False), (200, 96, "block", False),
                                            (64, 128, "block", True), (48, 64, "many", True),
                                            (300, 64, "many", False)])
def test_int8_matmul_equals_float64_of_its_quantized_inputs(tvm_cpu, n, k, rows, gated):
    """Full packs and a partial last one (200, 300), gated and plain, every remainder of the
    block (4-row) and prefill (6-row) tiles."""
    from trimode.compiler.kernels.q8_matmul import q8_matmul_cpu

    tvm, _, dot = tvm_cpu
    mm = build(tvm_cpu, q8_matmul_cpu(n, k, rows, gated, int8=dot))
    rng = np.random.default_rng(n + k)
    w = Q8Matrix.quantize(rng.standard_normal((n, k)).astype(np.float32))
    weights = [tvm.runtime.tensor(a, tvm.cpu()) for a in (packed_for_int8_dot(w.q), packed(w.scale))]
    for m in [1] if rows == "one" else range(1, 14):
        x = rng.standard_normal((m, k)).astype(np.float32)
        inputs = [tvm.runtime.tensor(a, tvm.cpu()) for a in quantized(tvm_cpu, x, rows)]
        out = tvm.runtime.tensor(np.zeros((m, n // 2 if gated else n), np.float32), tvm.cpu())
        mm(*inputs, *weights, out)
        want = int8_rows(x) @ w.dequantize(np.float64).T
        if gated:
            gate, up = want[:, 0::2], want[:, 1::2]
            want = gate / (1 + np.exp(-gate)) * up
        assert np.abs(out.numpy() - want).max() <= 1e-5 * np.abs(want).max(), m


def rel_err_of_rows(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.abs(got - want).max(axis=-1) / np.abs(want).max()


def engine_on(model, dot: str):
    """The int8 build on `dot` (a narrower one than this processor's widest as a processor
    without the wider one would build it)."""
    from trimode.runtime.engine import Engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIMODE_INT8", "1")
        mp.setattr("trimode.artifacts.cpu_int8_dot", lambda: dot)
        return Engine(model.config, model.weights, "llvm", metadata=model.metadata)


@pytest.fixture(scope="module", params=DOTS)
def int8_engine(request, tiny_model):
    return engine_on(tiny_model, request.param), tiny_model.weights, request.param


@pytest.mark.skipif(len(DOTS) < 2, reason="one int8 dot product here")
def test_every_dot_product_gives_the_same_logits(tiny_model):
    """The dot products differ in instructions, not in arithmetic: every block's int32 sums
    are exact, so the builds agree bit for bit (a sum off by one product would not)."""
    tokens = np.random.default_rng(3).integers(4, tiny_model.config.vocab, 40).tolist()
    logits = []
    for dot in DOTS:
        fwd = engine_on(tiny_model, dot).new_sequence(CTX)
        prefill = fwd.causal(tokens).logits()
        draft = fwd.bidirectional([tiny_model.config.mask_token_id] * 5 + [9]).logits()
        logits.append(np.concatenate([prefill, draft]))
    for dot, other in zip(DOTS[1:], logits[1:]):
        np.testing.assert_array_equal(other, logits[0], err_msg=f"{dot} vs {DOTS[0]}")


def test_the_build_says_it_quantizes_and_declares_the_dot_layout(int8_engine):
    engine, _, dot = int8_engine
    assert engine.int8_activations and engine.manifest["activations"] == "int8"
    assert engine.manifest["int8_dot"] == dot
    q = {p["name"]: p for p in engine.manifest["params"]}["layers.0.qkv.q"]
    assert q["dtype"] == "uint8" and q["shape"][2] == 64  # 16 features x 4 inputs


def test_every_entry_follows_the_int8_reference(int8_engine):
    """Prefill, decode, draft and verify over a 70-token cache (87 rows). Most rows agree with
    the int8 reference to float32 rounding (every entry does, before the cache holds a row
    that went astray), which a build that did not quantize, or quantized
    otherwise, would not (the quantization moves every row > 1e-3: the fp32-activation
    reference); no row is further off than the quantization moves the model (1.4e-2 at most
    here)."""
    engine, weights, _ = int8_engine
    cfg = engine.config
    fwd = engine.new_sequence(CTX)
    int8_ref = ReferenceForward(ReferenceModel(cfg, weights, int8_activations=True), CTX)
    float_ref = ReferenceForward(ReferenceModel(cfg, weights), CTX)
    tokens = np.random.default_rng(0).integers(4, cfg.vocab, 70).tolist()
    steps = [("prefill", lambda f: f.causal(tokens)), ("decode", lambda f: f.causal([7])),
             ("draft", lambda f: f.bidirectional([cfg.mask_token_id] * 6 + [3])),
             ("verify", lambda f: f.causal(tokens[:9]))]
    errors, moves = [], []
    for _, step in steps:
        got, want, unquantized = (step(f).logits() for f in (fwd, int8_ref, float_ref))
        errors.append(rel_err_of_rows(got, want))
        moves.append(rel_err_of_rows(want, unquantized))
    errors, moves = np.concatenate(errors), np.concatenate(moves)
    assert len(errors) == 87 and moves.min() > 1e-3
    assert np.median(errors) < 1e-4  # 74% of the rows here, the others past a row gone astray
    assert errors.max() < 2 * moves.max()


def test_greedy_spec_equals_greedy_ar_on_the_int8_build(int8_engine):
    from trimode.runtime.generation import DecodeParams, GenerationRequest, generate

    engine, _, _ = int8_engine
    prompt = tuple(np.random.default_rng(5).integers(4, engine.config.vocab, 30).tolist())

    def tokens(mode):
        request = GenerationRequest(prompt_ids=prompt, max_tokens=40, loop_detection=False,
                                    decode=DecodeParams(mode=mode, draft_length=4))
        *_, done = generate(engine.new_sequence(CTX), engine.tokenizer, request)
        return done.tokens

    ar = tokens("ar")
    assert len(ar) == 40 and tokens("spec") == ar
