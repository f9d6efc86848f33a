"""Sampler: the filters against hand-computed distributions and, on vocabulary-sized rows,
against the plain float64 definition (softmax, full sort, filters); greedy without logit
copies, penalties and suppression, seeded reproducibility."""
from __future__ import annotations

import numpy as np
import pytest
import top_candidates

from trimode.runtime.forward import StepResult
from trimode.runtime import sampling
from trimode.runtime.sampling import (Distribution, Sampler, SamplingParams, _top_k_ids,
                                      _top_p_prefix)

ROW = np.log(np.array([0.05, 0.40, 0.25, 0.15, 0.10, 0.05]))  # softmax(ROW) = those probs


class CountingStep(StepResult):
    """A StepResult that counts how often its full logits are fetched."""

    def __init__(self, logits: np.ndarray):
        base = StepResult.from_logits(logits)
        self.fetches = 0

        def fetch(start, stop):
            self.fetches += 1
            return base.logits(start, stop)

        super().__init__(argmax=base.argmax, prob=base.prob, fetch_rows=fetch)


def dist(**params) -> np.ndarray:
    return Sampler(SamplingParams(**params)).distribution(ROW, []).dense(len(ROW))


# the vocabulary is weighed in float32 (the logits' own precision), the filters in float64
RTOL = 1e-6


def test_temperature_one_is_softmax():
    np.testing.assert_allclose(dist(temperature=1.0), np.exp(ROW), rtol=RTOL)


def test_temperature_sharpens_and_flattens():
    p = np.exp(ROW)
    for t in (0.5, 2.0):
        expected = p ** (1 / t) / (p ** (1 / t)).sum()
        np.testing.assert_allclose(dist(temperature=t), expected, rtol=RTOL)


def test_top_k():
    np.testing.assert_allclose(dist(temperature=1.0, top_k=2), [0, 0.4 / 0.65, 0.25 / 0.65, 0, 0, 0], rtol=RTOL)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.40 + 0.25 = 0.65 < 0.7, so 0.15 joins; 0.80 >= 0.7 stops there.
    np.testing.assert_allclose(dist(temperature=1.0, top_p=0.7), [0, 0.5, 0.3125, 0.1875, 0, 0], rtol=RTOL)


def test_min_p_is_relative_to_the_top():
    # keep p >= 0.3 * 0.40 = 0.12
    np.testing.assert_allclose(dist(temperature=1.0, min_p=0.3), [0, 0.5, 0.3125, 0.1875, 0, 0], rtol=RTOL)


def test_filters_compose():
    np.testing.assert_allclose(dist(temperature=1.0, top_k=3, top_p=0.6),
                               [0, 0.4 / 0.65, 0.25 / 0.65, 0, 0, 0], rtol=RTOL)


def test_top_p_measures_what_top_k_kept():
    # top-3 renormalized is 0.5, 0.3125, 0.1875: 0.5 + 0.3125 >= 0.7 leaves the third out
    # (measured against the whole distribution, 0.40 + 0.25 = 0.65 < 0.7 would keep it)
    np.testing.assert_allclose(dist(temperature=1.0, top_k=3, top_p=0.7),
                               [0, 0.4 / 0.65, 0.25 / 0.65, 0, 0, 0], rtol=RTOL)


def test_repetition_penalty_llama_style():
    row = np.array([2.0, -1.0, 1.5, 0.5])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0, penalty_ids=(0,), ids_penalty=4.0,
                                     penalty_last_n=2))
    # penalized: id 0 (fixed, by its own factor) and the last two of the history (1, 3);
    # positives divided, negatives multiplied
    np.testing.assert_allclose(sampler.adjust(row, [2, 1, 3]), [0.5, -2.0, 1.5, 0.25])
    # a fixed id inside the window gets both factors
    np.testing.assert_allclose(sampler.adjust(row, [0, 1]), [0.25, -2.0, 1.5, 0.5])


