"""The TIR kernels' CUDA, as TVM generates it for the GPU, run on the CPU (tvm_cuda_emulation.py)
against float64: the decode attention with its own schedule (split kernel, then merge), and
the norms and the rope kernels under the pipeline's dlight schedules. Their llvm twins test
the algorithms; these test the thread bindings, shared memory and reductions of the GPU
build, which otherwise first run on a GPU."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
if shutil.which("g++") is None or shutil.which("nvcc") is None:
    pytest.skip("needs g++ (the emulator) and nvcc (TVM's CUDA build)", allow_module_level=True)

from test_attention_cuda import attention_reference  # noqa: E402
from tvm_cuda_emulation import run_primfunc  # noqa: E402

from trimode.artifacts import resolve_target  # noqa: E402
from trimode.compiler.kernels import norm, rope  # noqa: E402
from trimode.compiler.kernels.attention_cuda import attention_cuda, default_plan, scratch_rows  # noqa: E402
from trimode.compiler.pipeline import schedule_unscheduled_kernels  # noqa: E402
from trimode.model.config import GEOMETRIES  # noqa: E402
from trimode.model.reference import chunk_masses, rmsnorm, top_candidates  # noqa: E402
from trimode.model.reference import rope as rope_reference  # noqa: E402

CTX, LAYERS, LAYER = 256, 2, 1


def scheduled(func):
    """func as the model pipeline hands it to code generation: dlight's GPU schedule."""
    target = tvm.target.Target(resolve_target("cuda", "sm_90a"), host="llvm")
    with target:
        return schedule_unscheduled_kernels(tvm.IRModule({"main": func}))["main"]


def rel_err(got, want) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


@pytest.mark.parametrize("order", [(False, False), (True, True)], ids=["forward", "reverse-greedy"])
# the tiny test model's heads; the default model's (3 q heads a kv head, d = 48); the 14B's d
@pytest.mark.parametrize("heads, pos", [((4, 1, 32), 200), ((4, 1, 32), 0), ((6, 2, 48), 70), ((8, 2, 128), 130)])
def test_decode_attention_as_built_for_the_gpu(heads, pos, order):
    n_heads, n_kv_heads, d = heads
    plan = default_plan(n_heads, n_kv_heads, "one", d)
    func = attention_cuda(n_heads, n_kv_heads, d, True, "float16", 1, plan=plan)
    rng = np.random.default_rng(pos)
    q = rng.standard_normal((1, n_heads, d)).astype(np.float16)
    kv = rng.standard_normal((LAYERS, 2, n_kv_heads, CTX, d)).astype(np.float16)
    k_new = rng.standard_normal((1, n_kv_heads, d)).astype(np.float16)
    v_new = rng.standard_normal((1, n_kv_heads, d)).astype(np.float16)
    rows = scratch_rows(n_heads, n_kv_heads, plan, 1)
    # poisoned: splits past the keys at this pos (the grid follows the cache size) must still
    # write what the merge weighs as nothing
    buffers = {"q": q, "kv": kv.copy(), "pos_buf": np.array([pos], np.int32), "k_new": k_new, "v_new": v_new,
               "out": np.full((1, n_heads, d), np.nan, np.float16),
               "part_out": np.full((rows, n_heads, d), np.nan, np.float32),
               "part_lse": np.full((rows, n_heads), np.nan, np.float32)}
    run_primfunc(func, buffers, {"ctx": CTX, "layer": LAYER, "n_layers": LAYERS, "n_part": rows},
                 reverse=order[0], greedy=order[1])
    want = attention_reference(q.astype(float), kv.astype(float), LAYER, pos, k_new.astype(float),
                               v_new.astype(float), causal=True)
    assert np.isfinite(buffers["out"].astype(np.float32)).all()
    assert rel_err(buffers["out"], want) < 2e-3  # fp16 inputs and output
    np.testing.assert_array_equal(buffers["kv"], kv)  # the cache is only read


