"""The float64 reference (trimode.model.reference): checked by hand, against a naive
token-by-token loop written from MODEL.md, and by the cache properties the decode loops rely on."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from trimode.model.config import GEOMETRIES
from trimode.model.random_weights import random_weights
from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.model.weights import as_float
from trimode.runtime.forward import ContextFull

TINY = GEOMETRIES["tiny"]


@pytest.fixture(scope="module")
def reference(tiny_model) -> ReferenceModel:
    # the model's math against independent derivations: without the cache's fp16 rounding
    return ReferenceModel(tiny_model.config, tiny_model.weights, kv_cache=None)


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, TINY.vocab, n).tolist()


def run(reference: ReferenceModel, *steps, n_ctx: int = 256):
    """Feed ("causal"|"bidirectional", tokens) steps to a fresh cache; logits of each."""
    fwd = ReferenceForward(reference, n_ctx)
    return fwd, [getattr(fwd, mode)(toks).logits() for mode, toks in steps]


# Against independent computations ------------------------------------------------------------

def test_one_token_by_hand(tiny_model, reference):
    """One token at position 0 attends only to itself, so each query head's output is its
    kv head's value vector: rope, the query scale and softmax drop out."""
    cfg, w = tiny_model.config, tiny_model.weights
    token = 1234
    x = as_float(w.embed)[token]
    for layer in w.layers:
        h = x / math.sqrt(np.mean(x ** 2) + cfg.rms_eps) * layer.attn_norm
        v = (as_float(layer.wv) @ h).reshape(cfg.n_kv_heads, cfg.head_dim)
        heads = [v[j // (cfg.n_heads // cfg.n_kv_heads)] for j in range(cfg.n_heads)]
        x = x + as_float(layer.wo) @ np.concatenate(heads)
        h = x / math.sqrt(np.mean(x ** 2) + cfg.rms_eps) * layer.ffn_norm
        gate, up = as_float(layer.w_gate) @ h, as_float(layer.w_up) @ h
        x = x + as_float(layer.w_down) @ (gate / (1 + np.exp(-gate)) * up)
    x = x / math.sqrt(np.mean(x ** 2) + cfg.rms_eps) * w.output_norm
    expected = as_float(w.output) @ x
    _, (logits,) = run(reference, ("causal", [token]))
    np.testing.assert_allclose(logits[0], expected, rtol=1e-5, atol=1e-5)  # logits are float32


def yarn_inv_freq(theta: float, d: int, factor: float, orig: int, beta_fast: float, beta_slow: float):
    """MODEL.md section 1, written out again; returns (inv_freq, low, high)."""
    freq_extra = 1 / theta ** (np.arange(0, d, 2) / d)
    freq_inter = freq_extra / factor

    def corr(n):
        return d * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    return freq_inter * ramp + freq_extra * (1 - ramp), low, high


def naive_logits(cfg, w, toks: list[int], visible) -> np.ndarray:
    """Every position from 0, one query at a time; rope as complex rotation of the pairs
    (i, i + d/2); `visible(t, s)` says whether query t sees key s."""
    inv_freq, _, _ = yarn_inv_freq(cfg.rope_theta, cfg.head_dim, cfg.yarn_factor, cfg.yarn_orig_ctx,
                                   cfg.yarn_beta_fast, cfg.yarn_beta_slow)
    half, n = cfg.head_dim // 2, len(toks)

    def rope(vec, pos):
        z = (vec[:half] + 1j * vec[half:]) * np.exp(1j * pos * inv_freq)
        return np.concatenate([z.real, z.imag])

    def norm(x, weight):
        return x / np.sqrt(np.mean(x ** 2) + cfg.rms_eps) * weight

    xs = [as_float(w.embed)[t] for t in toks]
    for layer in w.layers:
        wq, wk, wv = as_float(layer.wq), as_float(layer.wk), as_float(layer.wv)
        q, k, v = [], [], []
        for pos, x in enumerate(xs):
            h = norm(x, layer.attn_norm)
            scale = 1 + 0.1 * math.log(1 + pos // cfg.yarn_orig_ctx)
            q.append([rope(qh, pos) * scale for qh in (wq @ h).reshape(cfg.n_heads, -1)])
            k.append([rope(kh, pos) for kh in (wk @ h).reshape(cfg.n_kv_heads, -1)])
            v.append((wv @ h).reshape(cfg.n_kv_heads, -1))
        new = []
        for t in range(n):
            seen = [s for s in range(n) if visible(t, s)]
            heads = []
            for j in range(cfg.n_heads):
                g = j // (cfg.n_heads // cfg.n_kv_heads)
                scores = np.array([q[t][j] @ k[s][g] for s in seen]) / math.sqrt(cfg.head_dim)
                p = np.exp(scores - scores.max())
                heads.append(sum(pi * v[s][g] for pi, s in zip(p / p.sum(), seen)))
            x = xs[t] + as_float(layer.wo) @ np.concatenate(heads)
            h = norm(x, layer.ffn_norm)
            gate = as_float(layer.w_gate) @ h
            new.append(x + as_float(layer.w_down) @ (gate / (1 + np.exp(-gate)) * (as_float(layer.w_up) @ h)))
        xs = new
    return np.array([as_float(w.output) @ norm(x, w.output_norm) for x in xs])


def test_causal_matches_naive_loop_across_the_query_scale_step(tiny_model, reference):
    assert TINY.yarn_orig_ctx == 64  # positions 0..79 cross the first q-scale step
    toks = tokens(80)
    expected = naive_logits(tiny_model.config, tiny_model.weights, toks, lambda t, s: s <= t)
    _, (logits,) = run(reference, ("causal", toks))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_grouped_heads_match_naive_loop():
    """Two kv heads of four queries each: query head j must read kv head j // 4."""
    cfg = TINY.replace(n_layers=1, n_heads=8, n_kv_heads=2, rope_theta=1e4, yarn_orig_ctx=16)
    weights = random_weights(cfg, seed=11, quantized=False)
    toks = tokens(24, seed=12)
    expected = naive_logits(cfg, weights, toks, lambda t, s: s <= t)
    _, (logits,) = run(ReferenceModel(cfg, weights, kv_cache=None), ("causal", toks))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_bidirectional_block_matches_naive_loop(tiny_model, reference):
    prefix, block = tokens(60, seed=1), tokens(8, seed=2)  # the block spans position 64
    start = len(prefix)
    expected = naive_logits(tiny_model.config, tiny_model.weights, prefix + block,
                            lambda t, s: s <= t or (t >= start and s >= start))
    _, (_, logits) = run(reference, ("causal", prefix), ("bidirectional", block))
    np.testing.assert_allclose(logits, expected[start:], rtol=1e-5, atol=1e-5)


def test_yarn_frequencies_at_theta_1e9():
    """MODEL.md: at theta 1e9 the ramp runs from pair 13 to pair 25."""
    cfg = GEOMETRIES["14b"]
    expected, low, high = yarn_inv_freq(1e9, 128, 16, 16384, 32, 1)
    assert (low, high) == (13, 25)
    inv_freq = cfg.inv_freq()
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-14)
    freq_extra = 1 / 1e9 ** (np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(inv_freq[:14], freq_extra[:14], rtol=1e-14)  # ramp 0: unscaled
    np.testing.assert_allclose(inv_freq[25:], freq_extra[25:] / 16, rtol=1e-14)  # ramp 1: / factor
    assert np.all(freq_extra[14:25] / 16 < inv_freq[14:25]) and np.all(inv_freq[14:25] < freq_extra[14:25])
    cos, sin = cfg.rope_tables(3)
    np.testing.assert_allclose(cos[2], np.cos(2 * inv_freq), rtol=1e-14)  # not rescaled
    np.testing.assert_allclose(sin[1], np.sin(inv_freq), rtol=1e-14)


def test_query_scale_steps_at_multiples_of_the_original_context():
    cfg = GEOMETRIES["14b"]
    positions = np.array([0, 16383, 16384, 32767, 32768, 262143])
    expected = [1, 1, 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(3),
                1 + 0.1 * math.log(16)]
    np.testing.assert_allclose(cfg.q_scale(positions), expected, rtol=1e-15)


# Cache properties -------------------------------------------------------------------------

def test_prefill_then_decodes_equals_one_prefill(reference):
    a, b = tokens(20, seed=3), tokens(6, seed=4)
    _, (whole,) = run(reference, ("causal", a + b))
    fwd, _ = run(reference, ("causal", a))
    steps = [fwd.causal([t]).logits()[0] for t in b]
    assert fwd.length == len(a + b)
    np.testing.assert_allclose(np.array(steps), whole[len(a):], rtol=1e-5, atol=1e-6)


def test_bidirectional_differs_from_causal_except_the_last_row_of_one_layer(tiny_model, reference):
    """In one layer, a block's last row sees the same keys under both masks; every other row
    also sees later block tokens when bidirectional. From the second layer on even the last
    row differs: its keys come from rows that saw the future."""
    a, block = tokens(10, seed=5), tokens(8, seed=6)
    weights = tiny_model.weights
    one_layer = ReferenceModel(TINY.replace(n_layers=1), dataclasses.replace(weights, layers=weights.layers[:1]),
                               kv_cache=None)
    for model, last_row_equal in ((one_layer, True), (reference, False)):
        fwd, (_, bidi) = run(model, ("causal", a), ("bidirectional", block))
        assert fwd.length == len(a)  # the bidirectional pass left the cache alone
        causal = fwd.causal(block).logits()
        for row in range(len(block)):
            same = np.allclose(bidi[row], causal[row], rtol=1e-5, atol=1e-6)
            assert same == (last_row_equal and row == len(block) - 1), row


def test_truncate_then_rerun_equals_fresh(reference):
    a, b, c = tokens(12, seed=7), tokens(9, seed=8), tokens(5, seed=9)
    fwd, _ = run(reference, ("causal", a + b))
    fwd.truncate(len(a))
    assert fwd.length == len(a)
    again = fwd.causal(c).logits()
    _, (_, fresh) = run(reference, ("causal", a), ("causal", c))
    np.testing.assert_array_equal(again, fresh)


def test_context_full_and_bad_truncate(reference):
    fwd = ReferenceForward(reference, n_ctx=8)
    fwd.causal(tokens(6))
    with pytest.raises(ContextFull):
        fwd.causal(tokens(3))
    with pytest.raises(ContextFull):
        fwd.bidirectional(tokens(3))
    with pytest.raises(ValueError):
        fwd.truncate(7)
    assert fwd.length == 6


def test_kv_kept_at_the_cache_precision(tiny_model, reference):
    """By default K and V are rounded to fp16 as they are made (the engine's cache precision,
    every target): what the cache keeps is fp16-exact, and the logits move by that rounding
    only (small, not zero)."""
    toks = tokens(40, seed=7)
    rounded = ReferenceModel(tiny_model.config, tiny_model.weights)
    fwd, (logits,) = run(rounded, ("causal", toks))
    for kept in fwd._k + fwd._v:
        np.testing.assert_array_equal(kept.astype(np.float16).astype(np.float64), kept)
    _, (exact,) = run(reference, ("causal", toks))
    err = np.abs(logits - exact).max() / np.abs(exact).max()
    assert 0 < err < 1e-2


def test_kv_kept_as_q8_0_blocks(tiny_model, reference):
    """kv_cache="q8_0": each 32 of a kept K or V row are integers in [-127, 127] times one
    scale (the block's largest at +-127), as a q8_0 cache keeps them; the logits move by
    more than the fp16 cache's rounding, and still little."""
    toks = tokens(40, seed=7)
    fwd, (logits,) = run(ReferenceModel(tiny_model.config, tiny_model.weights, kv_cache="q8_0"),
                         ("causal", toks))
    for kept in fwd._k + fwd._v:
        blocks = kept.reshape(*kept.shape[:-1], -1, 32)
        d = np.abs(blocks).max(axis=-1, keepdims=True) / 127
        values = blocks / np.where(d > 0, d, 1)
        np.testing.assert_array_equal(values, np.rint(values))
        assert np.abs(values).max() == 127
    _, (exact,) = run(reference, ("causal", toks))
    _, (f16,) = run(ReferenceModel(tiny_model.config, tiny_model.weights), ("causal", toks))
    err = np.abs(logits - exact).max() / np.abs(exact).max()
    assert np.abs(f16 - exact).max() / np.abs(exact).max() < err < 5e-2