def test_frequency_presence_and_bias_as_llama_cpp_applies_them():
    """logit bias first, then per id of the window: repetition factor, minus frequency x its
    count there, minus presence (llama_sampler_penalties_apply); ids outside the window
    only by their bias."""
    row = np.array([2.0, -1.0, 1.5, 0.5, 3.0], np.float32)
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5,
                            penalty_last_n=4, logit_bias=((4, -1.0), (0, 2.0), (4, -10.0)))
    history = [4, 3, 0, 0, 1, 0]  # the window: 0, 0, 1, 0 (4 and 3 fell out of it)
    want = np.array([(2.0 + 2.0) / 2 - 3 * 0.25 - 0.5, -1.0 * 2 - 0.25 - 0.5, 1.5, 0.5, 3.0 - 10.0])
    np.testing.assert_allclose(Sampler(params).adjust(row, history), want, rtol=1e-6)
    # negative penalties reward repeats; no window, no penalty, only the bias
    lifted = SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5, penalty_last_n=2)
    np.testing.assert_allclose(Sampler(lifted).adjust(row, [1, 1]), [2.0, 1.5, 1.5, 0.5, 3.0])
    none = SamplingParams(frequency_penalty=1.0, logit_bias=((2, 1.0),))
    np.testing.assert_allclose(Sampler(none).adjust(row, [0, 1]), [2.0, -1.0, 2.5, 0.5, 3.0])
    assert Sampler(none).context([0, 1]) == [] and Sampler(params).context([9, 8, 7, 6, 5]) == [8, 7, 6, 5]


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


def test_greedy_penalty_under_one_lifts_an_id_past_the_argmax():
    # a penalty of 0.5 doubles the positive logit of id 1 (2 -> 4 > 3): the row is fetched
    # though the argmax itself is untouched
    logits = np.array([[3.0, 2.0, 0.0, -1.0]])
    step = CountingStep(logits)
    sampler = Sampler(SamplingParams(repetition_penalty=0.5, penalty_last_n=8))
    ids, conf = sampler.choose(step, [0], [[1]])
    adjusted = sampler.adjust(logits[0], [1])
    assert ids == [1] == [int(sampler.distribution(logits[0], [1]).ids[0])] and step.fetches == 1
    assert conf[0] == pytest.approx(float(np.exp(adjusted[1]) / np.exp(adjusted).sum()))
    assert sampler.choose(step, [0], [[3]])[0] == [0]  # a negative logit sinks further


@pytest.mark.parametrize("params,history,want", [
    (dict(logit_bias=((2, 3.5),)), [], 2),                          # 0 + 3.5 > 3
    (dict(logit_bias=((2, 2.5),)), [], 0),
    (dict(frequency_penalty=-0.6, penalty_last_n=4), [1, 1], 1),    # 2 + 1.2 > 3
    (dict(presence_penalty=-1.5, penalty_last_n=4), [1, 1], 1),     # 2 + 1.5 > 3
    (dict(presence_penalty=1.5, penalty_last_n=4), [0], 1),         # 3 - 1.5 < 2
    (dict(frequency_penalty=0.4, penalty_last_n=2), [0, 0, 0], 0),  # window of 2: 3 - 0.8 > 2
])
def test_greedy_follows_bias_and_frequency_penalties(params, history, want):
    """Greedy picks the adjusted row's argmax: a lifting adjustment (positive bias, negative
    penalty) fetches the row even where the argmax is untouched."""
    logits = np.array([[3.0, 2.0, 0.0, -1.0]])
    step = CountingStep(logits)
    sampler = Sampler(SamplingParams(**params))
    ids, conf = sampler.choose(step, [0], [history])
    assert ids == [want] == [int(sampler.adjust(logits[0], history).argmax())]
    assert step.fetches == 1
    assert conf[0] == pytest.approx(float(sampling.softmax64(sampler.adjust(logits[0], history))[want]))


@pytest.mark.parametrize("params", [
    dict(temperature=0.8, frequency_penalty=-0.7, presence_penalty=0.3, penalty_last_n=6),
    dict(temperature=1.0, logit_bias=((3, 25.0), (99, -4.0), (70001, 2.0)))])
def test_chunk_masses_follow_lifting_adjustments(params):
    """Temperature alone from chunk masses, where adjustments raise logits (a negative
    frequency penalty, a bias that makes a flat row's token the max): the adjusted row's
    distribution, from chunks alone."""
    rows = vocab_rows()
    logits = np.stack([rows["peaked"], rows["flat"]])
    history = [99, 5, 5, 70000, 99, 3]
    fetches = []
    sampler = Sampler(SamplingParams(**params))
    known = sampler.distributions_known(with_top(logits, fetches), [0, 1], [history] * 2)
    assert "rows" not in {f[0] for f in fetches}
    for r, dist in enumerate(known):
        want = sampler.distribution(logits[r], history).dense(VOCAB)
        np.testing.assert_allclose(dist.dense(VOCAB), want, rtol=1e-5, atol=1e-12, err_msg=str(r))


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
        return [s.draw(Distribution(np.arange(len(ROW)), np.exp(ROW))) for _ in range(50)]
    assert draws(1) == draws(1) and draws(1) != draws(2)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0),
                                 dict(top_p=1.5), dict(min_p=2), dict(repetition_penalty=0),
                                 dict(repetition_penalty=1e-300), dict(ids_penalty=1e31),
                                 dict(frequency_penalty=-1e300), dict(presence_penalty=float("inf")),
                                 dict(logit_bias=((5, 1e38),)), dict(penalty_last_n=-1)])
