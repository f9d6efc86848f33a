"""Every compiled entry (llvm) against the float64 reference, and the shared-cache scenarios."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from trimode.model.config import GEOMETRIES
from trimode.model.random_weights import random_weights
from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.runtime.engine import Engine
from trimode.runtime.forward import ContextFull

CTX = 256
TOL = 1e-3


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# "q8, q8_0 cache": the Q8_0 weights' build with a q8_0 K/V cache (-ctk/-ctv q8_0), against
# the reference that keeps K/V as q8_0 blocks
@pytest.fixture(scope="module", params=["q8", "float", "q8, q8_0 cache"])
def setup(request):
    cfg = GEOMETRIES["tiny"]
    weights = random_weights(cfg, seed=3, quantized=request.param.startswith("q8"))
    kv_cache = "q8_0" if request.param.endswith("q8_0 cache") else "f16"
    engine = Engine(cfg, weights, "llvm", kv_cache=kv_cache)
    assert engine.kv_cache == kv_cache
    return engine, ReferenceModel(cfg, weights, kv_cache=kv_cache, int8_activations=engine.int8_activations)


def fresh(setup):
    engine, ref_model = setup
    return engine.new_sequence(CTX), ReferenceForward(ref_model, CTX)


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, GEOMETRIES["tiny"].vocab, n).tolist()


# 70 > the 64 positions of tiny's YaRN original context: crosses the long-context q-scale step,
# and > MAX_BLOCK rows, so all-rows causal passes run in chunks.
@pytest.mark.parametrize("n_prompt", [1, 5, 70])
def test_every_entry_matches_reference(setup, n_prompt):
    fwd, ref = fresh(setup)
    got, want = fwd.causal(prompt(n_prompt), last_only=True), ref.causal(prompt(n_prompt))
    assert got.logits().shape == (1, GEOMETRIES["tiny"].vocab)
    assert rel_err(got.logits()[0], want.logits()[-1]) < TOL            # prefill
    assert got.argmax[0] == want.argmax[-1]

    got, want = fwd.causal([7]), ref.causal([7])                         # decode
    assert rel_err(got.logits(), want.logits()) < TOL

    block = [GEOMETRIES["tiny"].mask_token_id] * 6 + [3]
    got, want = fwd.bidirectional(block), ref.bidirectional(block)       # draft
    assert rel_err(got.logits(), want.logits()) < TOL
    np.testing.assert_array_equal(got.argmax, want.argmax)
    np.testing.assert_allclose(got.prob, want.prob, rtol=TOL)

    got, want = fwd.causal(prompt(9, 1)), ref.causal(prompt(9, 1))       # verify
    assert rel_err(got.logits(), want.logits()) < TOL
    np.testing.assert_array_equal(got.argmax, want.argmax)
    assert fwd.length == ref.length == n_prompt + 10


def test_all_rows_of_a_long_causal_pass(setup):
    fwd, ref = fresh(setup)
    got, want = fwd.causal(prompt(150)), ref.causal(prompt(150))
    assert got.logits().shape == want.logits().shape
    assert rel_err(got.logits(), want.logits()) < TOL


def test_prefill_then_decodes_equals_one_prefill(setup):
    engine, _ = setup
    a, b = prompt(12), prompt(5, 1)
    whole = engine.new_sequence(CTX).causal(a + b).logits()
    split = engine.new_sequence(CTX)
    split.causal(a, last_only=True)
    rows = [split.causal([tok]).logits()[0] for tok in b]
    assert rel_err(np.stack(rows), whole[len(a):]) < 1e-5


def test_verify_truncate_decode_equals_reference_of_kept_prefix(setup):
    fwd, ref = fresh(setup)
    p, block = prompt(20), prompt(8, 2)
    fwd.causal(p, last_only=True)
    fwd.causal(block)
    fwd.truncate(len(p) + 3)                  # keep 3 of the 8 verified tokens
    got = fwd.causal([11])
    want = ref.causal(p + block[:3] + [11])
    assert rel_err(got.logits()[0], want.logits()[-1]) < TOL


class _NoText:
    def incremental_decoder(self, skip=b""):
        return self

    def push(self, token_id):
        return ""

    def flush(self):
        return ""


def test_logprobs_of_prompt_and_reply_equal_the_reference(setup):
    """generate() with prompt and reply logprobs on the compiled model (a 70-token prompt:
    two all-rows passes; spec: verify rows) against the reference's causal log-softmax."""
    from trimode.runtime.generation import DecodeParams, GenerationRequest, generate
    engine, ref_model = setup
    ids = prompt(70, 4)
    request = GenerationRequest(prompt_ids=tuple(ids), max_tokens=10, logprobs=3, prompt_logprobs=3,
                                loop_detection=False, decode=DecodeParams(mode="spec", draft_length=4))
    first, *events, done = generate(engine.new_sequence(CTX), _NoText(), request)
    scored = first.prompt_logprobs[1:] + [s for e in events for s in e.logprobs]
    tokens = ids + done.tokens
    assert first.prompt_logprobs[0] is None and [s.token for s in scored] == tokens[1:]
    logits = ReferenceForward(ref_model, CTX).causal(tokens[:-1]).logits().astype(np.float64)
    want = logits - logits.max(1, keepdims=True)
    want -= np.log(np.exp(want).sum(1, keepdims=True))
    # float32 on the CPU: ~5e-6 where K/V round to the same fp16 as in float64, up to ~4e-4
    # where one rounds to the other neighbour (TOL's logit bound would allow ~0.04)
    bound = 1e-3
    got = np.array([s.logprob for s in scored])
    assert np.abs(got - want[np.arange(len(scored)), tokens[1:]]).max() < bound
    for s, row in zip(scored, want):
        assert all(abs(lp - row[i]) < bound for i, lp in s.top)


