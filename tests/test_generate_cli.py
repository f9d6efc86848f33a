"""`trimode generate` on a generated tiny model, compiled for llvm, against the float64
reference; prompt assembly; flags refused or noted clearly."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from trimode.cli import cli
from trimode.cli.generate import build_prompt
from trimode.compiler.kernels.q8_matmul import ROW_TILE
from trimode.runtime.decode import CPU_DRAFT_LENGTH
from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.model.tokenizer import Tokenizer
from trimode.runtime.generation import DecodeParams, GenerationRequest, SamplingParams, generate
from trimode.runtime.healing import heal

PROMPT = [1, 400, 77, 1023, 5, 1900, 64]


def invoke(*args: str):
    return CliRunner().invoke(cli, ["generate", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_model) -> Tokenizer:
    return Tokenizer.from_metadata(tiny_model.metadata)


@pytest.fixture(scope="module")
def reference_tokens(tiny_model, tokenizer):
    """Greedy AR from the float64 reference, think tokens suppressed as the CLI does."""
    suppress = tuple(i for i in (tokenizer.think_open_id, tokenizer.think_close_id) if i is not None)
    request = GenerationRequest(prompt_ids=tuple(PROMPT), max_tokens=16, loop_detection=False,
                                decode=DecodeParams(mode="ar"), suppress_ids=suppress)
    fwd = ReferenceForward(ReferenceModel(tiny_model.config, tiny_model.weights), 256)
    return [t for e in generate(fwd, tokenizer, request) for t in getattr(e, "ids", [])]


@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_json_tokens_equal_the_float64_reference(tiny_gguf, tokenizer, reference_tokens, mode):
    result = invoke("-m", str(tiny_gguf), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "16",
                    "--mode", mode, "--draft-length", "5", "--json", "--no-loop-detection",
                    "--target", "llvm", "-c", "256")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tokens"] == reference_tokens
    assert out["text"] == tokenizer.decode(reference_tokens)
    stats = out["stats"]
    assert stats["prompt_tokens"] == len(PROMPT) and stats["generated_tokens"] == 16
    assert out["finish_reason"] == "length"
    if mode == "ar":
        assert stats["forwards"] == 16
    else:  # two passes a cycle, one when a cycle has room for no draft
        assert 1 + stats["cycles"] < stats["forwards"] <= 1 + 2 * stats["cycles"]


@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_penalties_and_logit_bias_equal_the_reference(tiny_gguf, tiny_model, tokenizer,
                                                      reference_tokens, mode):
    """llama.cpp's --presence-penalty, --frequency-penalty and -l ID-inf (a ban) through the
    compiled model give the float64 reference's tokens under the same settings."""
    banned = reference_tokens[0]
    result = invoke("-m", str(tiny_gguf), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "16",
                    "--mode", mode, "--presence-penalty", "0.5", "--frequency-penalty", "1.0",
                    "--repeat-last-n", "8", "-l", f"{banned}-inf", "-l", "7+0.5", "--json",
                    "--no-loop-detection", "--target", "llvm", "-c", "256")
    assert result.exit_code == 0, result.stderr
    suppress = tuple(i for i in (tokenizer.think_open_id, tokenizer.think_close_id) if i is not None)
    sampling = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, penalty_last_n=8,
                              logit_bias=((banned, -1e30), (7, 0.5)))
    request = GenerationRequest(prompt_ids=tuple(PROMPT), max_tokens=16, loop_detection=False,
                                decode=DecodeParams(mode="ar"), suppress_ids=suppress, sampling=sampling)
    want = greedy_text_reference(tiny_model, tokenizer, request)
    assert json.loads(result.stdout)["tokens"] == want and want[0] != banned


def test_repeat_last_n_of_minus_one_is_the_whole_context(tiny_gguf, tiny_model, tokenizer):
    """-1 penalizes every token of the context (llama.cpp's meaning): the prompt's first
    token, 71 back, is penalized, as it is not by the default window of 64."""
    prompt = [1906] + list(range(300, 370))  # 1906: what the unpenalized model writes next
    result = invoke("-m", str(tiny_gguf), "--prompt-ids", ",".join(map(str, prompt)), "-n", "6",
                    "--mode", "ar", "--repeat-penalty", "3", "--repeat-last-n", "-1", "--json",
                    "--no-loop-detection", "--target", "llvm", "-c", "256")
    assert result.exit_code == 0, result.stderr
    suppress = tuple(i for i in (tokenizer.think_open_id, tokenizer.think_close_id) if i is not None)

    def reference(last_n):
        request = GenerationRequest(prompt_ids=tuple(prompt), max_tokens=6, loop_detection=False,
                                    decode=DecodeParams(mode="ar"), suppress_ids=suppress,
                                    sampling=SamplingParams(repetition_penalty=3.0, penalty_last_n=last_n))
        return greedy_text_reference(tiny_model, tokenizer, request)
    assert json.loads(result.stdout)["tokens"] == reference(256) != reference(64)