@pytest.mark.parametrize("t", [1, 5])
def test_norms_as_built_for_the_gpu(t):
    hidden, eps = 384, 1e-6
    rng = np.random.default_rng(t)
    x = rng.standard_normal((t, hidden)).astype(np.float16)
    delta = rng.standard_normal((t, hidden)).astype(np.float16)
    w = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    s = (x + delta).astype(np.float16)  # the stream, rounded as stored

    buffers = {"x": x, "w": w, "y": np.full((t, hidden), np.nan, np.float16)}
    run_primfunc(scheduled(norm.rms_norm(hidden, eps, "float16")), buffers, {"t": t})
    assert rel_err(buffers["y"], rmsnorm(x.astype(float), w, eps)) < 1e-3

    buffers = {"x": x, "delta": delta, "w": w, "s": np.full((t, hidden), np.nan, np.float16),
               "y": np.full((t, hidden), np.nan, np.float16)}
    run_primfunc(scheduled(norm.add_rms_norm(hidden, eps, "float16")), buffers, {"t": t})
    np.testing.assert_array_equal(buffers["s"], s)
    assert rel_err(buffers["y"], rmsnorm(s.astype(float), w, eps)) < 1e-3


@pytest.mark.parametrize("append", [True, False], ids=["causal", "draft"])
def test_rope_kernels_as_built_for_the_gpu(append):
    cfg = GEOMETRIES["tiny"]
    hq, hkv, d, t, pos = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 3, 60
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((t, (hq + 2 * hkv) * d)).astype(np.float16)
    cos, sin = (np.asarray(a, np.float32) for a in cfg.rope_tables(CTX))
    q_scale = rng.uniform(1, 1.2, CTX).astype(np.float32)
    kv = rng.standard_normal((LAYERS, 2, hkv, CTX, d)).astype(np.float16)
    buffers = {"qkv": qkv, "cos": cos, "sin": sin, "qscale": q_scale, "pos": np.array([pos], np.int32),
               "kv": kv.copy(), "q": np.full((t, hq, d), np.nan, np.float16),
               "k": np.full((t, hkv, d), np.nan, np.float16), "v": np.full((t, hkv, d), np.nan, np.float16)}
    func = (rope.rope_split_append(LAYERS, hq, hkv, d, "float16", "float16") if append
            else rope.rope_split(hq, hkv, d, "float16", "float16"))
    run_primfunc(scheduled(func), buffers, {"t": t, "ctx": CTX, "layer": LAYER})

    rows = slice(pos, pos + t)
    heads = qkv.astype(np.float64).reshape(t, hq + 2 * hkv, d)
    want_q = rope_reference(heads[:, :hq], cos[rows], sin[rows]) * q_scale[rows, None, None]
    want_k = rope_reference(heads[:, hq:hq + hkv], cos[rows], sin[rows])
    assert rel_err(buffers["q"], want_q) < 1e-3 and rel_err(buffers["k"], want_k) < 1e-3
    np.testing.assert_array_equal(buffers["v"], qkv.reshape(t, hq + 2 * hkv, d)[:, hq + hkv:])
    expected_kv = kv.copy()
    if append:  # the block's k, v at positions pos.. of this layer; the rest untouched
        expected_kv[LAYER, 0, :, rows] = buffers["k"].transpose(1, 0, 2)
        expected_kv[LAYER, 1, :, rows] = buffers["v"].transpose(1, 0, 2)
    np.testing.assert_array_equal(buffers["kv"], expected_kv)


