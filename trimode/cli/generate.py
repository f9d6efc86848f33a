"""`trimode generate`: one prompt, streamed to stdout, statistics to stderr.

Takes the llama.cpp fork's `llama-diffusion` flags where they mean something here and says
so on stderr where they do not (-ngl, -fa, --diffusion-steps)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import click

from trimode.cli import INT_LIST, LOGIT_BIAS, kv_cache_of, kv_cache_options
from trimode.model.default_model import model_or_default

from trimode.runtime.decode import (CPU_DRAFT_LENGTH, DEFAULT_BLOCK_LENGTH, DEFAULT_DRAFT_LENGTH,
                                    DEFAULT_THRESHOLD, MODES, draft_params)
from trimode.runtime.forward import DEFAULT_CTX
from trimode.runtime.logprobs import MAX_TOP_LOGPROBS



def note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


def build_prompt(tokenizer, metadata: dict, text: str | None, ids: list[int] | None, chat: bool,
               reasoning: bool) -> list[int]:
    """The prompt as token ids: given ids verbatim; text through the chat template (chat) or
    as is, with BOS where the model wants it."""
    if ids is not None:
        return list(ids)
    from trimode.model.chat import encode_prompt, render_chat

    bos = tokenizer.tokens[tokenizer.bos_id]
    if chat:
        text = render_chat(metadata.get("tokenizer.chat_template") or None,
                           [{"role": "user", "content": text}], reasoning=reasoning,
                           template_vars={"bos_token": bos})
    return encode_prompt(tokenizer, text, bool(metadata.get("tokenizer.ggml.add_bos_token", True)))


def logprob_entry(tokenizer, scored) -> dict:
    def named(token: int, logprob: float) -> dict:
        return {"id": token, "token": tokenizer.token_text(token), "logprob": logprob}
    return {**named(scored.token, scored.logprob), "top": [named(*pair) for pair in scored.top]}


def stats_line(stats: dict, finish: str) -> str:
    accepted = (f"{stats['accepted_per_cycle']:.2f} drafts accepted/cycle over "
                f"{stats['spec_cycles']} of {stats['cycles']} cycles, " if stats["drafted_tokens"] else "")
    return (f"{stats['prompt_tokens']} prompt tokens ({stats['cached_tokens']} cached), "
            f"{stats['generated_tokens']} generated ({finish}); {stats['forwards']} forwards, "
            f"{stats['tokens_per_forward']:.2f} tokens/forward; {accepted}"
            f"prefill {stats['prefill_tok_s']:.1f} tok/s, decode {stats['decode_tok_s']:.1f} tok/s, "
            f"first token {stats['ttft_s'] * 1000:.0f} ms")


@click.command()
@click.option("-m", "--model", type=click.Path(dir_okay=False), help="GGUF model (default: the embedded model)")
@click.option("-p", "--prompt", help="prompt text (with -cnv: the system prompt)")
@click.option("--prompt-ids", type=INT_LIST, help="prompt as comma-separated token ids (no template, no BOS)")
@click.option("-f", "--file", "prompt_file", type=click.File("r", encoding="utf-8"), help="read the prompt text from a file")
@click.option("-n", "--n-predict", "n_predict", type=int, default=256, show_default=True,
              help="tokens to generate; -1: until the context is full")
@click.option("--mode", type=click.Choice(MODES), help="decoding mode  [default: spec]")
@click.option("--diffusion-self-spec", is_flag=True, help="same as --mode spec")
@click.option("--temp", type=float, default=0.0, show_default=True, help="temperature; 0 is greedy")
@click.option("-s", "--seed", type=int, help="sampling seed; -1 or none: random")
@click.option("--top-k", type=int, default=0, show_default=True, help="0: off")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1: off")
@click.option("--min-p", type=float, default=0.0, show_default=True, help="0: off")
@click.option("--repeat-penalty", type=float, default=1.0, show_default=True, help="1: off")
@click.option("--repeat-last-n", type=int, default=64, show_default=True,
              help="tokens the penalties look back over; -1: the whole context")
@click.option("--presence-penalty", type=float, default=0.0, show_default=True,
              help="subtracted from the logit of each token among them; 0: off")
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True,
              help="times each token's count among them, subtracted from its logit; 0: off")
@click.option("-l", "--logit-bias", type=LOGIT_BIAS, multiple=True,
              help="add BIAS to a token's logit, e.g. 15043+1 or 15043-inf (repeatable)")
@click.option("--draft-length", "--diffusion-draft-length", "draft_length", type=int,
              help=f"masked slots per self-speculation cycle, every cycle  [default: {DEFAULT_DRAFT_LENGTH} "
                   f"on cuda, {CPU_DRAFT_LENGTH} on llvm to start with, then chosen by measured speed]")
@click.option("--block-length", "--diffusion-block-length", "block_length", type=int,
              default=DEFAULT_BLOCK_LENGTH, show_default=True, help="block diffusion block size")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="block diffusion reveal confidence")
@click.option("--diffusion-steps", type=int, help="accepted and ignored (blocks reveal by --threshold)")
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("-cnv", "--conversation", is_flag=True,
              help="conversation mode: each line on stdin is a user turn (/exit ends)")
@click.option("-sys", "--system-prompt", help="with -cnv: the system prompt")
@click.option("--chat/--no-chat", default=None,
              help="wrap a text prompt in the model's chat template  [default: when the model has one]")
@click.option("--token-healing/--no-token-healing", default=True, show_default=True,
              help="without the chat template: back the prompt off by its last token and let the "
                   "first generated token re-cover its text (a prompt ending at `):` then continues "
                   "as training text did)")
@click.option("--reasoning/--no-reasoning", default=False, show_default=True,
              help="let the model think (<think> ... </think>)")
@click.option("-c", "--ctx-size", type=int,
              help=f"context size in tokens  [default: {DEFAULT_CTX}, or the model's if smaller]")
@click.option("--json", "as_json", is_flag=True, help='print one JSON object {"tokens", "text", "stats"}')
@click.option("--logprobs", "n_logprobs", type=int,
              help="with --json: each token's logprob and the N most likely ids at its place (0-20)")
@click.option("--no-loop-detection", is_flag=True, help="do not stop on repetition loops")
@click.option("--target", type=click.Choice(["llvm", "cuda"]), help="device (default: cuda if present)")
@click.option("-t", "--threads", type=int, help="CPU threads for the llvm target  [default: one per physical core]")
@click.option("-ngl", "--n-gpu-layers", type=int, help="accepted and ignored (all layers run on --target)")
@click.option("-fa", "--flash-attn", help="accepted and ignored (attention is always fused)")
@kv_cache_options
def generate(model, prompt, prompt_ids, prompt_file, n_predict, mode, diffusion_self_spec, temp,
             seed, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty,
             frequency_penalty, logit_bias, draft_length, block_length,
             threshold, diffusion_steps, stop, conversation, system_prompt, chat, token_healing,
             reasoning, ctx_size, as_json, n_logprobs, no_loop_detection, target, threads,
             n_gpu_layers, flash_attn, cache_type_k, cache_type_v):
    """Generate a reply to one prompt, or (-cnv) to each line of a conversation on stdin."""
    given = [name for name, value in (("-p", prompt), ("--prompt-ids", prompt_ids),
                                      ("-f", prompt_file), ("-sys", system_prompt)) if value is not None]
    if conversation:
        if prompt_ids is not None or len(given) > 1:
            raise click.UsageError("-cnv takes its turns from stdin: give at most a system prompt "
                                   "(-sys, -p or -f)")
        if n_logprobs is not None:
            raise click.UsageError("--logprobs is for one prompt, not -cnv")
    elif system_prompt is not None:
        raise click.UsageError("-sys is the system prompt of -cnv")
    elif len(given) != 1:
        raise click.UsageError("give exactly one of -p PROMPT, --prompt-ids IDS, -f FILE")
    if diffusion_self_spec and mode not in (None, "spec"):
        raise click.UsageError(f"--diffusion-self-spec contradicts --mode {mode}")
    mode = mode or "spec"
    if n_gpu_layers is not None:
        note("-ngl is ignored: every layer runs on the chosen --target")
    if flash_attn is not None:
        note("-fa is ignored: attention is always one fused kernel here")
    if diffusion_steps is not None:
        note("--diffusion-steps is ignored: block diffusion reveals by confidence (--threshold)")
    if n_logprobs is not None:
        if not as_json:
            raise click.UsageError("--logprobs needs --json (they are printed in its output)")
        if not 0 <= n_logprobs <= MAX_TOP_LOGPROBS:
            raise click.BadParameter(f"must be in [0, {MAX_TOP_LOGPROBS}], got {n_logprobs}",
                                     param_hint="--logprobs")
    if ctx_size is not None and ctx_size < 2:
        raise click.BadParameter(f"must be at least 2, got {ctx_size}", param_hint="-c")
    if threads is not None:
        if threads < 1:
            raise click.BadParameter(f"must be at least 1, got {threads}", param_hint="-t")
        os.environ["TVM_NUM_THREADS"] = str(threads)  # read when the runtime's pool starts

    from trimode.runtime.engine import load_engine
    from trimode.runtime.generation import (DecodeParams, GenerationRequest, RequestError,
                                            SamplingParams, TokenEvent, generate as run)
    from trimode.runtime.healing import heal

    # Settings are checked before the model loads (which may compile for minutes).
    sampling = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                              seed=None if seed is None or seed < 0 else seed,
                              repetition_penalty=repeat_penalty,
                              penalty_last_n=DEFAULT_CTX if repeat_last_n == -1 else repeat_last_n,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              logit_bias=tuple(logit_bias))
    from trimode.runtime.tvm_runtime import default_target
    target = target or default_target()
    decode = DecodeParams(mode=mode, block_length=block_length, threshold=threshold,
                          **draft_params(target, draft_length))
    problem = sampling.problem() or decode.problem()
    if problem:
        raise click.UsageError(problem)
    kv_cache = kv_cache_of(cache_type_k, cache_type_v)
    path = model_or_default(model)
    click.echo(f"loading {path} ...", err=True)
    started = time.perf_counter()
    engine = load_engine(path, target, kv_cache=kv_cache)
    click.echo(f"ready on {engine.target} in {time.perf_counter() - started:.1f} s", err=True)
    tok = engine.tokenizer
    text = prompt_file.read() if prompt_file is not None else prompt or system_prompt
    if chat is None:
        # As llama-cli does: a model without a chat template is a plain completion model.
        chat = bool(engine.metadata.get("tokenizer.chat_template"))
    # -cnv: each turn's prompt is the conversation so far (cli/conversation.py)
    ids = [] if conversation else build_prompt(tok, engine.metadata, text, prompt_ids, chat, reasoning)
    n_ctx = min(ctx_size or DEFAULT_CTX, engine.config.context_length)
    if repeat_last_n == -1:
        sampling = dataclasses.replace(sampling, penalty_last_n=n_ctx)
    if ctx_size and ctx_size > n_ctx:
        note(f"-c {ctx_size} is over the model's context; using {n_ctx}")
    suppress = () if reasoning else tuple(i for i in (tok.think_open_id, tok.think_close_id)
                                          if i is not None)
    request = GenerationRequest(
        prompt_ids=tuple(ids),
        max_tokens=max(n_ctx - len(ids), 0) if n_predict < 0 else n_predict,
        sampling=sampling, decode=decode, stop=tuple(stop),
        loop_detection=not no_loop_detection, suppress_ids=suppress, logprobs=n_logprobs)
    if conversation:
        from trimode.cli.conversation import converse

        def turn_done(done) -> None:
            if done.message:
                note(done.message)
            click.echo(stats_line(done.stats.to_dict(), done.finish_reason), err=True)
        if sys.stdin.isatty():
            note("conversation mode: type a line, Enter to send; /exit or Ctrl-D ends")
        turn = dataclasses.replace(request, max_tokens=n_predict)
        try:
            converse(engine, turn, text, reasoning, n_ctx, as_json, sys.stdin, turn_done)
        except RequestError as err:
            raise click.UsageError(str(err)) from None
        return
    if token_healing and text is not None and not chat:
        request = heal(tok, request)

    tokens, pieces, scored = [], [], []
    try:
        for event in run(engine.new_sequence(n_ctx), tok, request):
            if isinstance(event, TokenEvent):
                tokens += event.ids
                pieces.append(event.text)
                scored += event.logprobs or []
                if not as_json:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
            else:
                done = event
    except RequestError as err:
        raise click.UsageError(str(err)) from None
    stats = done.stats.to_dict()
    if as_json:
        out = {"tokens": tokens, "text": "".join(pieces), "stats": stats,
               "finish_reason": done.finish_reason}
        if n_logprobs is not None:
            out["logprobs"] = [logprob_entry(tok, s) for s in scored]
        click.echo(json.dumps(out, ensure_ascii=False))
    else:
        click.echo("")
    if done.message:
        note(done.message)
    click.echo(stats_line(stats, done.finish_reason), err=True)