def test_bad_params_are_named(bad):
    problem = SamplingParams(**bad).problem()
    assert problem and next(iter(bad)) in problem


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-31])
def test_a_temperature_too_small_for_float32_samples_as_greedy(temperature):
    """(l - max) / T there is 0 * inf for the top token: a NaN row, which drew the last id."""
    sampler = Sampler(SamplingParams(temperature=temperature, seed=0))
    step = StepResult.from_logits(ROW[None])
    assert sampler.greedy and sampler.choose(step, [0], [[]])[0] == [int(ROW.argmax())]


def test_the_largest_adjustments_keep_rows_finite():
    """At the bounds problem() allows, every adjusted logit is a float32 below infinity (an
    infinite one makes NaN of the softmax)."""
    history = np.argsort(-ROW)[:6].tolist()
    for params in (dict(repetition_penalty=1e-30), dict(frequency_penalty=-1e30, presence_penalty=-1e30),
                   dict(logit_bias=((3, 1e30), (4, 1e30)))):
        sampler = Sampler(SamplingParams(temperature=0.7, penalty_last_n=6, seed=0, **params))
        assert SamplingParams(**params).problem() is None
        with np.errstate(all="raise"):
            adjusted = sampler.adjust(ROW, history)
        assert np.all(adjusted < np.inf)
        dist = sampler.distribution(ROW, history)
        assert np.all(np.isfinite(dist.probs)) and dist.probs.sum() == pytest.approx(1.0)


