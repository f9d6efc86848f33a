"""The q8_0 K/V cache (-ctk/-ctv q8_0, model/kv_cache.py) end to end: what the cache holds after
a pass, its size, greedy self-speculation equal to AR over it, and the settings it refuses.
Its logits against the reference that keeps K/V as q8_0 are in test_compiled_model.py."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from trimode.cli import cli
from trimode.model.config import GEOMETRIES
from trimode.model.kv_cache import kv_row, q8_0_blocks
from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.runtime.engine import Engine

CTX = 128


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model.config, tiny_model.weights, "llvm", tiny_model.metadata, kv_cache="q8_0")


def test_the_cache_holds_the_reference_keys_and_values_as_q8_0_rows(engine, tiny_model):
    """After a prefill and a verify block, each cached row is its K or V as q8_0: int8 values,
    then fp32 scales, the reference's (an fp32 rounding boundary may move one value by one)."""
    cfg = engine.config
    tokens = np.random.default_rng(2).integers(4, cfg.vocab, 21).tolist()
    fwd = engine.new_sequence(CTX)
    fwd.causal(tokens[:13], last_only=True)
    fwd.causal(tokens[13:])
    ref = ReferenceForward(ReferenceModel(cfg, tiny_model.weights, kv_cache="q8_0"), CTX)
    ref.causal(tokens)
    cache = engine.device.download(fwd.kv)
    assert cache.dtype == np.int8 and cache.shape[-1] == kv_row("q8_0", cfg.head_dim)
    n_blocks = cfg.head_dim // 32
    for layer in range(cfg.n_layers):
        for part, kept in ((0, ref._k[layer]), (1, ref._v[layer])):
            rows = cache[layer, part, :, :len(tokens)].transpose(1, 0, 2)  # [T, kv heads, row]
            values, scales = q8_0_blocks(kept)
            got_scales = np.ascontiguousarray(rows[..., cfg.head_dim:]).view(np.float32)
            np.testing.assert_allclose(got_scales, scales.reshape(*scales.shape[:-2], n_blocks), rtol=1e-6)
            got_values = rows[..., :cfg.head_dim].astype(np.int16)
            moved = np.abs(got_values - values.reshape(got_values.shape).astype(np.int16))
            assert moved.max() <= 1 and np.mean(moved > 0) < 1e-3


def test_the_cache_takes_less_than_half_the_f16_bytes_at_head_size_128():
    assert kv_row("q8_0", 128) * 1 / (kv_row("f16", 128) * 2) == 144 / 256


def test_greedy_spec_equals_greedy_ar_over_a_q8_0_cache(engine):
    from trimode.runtime.generation import DecodeParams, GenerationRequest, generate

    prompt = tuple(np.random.default_rng(5).integers(4, engine.config.vocab, 30).tolist())

    def tokens(mode, draft_length=4):
        request = GenerationRequest(prompt_ids=prompt, max_tokens=40, loop_detection=False,
                                    decode=DecodeParams(mode=mode, draft_length=draft_length))
        *_, done = generate(engine.new_sequence(CTX), engine.tokenizer, request)
        return done.tokens

    ar = tokens("ar")
    assert len(ar) == 40 and tokens("spec") == ar and tokens("spec", 15) == ar


@pytest.mark.parametrize("args, message", [
    (["-ctk", "q8_0", "-ctv", "q8_0"], "a q8_0 K/V cache needs a head size that is a multiple of 32; this model's is 48"),
    (["-ctk", "q8_0"], "-ctk q8_0 with -ctv f16: K and V take the same cache type"),
    (["-ctk", "q4_0", "-ctv", "q4_0"], "'q4_0' is not one of 'f16', 'q8_0'"),
])
def test_generate_refuses_a_cache_the_model_cannot_take(args, message):
    """The default model's heads are 48 wide: no whole q8_0 blocks. Each refusal is one line."""
    result = CliRunner().invoke(cli, ["generate", "-p", "x", "-n", "2", *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_compile_refuses_a_q8_0_cache_for_cuda():
    result = CliRunner().invoke(cli, ["compile", "--geometry", "tiny", "--target", "cuda",
                                       "-ctk", "q8_0", "-ctv", "q8_0"])
    assert result.exit_code != 0
    assert "a q8_0 K/V cache is built for the CPU (llvm) only; cuda keeps f16" in result.output
