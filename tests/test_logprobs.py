"""Logprobs against the float64 reference: in every mode, greedy or sampled, each generated
token's logprob and top alternatives are the causal distribution's at its place, the raw
log-softmax (before temperature and adjustments), whether the rows or a GPU build's top
candidates and chunk masses give them; asking for them changes no token."""
from __future__ import annotations

import numpy as np
import pytest
from test_decode import (NO_EOS, PROMPTS, LetterTokenizer, Recorder, WithTop, fresh, greedy,
                         micro_model, run)

from trimode.model.reference import ReferenceForward
from trimode.runtime.generation import (DecodeParams, GenerationRequest, RequestError,
                                        SamplingParams, generate)

SAMPLINGS = {
    "greedy": SamplingParams(),
    # adjustments the logprobs must not see: temperature, top-k, a penalty, a bias
    "sampled": SamplingParams(temperature=0.9, top_k=5, seed=3, repetition_penalty=1.5,
                              penalty_last_n=8, logit_bias=((9, -3.0),)),
}
N_TOP = 3


def causal_log_softmax(seed: int, ids) -> np.ndarray:
    """Row i: the float64 reference's log-probabilities of the token after ids[:i + 1]."""
    fwd = ReferenceForward(micro_model(seed), len(ids))
    logits = fwd.model.forward(list(ids), fwd._k, fwd._v, causal=True)[0]
    peak = logits.max(axis=1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))


def scored_run(fwd, prompt, **request):
    tokens, done, events = run(fwd, prompt_ids=prompt, logprobs=N_TOP, **request)
    for event in events:
        assert [s.token for s in event.logprobs] == event.ids
    return tokens, done, [s for event in events for s in event.logprobs]


def assert_causal(seed: int, prompt, tokens, scored) -> None:
    assert [s.token for s in scored] == tokens and tokens
    want = causal_log_softmax(seed, list(prompt) + tokens)[len(prompt) - 1:]
    for row, s in zip(want, scored):
        assert s.logprob == pytest.approx(row[s.token], abs=1e-5)
        best = np.argsort(-row, kind="stable")[:N_TOP]
        assert [i for i, _ in s.top] == best.tolist()
        np.testing.assert_allclose([lp for _, lp in s.top], row[best], atol=1e-5)


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_logprobs_are_the_causal_distributions(mode, sampling):
    request = dict(max_tokens=20, loop_detection=False, sampling=SAMPLINGS[sampling],
                   decode=DecodeParams(mode=mode, draft_length=4, block_length=6))
    tokens, _, scored = scored_run(fresh(2), PROMPTS[1], **request)
    assert_causal(2, PROMPTS[1], tokens, scored)
    assert tokens == run(fresh(2), prompt_ids=PROMPTS[1], **request)[0]
    # as a GPU build gives them: from the top candidates and chunk masses, no row copied
    top = WithTop(fresh(2))
    gpu_tokens, _, gpu_scored = scored_run(top, PROMPTS[1], **request)
    assert gpu_tokens == tokens
    assert {f[0] for f in top.fetches} <= {"top", "mass", "span"}
    for got, want in zip(gpu_scored, scored):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [i for i, _ in got.top] == [i for i, _ in want.top]
        np.testing.assert_allclose([lp for _, lp in got.top], [lp for _, lp in want.top], atol=1e-5)


def test_a_diffusion_block_ended_by_eos_is_scored_by_one_causal_pass():
    """A block that ends the reply has no commit pass; one causal pass over its tokens
    scores them, and the tokens stay those of a run without logprobs."""
    params = greedy("diffusion", block_length=8, threshold=0.3)
    plain = run(fresh(2, config=NO_EOS), prompt_ids=PROMPTS[0], max_tokens=30, **params)[0]
    # an EOS a few tokens into the second block (its slots make tokens 9-15)
    end = next(i for i in range(11, 16) if plain[i] not in plain[:i])
    config = NO_EOS.replace(eos_token_id=plain[end])
    without = run(fresh(2, config=config), prompt_ids=PROMPTS[0], max_tokens=30, **params)[0]
    fwd = Recorder(fresh(2, config=config))
    tokens, done, scored = scored_run(fwd, PROMPTS[0], max_tokens=30, **params)
    assert done.finish_reason == "stop" and tokens == without == plain[:end]
    kind, passed, _, _ = [call for call in fwd.calls if call[0] != "truncate"][-1]
    full = list(PROMPTS[0]) + tokens  # the scoring pass: the token before the block, the block
    assert kind == "causal" and len(passed) > 1 and passed == full[-len(passed) - 1:-1]
    assert_causal(2, PROMPTS[0], tokens, scored)