def definition(row: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The filters as defined, in float64 over the whole row: softmax(row / T), tokens in
    falling probability (ties by id), top-k, top-p over what top-k kept, renormalized (mass
    strictly above a token < p), min-p (relative to the top token)."""
    probs = np.exp((row - row.max()) / p.temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.ones(len(order), bool)
    if p.top_k:
        keep[p.top_k:] = False
    if p.top_p < 1:
        mass = np.where(keep, probs[order], 0) / probs[order][keep].sum()
        keep &= np.cumsum(mass) - mass < p.top_p
    if p.min_p > 0:
        keep &= probs[order] >= p.min_p * probs[order[0]]
    out = np.zeros_like(probs)
    out[order[keep]] = probs[order[keep]]
    return out / out.sum()


VOCAB = 131072  # the 14B's


def vocab_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    flat = rng.standard_normal(VOCAB).astype(np.float32)  # mass spread over many thousands
    peaked = flat * 4
    peaked[[7, 99, 4096]] += 30  # three tokens hold nearly everything
    ties = np.round(flat * 2).astype(np.float32)  # ~10 distinct values: ties at every cut
    return {"flat": flat, "peaked": peaked, "ties": ties}


@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_p=0.999), dict(temperature=1.3, top_k=1000),
    dict(temperature=1.0, min_p=0.1), dict(temperature=2.0, top_k=5, min_p=0.01), dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=0.5, top_k=VOCAB + 1)])
def test_vocabulary_rows_follow_the_definition(params):
    p = SamplingParams(**params)
    for name, row in vocab_rows().items():
        got = Sampler(p).distribution(row, [])
        want = definition(row.astype(np.float64), p)
        assert np.all(np.diff(got.ids) > 0), name
        # the same tokens kept; each probability within float32 weighing of the definition
        # (logit differences of ~40 carry a float32 rounding of ~4e-6 into exp)
        np.testing.assert_array_equal(got.ids, np.flatnonzero(want), err_msg=name)
        np.testing.assert_allclose(got.probs, want[got.ids], rtol=1e-5, err_msg=name)


def test_filters_sort_a_small_prefix_of_the_vocabulary():
    """What keeps a row from costing a sort of the vocabulary: top-k's tokens are selected
    (among those near the top first), top-p's prefix is found by thresholds, and only those
    are sorted."""
    rows = vocab_rows()
    for name in ("flat", "peaked", "ties"):
        row = rows[name]
        got = _top_k_ids(row, 40)
        kth = np.sort(row)[-40]
        np.testing.assert_array_equal(got, np.flatnonzero(row >= kth), err_msg=name)
    assert len(_top_k_ids(rows["flat"], 40)) == 40
    odd = rows["flat"].copy()
    odd[::16] -= 100  # a sample that sees none of the top: the selection takes the whole row
    np.testing.assert_array_equal(_top_k_ids(odd, 5), np.flatnonzero(odd >= np.sort(odd)[-5]))
    for k in (1, 17, 1000):
        np.testing.assert_array_equal(_top_k_ids(rows["ties"], k),
                                      np.flatnonzero(rows["ties"] >= np.sort(rows["ties"])[-k]))
    weight = np.exp(rows["peaked"] - rows["peaked"].max())
    assert len(_top_p_prefix(weight, float(weight.sum()), 0.95, 0.0)) < 10
    # a flat row's nucleus is itself most of the vocabulary (~80k tokens hold 0.9 here): the
    # thresholds stop at the first long prefix and the cut comes from weight buckets
    weight = np.exp(rows["flat"] - rows["flat"].max())
    np.testing.assert_array_equal(_top_p_prefix(weight, float(weight.sum()), 0.9, 0.0),
                                  np.arange(VOCAB))


@pytest.mark.parametrize("params", [
    dict(top_p=0.9), dict(top_p=0.5), dict(top_p=0.999999), dict(top_p=0.95, min_p=0.001),
    dict(top_p=0.9, min_p=0.3), dict(min_p=0.0001)])
def test_bucketed_cut_keeps_what_the_sort_keeps(params, monkeypatch):
    """Long prefixes are cut from weight buckets, sorting only the bucket the cut falls in:
    the same tokens and probabilities as the sort of every candidate, also where the cut
    falls among ties, where most weights underflow to 0 and where top-p nearly reaches 1."""
    rows = vocab_rows()
    rows["underflow"] = rows["flat"] * 40  # most tokens' weights are exactly 0
    rows["ties"][:5000] = rows["ties"].max()  # a tie far longer than the sort threshold
    p = SamplingParams(temperature=0.7, **params)
    bucketed = {name: Sampler(p).distribution(row, []) for name, row in rows.items()}
    monkeypatch.setattr(sampling, "_BUCKET_CUT_FROM", VOCAB)
    for name, row in rows.items():
        sorted_ = Sampler(p).distribution(row, [])
        np.testing.assert_array_equal(bucketed[name].ids, sorted_.ids, err_msg=name)
        np.testing.assert_array_equal(bucketed[name].probs, sorted_.probs, err_msg=name)
        want = definition(row.astype(np.float64), p)
        if name != "underflow":  # float32 weights of 0 where float64 has ~1e-300
            np.testing.assert_array_equal(bucketed[name].ids, np.flatnonzero(want), err_msg=name)


def test_a_sparse_draw_is_the_dense_draw():
    """Drawing from the kept tokens alone picks what the inverse CDF over the whole
    vocabulary (zeros elsewhere) picks with the same random numbers."""
    row = vocab_rows()["flat"]
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=4)
    sparse, dense = Sampler(p), Sampler(p)
    dist = sparse.distribution(row, [])
    whole = Distribution(np.arange(VOCAB), dist.dense(VOCAB))
    assert [sparse.draw(dist) for _ in range(200)] == [dense.draw(whole) for _ in range(200)]


def test_drawing_many_at_once_is_drawing_each_in_turn():
    """draw_each over short distributions (drawn as one array), with zeros and a single
    token among them, and over a mix with a whole-vocabulary one, gives what draw() on each
    in turn gives with the same seed, and each token's probability."""
    rng = np.random.default_rng(3)
    short = []
    for n in (1, 5, 40, 64, 17):
        probs = rng.random(n) ** 3
        probs[rng.random(n) < 0.2] = 0
        probs[0] += 1e-3
        short.append(Distribution(np.sort(rng.choice(VOCAB, n, replace=False)), probs / probs.sum()))
    whole = Distribution(np.arange(VOCAB), np.full(VOCAB, 1.0 / VOCAB))
    for dists in (short * 20, short[:2] + [whole] + short[2:]):
        each, together = Sampler(SamplingParams(seed=7)), Sampler(SamplingParams(seed=7))
        for _ in range(5):
            tokens, probs = together.draw_each(dists)
            assert tokens == [each.draw(d) for d in dists]
            assert probs == [d.prob(t) for d, t in zip(dists, tokens)]
    assert together.draw_each([]) == ([], [])


def test_distribution_lookup():
    d = Distribution(np.array([2, 5, 9]), np.array([0.2, 0.3, 0.5]))
    np.testing.assert_array_equal(d.of([0, 2, 5, 6, 9, 12]), [0, 0.2, 0.3, 0, 0.5, 0])
    assert d.prob(9) == 0.5 and d.prob(3) == 0.0
    whole = Distribution(np.arange(4), np.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_array_equal(whole.of([3, 0, 4, 2]), [0.4, 0.1, 0, 0.3])


def test_block_draws_follow_the_running_sum():
    """Draws from a vocabulary-sized distribution go by block sums; they land where the plain
    running sum puts the same random number, and never on a token of probability 0."""
    from trimode.runtime.sampling import _inverse_cdf
    rng = np.random.default_rng(8)
    probs = rng.random(VOCAB) ** 4
    probs[rng.choice(VOCAB, VOCAB // 2, replace=False)] = 0  # half the tokens impossible
    probs[-3000:] = 0  # a trailing run of empty blocks
    probs /= probs.sum()
    cdf = np.cumsum(probs)
    for u in np.concatenate([rng.random(2000), [0.0, 1 - 2 ** -53]]):
        at = _inverse_cdf(probs, u)
        assert probs[at] > 0
        want = min(np.searchsorted(cdf, u * cdf[-1], side="right"), VOCAB - 1)
        # the same token, or (rounding at a boundary) its neighbour among possible tokens
        assert at == want or abs(cdf[at] - cdf[want]) < 1e-9, (u, at, want)


def with_top(logits: np.ndarray, fetches=None) -> StepResult:
    """A step as a GPU build gives it: the rows and each row's 64 largest logits."""
    return top_candidates.with_top(StepResult.from_logits(np.asarray(logits, np.float32)), fetches)


@pytest.mark.parametrize("params", [
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05), dict(temperature=1.0, top_k=1),
    dict(temperature=1.5, top_k=50), dict(temperature=0.7, top_k=10, top_p=0.5),
    dict(temperature=1.0, top_k=40, repetition_penalty=1.3, penalty_last_n=8),
    dict(temperature=1.0, top_k=40, frequency_penalty=0.7, presence_penalty=0.4, penalty_last_n=8,
         logit_bias=((99, -2.0), (5, -100.0)))])
def test_top_candidates_give_the_rows_distribution(params):
    """Where the 64 largest logits hold all that top-k keeps, the distribution made from them
    is the one made from the whole row, penalties and suppression included. (The row of ~10
    distinct values ties its 64th largest with tokens left out: it gets None, tested below.)"""
    rows = vocab_rows()
    del rows["ties"]
    history = list(np.argsort(-rows["peaked"])[:6])  # penalized: some of the top tokens
    history += history[1:3]  # twice: the frequency penalty counts them
    sampler = Sampler(SamplingParams(**params), suppress_ids=(7, 12345))
    for name, row in rows.items():
        step = with_top(row[None])
        values, ids = step.top()
        got = sampler.distributions_from_top(values, ids, [history])[0]
        want = sampler.distribution(row, history)
        assert got is not None, name
        np.testing.assert_array_equal(got.ids, want.ids, err_msg=name)
        np.testing.assert_allclose(got.probs, want.probs, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("params", [
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05), dict(temperature=1.0, top_k=63),
    dict(temperature=0.5, top_k=20, top_p=0.6, repetition_penalty=1.5, penalty_last_n=3),
    dict(temperature=0.8, top_k=30, frequency_penalty=0.5, presence_penalty=1.0, penalty_last_n=4,
         logit_bias=((4096, -5.0),))])
def test_rows_filtered_together_are_each_the_rows_own_distribution(params):
    """Rows filtered as one array, each with its own history (so its own penalized ids), give
    each row's distribution() where the candidates suffice and None exactly where one row
    alone would: a tied row in the batch does not spoil its neighbours."""
    rng = np.random.default_rng(11)
    base = vocab_rows()
    rows = [base["peaked"], base["ties"], base["flat"]]
    for scale in (0.5, 3.0, 8.0):  # peaked to very peaked, with near ties at the top
        row = (rng.standard_normal(VOCAB) * scale).astype(np.float32)
        row[rng.choice(VOCAB, 40, replace=False)] = row.max()
        rows.append(row)
    logits = np.stack(rows)
    # each row's own three of its top tokens, twice: the frequency penalty counts them
    histories = [list(np.argsort(-row)[i:i + 3]) * 2 for i, row in enumerate(rows)]
    sampler = Sampler(SamplingParams(**params), suppress_ids=(7, 321))
    values, ids = with_top(logits).top()
    together = sampler.distributions_from_top(values, ids, histories)
    for r, (row, history) in enumerate(zip(rows, histories)):
        alone = sampler.distributions_from_top(values[r:r + 1], ids[r:r + 1], [history])[0]
        got = together[r]
        assert (got is None) == (alone is None), r
        if got is None:
            continue
        want = sampler.distribution(row, history)
        np.testing.assert_array_equal(got.ids, want.ids, err_msg=str(r))
        np.testing.assert_allclose(got.probs, want.probs, rtol=1e-6, err_msg=str(r))
    assert together[1] is None  # the tied row
    assert sum(d is not None for d in together) >= 4


def test_top_candidates_that_may_miss_a_kept_token_are_not_used():
    row = vocab_rows()["flat"]
    values, ids = with_top(row[None]).top()
    top = list(ids[0])

    def from_top(suppress=(), history=(), **params):
        s = Sampler(SamplingParams(temperature=1.0, **params), suppress_ids=suppress)
        return s.distributions_from_top(values, ids, [list(history)])[0]
    assert from_top(top_k=0) is None                       # no top-k: the whole row counts
    assert from_top(top_k=65) is None                      # more than the candidates
    assert from_top(top_k=64) is None                      # the 64th may tie the 65th
    assert from_top(top_k=63) is not None
    tied, tied_ids = with_top(vocab_rows()["ties"][None]).top()  # the 64th ties tokens left out
    assert Sampler(SamplingParams(temperature=1.0, top_k=40)).distributions_from_top(tied, tied_ids, [[]])[0] is None
    assert from_top(top_k=40, repetition_penalty=0.8, penalty_last_n=4, history=top[-4:]) is None  # raises some
    assert from_top(top_k=40, frequency_penalty=-0.5, penalty_last_n=4, history=top[-4:]) is None
    assert from_top(top_k=40, presence_penalty=-0.5, penalty_last_n=4, history=top[-4:]) is None
    assert from_top(top_k=40, logit_bias=((top[-1], 0.5),)) is None
    assert from_top(top_k=40, logit_bias=((top[0], -0.5),)) is not None
    assert from_top(top_k=40, suppress=top[:30]) is None   # 34 left above the 65th: not 40
    assert from_top(top_k=30, suppress=top[:30]) is not None
    # a row shorter than the candidates leaves nothing out: always exact
    short = np.array([[0.5, 2.0, -1.0, 2.0]], np.float32)
    v, i = with_top(short).top()
    got = Sampler(SamplingParams(temperature=1.0, top_k=10), suppress_ids=(1,)).distributions_from_top(v, i, [[]])[0]
    want = Sampler(SamplingParams(temperature=1.0, top_k=10), suppress_ids=(1,)).distribution(short[0], [])
    np.testing.assert_allclose(got.dense(4), want.dense(4), rtol=1e-6)  # want lists id 1 at 0


def test_sampling_with_top_candidates_fetches_no_row():
    logits = np.stack([vocab_rows()["peaked"], vocab_rows()["flat"]])
    fetches = []
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=9)
    got = Sampler(params).choose(with_top(logits, fetches), [0, 1], [[], []])
    want = Sampler(params).choose(StepResult.from_logits(logits), [0, 1], [[], []])
    assert got[0] == want[0] and np.allclose(got[1], want[1], rtol=1e-6)
    assert fetches == [("top",)]
    # top-k past the candidates: the rows are fetched, once, from the first needed to the last
    fetches.clear()
    Sampler(SamplingParams(temperature=0.8, top_k=100, seed=9)).choose(with_top(logits, fetches), [1, 0], [[], []])
    assert fetches == [("rows", 0, 2)]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_chunk_masses_give_the_rows_distribution_and_draws(temperature):
    """Temperature alone from a GPU build's chunk masses: every token's probability is the
    whole row's, penalties and suppression included (the max token suppressed on one row),
    and the same seed draws the same tokens, while only chunks (4 KB), never a row, are
    copied."""
    rows = vocab_rows()
    logits = np.stack([rows["peaked"], rows["flat"], rows["ties"]])
    history = list(np.argsort(-rows["peaked"])[1:4]) + [5, 70000]
    params = SamplingParams(temperature=temperature, seed=3, repetition_penalty=1.4, penalty_last_n=8)
    suppress = (int(rows["peaked"].argmax()), 12345)
    fetches = []
    step = with_top(logits, fetches)
    sampler = Sampler(params, suppress_ids=suppress)
    known = sampler.distributions_known(step, [0, 1, 2], [history] * 3)
    for r, dist in enumerate(known):
        want = sampler.distribution(logits[r], history).dense(VOCAB)
        got = dist.dense(VOCAB)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12, err_msg=str(r))
        tokens = np.random.default_rng(r).choice(VOCAB, 50)
        np.testing.assert_allclose([dist.prob(int(t)) for t in tokens], want[tokens], rtol=1e-5, atol=1e-12)
    fetches.clear()
    by_mass = Sampler(params, suppress_ids=suppress)
    by_row = Sampler(params, suppress_ids=suppress)
    for _ in range(40):
        got = by_mass.choose(with_top(logits, fetches), [0, 1, 2], [history] * 3)
        want = by_row.choose(StepResult.from_logits(logits), [0, 1, 2], [history] * 3)
        assert got[0] == want[0]
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    assert {f[0] for f in fetches} == {"mass", "span"}
    assert all(f[3] - f[2] == 1024 for f in fetches if f[0] == "span")


def test_the_rows_max_has_its_probability_without_a_chunk():
    """A verify row's check of a draft token that is the row's argmax (the usual case with a
    trained model) reads the probability from the masses alone, 1 / total (the max's weight
    is exp(0)), the same float its chunk gives; another token copies its chunk; a max the
    penalty demotes has the penalized row's probability, not 1 / total."""
    rows = vocab_rows()
    logits = np.stack([rows["peaked"], rows["flat"]])
    top = int(logits[0].argmax())
    c = top // 1024
    params = SamplingParams(temperature=0.7, repetition_penalty=1.2)
    fetches = []
    dist = Sampler(params).distributions_known(with_top(logits, fetches), [0], [[]])[0]
    fetches.clear()
    assert dist.prob(top) == 1.0 / dist.total and fetches == []
    assert dist.prob(top) == float(dist._chunk_weights(c)[top - c * 1024]) / dist.total
    fetches.clear()
    other = (top + 5000) % VOCAB  # in another chunk
    assert dist.prob(other) > 0 and [f[0] for f in fetches] == ["span"]
    params = SamplingParams(temperature=0.7, repetition_penalty=3.0, penalty_last_n=1)  # the max falls below two others
    penalized = Sampler(params).distributions_known(with_top(logits), [0], [[top]])[0]
    want = Sampler(params).distribution(logits[0], [top]).prob(top)
    assert penalized.prob(top) < 1.0 / penalized.total
    assert penalized.prob(top) == pytest.approx(want, rel=1e-5)


def test_chunk_masses_are_not_used_where_they_cannot_serve():
    logits = vocab_rows()["flat"][None]
    fetches = []
    many = list(range(0, VOCAB, 2048))  # 64 penalized ids in 64 chunks: the row is cheaper
    Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.2, penalty_last_n=64)).choose(
        with_top(logits, fetches), [0], [many])
    assert fetches == [("rows", 0, 1)]
    # a flat row's nucleus and min-p set hold far more than the 64 candidates; top-k over 64
    # needs no extra output at all
    for params, extra in ((dict(top_p=0.9), [("top",), ("mass",)]), (dict(min_p=0.1), [("top",)]),
                          (dict(top_k=100), [])):
        fetches.clear()
        Sampler(SamplingParams(temperature=1.0, **params)).choose(with_top(logits, fetches), [0], [[]])
        assert fetches == extra + [("rows", 0, 1)], params


def nucleus_rows() -> dict[str, np.ndarray]:
    """vocab_rows() and a row whose top-p 0.9 keeps a couple of dozen tokens."""
    rows = vocab_rows()
    rng = np.random.default_rng(8)
    row = (rng.standard_normal(VOCAB) * 2).astype(np.float32)
    row[rng.choice(VOCAB, 50, replace=False)] += rng.uniform(12, 14, 50).astype(np.float32)
    rows["dozens"] = row  # 50 tokens hold ~96% of the mass at temperature 1
    return rows


@pytest.mark.parametrize("params,served", [
    (dict(temperature=1.0, top_p=0.9), {"peaked", "dozens"}),
    (dict(temperature=0.7, top_p=0.95, min_p=0.05), {"peaked", "dozens"}),
    (dict(temperature=1.5, min_p=0.02), {"peaked", "dozens"}),
    (dict(temperature=1.0, top_p=0.5, repetition_penalty=1.3, penalty_last_n=8), {"peaked", "dozens"}),
    (dict(temperature=1.0, top_p=0.8, frequency_penalty=0.5, presence_penalty=1.5, penalty_last_n=8,
          logit_bias=((99, -3.0),)), {"peaked", "dozens"}),
    (dict(temperature=0.8, min_p=0.1, top_p=0.99), {"peaked", "ties", "dozens"}),
    (dict(temperature=1.0, top_p=0.999), {"peaked"})])  # dozens: the rest holds ~4% of it
