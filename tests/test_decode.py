"""The decode loops against the float64 reference: greedy self-speculation equals greedy AR
token for token, speculative sampling samples the AR distribution, block diffusion reveals
by its rule, and generate() keeps its contract (lazy cycles, KV reuse, limits)."""
from __future__ import annotations

import codecs
import functools
import math

import numpy as np
import pytest
import top_candidates

from trimode.model.config import ModelConfig
from trimode.model.random_weights import random_weights
from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.runtime.forward import ContextFull, StepResult
from trimode.runtime.generation import (DecodeParams, DoneEvent, GenerationRequest, RequestError,
                                        SamplingParams, TokenEvent, cached_prefix, generate)
from trimode.runtime.sampling import Sampler
from trimode.runtime.spec_pace import SpecPace
from trimode.runtime.stops import loop_found

# A very small vocabulary, so random models repeat themselves, drafts sometimes match, and
# sampling tests have few outcomes. Ids 0-3 are specials as in NLD's layout (eos 2, mask 3).
MICRO = ModelConfig(n_layers=2, hidden=64, ffn=128, n_heads=4, n_kv_heads=1, head_dim=16,
                    vocab=32, context_length=512, yarn_orig_ctx=64, bos_token_id=1,
                    eos_token_id=2, mask_token_id=3)
# An EOS id outside the vocabulary: runs that must reach a limit.
NO_EOS = MICRO.replace(eos_token_id=MICRO.vocab)
PROMPTS = [(1, 5, 7, 9), (1, 30, 4, 4, 12, 6, 19, 21, 8), (1, 17)]


@functools.lru_cache(maxsize=None)
def micro_model(seed: int) -> ReferenceModel:
    return ReferenceModel(MICRO, random_weights(MICRO, seed=seed))


class LetterTokenizer:
    """Id i decodes to one letter; enough for generate(), which only streams text."""

    def incremental_decoder(self, skip=b""):
        assert not skip, "this fake does not heal prompts"
        return _Letters()


class _Letters:
    def __init__(self):
        self.utf8 = codecs.getincrementaldecoder("utf-8")()

    def push(self, token_id: int) -> str:
        return self.utf8.decode(bytes([97 + token_id % 26]))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


class Recorder:
    """A Forward that passes through to another and records every call, refusing (like the
    compiled engine) to write past its own n_ctx."""

    def __init__(self, inner, n_ctx: int | None = None):
        self.inner = inner
        self.config = inner.config
        self.n_ctx = n_ctx or inner.n_ctx
        self.calls: list[tuple[str, list[int], StepResult | None, int]] = []

    @property
    def length(self) -> int:
        return self.inner.length

    def causal(self, tokens, last_only=False):
        if self.length + len(tokens) > self.n_ctx:
            raise ContextFull(f"{self.length} + {len(tokens)} > {self.n_ctx}")
        result = self.inner.causal(tokens, last_only)
        self.calls.append(("causal", list(tokens), result, self.length - len(tokens)))
        return result

    def bidirectional(self, tokens):
        if self.length + len(tokens) > self.n_ctx:
            raise ContextFull(f"{self.length} + {len(tokens)} > {self.n_ctx}")
        result = self.inner.bidirectional(tokens)
        self.calls.append(("bidirectional", list(tokens), result, self.length))
        return result

    def truncate(self, n):
        self.calls.append(("truncate", [], None, n))
        self.inner.truncate(n)


class LookaheadDraft(Recorder):
    """Drafts like a good drafter: each masked slot gets the true greedy continuation (from
    real causal passes, undone afterwards), except slots a seeded rng makes wrong, so greedy
    self-speculation accepts every number of drafts from none to all. With `noise`, each
    slot's logits are instead the true causal logits plus Gaussian noise: a draft
    distribution q close to, but not equal to, the verify distribution p."""

    def __init__(self, inner, n_ctx: int, seed: int, wrong: float = 0.3, noise: float = 0.0):
        super().__init__(inner, n_ctx)
        self.rng = np.random.default_rng(seed)
        self.wrong, self.noise = wrong, noise

    def bidirectional(self, tokens):
        start, token, truth = self.inner.length, tokens[0], []
        for _ in tokens[1:]:
            step = self.inner.causal([token])
            token = int(step.argmax[0])
            truth.append((token, step.logits()[0]))
        self.inner.truncate(start)
        vocab = self.config.vocab
        logits = np.zeros((len(tokens), vocab))
        for slot, (token, row) in enumerate(truth, start=1):
            if self.noise:
                logits[slot] = row + self.noise * self.rng.standard_normal(vocab)
                continue
            if self.rng.random() < self.wrong:
                token = (token + 1 + int(self.rng.integers(vocab - 1))) % vocab
            logits[slot, token] = 8.0
        return StepResult.from_logits(logits)