def test_q8_embedding_as_built_for_the_gpu():
    from trimode.compiler.kernels.embedding import q8_embedding

    vocab, hidden, t = 300, 96, 3
    rng = np.random.default_rng(4)
    q = rng.integers(-127, 128, (vocab, hidden)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (vocab, hidden // 32)).astype(np.float16)
    ids = np.array([299, 0, 17, 5, 5], np.int32)  # a block's token buffer: the first t are used
    buffers = {"ids": ids, "q": q, "scale": scale, "x": np.full((t, hidden), np.nan, np.float16)}
    run_primfunc(scheduled(q8_embedding(vocab, hidden, "float16")), buffers, {"t": t, "n_ids": len(ids)})
    want = q[ids[:t]].astype(np.float64) * np.repeat(scale[ids[:t]].astype(np.float64), 32, axis=1)
    assert rel_err(buffers["x"], want) < 1e-3


def lowered_for_cuda(cfg, schedules=None):
    """The model's Relax as the CUDA pipeline hands it to memory planning: fused, scheduled
    (the matmuls by `schedules`, a tuning database's entries, where given)."""
    from trimode.compiler.kernel_table import Kernels
    from trimode.compiler.model import NLDModel, mark_static_arguments
    from trimode.compiler.pipeline import relax_passes

    model = NLDModel(cfg, {"embed": True, "layers": True, "output": True},
                     Kernels(cfg, "cuda", schedules or {}))
    mod, params = model.export_tvm(spec=model.entry_specs())
    target = tvm.target.Target(resolve_target("cuda", "sm_90a"), host="llvm")
    passes = relax_passes(target)
    with target:
        mod = tvm.transform.Sequential(passes[:passes.index(schedule_unscheduled_kernels) + 1])(
            mark_static_arguments(mod))
    return mod, [name for name, _ in params]


@pytest.fixture(scope="module", params=["tiny", "default"])
def model_on_the_gpu(request):
    """A model lowered for CUDA (the tiny test geometry with random weights, or the shipped
    default model: 3 query heads a kv head, head_dim 48), its parameters as the loader lays
    them out (gate_up's rows interleaved), and a float64 reference after a 70-token prompt
    with that prompt's K/V in an fp16 cache, as a prefill would have left them."""
    from concurrent.futures import ThreadPoolExecutor

    from trimode.model.default_model import model_or_default
    from trimode.model.gguf_file import load_model
    from trimode.model.random_weights import random_weights
    from trimode.model.reference import ReferenceForward, ReferenceModel
    from trimode.runtime.engine import parameter_groups, quantized_parts

    if request.param == "tiny":
        cfg = GEOMETRIES["tiny"]
        weights = random_weights(cfg, seed=3)
    else:
        model = load_model(model_or_default(None))
        cfg, weights = model.config, model.weights
    mod, names = lowered_for_cuda(cfg)
    with ThreadPoolExecutor(2) as pool:
        host = {}
        for group in parameter_groups(weights, quantized_parts(weights), "float16", pool):
            host.update({name: array.copy() for name, array in group.items()})
    ref = ReferenceForward(ReferenceModel(cfg, weights), CTX)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab, 70).tolist()
    ref.causal(prompt)
    kv = np.zeros((cfg.n_layers, 2, cfg.n_kv_heads, CTX, cfg.head_dim), np.float16)
    for layer in range(cfg.n_layers):
        kv[layer, 0, :, :len(prompt)] = ref._k[layer].transpose(1, 0, 2)
        kv[layer, 1, :, :len(prompt)] = ref._v[layer].transpose(1, 0, 2)
    return cfg, mod, tuple(host[name] for name in names), ref, kv


@pytest.mark.parametrize("entry, block, mma", [("decode", [7], "mma.sync"),
                                               ("verify", [7, 3, 99, 5, 0, 12, 8, 1, 2], "mma.sync"),
                                               ("draft", [7] + [1000] * 6, "mma.sync"),
                                               ("verify", [7, 3, 99, 5, 0, 12, 8, 1, 2] * 2, "wgmma"),
                                               ("draft", [7] + [1000] * 6, "wgmma")])
def test_a_whole_step_as_built_for_the_gpu_matches_float64(model_on_the_gpu, entry, block, mma):
    # every kernel of a CUDA entry, in its order: embedding, the fused norms, the matmuls
    # (gemv for decode, split-K tensor cores for blocks -- mma.sync by default, or Hopper's
    # wgmma as a tuning database may choose it; gate_up gated), rope with the cache append,
    # attention (split-KV decode; tensor cores for blocks), head, argmax -- the GPU check's
    # tiny test, run on the CPU
    from tvm_cuda_emulation import EntryEmulator

    from trimode.compiler.kernel_table import MAX_BLOCK
    from trimode.compiler.kernels.q8_matmul_cuda import _splitk_schedule
    from trimode.schedules import entry_key

    cfg, mod, params, ref, kv = model_on_the_gpu
    if mma == "wgmma":
        mod, _ = lowered_for_cuda(cfg, {entry_key("q8_matmul", (n, k), "block"): _splitk_schedule(
            n, k, 2, 8, 1, None, 2, wgmma=True) for n, k in cfg.matmul_shapes().values()})
        assert "_wg" in mod.script()
    fill = ref.length
    tokens = np.zeros(MAX_BLOCK, np.int32)
    tokens[:len(block)] = block
    cos, sin = (np.asarray(a, np.float32) for a in cfg.rope_tables(CTX))
    q_scale = cfg.q_scale(np.arange(CTX)).astype(np.float32)
    shape = [] if entry == "decode" else [(len(block),)]
    outputs = EntryEmulator(mod).run(entry, shape + [tokens, np.array([fill], np.int32), kv.copy(), cos, sin,
                                                     q_scale, params])
    logits, argmax, prob = outputs[:3]
    want = (ref.bidirectional(block) if entry == "draft" else ref.causal(block)).logits()
    assert float(np.abs(logits - want).max() / np.abs(want).max()) < 1e-2  # fp16, as on the GPU
    np.testing.assert_array_equal(argmax, logits.argmax(axis=1))
    lse = np.log(np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True)).sum(axis=1))
    np.testing.assert_allclose(prob, np.exp(-lse), rtol=1e-4)
    # the sampler's entry on those logits: each row's 64 largest, falling, ties by the smaller id
    values, ids = EntryEmulator(mod).run("top_candidates", [logits])
    want_values, want_ids = top_candidates(logits)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)
    # and each row's chunk masses at a temperature
    top, total = EntryEmulator(mod).run("chunk_mass", [logits, np.array([1 / 0.7], np.float32)])
    want_top, want_total = chunk_masses(logits, 1 / 0.7)
    np.testing.assert_array_equal(top, want_top.astype(np.float32))
    np.testing.assert_allclose(total, want_total, rtol=2e-6)
    if entry != "draft":  # the block's K/V appended at its positions, the prompt's untouched
        kv_out = outputs[3]
        for layer in range(cfg.n_layers):
            assert rel_err(kv_out[layer, 0, :, fill:fill + len(block)].transpose(1, 0, 2),
                           ref._k[layer][fill:]) < 1e-2
            np.testing.assert_array_equal(kv_out[layer, :, :, :fill], kv[layer, :, :, :fill])
        ref.truncate(fill)


