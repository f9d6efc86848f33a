"""`trimode generate -cnv`: llama-cli's conversation mode. Each line on stdin is a user turn;
the reply streams to stdout. The prompt of every turn is the whole conversation through the
chat template (with the fork's multi-turn cleanup and its 1.3 penalty on the previous reply's
tokens, as the server applies them), and the sequence keeps its cache between turns, so a
turn prefills only what the cached ids do not already hold."""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Iterable

import click

from trimode.model.chat import PREVIOUS_REPLY_PENALTY, encode_prompt, previous_reply_ids, render_chat
from trimode.runtime.generation import DoneEvent, GenerationRequest, TokenEvent, cached_prefix, generate

EXIT_COMMANDS = ("/exit", "/quit")


def converse(engine, turn: GenerationRequest, system: str | None, reasoning: bool, n_ctx: int,
             as_json: bool, lines: Iterable[str], on_done) -> None:
    """One reply per line of `lines` (empty lines skipped, /exit or /quit or the end of input
    stops). `turn` holds every setting but the prompt (its max_tokens < 0: up to the context);
    `on_done(done)` reports each turn's DoneEvent (statistics, a note)."""
    tok, metadata = engine.tokenizer, engine.metadata
    template = metadata.get("tokenizer.chat_template") or None
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
    bos = tok.tokens[tok.bos_id]
    messages = [{"role": "system", "content": system}] if system else []
    fwd, cached = engine.new_sequence(n_ctx), []  # the ids whose K/V the sequence holds a prefix of
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip() in EXIT_COMMANDS:
            break
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        prompt = encode_prompt(tok, render_chat(template, messages, reasoning=reasoning,
                                                template_vars={"bos_token": bos}), add_bos)
        fwd.truncate(cached_prefix(cached, fwd.length, prompt))
        penalized = previous_reply_ids(tok, messages)
        sampling = dataclasses.replace(turn.sampling, penalty_ids=penalized,
                                       ids_penalty=PREVIOUS_REPLY_PENALTY if penalized else 1.0)
        request = dataclasses.replace(turn, prompt_ids=tuple(prompt), sampling=sampling,
                                      max_tokens=max(n_ctx - len(prompt), 0) if turn.max_tokens < 0 else turn.max_tokens)
        pieces, done = [], None
        for event in generate(fwd, tok, request):
            if isinstance(event, TokenEvent):
                pieces.append(event.text)
                if not as_json:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
            elif isinstance(event, DoneEvent):
                done = event
        reply = "".join(pieces)
        if as_json:
            click.echo(json.dumps({"tokens": done.tokens, "text": reply, "stats": done.stats.to_dict(),
                                   "finish_reason": done.finish_reason}, ensure_ascii=False))
        else:
            click.echo("")
        on_done(done)
        if done.finish_reason == "context" and not done.tokens:
            return  # the conversation no longer fits: the note says so
        messages.append({"role": "assistant", "content": reply})
        cached = prompt + done.tokens