def run(fwd, **request) -> tuple[list[int], DoneEvent, list[TokenEvent]]:
    events = list(generate(fwd, LetterTokenizer(), GenerationRequest(**request)))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    tokens = [t for e in events[:-1] for t in e.ids]
    assert tokens == done.tokens
    return tokens, done, events[:-1]


def fresh(seed: int, n_ctx: int = 256, config: ModelConfig | None = None) -> ReferenceForward:
    fwd = ReferenceForward(micro_model(seed), n_ctx)
    if config is not None:
        fwd.config = config  # eos/mask/shift are read by the loops, not by the network
    return fwd


def greedy(mode: str, **decode) -> dict:
    return dict(decode=DecodeParams(mode=mode, **decode), loop_detection=False)


# --- greedy self-speculation == greedy AR -------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_spec_equals_ar_with_model_drafts(seed, prompt):
    ar, _, _ = run(fresh(seed), prompt_ids=prompt, max_tokens=40, **greedy("ar"))
    for k in (1, 4, 9):
        fwd = Recorder(fresh(seed))
        spec, done, _ = run(fwd, prompt_ids=prompt, max_tokens=40, **greedy("spec", draft_length=k))
        assert spec == ar, f"draft length {k}"
        passes = [kind for kind, *_ in fwd.calls if kind != "truncate"]
        assert done.stats.forwards == len(passes) <= 1 + 2 * done.stats.cycles


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("k", [2, 5, 12])
def test_greedy_spec_equals_ar_with_good_drafts(seed, k):
    prompt = PROMPTS[seed % len(PROMPTS)]
    ar, _, _ = run(fresh(seed), prompt_ids=prompt, max_tokens=50, **greedy("ar"))
    drafter = LookaheadDraft(fresh(seed, 512), n_ctx=256, seed=seed)
    spec, done, events = run(drafter, prompt_ids=prompt, max_tokens=50, **greedy("spec", draft_length=k))
    assert spec == ar
    accepted = [len(e.ids) - 1 for e in events[1:]]  # event 0 is the prefill's token
    assert max(accepted) >= min(k, 3) and len(set(accepted)) >= 3  # partial and long acceptance
    # EOS in the last accepted block drops its tail from the events, not from the stats
    assert done.stats.accepted_tokens == sum(accepted) or done.finish_reason == "stop"
    assert done.stats.tokens_per_forward > 0.5


class ScriptedPace(SpecPace):
    """A pace that runs a script of draft lengths (cyclically) and keeps what it was told."""
    script = [3, 0, 0, 3, 3, 0, 0, 0]

    def __init__(self, k):
        super().__init__(k)
        self.told: list[tuple[int, int]] = []

    def next_k(self):
        return self.script[len(self.told) % len(self.script)]

    def record(self, k, accepted, seconds):
        self.told.append((k, accepted))
        super().record(k, accepted, seconds)


def test_adaptive_spec_runs_the_cycles_its_pace_asks_for(monkeypatch):
    """Spec cycles and AR steps mixed as the pace says, each told back to it; the tokens are
    AR's whatever the mix."""
    paces = []
    monkeypatch.setattr("trimode.runtime.generation.SpecPace", lambda k: paces.append(ScriptedPace(k)) or paces[-1])
    prompt = PROMPTS[1]
    ar, _, _ = run(fresh(3), prompt_ids=prompt, max_tokens=40, **greedy("ar"))
    drafter = LookaheadDraft(fresh(3, 512), n_ctx=256, seed=3)
    spec, done, events = run(drafter, prompt_ids=prompt, max_tokens=40,
                             **greedy("spec", draft_length=3, adaptive=True))
    assert spec == ar
    (pace,) = paces
    ks = [k for k, _ in pace.told]
    assert ks[:-1] == [ScriptedPace.script[i % 8] for i in range(len(ks) - 1)]  # the last may be cut short
    assert done.stats.cycles == len(ks) and done.stats.spec_cycles == sum(k > 0 for k in ks) >= 4
    # the prefill, two passes a spec cycle, one an AR step
    assert done.stats.forwards == 1 + 2 * done.stats.spec_cycles + (done.stats.cycles - done.stats.spec_cycles)
    assert [len(e.ids) for e in events[1:]] == [1 + a for _, a in pace.told][:len(events) - 1]
    assert done.stats.accepted_tokens == sum(a for _, a in pace.told) > 0


