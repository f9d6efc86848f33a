"""Sampler: the filters against hand-computed distributions, greedy without logit copies,
penalties and suppression, seeded reproducibility."""
from __future__ import annotations

import numpy as np
import pytest

from trimode.runtime.forward import StepResult
from trimode.runtime.sampling import Sampler, SamplingParams

ROW = np.log(np.array([0.05, 0.40, 0.25, 0.15, 0.10, 0.05]))  # softmax(ROW) = those probs


class CountingStep(StepResult):
    """A StepResult that counts how often its full logits are fetched."""

    def __init__(self, logits: np.ndarray):
        base = StepResult.from_logits(logits)
        self.fetches = 0

        def fetch():
            self.fetches += 1
            return base.logits()

        super().__init__(argmax=base.argmax, prob=base.prob, fetch_logits=fetch)


def dist(**params) -> np.ndarray:
    return Sampler(SamplingParams(**params)).distribution(ROW, [])


def test_temperature_one_is_softmax():
    np.testing.assert_allclose(dist(temperature=1.0), np.exp(ROW), rtol=1e-12)


def test_temperature_sharpens_and_flattens():
    p = np.exp(ROW)
    for t in (0.5, 2.0):
        expected = p ** (1 / t) / (p ** (1 / t)).sum()
        np.testing.assert_allclose(dist(temperature=t), expected, rtol=1e-12)


def test_top_k():
    np.testing.assert_allclose(dist(temperature=1.0, top_k=2), [0, 0.4 / 0.65, 0.25 / 0.65, 0, 0, 0])


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.40 + 0.25 = 0.65 < 0.7, so 0.15 joins; 0.80 >= 0.7 stops there.
    np.testing.assert_allclose(dist(temperature=1.0, top_p=0.7), [0, 0.5, 0.3125, 0.1875, 0, 0])


def test_min_p_is_relative_to_the_top():
    # keep p >= 0.3 * 0.40 = 0.12
    np.testing.assert_allclose(dist(temperature=1.0, min_p=0.3), [0, 0.5, 0.3125, 0.1875, 0, 0])


def test_filters_compose():
    np.testing.assert_allclose(dist(temperature=1.0, top_k=3, top_p=0.6),
                               [0, 0.4 / 0.65, 0.25 / 0.65, 0, 0, 0])


def test_repetition_penalty_llama_style():
    row = np.array([2.0, -1.0, 1.5, 0.5])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0, penalty_ids=(0,), penalty_last_n=2))
    # penalized: id 0 (fixed) and the last two of the history (1, 3); positives halve,
    # negatives double
    np.testing.assert_allclose(sampler.adjust(row, [2, 1, 3]), [1.0, -2.0, 1.5, 0.25])


def test_greedy_never_fetches_logits_unless_the_argmax_is_touched():
    logits = np.array([[0.0, 3.0, 2.0, 1.0], [5.0, 1.0, 0.0, 0.0]])
    step = CountingStep(logits)
    sampler = Sampler(SamplingParams(), suppress_ids=(2,))
    ids, conf = sampler.choose(step, [0, 1], [[], []])
    assert ids == [1, 0] and step.fetches == 0
    np.testing.assert_allclose(conf, step.prob)
    # suppressing the argmax falls back to the next best, with a fetch
    sampler = Sampler(SamplingParams(), suppress_ids=(1,))
    ids, conf = sampler.choose(step, [0, 1], [[], []])
    assert ids == [2, 0] and step.fetches == 1
    e = np.exp(np.array([0.0, 2.0, 1.0]))
    assert conf[0] == pytest.approx(e[1] / e.sum())


def test_greedy_penalty_can_move_the_argmax():
    step = CountingStep(np.array([[0.0, 3.0, 2.0]]))
    sampler = Sampler(SamplingParams(repetition_penalty=2.0, penalty_last_n=4))
    assert sampler.choose(step, [0], [[2, 1]])[0] == [1]  # both penalized: 1.5 > 1.0
    assert sampler.choose(step, [0], [[0, 1]])[0] == [2]  # 1.5 < 2
    assert sampler.choose(step, [0], [[0, 2]])[0] == [1]


def test_sampling_fetches_and_follows_the_distribution():
    step = CountingStep(ROW[None, :])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    draws = [sampler.choose(step, [0], [[]])[0][0] for _ in range(4000)]
    assert step.fetches == 4000
    freq = np.bincount(draws, minlength=6) / 4000
    # 4000 draws: a standard error of at most 0.008 per frequency; 0.04 is 5 of them.
    np.testing.assert_allclose(freq, np.exp(ROW), atol=0.04)


def test_suppressed_ids_are_never_sampled():
    sampler = Sampler(SamplingParams(temperature=5.0, seed=0), suppress_ids=(1, 2))
    step = StepResult.from_logits(ROW[None, :])
    assert {sampler.choose(step, [0], [[]])[0][0] for _ in range(300)}.isdisjoint({1, 2})


def test_same_seed_same_draws():
    def draws(seed):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [s.draw(np.exp(ROW)) for _ in range(50)]
    assert draws(1) == draws(1) and draws(1) != draws(2)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0),
                                 dict(top_p=1.5), dict(min_p=2), dict(repetition_penalty=0),
                                 dict(penalty_last_n=-1)])
def test_bad_params_are_named(bad):
    problem = SamplingParams(**bad).problem()
    assert problem and next(iter(bad)) in problem
