"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Validation is strict (a string where a number belongs is a 400, not a silent coercion) and
every list and string a client controls is bounded, so no body can make the server do
unbounded work. Fields that select our decoding mode are extras beyond OpenAI's set.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import (AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator,
                      model_validator)

from trimode.runtime.decode import MAX_BLOCK, MODES
from trimode.runtime.logprobs import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_TOKEN_IDS = 1 << 20
MAX_LOGIT_BIAS = 4096
MAX_CHOICES = 16
MAX_PROMPTS = 64  # a completions batch
TopLogprobs = Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)]
TokenIds = Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1, max_length=MAX_TOKEN_IDS)]



def _unicode(text: str) -> str:
    # JSON's \ud800 escapes decode to lone surrogates: valid JSON, not valid Unicode text.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text holds an unpaired surrogate at character {err.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
StrictInt = Annotated[int, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]


class _Body(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata, ...); ignoring them is what
    # llama-server does. Fields whose absence of support would change the answer are
    # refused explicitly below.
    model_config = ConfigDict(extra="ignore")


# Fields of OpenAI's API and llama-server's that change the answer and that we do not
# implement, with the values that leave it unchanged: any other value is a 400, never a
# silently different reply.
NEUTRAL_VALUES = {
    "response_format": (None, {"type": "text"}),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tool_choice": (None, "none", "auto"),
    "n_probs": (None, 0),
    "prompt_logprobs": (None,),
    "ignore_eos": (None, False),
    "grammar": (None, ""),
    "json_schema": (None, {}),
    "typical_p": (None, 1, 1.0),
    "mirostat": (None, 0),
    "dynatemp_range": (None, 0, 0.0),
    "dry_multiplier": (None, 0, 0.0),
    "xtc_probability": (None, 0, 0.0),
    "top_n_sigma": (None, -1, -1.0),
}


class StreamOptions(_Body):
    include_usage: StrictBool = False


class SamplingFields(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: Optional[str] = None
    # llama-server also reads its native n_predict here, first where both are given
    max_tokens: Optional[Annotated[int, Field(strict=True, ge=0)]] = Field(
        None, validation_alias=AliasChoices("n_predict", "max_tokens"))
    temperature: Optional[Annotated[float, Field(strict=True, ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(strict=True, gt=0.0, le=1.0)]] = None
    top_k: Optional[Annotated[int, Field(strict=True, ge=0)]] = None
    min_p: Optional[Annotated[float, Field(strict=True, ge=0.0, le=1.0)]] = None
    # OpenAI's penalties (its range), and llama-server's repetition penalty over the last
    # repeat_last_n tokens of prompt + reply (-1: the whole context), which vLLM clients
    # send as repetition_penalty
    frequency_penalty: Optional[Annotated[float, Field(strict=True, ge=-2.0, le=2.0)]] = None
    presence_penalty: Optional[Annotated[float, Field(strict=True, ge=-2.0, le=2.0)]] = None
    repeat_penalty: Optional[Annotated[float, Field(strict=True, gt=0.0, le=10.0)]] = Field(
        None, validation_alias=AliasChoices("repeat_penalty", "repetition_penalty"))
    repeat_last_n: Optional[Annotated[int, Field(strict=True, ge=-1)]] = None
    # OpenAI's: token id (as a string, JSON's object keys) -> bias added to its logit
    logit_bias: Optional[Annotated[dict[str, Annotated[float, Field(strict=True, ge=-100.0, le=100.0)]],
                                   Field(max_length=MAX_LOGIT_BIAS)]] = None
    seed: Optional[StrictInt] = None
    stop: Optional[Union[Text, list[Text]]] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    # choices, each its own generation (the prompt's cache reused between them)
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] = 1
    # trimode's decoding controls (MODEL.md section 5).
    mode: Optional[Literal[MODES]] = None
    draft_length: Optional[Annotated[int, Field(strict=True, ge=0, lt=MAX_BLOCK)]] = None
    block_length: Optional[Annotated[int, Field(strict=True, ge=1, le=MAX_BLOCK)]] = None
    threshold: Optional[Annotated[float, Field(strict=True, ge=0.0, le=1.0)]] = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_we_do_not_do(cls, body):
        if isinstance(body, dict):
            for name, neutral in NEUTRAL_VALUES.items():
                if name in body and not any(type(body[name]) is type(v) and body[name] == v for v in neutral):
                    raise ValueError(f"{name} is not supported (got {body[name]!r})")
        return body

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: Optional[dict]) -> Optional[dict]:
        for key in bias or {}:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
        return bias

    def biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(key), value) for key, value in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed: Optional[int]) -> Optional[int]:
        if seed is not None and not -(1 << 63) <= seed < (1 << 64):
            raise ValueError("seed must fit in 64 bits")
        return seed

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[Text, Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]]] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TemplateArgs(_Body):
    # llama-server's per-request switch for the think block; other template variables are
    # not passed to the template.
    enable_thinking: Optional[StrictBool] = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    chat_template_kwargs: Optional[TemplateArgs] = None
    # Accepted for OpenAI clients; tools are refused rather than silently ignored.
    max_completion_tokens: Optional[Annotated[int, Field(strict=True, ge=0)]] = None
    tools: Optional[list[dict]] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[TopLogprobs] = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprob_count(self) -> Optional[int]:
        """How many top alternatives each token reports, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: Optional[list]) -> Optional[list]:
        if tools:
            raise ValueError("tool calls are not supported")
        return tools

    def token_limit(self) -> Optional[int]:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def reasoning(self, default: bool) -> bool:
        asked = self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None
        return default if asked is None else asked


class CompletionRequest(SamplingFields):
    # A string or a list of token ids (llama-server accepts both), or a batch of either (what
    # evaluation harnesses send): choice j of prompt i is choices[i * n + j].
    prompt: Union[Text, TokenIds, Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    # the prompt before the reply's text, and with logprobs its tokens' logprobs before the
    # reply's (what evaluation harnesses score a continuation by)
    echo: StrictBool = False
    # OpenAI's legacy form: the number of top alternatives (the chosen token comes besides)
    logprobs: Optional[TopLogprobs] = None
    # trimode's extra: token healing of a text prompt (runtime/healing.py). Off by default so
    # the prompt's tokens are exactly what OpenAI-style clients and llama-server expect.
    token_healing: StrictBool = False

    @model_validator(mode="after")
    def _echo_of_the_prompt_as_given(self):
        if self.echo and self.token_healing:
            raise ValueError("echo and token_healing do not go together (healing rewrites the prompt's end)")
        return self

    def token_limit(self) -> Optional[int]:
        return self.max_tokens

    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch's prompts (one, unless the request sent a list of them)."""
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if one else list(self.prompt)

    def logprob_count(self) -> Optional[int]:
        return self.logprobs

    def prompt_logprob_count(self) -> Optional[int]:
        return self.logprobs if self.echo else None


class TokenizeRequest(_Body):
    content: Text
    add_special: StrictBool = False   # prepend BOS
    parse_special: StrictBool = True  # "<|im_start|>" in the text becomes its control token


class DetokenizeRequest(_Body):
    tokens: Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(max_length=MAX_TOKEN_IDS)]