def test_a_given_draft_length_drafts_every_cycle(monkeypatch):
    monkeypatch.setattr("trimode.runtime.generation.SpecPace", None)  # never asked
    _, done, _ = run(fresh(0), prompt_ids=PROMPTS[0], max_tokens=20, **greedy("spec", draft_length=3))
    assert done.stats.spec_cycles >= done.stats.cycles - 1  # the last may have room for 1 token


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_greedy_spec_equals_ar(seed):
    prompt = PROMPTS[seed % 2]
    ar, _, _ = run(fresh(seed), prompt_ids=prompt, max_tokens=60, **greedy("ar"))
    for fwd in (fresh(seed), LookaheadDraft(fresh(seed, 512), n_ctx=256, seed=seed)):
        spec, done, _ = run(fwd, prompt_ids=prompt, max_tokens=60, **greedy("spec", draft_length=4, adaptive=True))
        assert spec == ar and done.stats.spec_cycles >= 2


@pytest.mark.parametrize("sampling", [
    SamplingParams(frequency_penalty=0.8, presence_penalty=0.3, penalty_last_n=6),
    SamplingParams(repetition_penalty=0.7, penalty_last_n=5, logit_bias=((3, 1.5), (5, -2.0))),
    SamplingParams(presence_penalty=-0.6, penalty_last_n=3)])
def test_greedy_spec_equals_ar_under_penalties_and_bias(sampling):
    """Each verify row is penalized by its own history (the accepted drafts before it):
    greedy spec still equals greedy AR, with the drafts made without the penalties."""
    prompt = PROMPTS[0]
    plain, _, _ = run(fresh(0), prompt_ids=prompt, max_tokens=40, **greedy("ar"))
    ar, _, _ = run(fresh(0), prompt_ids=prompt, max_tokens=40, sampling=sampling, **greedy("ar"))
    assert ar != plain  # the adjustments change the output
    for k in (2, 6):
        drafter = LookaheadDraft(fresh(0, 512), n_ctx=256, seed=k)
        spec, done, _ = run(drafter, prompt_ids=prompt, max_tokens=40, sampling=sampling,
                            **greedy("spec", draft_length=k))
        assert spec == ar, f"draft length {k}"
        assert done.stats.accepted_tokens > 0


@pytest.mark.parametrize("seed", [0, 2])
def test_greedy_spec_equals_ar_across_eos(seed):
    prompt = PROMPTS[0]
    plain, _, _ = run(fresh(seed), prompt_ids=prompt, max_tokens=40, **greedy("ar"))
    # Make a token of the greedy continuation the EOS: generation must stop just before it.
    eos = plain[13]
    cut = plain.index(eos)
    config = MICRO.replace(eos_token_id=eos)
    ar, done_ar, _ = run(fresh(seed, config=config), prompt_ids=prompt, max_tokens=40, **greedy("ar"))
    assert ar == plain[:cut] and done_ar.finish_reason == "stop"
    for k in (3, 8):
        drafter = LookaheadDraft(fresh(seed, 512, config), n_ctx=256, seed=k, wrong=0.2)
        spec, done, _ = run(drafter, prompt_ids=prompt, max_tokens=40, **greedy("spec", draft_length=k))
        assert spec == ar and done.finish_reason == "stop"
        assert drafter.length <= len(prompt) + len(spec)  # the cache holds no token past EOS


@pytest.mark.parametrize("mode,k", [("ar", 0), ("spec", 3), ("spec", 7), ("diffusion", 0)])
def test_context_limit_ends_cleanly(mode, k):
    prompt, n_ctx = PROMPTS[1], 30
    ar, _, _ = run(fresh(1, config=NO_EOS), prompt_ids=prompt, max_tokens=100, **greedy("ar"))
    fwd = LookaheadDraft(fresh(1, 512, NO_EOS), n_ctx=n_ctx, seed=5)  # refuses to write past n_ctx
    tokens, done, _ = run(fwd, prompt_ids=prompt, max_tokens=100,
                          **greedy(mode, draft_length=k or 1, block_length=8))
    assert done.finish_reason == "context" and "context" in done.message
    assert len(prompt) + len(tokens) == n_ctx
    if mode != "diffusion":
        assert tokens == ar[:len(tokens)]


