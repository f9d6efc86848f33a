"""The CPU argmax/prob kernel (logits.argmax_prob), built for llvm, against numpy float64: the
first index of each row's maximum (ties, a maximum in the first or last slot or in the values
past the last full vector, a vocabulary shorter than one vector) and 1 / sum exp(l - max),
with logits close together and hundreds apart (where the kernel drops negligible weights)."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from trimode.compiler.kernels.logits import LANES, argmax_prob  # noqa: E402


@pytest.fixture(scope="module")
def built():
    cache = {}

    def build(vocab):
        if vocab not in cache:
            cpu = tvm.target.codegen.llvm_get_system_cpu()
            func = argmax_prob(vocab).with_attr("global_symbol", "amax")
            cache[vocab] = tvm.compile(func, target=tvm.target.Target({"kind": "llvm", "mcpu": cpu}))["amax"]
        return cache[vocab]

    return build


def run(built, logits):
    t, vocab = logits.shape
    argmax = tvm.runtime.tensor(np.full(t, -1, np.int32))
    prob = tvm.runtime.tensor(np.full(t, np.nan, np.float32))
    built(vocab)(tvm.runtime.tensor(logits), argmax, prob)
    return argmax.numpy(), prob.numpy()


def expected_prob(logits):
    x = logits.astype(np.float64)
    return 1.0 / np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)


@pytest.mark.parametrize("vocab", [7, LANES, 4 * LANES + 5, 4096, 131072])
@pytest.mark.parametrize("spread", [3.0, 60.0])
def test_argmax_prob_equals_float64(built, vocab, spread):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((6, vocab)) * spread).astype(np.float32)
    top = logits.max() + 1
    logits[1, 0] = top                       # the first slot
    logits[2, -1] = top                      # the last, past the vectors where vocab % LANES
    logits[3, [vocab // 3, vocab - 1]] = top  # a tie: the first one wins
    logits[4, [0, vocab // 2]] = top
    logits[5] = 1.5                          # all equal: index 0, prob 1 / vocab
    argmax, prob = run(built, logits)
    np.testing.assert_array_equal(argmax, logits.argmax(axis=1))
    # fp32 sums of vocab / LANES terms a lane (8192 at 131072): the CUDA kernel's bound
    np.testing.assert_allclose(prob, expected_prob(logits), rtol=1e-4)


def test_argmax_prob_with_one_logit_far_above_the_rest(built):
    logits = np.full((2, 4096), -40.0, np.float32)
    logits[0, 123] = 80.0   # the rest's weights (e^-120) are dropped: prob 1 exactly
    logits[1, 77] = 20.0    # e^-60 each, kept: 1 / (1 + 4095 e^-60)
    argmax, prob = run(built, logits)
    assert argmax.tolist() == [123, 77]
    assert prob[0] == 1.0
    np.testing.assert_allclose(prob, expected_prob(logits), rtol=1e-6)