@pytest.mark.parametrize("gemm", ["mma.sync", "wgmma"])
def test_a_prefill_as_built_for_the_gpu_matches_float64(model_on_the_gpu, gemm):
    # 70 prompt rows: the tiled GEMM (its kernel chosen on the host by the row count; mma.sync
    # by default, or Hopper's wgmma as a tuning database may choose it), the tensor-core
    # attention's prefill plan, the cache written at every position, the last row's logits
    from tvm_cuda_emulation import EntryEmulator

    from trimode.compiler.kernels.q8_matmul_cuda import GemmPlan
    from trimode.model.reference import ReferenceForward
    from trimode.schedules import entry_key

    cfg, mod, params, ref, _ = model_on_the_gpu
    if gemm == "wgmma":
        wgmma = GemmPlan(128, 3, 32, wgmma=True).schedule()
        mod, _ = lowered_for_cuda(cfg, {entry_key("q8_matmul", shape, "dynamic"): wgmma
                                        for shape in cfg.matmul_shapes().values()})
        assert "_wg128" in mod.script()  # the prefill's layer matmuls took the database's plan
    prompt = np.random.default_rng(1).integers(0, cfg.vocab, 70).astype(np.int32)
    fresh = ReferenceForward(ref.model, CTX)
    want = fresh.causal(prompt.tolist(), last_only=True).logits()
    cos, sin = (np.asarray(a, np.float32) for a in cfg.rope_tables(CTX))
    q_scale = cfg.q_scale(np.arange(CTX)).astype(np.float32)
    kv = np.zeros((cfg.n_layers, 2, cfg.n_kv_heads, CTX, cfg.head_dim), np.float16)
    logits, argmax, _, kv_out = EntryEmulator(mod).run(
        "prefill", [prompt, np.array([0], np.int32), kv, cos, sin, q_scale, params])
    assert logits.shape == (1, cfg.vocab)
    assert float(np.abs(logits - want).max() / np.abs(want).max()) < 1e-2
    assert argmax[0] == logits[0].argmax()
    for layer in range(cfg.n_layers):
        assert rel_err(kv_out[layer, 1, :, :70].transpose(1, 0, 2), fresh._v[layer]) < 1e-2