def test_draft_leaves_cache_bit_identical(setup):
    engine, _ = setup
    fwd = engine.new_sequence(CTX)
    fwd.causal(prompt(30), last_only=True)
    before = engine.device.download(fwd.kv).tobytes()  # bytes: unwritten slots may hold NaNs
    fwd.bidirectional([GEOMETRIES["tiny"].mask_token_id] * 16)
    assert engine.device.download(fwd.kv).tobytes() == before
    assert fwd.length == 30


def test_context_full_is_refused_without_changing_the_cache(setup):
    engine, _ = setup
    fwd = engine.new_sequence(16)
    fwd.causal(prompt(10), last_only=True)
    with pytest.raises(ContextFull):
        fwd.causal(prompt(7))
    with pytest.raises(ContextFull):
        fwd.bidirectional(prompt(7))
    assert fwd.length == 10


def test_runtime_loads_artifact_without_the_compiler(setup, tmp_path):
    """A cached artifact runs in a process that never imports `tvm` (only tvm_ffi and
    libtvm_runtime), nor what tvm_ffi would of torch and ml_dtypes, and gives the same
    logits."""
    engine, _ = setup
    if engine.manifest["layout"].endswith("fff"):
        pytest.skip("one layout is enough")
    fwd = engine.new_sequence(CTX)
    want = fwd.causal(prompt(6), last_only=True).logits()
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from trimode.model.config import GEOMETRIES
        from trimode.model.random_weights import random_weights
        from trimode.runtime.engine import Engine
        engine = Engine(GEOMETRIES["tiny"], random_weights(GEOMETRIES["tiny"], seed=3), "llvm",
                        kv_cache={engine.kv_cache!r})
        logits = engine.new_sequence({CTX}).causal({prompt(6)}, last_only=True).logits()
        loaded = {{name: name in sys.modules for name in ("tvm", "torch", "ml_dtypes")}}
        import importlib.util
        torch_installed = importlib.util.find_spec("torch") is not None
        print(json.dumps({{"loaded": loaded, "torch_installed": torch_installed, "logits": logits.tolist()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == {"tvm": False, "torch": False, "ml_dtypes": False}
    subprocess.run([sys.executable, "-c", "from trimode.runtime.tvm_runtime import Device; "
                    "Device('llvm'); import ml_dtypes; ml_dtypes.bfloat16"], check=True)
    if result["torch_installed"]:  # ... which stays importable afterwards
        subprocess.run([sys.executable, "-c", "from trimode.runtime.tvm_runtime import Device; "
                        "Device('llvm'); import torch; torch.zeros(1)"], check=True)
    np.testing.assert_array_equal(np.asarray(result["logits"], np.float32), want)


def test_features_that_do_not_fill_the_cpu_packs():
    """qkv (200) and head (300) features are no multiple of the CPU matmul's 16-feature packs:
    their last pack is zero-padded at load and only its real features are stored."""
    from trimode.model.config import ModelConfig

    cfg = ModelConfig(n_layers=2, hidden=64, ffn=96, n_heads=8, n_kv_heads=1, head_dim=20,
                      vocab=300, context_length=CTX, yarn_orig_ctx=64, bos_token_id=1,
                      eos_token_id=2, mask_token_id=3)
    assert (cfg.q_dim + 2 * cfg.kv_dim) % 16 and cfg.vocab % 16
    weights = random_weights(cfg, seed=5)
    engine = Engine(cfg, weights, "llvm")
    fwd = engine.new_sequence(CTX)
    ref = ReferenceForward(ReferenceModel(cfg, weights, int8_activations=engine.int8_activations), CTX)
    tokens = np.random.default_rng(2).integers(4, cfg.vocab, 20).tolist()
    got, want = fwd.causal(tokens[:13], last_only=True), ref.causal(tokens[:13])   # prefill
    assert rel_err(got.logits()[0], want.logits()[-1]) < TOL
    got, want = fwd.causal(tokens[13:14]), ref.causal(tokens[13:14])               # decode
    assert rel_err(got.logits(), want.logits()) < TOL
    got, want = fwd.causal(tokens[14:]), ref.causal(tokens[14:])                   # verify
    assert rel_err(got.logits(), want.logits()) < TOL
    block = [cfg.mask_token_id] * 4 + [7]
    got, want = fwd.bidirectional(block), ref.bidirectional(block)                # draft
    assert rel_err(got.logits(), want.logits()) < TOL
