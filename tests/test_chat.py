"""Chat template rendering (MODEL.md section 2) and the fork's multi-turn cleanup (section 6)."""
import pytest

from trimode.model.chat import cut_repetition_loop, loop_period, render_chat
from trimode.model.config import ModelError
from trimode.model.tokenizer import Tokenizer
from trimode.model.vocab import make_vocab

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
]
# A Qwen3-style template: no think block unless reasoning is off, then an empty one.
QWEN_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
PLAIN = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}[assistant] {% endif %}")
# As NLD's own: the generation prompt opens a think block. (jinja2, like HF, drops a
# template's final newline, hence the expression.)
OPENS_THINK = PLAIN.replace("[assistant] {% endif %}", "[assistant] {{ '<think>\\n' }}{% endif %}")


def test_fallback_is_chatml_with_closed_think_when_reasoning_off():
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n</think>\n")
    assert render_chat(None, CONVERSATION) == expected
    assert render_chat("", CONVERSATION) == expected


def test_fallback_leaves_think_open_when_reasoning_on():
    prompt = render_chat(None, CONVERSATION, reasoning=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_no_generation_prompt():
    assert render_chat(None, CONVERSATION, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.parametrize("template, off_ending, on_ending", [
    (QWEN_LIKE, "assistant\n<think>\n\n</think>\n\n", "assistant\n"),
    (PLAIN, "[assistant] <think>\n</think>\n", "[assistant] "),
    (OPENS_THINK, "[assistant] <think>\n</think>\n", "[assistant] <think>\n"),
])
def test_reasoning_off_always_ends_with_one_closed_think_block(template, off_ending, on_ending):
    off = render_chat(template, CONVERSATION)
    assert off.endswith(off_ending) and off.count("</think>") == 1
    assert render_chat(template, CONVERSATION, reasoning=True).endswith(on_ending)


def test_template_sees_enable_thinking_and_extra_variables():
    template = "{{ bos_token }}{{ enable_thinking }}|{{ tools | tojson }}"
    assert render_chat(template, CONVERSATION, add_generation_prompt=False, reasoning=True,
                       template_vars={"tools": [{"name": "<x>&"}]}) == '<s>True|[{"name": "<x>&"}]'


def test_content_parts_are_joined():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert "<|im_start|>user\nab<|im_end|>" in render_chat(None, messages)


@pytest.mark.parametrize("template, messages, message", [
    ("{{ raise_exception('Conversation roles must alternate') }}", CONVERSATION,
     "chat template: Conversation roles must alternate"),
    ("{% for %}", CONVERSATION, "chat template: "),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", CONVERSATION, "chat template: "),
    (None, [], "messages must be a non-empty list"),
    (None, [{"content": "x"}], "message 0 has no role"),
    (None, [{"role": "user", "content": 3}], "message 0 content must be a string"),
])
def test_bad_template_or_messages_give_one_line_errors(template, messages, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(")) as err:
        render_chat(template, messages)
    assert "\n" not in str(err.value)


def _with_reply(reply: str, *later) -> list[dict]:
    return [*CONVERSATION, {"role": "assistant", "content": reply}, *later]


def _replies(prompt: str) -> list[str]:
    return [part.split("<|im_end|>")[0] for part in prompt.split("<|im_start|>assistant\n")[1:-1]]


def test_earlier_turns_lose_empty_think_blocks_but_keep_real_ones():
    prompt = render_chat(None, _with_reply("<think>\n\n</think>\n\nHello", {"role": "user", "content": "more"},
                                           {"role": "assistant", "content": "<think>plan</think>Sure"},
                                           {"role": "user", "content": "ok"}))
    assert _replies(prompt) == ["Hello", "<think>plan</think>Sure"]


def test_earlier_turns_drop_trailing_unclosed_think():
    prompt = render_chat(None, _with_reply("Answer.<think>\nI was still thin", {"role": "user", "content": "go"}))
    assert _replies(prompt) == ["Answer."]


def test_earlier_turns_cut_repetition_loops_to_one_copy():
    reply = "The answer is 42. " + "I repeat. " * 9
    prompt = render_chat(None, _with_reply(reply, {"role": "user", "content": "and?"}))
    assert _replies(prompt) == ["The answer is 42. I repeat. "]


def test_cleanup_spares_users_and_a_continued_final_reply():
    looping = "ha" * 20
    user_kept = render_chat(None, [{"role": "user", "content": looping}])
    assert looping in user_kept
    continued = render_chat(None, _with_reply("<think>\n" + looping), add_generation_prompt=False)
    assert continued.endswith("<|im_start|>assistant\n<think>\n" + looping + "<|im_end|>\n")


def test_loop_period_rule():
    assert loop_period("abcd" * 3) is None                      # 12 < 16 units
    assert loop_period("xyz!" + "abcd" * 3) == 4
    assert loop_period("q" * 16) == 4                           # smallest period from 4
    assert loop_period("123" * 8) == 6                          # periods below 4 are not checked
    tail32 = [*range(100, 132)]
    assert loop_period([7, *tail32, *tail32]) == 32             # longest period
    tail33 = [*range(100, 133)]
    assert loop_period([*tail33, *tail33]) is None              # above 32
    assert loop_period([1, 2, 3] + list(range(20, 30)) * 2 + [5] * 3) is None
    assert loop_period(list(range(13)) + [9, 8, 9, 8]) is None


def test_cut_repetition_loop():
    assert cut_repetition_loop("Intro. " + "abcde" * 6) == "Intro. abcde"
    assert cut_repetition_loop([1, 2, 3, *([4, 5, 6, 7] * 5)]) == [1, 2, 3, 4, 5, 6, 7]
    assert cut_repetition_loop("no loop in this sentence at all") == "no loop in this sentence at all"


def test_rendered_prompt_tokenizes_with_control_tokens():
    tok = Tokenizer.from_metadata(make_vocab(2048).to_metadata())
    ids = tok.encode_template(render_chat(make_vocab(2048).chat_template, CONVERSATION))
    tail = [tok.im_start_id, *tok.encode("assistant\n"), tok.think_open_id, *tok.encode("\n"),
            tok.think_close_id, *tok.encode("\n")]
    assert ids[0] == tok.im_start_id and ids[-len(tail):] == tail
    assert ids.count(tok.im_start_id) == 3 and ids.count(tok.im_end_id) == 2