def test_a_healed_first_token_gets_its_raw_logprob():
    """A first token restricted to a few ids (token healing) is scored by the unrestricted row."""
    want = causal_log_softmax(1, PROMPTS[0])[-1]
    forced = int(np.argsort(want)[3])  # an unlikely token
    tokens, _, scored = scored_run(fresh(1), PROMPTS[0], max_tokens=3, first_ids=(forced,),
                                   **greedy("ar"))
    assert tokens[0] == forced
    assert scored[0].logprob == pytest.approx(want[forced], abs=1e-5)
    assert scored[0].top[0][0] == int(want.argmax())


def test_a_stop_string_inside_a_cycle_keeps_ids_and_logprobs_together():
    """The cycle that holds a stop string reports the tokens up to it, each with its logprob."""
    params = dict(max_tokens=30, **greedy("spec", draft_length=6))
    plain = run(fresh(2), prompt_ids=PROMPTS[1], **params)[0]
    letter = chr(97 + plain[6] % 26)
    first = next(i for i, t in enumerate(plain) if chr(97 + t % 26) == letter)
    tokens, done, scored = scored_run(fresh(2), PROMPTS[1], stop=(letter,), **params)
    assert done.finish_reason == "stop" and tokens == plain[:first + 1]
    assert_causal(2, PROMPTS[1], tokens, scored)


def test_no_alternatives_and_a_bad_count():
    tokens, _, events = run(fresh(0), prompt_ids=PROMPTS[0], max_tokens=5, logprobs=0, **greedy("ar"))
    scored = [s for e in events for s in e.logprobs]
    assert [s.token for s in scored] == tokens and all(s.top == () for s in scored)
    assert all(e.logprobs is None for e in run(fresh(0), prompt_ids=PROMPTS[0], max_tokens=5)[2])
    for bad in (-1, 21):
        with pytest.raises(RequestError, match="logprobs"):
            next(generate(fresh(0), LetterTokenizer(), GenerationRequest(prompt_ids=(1,), logprobs=bad)))


def test_top_candidates_and_chunk_masses_give_the_rows_numbers():
    """At a vocabulary of several chunks, a GPU build's extras give each row's logprobs as
    its whole row does; a token outside the 64 candidates costs one logit, never a row."""
    import top_candidates
    from trimode.runtime.forward import StepResult
    from trimode.runtime.logprobs import token_logprobs
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((5, 5000)) * 3).astype(np.float32)
    tokens = [int(np.argmax(logits[0])), int(np.argmin(logits[1])), 17, 4999, int(np.argsort(logits[4])[-70])]
    want = token_logprobs(StepResult.from_logits(logits), tokens, 5)
    fetches = []
    got = token_logprobs(top_candidates.with_top(StepResult.from_logits(logits), fetches), tokens, 5)
    assert {f[0] for f in fetches} == {"top", "mass", "span"}
    assert sum(f[0] == "span" and f[3] - f[2] == 1 for f in fetches) >= 3
    for g, w, row in zip(got, want, logits.astype(np.float64)):
        exact = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert w.logprob == pytest.approx(exact[w.token], abs=1e-6)
        assert g.token == w.token and g.logprob == pytest.approx(w.logprob, abs=1e-5)
        assert [i for i, _ in g.top] == [i for i, _ in w.top] == np.argsort(-row, kind="stable")[:5].tolist()
        np.testing.assert_allclose([lp for _, lp in g.top], exact[[i for i, _ in w.top]], atol=1e-5)


@pytest.mark.parametrize("max_tokens", [0, 6])
def test_prompt_logprobs_score_every_prompt_token_but_the_first(max_tokens):
    """One event before the reply's scores the prompt: None for its first token, then each
    token's logprob and alternatives under the causal distribution, over a prompt longer than
    one all-rows pass and after a cached prefix (recomputed); the reply is the same."""
    rng = np.random.default_rng(5)
    prompt = (1, *rng.integers(4, 32, 150).tolist())  # > MAX_BLOCK: three causal passes
    fwd = Recorder(fresh(2))
    fwd.causal(list(prompt[:40]))  # a cached prefix, as after an earlier turn
    request = dict(max_tokens=max_tokens, prompt_logprobs=N_TOP, **greedy("spec", draft_length=4))
    events = list(generate(fwd, LetterTokenizer(), GenerationRequest(prompt_ids=prompt, **request)))
    first, *rest, done = events
    assert first.ids == [] and first.text == "" and first.prompt_logprobs[0] is None
    assert all(e.prompt_logprobs is None for e in rest)
    scored = first.prompt_logprobs[1:]
    assert_causal(2, prompt[:1], list(prompt[1:]), scored)
    assert done.stats.cached_tokens == 0
    tokens = [t for e in rest for t in e.ids]
    cached = fresh(2)
    cached.causal(list(prompt[:40]))
    assert tokens == run(cached, prompt_ids=prompt, max_tokens=max_tokens, **greedy("spec", draft_length=4))[0]
    assert len(tokens) == max_tokens
