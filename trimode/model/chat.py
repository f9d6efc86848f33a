"""Chat prompts: the GGUF's jinja2 chat template, rendered in a sandbox, plus the llama.cpp
fork's multi-turn cleanup (MODEL.md sections 2 and 6)."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trimode.model.config import ModelError

# MODEL.md section 2's ChatML form; the fallback for files without `tokenizer.chat_template`
# and the template generated vocabularies carry. The generation prompt opens a think block;
# `enable_thinking=false` closes it at once.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '</think>\\n' }}{%- endif -%}"
    "{%- endif -%}"
)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# The fork's repetition penalty on the tokens of the previous assistant reply (MODEL.md 6).
PREVIOUS_REPLY_PENALTY = 1.3
CLOSED_THINK = "<think>\n</think>\n"

# The fork's loop rule (MODEL.md section 6): at >= 16 units, some period 4..min(32, n/2)
# whose last copy equals the copy before it.
LOOP_MIN_UNITS = 16
LOOP_MIN_PERIOD = 4
LOOP_MAX_PERIOD = 32

_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                reasoning: bool = False, template_vars: Mapping | None = None) -> str:
    """The prompt text for `messages` ({"role", "content"} dicts, content a string or a list of
    OpenAI text parts). `template` None or empty uses CHATML_TEMPLATE. `reasoning` is passed to
    the template as `enable_thinking`; when off, the prompt ends with a closed think block
    whatever the template does. `template_vars` adds variables (bos_token, tools, ...)."""
    turns = [_cleaned(m, earlier=add_generation_prompt or i < len(messages) - 1)
             for i, m in enumerate(_validated(messages))]
    context = {"bos_token": "<s>", "eos_token": "<|im_end|>", **(template_vars or {}),
               "messages": turns, "add_generation_prompt": add_generation_prompt,
               "enable_thinking": reasoning}
    try:
        prompt = _compiled(template or CHATML_TEMPLATE).render(**context)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
        raise ModelError(f"chat template: {e}") from None
    if add_generation_prompt and not reasoning:
        prompt = _close_think(prompt)
    return prompt


def loop_period(units: Sequence) -> int | None:
    """The smallest period of a repetition loop at the end of `units` (characters or token ids),
    or None: the fork's loop-detector rule."""
    n = len(units)
    if n < LOOP_MIN_UNITS:
        return None
    for period in range(LOOP_MIN_PERIOD, min(LOOP_MAX_PERIOD, n // 2) + 1):
        if units[n - period:] == units[n - 2 * period:n - period]:
            return period
    return None


def cut_repetition_loop(units: Sequence) -> Sequence:
    """`units` with a trailing loop cut back to its first copy (unchanged if there is none)."""
    period = loop_period(units)
    if period is None:
        return units
    while len(units) >= 2 * period and units[-period:] == units[-2 * period:-period]:
        units = units[:-period]
    return units


def _cleaned(message: dict, earlier: bool) -> dict:
    # Earlier assistant replies as the fork re-sends them. Loops are cut on characters (this
    # runs before tokenization), so the period rule counts characters, not tokens.
    if message["role"] != "assistant" or not earlier:
        return message
    content = message["content"]
    opened, closed = content.rfind(THINK_OPEN), content.rfind(THINK_CLOSE)
    if opened > closed:  # reasoning cut off before its </think>
        content = content[:opened]
    content = cut_repetition_loop(_EMPTY_THINK.sub("", content))
    return {**message, "content": content}


def _close_think(prompt: str) -> str:
    if prompt.rstrip().endswith(THINK_CLOSE):
        return prompt
    if prompt.endswith("<think>\n"):
        return prompt + "</think>\n"
    if prompt.endswith(THINK_OPEN):
        return prompt + "\n</think>\n"
    return prompt + CLOSED_THINK


def _validated(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ModelError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ModelError(f"message {i} has no role")
        out.append({**m, "content": _text(m.get("content"), i)})
    return out


def _text(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ModelError(f"message {index} content must be a string or a list of text parts")


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    # As HF transformers: plain json.dumps, without jinja2's HTML escaping.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


@lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    # Whitespace handling and helpers as HF transformers renders chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelError(f"chat template: {e.message} (line {e.lineno})") from None


def previous_reply_ids(tokenizer, messages: Sequence[Mapping]) -> tuple[int, ...]:
    """The ids of the last assistant reply among `messages` (ascending, once each), which
    the fork penalizes PREVIOUS_REPLY_PENALTY times so the model does not repeat itself."""
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return tuple(sorted(set(tokenizer.encode(replies[-1])))) if replies else ()


def encode_prompt(tokenizer, text: str, add_bos: bool) -> list[int]:
    """A rendered prompt as ids: special tokens parsed, and BOS first when the model wants
    one (tokenizer.ggml.add_bos_token) and the text does not already start with it."""
    ids = tokenizer.encode_template(text)
    if add_bos and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids
