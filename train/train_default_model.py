"""Train the embedded default model (trimode/data/nld-tiny-code.gguf) on this machine's CPU.

    python train/train_default_model.py train   # corpus -> BPE -> joint training -> train/out/
    python train/train_default_model.py export  # train/out/ -> trimode/data/nld-tiny-code.gguf
    python train/train_default_model.py measure # the figures in BENCHMARKS.md

Reproducible from --seed (same thread count, same Python stdlib). PyTorch is a development
dependency only: pip install -e .[train].
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import click
import numpy as np
import torch

import bpe
import corpus
import measure
from export import model_weights
from nld_torch import NLDModel
from objective import AR_WEIGHT, BLOCK, DIFFUSION_WEIGHT, joint_loss, visibility
from trimode.model.config import ModelConfig
from trimode.model.default_model import DEFAULT_MODEL
from trimode.model.gguf_file import write_model
from trimode.runtime.generation import DecodeParams

OUT_DIR = Path(__file__).resolve().parent / "out"
VOCAB_SIZE = 4096
# ~5M parameters, sized so the run ends within an hour on a share of two busy cores;
# head_dim * heads (192) != hidden (256) and GQA 4:1 like the real models.
GEOMETRY = ModelConfig(n_layers=4, hidden=256, ffn=768, n_heads=4, n_kv_heads=1, head_dim=48,
                       vocab=VOCAB_SIZE, context_length=4096, rope_theta=1e6,
                       yarn_orig_ctx=4096, yarn_factor=16.0)


def token_stream(files: list[corpus.SourceFile], vocab: bpe.TrainedVocab) -> np.ndarray:
    """Every file as <s> text <|im_end|>, concatenated (int32)."""
    tok = vocab.tokenizer()
    pieces = []
    for enc in tok.encode_batch([f.text for f in files]):
        pieces.append(np.array([GEOMETRY.bos_token_id, *enc.ids, GEOMETRY.eos_token_id], np.int32))
    return np.concatenate(pieces)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: NLDModel, stream: np.ndarray, seq: int, n_windows: int, seed: int) -> dict:
    """Mean held-out AR and diffusion losses over the first n_windows disjoint windows."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    visible = visibility(seq)
    n = min(n_windows, len(stream) // seq)
    ar_sum = df_sum = 0.0
    for i in range(n):
        window = torch.from_numpy(stream[i * seq:(i + 1) * seq].astype(np.int64))[None]
        ar, df = joint_loss(model, window, GEOMETRY.mask_token_id, gen, visible)
        ar_sum += ar.item()
        df_sum += df.item()
    model.train()
    return {"ar_loss": ar_sum / n, "diffusion_loss": df_sum / n, "windows": n}


@click.group()
def cli():
    """Train or export the default model."""


@cli.command()
@click.option("--steps", default=420, show_default=True)
@click.option("--batch", default=4, show_default=True)
@click.option("--seq", default=256, show_default=True, help="tokens per sequence (a multiple of 32)")
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--eval-every", default=50, show_default=True)
def train(steps, batch, seq, lr, seed, threads, eval_every):
    """Corpus -> BPE -> joint AR + diffusion training; writes train/out/."""
    if seq % BLOCK:
        raise click.BadParameter(f"--seq must be a multiple of {BLOCK}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    OUT_DIR.mkdir(exist_ok=True)
    train_files, held_out = corpus.split(corpus.stdlib_files())
    vocab = bpe.train_vocab([f.text for f in train_files], VOCAB_SIZE)
    (OUT_DIR / "vocab.json").write_text(json.dumps({"tokens": vocab.tokens, "merges": vocab.merges}))
    train_stream, eval_stream = token_stream(train_files, vocab), token_stream(held_out, vocab)
    print(f"corpus: {len(train_files)} train files ({len(train_stream)} tokens), "
          f"{len(held_out)} held-out files ({len(eval_stream)} tokens)", flush=True)

    model = NLDModel(GEOMETRY)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    visible = visibility(seq)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        offsets = rng.integers(0, len(train_stream) - seq, batch)
        clean = torch.from_numpy(np.stack([train_stream[o:o + seq] for o in offsets]).astype(np.int64))
        ar, df = joint_loss(model, clean, GEOMETRY.mask_token_id, gen, visible)
        loss = AR_WEIGHT * ar + DIFFUSION_WEIGHT * df
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step} ar {ar.item():.3f} diffusion {df.item():.3f} "
                  f"elapsed {time.time() - start:.0f}s", flush=True)
        if (step + 1) % eval_every == 0 or step == steps - 1:
            torch.save({"state": model.state_dict(), "step": step + 1}, OUT_DIR / "model.pt")
    result = evaluate(model, eval_stream, seq, n_windows=32, seed=seed)
    result.update(steps=steps, batch=batch, seq=seq, lr=lr, seed=seed, threads=threads,
                  train_tokens=steps * batch * seq, wall_s=round(time.time() - start))
    (OUT_DIR / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"held-out: {result}", flush=True)


def load_trained() -> tuple[NLDModel, bpe.TrainedVocab]:
    if not (OUT_DIR / "model.pt").exists():
        raise click.ClickException(f"no trained model in {OUT_DIR}: run the train command first")
    model = NLDModel(GEOMETRY)
    model.load_state_dict(torch.load(OUT_DIR / "model.pt")["state"])
    model.eval()
    saved = json.loads((OUT_DIR / "vocab.json").read_text())
    return model, bpe.TrainedVocab(tokens=saved["tokens"], merges=[tuple(m) for m in saved["merges"]])


@cli.command()
def export():
    """train/out/ -> trimode/data/nld-tiny-code.gguf (Q8_0)."""
    model, vocab = load_trained()
    DEFAULT_MODEL.parent.mkdir(exist_ok=True)
    write_model(DEFAULT_MODEL, GEOMETRY, model_weights(model), vocab.to_vocab(),
                name="nld-tiny-code")
    print(f"wrote {DEFAULT_MODEL} ({DEFAULT_MODEL.stat().st_size / 1e6:.1f} MB)")


@cli.command("measure")
@click.option("--prompts", "n_prompts", default=16, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
def measure_cmd(n_prompts, max_tokens):
    """Figures for BENCHMARKS.md from the shipped GGUF (float64 reference forward)."""
    torch.set_num_threads(1)
    loaded = measure.load(DEFAULT_MODEL)
    model, _ = load_trained()
    ids = loaded.tokenizer.encode(measure.SAMPLE_PROMPTS[0], add_bos=True)
    print(f"torch vs reference (Q8_0) max |diff| / std(logits): {measure.logits_gap(loaded, model, ids):.4f}")
    for prompt in measure.SAMPLE_PROMPTS:
        done = measure.run(loaded, prompt, 48, DecodeParams(mode="ar"))
        print(f"--- greedy AR, 48 tokens\n{prompt}{loaded.tokenizer.decode(done.tokens)}")
    prompts = measure.held_out_prompts(n_prompts)
    same = all(measure.run(loaded, p, max_tokens, DecodeParams(mode="ar")).tokens
               == measure.run(loaded, p, max_tokens, DecodeParams(mode="spec")).tokens for p in prompts)
    print(f"greedy spec == greedy AR on {len(prompts)} held-out prompts: {same}")
    for k in (4, 8, 16, 32):
        print(f"held-out self-speculation ({len(prompts)} prompts x {max_tokens} tokens): "
              f"{measure.acceptance(loaded, prompts, k, max_tokens)}", flush=True)


if __name__ == "__main__":
    cli()
