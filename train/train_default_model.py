"""Train the embedded default model (trimode/data/nld-tiny-code.gguf) on this machine's CPU.

    python train/train_default_model.py prepare  # stdlib corpus -> BPE -> token ids in train/out/
    python train/train_default_model.py train    # joint AR + diffusion training -> train/out/model.pt
    python train/train_default_model.py export   # train/out/ -> trimode/data/nld-tiny-code.gguf
    python train/train_default_model.py measure  # the figures in BENCHMARKS.md

`prepare` fixes the data (it depends on the Python whose stdlib it reads), so `train` can run
on another machine (--device cuda) from the same ids. Reproducible from --seed on the same
device and thread count. PyTorch is a development dependency only: pip install -e .[train].
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

# One BLAS thread: on shared cores, spinning worker threads make the reference forward 10x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click  # noqa: E402
import numpy as np
import torch

import bpe
import corpus
from nld_torch import NLDModel
from objective import AR_WEIGHT, BLOCK, DIFFUSION_WEIGHT, joint_loss, visibility
from trimode.model.config import ModelConfig
from trimode.model.default_model import DEFAULT_MODEL

OUT_DIR = Path(__file__).resolve().parent / "out"
VOCAB_SIZE = 4096
EVAL_WINDOWS = 64  # held-out windows of --seq tokens (the first 16K held-out tokens at seq 256)
# 12M parameters: the largest of the shapes we timed (5M-16M) that trains on ~5M tokens in
# under an hour on two quiet cores; head_dim * heads (288) != hidden (384) and GQA 3:1, so the
# compiled kernels see the irregular shapes the real models' checks need.
GEOMETRY = ModelConfig(n_layers=6, hidden=384, ffn=1024, n_heads=6, n_kv_heads=2, head_dim=48,
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
    device = model.output.weight.device
    gen = torch.Generator().manual_seed(seed)
    visible = visibility(seq).to(device)
    n = min(n_windows, len(stream) // seq)
    ar_sum = df_sum = 0.0
    for i in range(n):
        window = torch.from_numpy(stream[i * seq:(i + 1) * seq].astype(np.int64))[None].to(device)
        ar, df = joint_loss(model, window, GEOMETRY.mask_token_id, gen, visible)
        ar_sum += ar.item()
        df_sum += df.item()
    model.train()
    return {"ar_loss": ar_sum / n, "diffusion_loss": df_sum / n, "windows": n}


@click.group()
def cli():
    """Train or export the default model."""


@cli.command()
def prepare():
    """Corpus -> BPE -> token ids: train/out/vocab.json and train/out/tokens.npz."""
    OUT_DIR.mkdir(exist_ok=True)
    train_files, held_out = corpus.split(corpus.stdlib_files())
    vocab = bpe.train_vocab([f.text for f in train_files], VOCAB_SIZE)
    (OUT_DIR / "vocab.json").write_text(json.dumps({"tokens": vocab.tokens, "merges": vocab.merges}))
    train_stream, eval_stream = token_stream(train_files, vocab), token_stream(held_out, vocab)
    np.savez(OUT_DIR / "tokens.npz", train=train_stream, held_out=eval_stream)
    print(f"corpus: {len(train_files)} train files ({len(train_stream)} tokens), "
          f"{len(held_out)} held-out files ({len(eval_stream)} tokens)", flush=True)


@cli.command()
@click.option("--steps", default=4500, show_default=True)
@click.option("--batch", default=4, show_default=True)
@click.option("--seq", default=256, show_default=True, help="tokens per sequence (a multiple of 32)")
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda")
@click.option("--threads", default=2, show_default=True, help="CPU threads (cpu device)")
@click.option("--save-every", default=250, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=OUT_DIR, show_default=True)
@click.option("--resume", type=click.Path(exists=True, path_type=Path), default=None,
              help="start from this model.pt's weights (a new optimizer and schedule)")
def train(steps, batch, seq, lr, seed, device, threads, save_every, out_dir, resume):
    """Joint AR + diffusion training from prepared ids; writes OUT/model.pt and OUT/eval.json."""
    if seq % BLOCK:
        raise click.BadParameter(f"--seq must be a multiple of {BLOCK}")
    if not (OUT_DIR / "tokens.npz").exists():
        raise click.ClickException(f"no prepared data in {OUT_DIR}: run the prepare command first")
    torch.set_num_threads(threads)
    # TF32 matmuls on GPUs; no effect on CPU.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = np.load(OUT_DIR / "tokens.npz")
    train_stream, eval_stream = data["train"], data["held_out"]

    model = NLDModel(GEOMETRY)
    if resume:
        model.load_state_dict(torch.load(resume, map_location="cpu")["state"])
    model.to(device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M on {device}", flush=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)  # mask draws on the CPU: the same on every device
    visible = visibility(seq).to(device)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        offsets = rng.integers(0, len(train_stream) - seq, batch)
        clean = torch.from_numpy(np.stack([train_stream[o:o + seq] for o in offsets]).astype(np.int64))
        ar, df = joint_loss(model, clean.to(device), GEOMETRY.mask_token_id, gen, visible)
        loss = AR_WEIGHT * ar + DIFFUSION_WEIGHT * df
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} ar {ar.item():.3f} diffusion {df.item():.3f} "
                  f"elapsed {time.time() - start:.0f}s", flush=True)
        if (step + 1) % save_every == 0 or step == steps - 1:
            torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()}, "step": step + 1},
                       out_dir / "model.pt")
    train_s = time.time() - start
    result = evaluate(model, eval_stream, seq, n_windows=EVAL_WINDOWS, seed=seed)
    result.update(resumed_from=str(resume) if resume else None, steps=steps, batch=batch, seq=seq, lr=lr, seed=seed, device=device,
                  device_name=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                  threads=threads, train_tokens=steps * batch * seq, train_s=round(train_s))
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"held-out: {result}", flush=True)


def load_trained() -> tuple[NLDModel, bpe.TrainedVocab]:
    if not (OUT_DIR / "model.pt").exists():
        raise click.ClickException(f"no trained model in {OUT_DIR}: run the train command first")
    model = NLDModel(GEOMETRY)
    model.load_state_dict(torch.load(OUT_DIR / "model.pt", map_location="cpu")["state"])
    model.eval()
    saved = json.loads((OUT_DIR / "vocab.json").read_text())
    return model, bpe.TrainedVocab(tokens=saved["tokens"], merges=[tuple(m) for m in saved["merges"]])


@cli.command()
def export():
    """train/out/ -> trimode/data/nld-tiny-code.gguf (Q8_0)."""
    from export import model_weights
    from trimode.model.gguf_file import write_model

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
    import measure
    from trimode.runtime.generation import DecodeParams

    torch.set_num_threads(1)
    loaded = measure.load(DEFAULT_MODEL)
    model, _ = load_trained()
    ids = loaded.tokenizer.encode(measure.SAMPLE_PROMPTS[0], add_bos=True)
    print(f"torch vs reference (Q8_0) max |diff| / std(logits): {measure.logits_gap(loaded, model, ids):.4f}")
    for prompt in measure.SAMPLE_PROMPTS:
        text = measure.complete(loaded, prompt, 48, DecodeParams(mode="ar"))
        print(f"--- greedy AR, 48 tokens, prompt healed\n{prompt}{text}")
    prompts = measure.held_out_prompts(n_prompts)
    same = all(measure.run(loaded, p, max_tokens, DecodeParams(mode="ar")).tokens
               == measure.run(loaded, p, max_tokens, DecodeParams(mode="spec")).tokens for p in prompts)
    print(f"greedy spec == greedy AR on {len(prompts)} held-out prompts: {same}")
    for k in (4, 8, 16, 32):
        print(f"held-out self-speculation ({len(prompts)} prompts x {max_tokens} tokens): "
              f"{measure.acceptance(loaded, prompts, k, max_tokens)}", flush=True)


if __name__ == "__main__":
    cli()