def test_prompt_longer_than_context_is_refused_cleanly():
    tokens, done, _ = run(fresh(0, n_ctx=4), prompt_ids=PROMPTS[1], max_tokens=5)
    assert tokens == [] and done.finish_reason == "context"
    assert "does not fit" in done.message


@pytest.mark.parametrize("mode", ["spec", "diffusion"])
def test_cycles_never_run_past_max_tokens(mode):
    fwd = LookaheadDraft(fresh(0, 512, NO_EOS), n_ctx=256, seed=0, wrong=0.0)
    tokens, done, _ = run(fwd, prompt_ids=PROMPTS[0], max_tokens=6,
                          **greedy(mode, draft_length=16, block_length=16))
    assert len(tokens) == 6 and done.finish_reason == "length"
    biggest = max(len(toks) for kind, toks, _, _ in fwd.calls[1:] if kind != "truncate")
    assert biggest == 5  # [next token] + 4 masks: the 5 tokens still allowed after the first


# --- temperature > 0: self-speculation samples the AR distribution ------------------------

def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable: 1 - regularized lower incomplete gamma."""
    a, z = dof / 2, x / 2
    if x > dof + 40 * math.sqrt(dof) + 100:
        return 0.0  # far in the tail (< 1e-30); the series below would overflow
    term = total = 1.0 / a
    for n in range(1, 2000):
        term *= z / (a + n)
        total += term
        if term < 1e-15 * total:
            break
    return max(0.0, 1.0 - math.exp(a * math.log(z) - z - math.lgamma(a)) * total)


def _filtered(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    probs = np.exp((logits - logits.max()) / temperature)
    probs[np.argsort(-probs)[top_k:]] = 0.0
    return probs / probs.sum()


def chi2_p(counts: dict, expected: dict, runs: int) -> float:
    """Pearson's test; outcomes expected fewer than 5 times are pooled into one bin so the
    chi-square approximation holds."""
    assert set(counts) <= set(expected), set(counts) - set(expected)
    bins = {c: (counts.get(c, 0), runs * p) for c, p in expected.items() if runs * p >= 5}
    rest = [c for c in expected if c not in bins]
    while rest and runs * sum(expected[c] for c in rest) < 5:  # the pool itself too small
        rest.append(min(bins, key=lambda c: bins[c][1]))
        del bins[rest[-1]]
    if rest:
        bins["rest"] = (sum(counts.get(c, 0) for c in rest), runs * sum(expected[c] for c in rest))
    assert len(bins) >= 3 and min(e for _, e in bins.values()) >= 5
    stat = sum((seen - e) ** 2 / e for seen, e in bins.values())
    return chi2_sf(stat, len(bins) - 1)


def test_rejection_step_emits_the_verify_distribution():
    """One speculative step on fixed, very different p and q over 6 tokens: the first token
    emitted must follow p whatever q is. 10000 draws; fails below p-value 1e-3 (a correct
    step fails that with probability 0.001 over seeds; the seed is fixed)."""
    from trimode.runtime.decode import _rejection_sample
    from trimode.runtime.sampling import Distribution, Sampler, softmax64
    sampler = Sampler(SamplingParams(temperature=1.0, seed=11))
    verify = np.log(np.array([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
                              [0.10, 0.10, 0.20, 0.20, 0.20, 0.20]]))
    q = [Distribution(np.arange(6), softmax64(np.array([0.0, 2.0, 0.5, 1.0, -1.0, 0.3])))]
    runs, counts = 10000, {}
    step = StepResult.from_logits(verify)
    for _ in range(runs):
        draft = sampler.draw(q[0])
        first = _rejection_sample(sampler, step, [[], []], [draft], q)[0]
        counts[first] = counts.get(first, 0) + 1
    expected = dict(enumerate(softmax64(verify[0])))
    assert chi2_p(counts, expected, runs) > 1e-3, counts


@pytest.mark.parametrize("proposals", [64, 1], ids=["proposals", "rows-after-one"])
def test_rejection_step_from_chunk_masses_emits_the_verify_distribution(monkeypatch, proposals):
    """The same with temperature alone over a 3000-token vocabulary (three chunks) known by
    chunk masses, as a GPU build hands them over: the residual is drawn by proposals from p
    (or, past the proposals, from the whole rows). The first token must follow p: the 8 most
    likely tokens one by one and the rest together; fails below p-value 1e-3."""
    from trimode.runtime import decode
    from trimode.runtime.chunked_row import ChunkedRow
    from trimode.runtime.sampling import Sampler, softmax64
    monkeypatch.setattr(decode, "_RESIDUAL_PROPOSALS", proposals)
    rng = np.random.default_rng(4)
    verify = rng.standard_normal((2, 3000)).astype(np.float32)
    verify[0, [10, 1500, 2999, 7]] += [6.0, 5.5, 5.0, 4.0]
    draft = rng.standard_normal((1, 3000)).astype(np.float32)
    draft[0, [10, 1500, 2400]] += [4.0, 7.0, 6.0]  # q favours other tokens than p
    sampler = Sampler(SamplingParams(temperature=1.0, seed=12))
    verify_step = top_candidates.with_top(StepResult.from_logits(verify))
    q = sampler.distributions_known(top_candidates.with_top(StepResult.from_logits(draft)), [0], [[]])
    assert isinstance(q[0], ChunkedRow)
    p = softmax64(verify[0])
    bins = list(np.argsort(-p)[:8])
    runs, counts = 6000, {}
    for _ in range(runs):
        first = decode._rejection_sample(sampler, verify_step, [[], []], [sampler.draw(q[0])], q)[0]
        key = first if first in bins else -1
        counts[key] = counts.get(key, 0) + 1
    expected = {int(t): p[t] for t in bins} | {-1: 1 - p[bins].sum()}
    assert chi2_p(counts, expected, runs) > 1e-3, counts


def test_rejection_fetches_verify_rows_up_to_the_first_rejection():
    """Each verify row is a device-to-host copy: the rows after the first rejected draft are
    never read, so never fetched."""
    from trimode.runtime.decode import _rejection_sample
    from trimode.runtime.sampling import Distribution, Sampler
    logits = np.log(np.full((4, 6), 1 / 6))
    logits[0] = np.log([0.9, 0.02, 0.02, 0.02, 0.02, 0.02])  # row 0 keeps draft 0 (p = q)
    base, fetched = StepResult.from_logits(logits), []
    step = StepResult(base.argmax, base.prob,
                      lambda start, stop: fetched.append((start, stop)) or base.logits(start, stop))
    q = [Distribution(np.arange(6), np.array([0.9, 0.02, 0.02, 0.02, 0.02, 0.02])),
         Distribution(np.array([3]), np.ones(1)), Distribution(np.array([3]), np.ones(1))]
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    # draft 0 (token 0) is kept with probability min(1, p/q) = 1; draft 1 (token 3, q = 1,
    # p = 1/6) is rejected unless u < 1/6: seeds where it is rejected stop at row 1
    for seed in range(20):
        sampler.rng, fetched[:] = np.random.default_rng(seed), []
        tokens = _rejection_sample(sampler, step, [[]] * 4, [0, 3, 3], q)
        assert fetched == [(j, j + 1) for j in range(len(fetched))]
        assert len(fetched) == min(len(tokens), 4) and tokens[0] == 0


@pytest.mark.parametrize("adjustments", [
    {}, dict(frequency_penalty=1.0, presence_penalty=0.5, penalty_last_n=3, logit_bias=((23, -1.5), (25, 2.5)))])
def test_spec_sampling_matches_ar_distribution(adjustments):
    """End to end on the reference: the joint law of the first three tokens at temperature
    1.5 and top-k 2 (8 outcomes) against the exact AR probabilities. After the prefill's
    token, max_tokens 3 leaves room for a cycle of one draft: accepted, it brings the bonus
    from p; rejected, the residual max(0, p - q). The drafter is the reference's own logits
    plus noise (a real model's mask rows are too poor to ever be accepted here). Fails below
    p-value 1e-3 (a correct sampler fails that with probability 0.001 over seeds; seeds
    are fixed)."""
    seed, prompt, temp, top_k, runs = 0, PROMPTS[0], 1.5, 2, 600
    model = micro_model(seed)

    adjust = Sampler(SamplingParams(**adjustments)).adjust  # tested against llama.cpp's rule

    def law(context: tuple[int, ...]) -> np.ndarray:
        logits = ReferenceForward(model, 16).causal(context).logits()[-1]
        return _filtered(adjust(logits, list(context)).astype(np.float64), temp, top_k)

    expected: dict[tuple[int, ...], float] = {}
    p1 = law(prompt)
    for t1 in np.flatnonzero(p1):
        p2 = law(prompt + (t1,))
        for t2 in np.flatnonzero(p2):
            p3 = law(prompt + (t1, t2))
            for t3 in np.flatnonzero(p3):
                expected[(t1, t2, t3)] = p1[t1] * p2[t2] * p3[t3]

    counts: dict[tuple[int, ...], int] = {}
    fwd = LookaheadDraft(fresh(seed, 16, NO_EOS), n_ctx=16, seed=3, noise=2.0)  # no EOS: runs reach 3
    accepted = 0
    for i in range(runs):
        fwd.truncate(min(fwd.length, len(prompt)))  # reuse the cached prompt
        sampling = SamplingParams(temperature=temp, top_k=top_k, seed=1000 + i, **adjustments)
        tokens, done, _ = run(fwd, prompt_ids=prompt, max_tokens=3, sampling=sampling,
                              decode=DecodeParams(mode="spec", draft_length=2), loop_detection=False)
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
        accepted += done.stats.accepted_tokens
    assert 0 < accepted < 2 * runs  # both acceptance and rejection happened
    assert chi2_p(counts, expected, runs) > 1e-3, counts


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_same_seed_same_output(mode):
    def sample(seed):
        return run(fresh(2), prompt_ids=PROMPTS[0], max_tokens=20, loop_detection=False,
                   sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=seed),
                   decode=DecodeParams(mode=mode, draft_length=4, block_length=6))[0]
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


# --- block diffusion -----------------------------------------------------------------------

def replay_diffusion(calls, start_block: list[int], threshold: float, shift: bool, eos: int):
    """Check each recorded pass of one diffusion cycle against the rule; return the emitted
    tokens the rule gives and the calls consumed."""
    block, used = list(start_block), 0
    masked = set(range(1, len(block)))
    while masked:
        kind, tokens, result, _ = calls[used]
        used += 1
        assert kind == "bidirectional" and tokens == block
        slots = sorted(masked)
        rows = [s - 1 if shift else s for s in slots]
        conf = result.prob[rows]
        best = slots[int(np.argmax(conf))]
        for slot, row, c in zip(slots, rows, conf):
            if slot == best or c >= threshold:
                block[slot] = int(result.argmax[row])
                masked.discard(slot)
        revealed_eos = [s for s in range(len(block)) if block[s] == eos]
        if revealed_eos and not any(s < revealed_eos[0] for s in masked):
            return block[1:revealed_eos[0] + 1], used
    kind, tokens, result, _ = calls[used]
    assert kind == "causal" and tokens == block
    return block[1:] + [int(result.argmax[-1])], used + 1


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("threshold", [0.9, 0.25])
def test_diffusion_reveals_by_rule(shift, threshold):
    config = MICRO.replace(shift_logits=shift)
    fwd = Recorder(fresh(3, config=config))
    prompt = PROMPTS[1]
    tokens, done, _ = run(fwd, prompt_ids=prompt, max_tokens=21,
                          **greedy("diffusion", block_length=6, threshold=threshold))
    calls = [c for c in fwd.calls if c[0] != "truncate"]
    assert calls[0][0] == "causal" and calls[0][1] == list(prompt)
    expected = [int(calls[0][2].argmax[-1])]
    i, multi_reveals = 1, 0
    while len(expected) < 21:
        b = min(6, 21 - len(expected))
        emitted, used = replay_diffusion(calls[i:], [expected[-1]] + [MICRO.mask_token_id] * (b - 1),
                                         threshold, shift, MICRO.eos_token_id)
        multi_reveals += (used - 1) < (b - 1)
        expected += emitted
        i += used
    assert i == len(calls)
    assert tokens == expected
    assert done.stats.forwards == len(calls)
    if threshold < 0.5:
        assert multi_reveals  # the threshold part of the rule was exercised


def test_shift_logits_changes_which_row_drafts():
    outputs = {}
    for shift in (False, True):
        fwd = Recorder(fresh(0, config=NO_EOS.replace(shift_logits=shift)))
        outputs[shift] = run(fwd, prompt_ids=PROMPTS[0], max_tokens=8,
                             **greedy("diffusion", block_length=8, threshold=1.0))[0]
        kind, tokens, result, _ = fwd.calls[1]
        assert kind == "bidirectional"
        # threshold 1: one reveal per pass, the slot whose predicting row is most confident
        slots = [i for i, t in enumerate(tokens) if t == MICRO.mask_token_id]
        rows = [s - 1 if shift else s for s in slots]
        best = int(np.argmax(result.prob[rows]))
        revealed = fwd.calls[2][1]
        assert revealed[slots[best]] == int(result.argmax[rows[best]])
        assert sum(t == MICRO.mask_token_id for t in revealed) == len(slots) - 1
    assert outputs[False] != outputs[True]


def test_diffusion_stops_at_revealed_eos():
    plain = run(fresh(0), prompt_ids=PROMPTS[0], max_tokens=30,
                **greedy("diffusion", block_length=8, threshold=0.3))[0]
    eos = plain[9]
    fwd = Recorder(fresh(0, config=MICRO.replace(eos_token_id=eos)))
    tokens, done, _ = run(fwd, prompt_ids=PROMPTS[0], max_tokens=30,
                          **greedy("diffusion", block_length=8, threshold=0.3))
    assert done.finish_reason == "stop" and eos not in tokens
    assert tokens == plain[:len(tokens)]
    assert fwd.calls[-1][0] != "causal"  # no commit pass for a block that ends the reply


# --- generate()'s contract ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_kv_reuse_gives_the_same_tokens(mode):
    prompt = PROMPTS[1]
    params = dict(max_tokens=12, **greedy(mode, draft_length=3, block_length=4))
    first, _, _ = run(fresh(1), prompt_ids=prompt, **params)
    # A second turn: the cache keeps a prefix of prompt + reply; extend the conversation.
    turn2 = prompt + tuple(first) + (4, 9)
    fwd = fresh(1)
    run(fwd, prompt_ids=prompt, **params)
    assert fwd.length <= len(prompt) + len(first)
    cached = fwd.length
    reused, done, _ = run(fwd, prompt_ids=turn2, **params)
    assert done.stats.cached_tokens == cached
    assert reused == run(fresh(1), prompt_ids=turn2, **params)[0]
    # The whole prompt cached: one token is recomputed to have a row to sample from.
    whole = fresh(1)
    whole.causal(turn2)
    assert run(whole, prompt_ids=turn2, **params)[0] == reused


def test_cached_prefix_counts_only_what_the_cache_holds():
    history = [5, 6, 7, 8]
    assert cached_prefix(history, 4, (5, 6, 9)) == 2  # diverges at the third id
    assert cached_prefix(history, 2, (5, 6, 7, 8)) == 2  # the cache was truncated to two
    assert cached_prefix(history, 4, (5, 6)) == 2  # the prompt is shorter than the cache
    assert cached_prefix(history, 4, (1, 6, 7)) == 0
    assert cached_prefix([], 0, (5,)) == 0


def test_one_cycle_per_event_and_close_stops_at_once():
    fwd = Recorder(fresh(0))
    events = generate(fwd, LetterTokenizer(), GenerationRequest(
        prompt_ids=PROMPTS[0], max_tokens=40, **greedy("spec", draft_length=4)))
    first = next(events)
    assert isinstance(first, TokenEvent) and len(fwd.calls) == 1  # the prefill alone
    for _ in range(3):
        before = len([c for c in fwd.calls if c[0] != "truncate"])
        next(events)
        assert len([c for c in fwd.calls if c[0] != "truncate"]) - before == 2  # draft + verify
    passes = len(fwd.calls)
    events.close()
    assert all(kind == "truncate" for kind, *_ in fwd.calls[passes:])


def test_bad_requests_raise_one_sentence():
    for bad in (dict(prompt_ids=()), dict(prompt_ids=(1,), max_tokens=-1),
                dict(prompt_ids=(1,), decode=DecodeParams(mode="fast")),
                dict(prompt_ids=(1,), sampling=SamplingParams(top_p=0.0)),
                dict(prompt_ids=(1,), decode=DecodeParams(draft_length=100)),
                dict(prompt_ids=(1, 32)), dict(prompt_ids=(1,), suppress_ids=(-1,))):
        with pytest.raises(RequestError) as err:
            next(generate(fresh(0), LetterTokenizer(), GenerationRequest(**bad)))
        assert "\n" not in str(err.value)


def test_ar_stats():
    tokens, done, _ = run(fresh(0), prompt_ids=PROMPTS[0], max_tokens=10, **greedy("ar"))
    s = done.stats
    assert (s.prompt_tokens, s.generated_tokens, s.forwards, s.cycles) == (4, 10, 10, 9)
    assert s.tokens_per_forward == 1.0 and s.accepted_per_cycle == 0.0
    d = s.to_dict()
    assert {"prefill_tok_s", "decode_tok_s", "ttft_s", "tokens_per_forward"} <= set(d)


@pytest.mark.parametrize("mode,k", [("ar", 0), ("spec", 6), ("spec", 12)])
def test_stop_string_inside_an_accepted_block(mode, k):
    """The stop string spans three tokens; with perfect drafts it lands inside one cycle's
    accepted block, and the text is still cut exactly where AR cuts it."""
    prompt = PROMPTS[0]
    plain, _, _ = run(fresh(0, config=NO_EOS), prompt_ids=prompt, max_tokens=40, **greedy("ar"))
    letters = "".join(chr(97 + t % 26) for t in plain)
    stop = letters[9:12]
    at = letters.find(stop)
    fwd = LookaheadDraft(fresh(0, 512, NO_EOS), n_ctx=256, seed=0, wrong=0.0)
    tokens, done, events = run(fwd, prompt_ids=prompt, max_tokens=40, stop=(stop, "zzzzzz"),
                               **greedy(mode, draft_length=k or 1))
    assert done.finish_reason == "stop"
    assert "".join(e.text for e in events) == letters[:at]
    assert tokens == plain[:at + len(stop)]  # ids run up to the token completing the stop
    if mode == "spec":
        assert any(len(e.ids) > 3 for e in events)  # several tokens per cycle really happened


@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_loop_detection_stops_a_looping_model(mode):
    # seed 1 falls into repeating one token after a few; detection is on by default
    free, _, _ = run(fresh(1, config=NO_EOS), prompt_ids=PROMPTS[0], max_tokens=60, **greedy("ar"))
    first = next(n for n in range(1, 61) if loop_found(free[:n]))
    fwd = LookaheadDraft(fresh(1, 512, NO_EOS), n_ctx=256, seed=1)
    tokens, done, _ = run(fwd, prompt_ids=PROMPTS[0], max_tokens=60,
                          decode=DecodeParams(mode=mode, draft_length=8))
    assert done.finish_reason == "loop" and "loop" in done.message
    assert tokens == free[:first]


class WithTop(Recorder):
    """Steps as a GPU build gives them: each row's largest logits beside the rows (the numpy
    twin of the top_candidates entry); `fetches` records what the sampler fetched."""

    def __init__(self, inner):
        super().__init__(inner)
        self.fetches = []

    def causal(self, tokens, last_only=False):
        return top_candidates.with_top(super().causal(tokens, last_only), self.fetches)

    def bidirectional(self, tokens):
        return top_candidates.with_top(super().bidirectional(tokens), self.fetches)


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
@pytest.mark.parametrize("filters,fetched", [(dict(top_k=3, top_p=0.95), {("top",)}),
                                             (dict(top_p=0.9), {("top",), ("mass",)})])
def test_filtered_sampling_from_top_candidates_fetches_no_row(mode, filters, fetched):
    """Sampling with top-k, or with top-p alone (its share of the row from the chunk
    masses), from the candidates a GPU build returns gives the tokens sampling from the
    whole rows gives (same seed), and never copies a row."""
    def sample(fwd):
        return run(fwd, prompt_ids=PROMPTS[0], max_tokens=20, loop_detection=False,
                   sampling=SamplingParams(temperature=0.9, seed=5, **filters),
                   decode=DecodeParams(mode=mode, draft_length=4, block_length=6))[0]
    top = WithTop(fresh(2))
    assert sample(top) == sample(fresh(2))
    assert top.fetches and set(top.fetches) == fetched


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_temperature_sampling_from_chunk_masses_fetches_no_row(mode):
    """Temperature alone from the chunk masses a GPU build returns: AR and diffusion give the
    tokens sampling from the whole rows gives (same seed; spec draws its residuals another
    way, exact too: tested above), and no mode copies a row, only chunks."""
    def sample(fwd):
        return run(fwd, prompt_ids=PROMPTS[0], max_tokens=20, loop_detection=False,
                   sampling=SamplingParams(temperature=0.8, seed=5),
                   decode=DecodeParams(mode=mode, draft_length=4, block_length=6))[0]
    chunked = WithTop(fresh(2))
    tokens = sample(chunked)
    assert tokens
    if mode != "spec":
        assert tokens == sample(fresh(2))
    assert chunked.fetches and {f[0] for f in chunked.fetches} == {"mass", "span"}