def test_top_candidates_give_the_nucleus_without_top_k(params, served):
    """Top-p and min-p without top-k judge the whole row: its top candidates serve it where
    those above the largest left out hold top_p of the row's mass (known from its chunk
    masses) or the largest left out weighs under min-p. Those rows get the whole row's
    distribution (penalties, and suppression of a top token, included); the others None."""
    rows = nucleus_rows()
    names = list(rows)
    logits = np.stack([rows[n] for n in names])
    history = list(np.argsort(-rows["dozens"])[1:4])  # penalized: some of its top tokens
    sampler = Sampler(SamplingParams(**params), suppress_ids=(7, 12345))  # 7: peaked's
    known = sampler.distributions_known(with_top(logits), range(len(names)), [history] * len(names))
    assert {name for name, d in zip(names, known) if d is not None} == served
    for name, got in zip(names, known):
        if got is not None:
            want = sampler.distribution(rows[name], history)
            np.testing.assert_array_equal(got.ids, want.ids, err_msg=name)
            np.testing.assert_allclose(got.probs, want.probs, rtol=1e-6, err_msg=name)


def test_nucleus_from_top_candidates_at_the_edge_of_what_they_hold():
    """Just under the mass the 63 candidates surely above the rest hold, top-p is served
    from them; just over, it is not (a token left out could be in). Min-p likewise around
    the weight of the largest left out."""
    from trimode.runtime.sampling import softmax64
    row = nucleus_rows()["dozens"]
    step = with_top(row[None])
    values, ids = step.top()
    held = softmax64(row)[ids[0, :63]].sum()
    largest_left_out = float(np.exp(np.float64(values[0, 63]) - values[0, 0]))

    def known(**params):
        sampler = Sampler(SamplingParams(temperature=1.0, **params))
        got = sampler.distributions_known(step, [0], [[]])[0]
        if got is not None:
            want = sampler.distribution(row, [])
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_allclose(got.probs, want.probs, rtol=1e-6)
        return got
    assert known(top_p=held * (1 - 1e-4)) is not None
    assert known(top_p=held * (1 + 1e-4)) is None
    assert known(min_p=largest_left_out * (1 + 1e-4)) is not None
    assert known(min_p=largest_left_out * (1 - 1e-4)) is None
    # min-p needs no chunk masses; top-p without them takes the row
    no_mass = StepResult(step.argmax, step.prob, step.fetch_rows, step.fetch_top)
    s = Sampler(SamplingParams(temperature=1.0, min_p=largest_left_out * 2))
    assert s.distributions_known(no_mass, [0], [[]])[0] is not None
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5))
    assert s.distributions_known(no_mass, [0], [[]])[0] is None


def test_nucleus_sampling_from_top_candidates_draws_the_rows_tokens():
    """Top-p without top-k, the candidates serving: the same seed draws the tokens the whole
    rows give, with only the candidates and the chunk masses copied (and, for a penalized
    row, the chunks its penalized ids lie in)."""
    rows = nucleus_rows()
    logits = np.stack([rows["peaked"], rows["dozens"]])
    histories = [[], list(np.argsort(-rows["dozens"])[:2]) + [3000]]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=4, repetition_penalty=1.2,
                            penalty_last_n=4)
    fetches = []
    by_top, by_row = Sampler(params), Sampler(params)
    for _ in range(40):
        got = by_top.choose(with_top(logits, fetches), [0, 1], histories)
        want = by_row.choose(StepResult.from_logits(logits), [0, 1], histories)
        assert got[0] == want[0]
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    assert {f[0] for f in fetches} == {"top", "mass", "span"}
    assert {f[1] for f in fetches if f[0] == "span"} == {1}  # the penalized row's chunks
