"""Token healing for raw-text prompts.

BPE glues characters to what follows them (the Tekken split makes `):` and the newline after
it one token), so a prompt cut at `def f(n):` ends on a token that training text almost never
ends there, and the model's first token comes out of distribution. Healing backs the prompt
off by its last token and lets the first generated token be any ordinary token whose bytes
start with that token's (`):\\n`, `):\\n\\n`, `):` itself, ...); the bytes the prompt already
showed are not emitted again. It is what `token_healing` does in transformers and guidance.
"""
from __future__ import annotations

from dataclasses import replace

from trimode.model.tokenizer import Tokenizer
from trimode.runtime.generation import GenerationRequest


def heal(tokenizer: Tokenizer, request: GenerationRequest) -> GenerationRequest:
    """`request` with its prompt's last token backed off and the first generated token
    constrained to re-cover it; unchanged when there is nothing to heal (a special last
    token, a one-token prompt, or no longer token that starts the same way)."""
    ids = request.prompt_ids
    if len(ids) < 2 or request.first_ids or not tokenizer.is_ordinary(ids[-1]):
        return request
    tail = tokenizer.token_bytes(ids[-1])
    allowed = tuple(tokenizer.ids_with_prefix(tail))
    if allowed == (ids[-1],):
        return request
    return replace(request, prompt_ids=ids[:-1], first_ids=allowed, prompt_tail=tail)