@pytest.mark.parametrize("given", [False, True])
def test_spec_drafts_cpu_draft_length_slots_on_the_cpu_by_default(tiny_gguf, reference_tokens, given):
    """Without --draft-length, llvm starts at CPU_DRAFT_LENGTH slots a cycle (a pass costs its
    rows there, and K + 1 = ROW_TILE["block"] rows are one tile of its matmul), the first two
    cycles drafting it before the pace (spec_pace.py) times AR steps and other lengths; with
    it, every cycle drafts it. Either way the reference's greedy tokens."""
    k = CPU_DRAFT_LENGTH
    result = invoke("-m", str(tiny_gguf), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "16",
                    "--json", "--no-loop-detection", "--target", "llvm", "-c", "256",
                    *(["--draft-length", str(k)] if given else []))
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tokens"] == reference_tokens
    stats = out["stats"]
    assert k + 1 == ROW_TILE["block"]
    spec, drafted = stats["spec_cycles"], stats["drafted_tokens"]
    if given:  # every cycle but the last few (fewer tokens left) drafts k
        assert spec >= stats["cycles"] - 1 and spec * k >= drafted > (spec - k) * k
    else:
        assert spec >= 2 and drafted >= 2 * k and stats["cycles"] > spec  # AR steps timed too


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_logprobs_equal_the_float64_reference(tiny_gguf, tiny_model, tokenizer, mode):
    """--logprobs 4 through the compiled model, in each mode: each token's logprob and its
    row's four most likely ids are the reference's causal log-softmax at its place."""
    result = invoke("-m", str(tiny_gguf), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "12",
                    "--mode", mode, "--logprobs", "4", "--json", "--no-loop-detection",
                    "--target", "llvm", "-c", "256")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    scored = out["logprobs"]
    assert [s["id"] for s in scored] == out["tokens"] and len(scored) == 12
    fwd = ReferenceForward(ReferenceModel(tiny_model.config, tiny_model.weights), 256)
    logits = fwd.causal(PROMPT + out["tokens"]).logits().astype(np.float64)[len(PROMPT) - 1:]
    want = logits - logits.max(1, keepdims=True)
    want -= np.log(np.exp(want).sum(1, keepdims=True))
    # float32 against float64, but a K/V value float32 rounds to the other fp16 neighbour from
    # float64's moves a logprob by up to a few 1e-4 (test_compiled_model's logprobs test)
    bound = 1e-3
    for row, s in zip(want, scored):
        assert s["token"] == tokenizer.token_text(s["id"])
        assert s["logprob"] == pytest.approx(row[s["id"]], abs=bound)
        # the reference's top four, except where the compiled model's rounding swaps a near tie
        best = np.argsort(-row)[:4]
        got = [t["id"] for t in s["top"]]
        assert got == best.tolist() or np.allclose(row[got], row[best], atol=bound)
        np.testing.assert_allclose([t["logprob"] for t in s["top"]], row[best], atol=bound)


def greedy_text_reference(tiny_model, tokenizer, request):
    fwd = ReferenceForward(ReferenceModel(tiny_model.config, tiny_model.weights), 256)
    return [t for e in generate(fwd, tokenizer, request) for t in getattr(e, "ids", [])]


@pytest.mark.parametrize("healing", [True, False])
def test_text_prompt_without_template_is_healed(tiny_gguf, tiny_model, tokenizer, healing):
    text = "def main():"
    suppress = tuple(i for i in (tokenizer.think_open_id, tokenizer.think_close_id) if i is not None)
    request = GenerationRequest(prompt_ids=tuple(tokenizer.encode(text, add_bos=True)), max_tokens=8,
                                loop_detection=False, decode=DecodeParams(mode="ar"), suppress_ids=suppress)
    if healing:
        request = heal(tokenizer, request)
        assert len(request.first_ids) > 1
    want = greedy_text_reference(tiny_model, tokenizer, request)
    result = invoke("-m", str(tiny_gguf), "-p", text, "--no-chat", "-n", "8", "--mode", "ar", "--json",
                    "--no-loop-detection", "--target", "llvm", "-c", "256",
                    *([] if healing else ["--no-token-healing"]))
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tokens"] == want
    assert text + out["text"] == tokenizer.decode(list(request.prompt_ids[1:]) + want)


def test_streams_text_and_notes_ignored_flags(tiny_gguf, tokenizer, reference_tokens):
    result = invoke("-m", str(tiny_gguf), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "16",
                    "--diffusion-self-spec", "--no-loop-detection", "--target", "llvm",
                    "-ngl", "99", "-fa", "on", "--diffusion-steps", "8", "-c", "256")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == tokenizer.decode(reference_tokens) + "\n"
    for flag in ("-ngl", "-fa", "--diffusion-steps"):
        assert f"note: {flag} is ignored" in result.stderr
    assert "16 generated (length)" in result.stderr and "tokens/forward" in result.stderr


def test_context_full_is_a_note_not_a_crash(tiny_gguf):
    result = invoke("-m", str(tiny_gguf), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "-1",
                    "--json", "--no-loop-detection", "--target", "llvm", "-c", "12")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["tokens"]) == 12 - len(PROMPT)
    assert out["finish_reason"] in ("length", "context", "stop")


