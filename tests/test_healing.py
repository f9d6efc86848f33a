"""Token healing (runtime/healing.py) on the tiny model's 2048-token vocabulary, run on the
float64 reference: which tokens may re-cover the prompt's tail, what text comes out, and that
healing keeps every mode's promises."""
from __future__ import annotations

from dataclasses import replace

import pytest

from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.model.tokenizer import Tokenizer
from trimode.runtime.generation import (DecodeParams, DoneEvent, GenerationRequest, SamplingParams,
                                        TokenEvent, generate)
from trimode.runtime.healing import heal

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer.from_metadata(tiny_model.metadata)


@pytest.fixture(scope="module")
def model(tiny_model) -> ReferenceModel:
    return ReferenceModel(tiny_model.config, tiny_model.weights)


def request_for(tok, text, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_ids=tuple(tok.encode(text, add_bos=True)), **kw)


def run(model, tok, request) -> tuple[list[int], str, DoneEvent]:
    tokens, text = [], ""
    for event in generate(ReferenceForward(model, 256), tok, request):
        if isinstance(event, TokenEvent):
            tokens += event.ids
            text += event.text
        else:
            done = event
    return tokens, text, done


def test_ids_with_prefix_is_every_ordinary_token_that_starts_so(tok):
    for prefix in (b"):", b"(", b" ", b"\n", b"de", b"\xc3", b"zzzz-not-a-token"):
        want = [i for i in range(len(tok)) if tok.is_ordinary(i)
                and tok.token_bytes(i).startswith(prefix)]
        assert tok.ids_with_prefix(prefix) == want, prefix
    assert not tok.is_ordinary(tok.bos_id) and not tok.is_ordinary(len(tok))


def test_heal_backs_off_the_last_token(tok):
    request = request_for(tok, PROMPT)
    healed = heal(tok, request)
    last = request.prompt_ids[-1]
    tail = tok.token_bytes(last)
    assert healed.prompt_ids == request.prompt_ids[:-1]
    assert healed.prompt_tail == tail
    assert last in healed.first_ids and len(healed.first_ids) > 1
    assert all(tok.token_bytes(i).startswith(tail) for i in healed.first_ids)


def test_nothing_to_heal_leaves_the_request_alone(tok):
    special_end = GenerationRequest(prompt_ids=(tok.bos_id, *tok.encode("x"), tok.im_end_id))
    assert heal(tok, special_end) == special_end
    assert heal(tok, GenerationRequest(prompt_ids=(5,))) == GenerationRequest(prompt_ids=(5,))
    healed = heal(tok, request_for(tok, PROMPT))
    assert heal(tok, healed) == healed  # never twice


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_healed_text_continues_the_prompt(model, tok, mode):
    healed = heal(tok, request_for(tok, PROMPT, max_tokens=24, loop_detection=False,
                                   decode=DecodeParams(mode=mode, draft_length=6)))
    tokens, text, done = run(model, tok, healed)
    assert tokens[0] in healed.first_ids
    full = tok.decode(list(healed.prompt_ids[1:]) + tokens)
    assert full == PROMPT + text  # the tail is shown once, by the prompt
    assert done.tokens == tokens


def test_healing_keeps_greedy_spec_equal_to_greedy_ar(model, tok):
    def greedy(mode, k=4):
        request = heal(tok, request_for(tok, PROMPT, max_tokens=32, loop_detection=False,
                                        decode=DecodeParams(mode=mode, draft_length=k)))
        return run(model, tok, request)[0]
    ar = greedy("ar")
    assert greedy("spec", 4) == ar and greedy("spec", 15) == ar


def test_the_healed_first_token_is_sampled_from_the_allowed_ones(model, tok):
    healed = heal(tok, request_for(tok, PROMPT, max_tokens=1))
    for seed in range(20):
        request = replace(healed, sampling=SamplingParams(temperature=1.5, seed=seed))
        tokens, _, _ = run(model, tok, request)
        assert tokens[0] in healed.first_ids


def test_stop_strings_see_only_generated_text(model, tok):
    """The tail the first token repeats is prompt text: a stop string matching it is no stop."""
    def text_with(stop):
        request = heal(tok, request_for(tok, PROMPT, max_tokens=16, loop_detection=False, stop=stop))
        return run(model, tok, request)[1]
    free = text_with(())
    for stop in ("):", ")", free[2:4]):
        cut = free.find(stop)
        assert text_with((stop,)) == (free if cut < 0 else free[:cut]), stop


def test_a_decoder_refuses_a_token_that_does_not_continue_the_tail(tok):
    decoder = tok.incremental_decoder(skip=b"):")
    with pytest.raises(ValueError, match="healed prompt tail"):
        decoder.push(tok.encode("xyz")[0])