def test_chat_prompt_closes_the_think_block(tokenizer, tiny_model):
    ids = build_prompt(tokenizer, tiny_model.metadata, "hello", None, chat=True, reasoning=False)
    assert ids[0] == tokenizer.bos_id
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n")
    thinking = tokenizer.decode(build_prompt(tokenizer, tiny_model.metadata, "hello", None,
                                             chat=True, reasoning=True))
    assert thinking.endswith("<think>\n")
    plain = build_prompt(tokenizer, tiny_model.metadata, "hello", None, chat=False, reasoning=False)
    assert plain == [tokenizer.bos_id, *tokenizer.encode("hello")]
    assert build_prompt(tokenizer, {}, None, [3, 4, 5], chat=True, reasoning=False) == [3, 4, 5]


@pytest.mark.parametrize("args,message", [
    ([], "exactly one of"),
    (["-p", "a", "--prompt-ids", "1"], "exactly one of"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["-p", "a", "--diffusion-self-spec", "--mode", "ar"], "contradicts"),
    (["-p", "a", "--mode", "fast"], "'fast' is not one of"),
    (["-p", "a", "-c", "1"], "at least 2"),
    (["-p", "a", "-l", "15+x"], "TOKEN_ID+BIAS"),
    (["-p", "a", "-l", "15"], "TOKEN_ID+BIAS"),
    (["-p", "a", "-l", "15+inf"], "logit_bias"),
    (["-p", "a", "--repeat-penalty", "0"], "repetition_penalty"),
    (["-p", "a", "--repeat-last-n", "-2"], "penalty_last_n"),
    (["-p", "a", "--logprobs", "2"], "needs --json"),
    (["-p", "a", "--logprobs", "21", "--json"], "[0, 20]"),
])
def test_usage_errors(tiny_gguf, args, message):
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_gguf), *args])
    assert result.exit_code == 2 and message in result.stderr


def test_missing_default_model_is_explained(monkeypatch):
    import trimode.model.default_model as default_model
    monkeypatch.setattr(default_model, "DEFAULT_MODEL", default_model.Path("/nonexistent/model.gguf"))
    result = CliRunner().invoke(cli, ["generate", "-p", "hi"])
    assert result.exit_code == 1 and "default model is not installed" in result.stderr


def test_bad_model_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    run = subprocess.run([sys.executable, "-c", "from trimode.cli import main; main()", "generate",
                          "-m", str(bad), "-p", "hi"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    lines = [line for line in run.stderr.splitlines() if not line.startswith("loading")]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in run.stderr


def test_conversation_mode_replies_to_each_line_and_reuses_the_cache(tiny_gguf, tiny_model, tokenizer):
    """-cnv: a reply per stdin line, each the float64 reference's for the whole conversation
    through the chat template (the previous reply penalized 1.3x, think tokens suppressed);
    the second turn prefills only what the first left uncached; /exit ends it."""
    from trimode.model.chat import encode_prompt, previous_reply_ids, render_chat
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_gguf), "-cnv", "-sys", "Be brief.", "-n", "6",
                                      "--mode", "spec", "--json", "--no-loop-detection", "--target", "llvm",
                                      "-c", "256"], input="hello\n\nhow are you?\n/exit\nnot read\n",
                               catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(turns) == 2
    meta = tiny_model.metadata
    suppress = tuple(i for i in (tokenizer.think_open_id, tokenizer.think_close_id) if i is not None)
    messages = [{"role": "system", "content": "Be brief."}]
    for user, got in zip(["hello", "how are you?"], turns):
        messages.append({"role": "user", "content": user})
        text = render_chat(meta.get("tokenizer.chat_template"), messages,
                           template_vars={"bos_token": tokenizer.tokens[tokenizer.bos_id]})
        prompt = encode_prompt(tokenizer, text, bool(meta.get("tokenizer.ggml.add_bos_token", True)))
        penalized = previous_reply_ids(tokenizer, messages)
        sampling = SamplingParams(penalty_ids=penalized, ids_penalty=1.3 if penalized else 1.0)
        request = GenerationRequest(prompt_ids=tuple(prompt), max_tokens=6, loop_detection=False,
                                    decode=DecodeParams(mode="ar"), suppress_ids=suppress, sampling=sampling)
        assert got["tokens"] == greedy_text_reference(tiny_model, tokenizer, request)
        assert got["stats"]["prompt_tokens"] == len(prompt)
        messages.append({"role": "assistant", "content": got["text"]})
    assert turns[1]["stats"]["cached_tokens"] > turns[0]["stats"]["prompt_tokens"] // 2


@pytest.mark.parametrize("args,message", [
    (["-cnv", "--prompt-ids", "1,2"], "at most a system prompt"),
    (["-cnv", "-p", "a", "-sys", "b"], "at most a system prompt"),
    (["-sys", "b"], "-sys is the system prompt of -cnv"),
    (["-cnv", "--logprobs", "2", "--json"], "not -cnv"),
])
def test_conversation_usage_errors(tiny_gguf, args, message):
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_gguf), *args])
    assert result.exit_code == 2 and message in result.stderr
