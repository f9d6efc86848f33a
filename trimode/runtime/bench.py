"""What `trimode bench` and bench/gpu_check.py measure (issue 7), with the TVM runtime only.

One run: the device's copy bandwidth (the roofline's denominator), model load time, every
compiled entry (decode, verify T, draft T at each cache fill; prefill T) with achieved GB/s
and % of roofline, the AR loop and a self-speculation cycle with their host logic, the
decode step's host enqueue time, peak memory; then, where torch is present, the same
geometry as plain PyTorch (bf16 on a GPU, float32 on the CPU; runtime/torch_baseline.py)
and our/torch time ratios.

Roofline of a step: the bytes it must read (every weight once; the cache's K/V up to the
fill) over the measured copy bandwidth, read + write bytes per second. The report is a plain
JSON-able dict; `render_table` prints it.
"""
from __future__ import annotations

import copy
import gc
import os
import resource
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from trimode.model.config import ModelConfig
from trimode.model.weights import Q8_0_DTYPE, Q8_BLOCK, LayerWeights, ModelWeights, Q8Matrix
from trimode.runtime.decode import MAX_BLOCK, ar_cycle, spec_cycle
from trimode.runtime.sampling import SamplingParams, Sampler

Q8_BYTES_PER_WEIGHT = Q8_0_DTYPE.itemsize / Q8_BLOCK  # 32 int8 + one fp16 scale per block
WARMUP_CALLS = 2
COPY_REPEATS = 10


@dataclass(frozen=True)
class BenchPlan:
    """fills: cache lengths the decode/verify/draft entries are timed at; block: verify and
    draft rows; prefill: prompt length timed from an empty cache; repeat: timed calls per
    figure (the median is kept); ar_steps: tokens of the AR loop; ctx: the KV cache's size
    (None: what the timings need; a larger one shows in the memory figures)."""
    fills: tuple[int, ...] = (512, 4096)
    block: int = 32
    prefill: int = 2048
    repeat: int = 10
    ar_steps: int = 64
    ctx: int | None = None

    @property
    def needed_ctx(self) -> int:
        """Cache that holds every timed step (the AR loop and spec cycle start at the first fill)."""
        return max(max(self.fills) + self.block, self.prefill,
                   self.fills[0] + max(self.ar_steps + 1, self.block))

    @property
    def n_ctx(self) -> int:
        return self.ctx or self.needed_ctx

    def problem(self, cfg: ModelConfig) -> str | None:
        if not self.fills or min(self.fills) < 0:
            return f"fills must be cache lengths >= 0, got {','.join(map(str, self.fills))}"
        if not 2 <= self.block <= MAX_BLOCK:
            return f"block must be in [2, {MAX_BLOCK}] (the verify/draft entries' rows), got {self.block}"
        if self.prefill < 2:
            return f"prefill must be at least 2 tokens (one token is a decode step), got {self.prefill}"
        if self.repeat < 1:
            return f"repeat must be at least 1, got {self.repeat}"
        if self.ctx is not None and self.ctx < self.needed_ctx:
            return (f"a {self.ctx}-token cache cannot hold these fills, block and prefill "
                    f"(they need {self.needed_ctx})")
        if self.n_ctx > cfg.context_length:
            return (f"these fills, block and prefill need a {self.n_ctx}-token cache; the model's "
                    f"context is {cfg.context_length} tokens")
        return None


class Loaded(NamedTuple):
    engine: object    # runtime.engine.Engine
    seconds: float    # from the named source to a ready engine
    source: str       # where the weights came from: "file" or "host memory"


def bench_loader(model_path: str | None, cfg: ModelConfig | None, target: str,
                 artifact: str | None, log, kv_cache: str = "f16") -> tuple[ModelConfig, Callable[[], Loaded]]:
    """The geometry to bench and how to load its engine: a GGUF file's own weights (the
    file's parse timed with the unpack and upload), or random weights of `cfg` made in host
    memory."""
    from trimode.runtime.engine import Engine

    if model_path is None:
        def load_tiled() -> Loaded:
            engine = Engine(cfg, tiled_weights(cfg), target, log=log, artifact=artifact, kv_cache=kv_cache)
            return Loaded(engine, engine.load_seconds, "host memory")
        return cfg, load_tiled

    from trimode.model.gguf_file import load_model

    started = time.perf_counter()
    model = load_model(model_path)
    read_seconds = time.perf_counter() - started

    def load_file() -> Loaded:
        engine = Engine(model.config, model.weights, target, model.metadata, log, artifact, kv_cache)
        return Loaded(engine, read_seconds + engine.load_seconds, "file")
    return model.config, load_file


# --- the machine ---------------------------------------------------------------------------

def tiled_weights(cfg: ModelConfig, seed: int = 0) -> ModelWeights:
    """Random Q8_0 weights of any geometry in seconds: every layer shares the same host arrays
    (upload still gives each its own device buffer); scales keep activations O(1)."""
    rng = np.random.default_rng(seed)

    def q8(n: int, k: int) -> Q8Matrix:
        q = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
        scale = np.full((n, k // 32), 1.0 / (73.0 * np.sqrt(k)), np.float16)  # 73 ~ std of q
        return Q8Matrix(q=q, scale=scale)

    mats = {name: q8(*shape) for name, shape in cfg.layer_matrix_shapes().items()}
    norm = np.ones(cfg.hidden, np.float32)
    layers = [LayerWeights(attn_norm=norm, ffn_norm=norm, **mats) for _ in range(cfg.n_layers)]
    return ModelWeights(embed=q8(cfg.vocab, cfg.hidden), layers=layers, output_norm=norm,
                        output=q8(cfg.vocab, cfg.hidden))


def weight_bytes_per_step(cfg: ModelConfig, quantized: dict[str, bool], act_bytes: int) -> float:
    """Weight bytes one forward pass reads (the embedding is gathered, not read whole)."""
    per_layer = sum(n * k for name, (n, k) in cfg.matmul_shapes().items() if name != "head")
    size = {True: Q8_BYTES_PER_WEIGHT, False: act_bytes}
    return (cfg.n_layers * per_layer * size[quantized["layers"]]
            + cfg.vocab * cfg.hidden * size[quantized["output"]])


def copy_bandwidth(target: str) -> tuple[float | None, str]:
    """Read + write bytes per second of a large copy on the target's memory, and what
    measured it. A GPU needs torch for this; without it the roofline is n/a."""
    if target != "cuda":
        n = 256 << 20
        seconds = _copy_seconds(np.empty(n, np.uint8), np.ones(n, np.uint8), np.copyto)
        return 2 * n / seconds / 1e9, "numpy copy (host memory)"
    from trimode.runtime.torch_baseline import torch_or_none

    torch = torch_or_none()
    if torch is None or not torch.cuda.is_available():
        return None, "n/a (needs torch with CUDA)"

    def copy(dst, src):
        dst.copy_(src)
        torch.cuda.synchronize()
    n = 2 << 30
    seconds = _copy_seconds(torch.empty(n, dtype=torch.uint8, device="cuda"),
                            torch.empty(n, dtype=torch.uint8, device="cuda"), copy)
    torch.cuda.empty_cache()  # the buffers died with _copy_seconds' frame
    return 2 * n / seconds / 1e9, "torch device-to-device copy"


def _copy_seconds(dst, src, copy: Callable) -> float:
    return median_seconds(lambda: copy(dst, src), COPY_REPEATS)


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def device_name(target: str) -> str:
    if target == "cuda":
        return _nvidia_smi("name") or "CUDA GPU (nvidia-smi unavailable)"
    return f"CPU, {os.cpu_count()} cores"


def host_huge_pages_mib() -> float | None:
    """This process's memory on transparent huge pages (the CPU's weights, where Linux grants
    them: tvm_runtime.huge_page_memory), MiB; None where the kernel does not say."""
    try:
        rollup = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    sizes = [line.split()[1] for line in rollup.splitlines() if line.startswith("AnonHugePages:")]
    return int(sizes[0]) / 1024 if sizes else None


class MemoryWatch:
    """GPU memory in use (nvidia-smi, whole device) sampled between phases; the peak over the
    samples less the first is what the engine added. None everywhere without nvidia-smi."""

    def __init__(self, target: str):
        self.on = target == "cuda"
        self.baseline = self._used()
        self.peak = self.baseline

    def _used(self) -> float | None:
        value = _nvidia_smi("memory.used") if self.on else None
        return float(value) if value else None

    def sample(self) -> None:
        used = self._used()
        if used is not None:
            self.peak = used if self.peak is None else max(self.peak, used)

    def added(self) -> float | None:
        return None if self.peak is None or self.baseline is None else self.peak - self.baseline


# --- timing --------------------------------------------------------------------------------

def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = WARMUP_CALLS) -> float:
    """Median wall time of fn; every fn here ends synchronised with the device (it downloads
    argmax/prob or syncs), so wall time is the step."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


class _Tokens:
    """Random token ids above the special ids, from a fixed seed."""

    def __init__(self, vocab: int, seed: int = 1):
        self.rng, self.vocab = np.random.default_rng(seed), vocab

    def __call__(self, n: int) -> list[int]:
        return self.rng.integers(min(1000, self.vocab // 2), self.vocab, n).tolist()


# A cache is filled by prefills of at most this many tokens: a 32k-token fill in one call
# would hold ~2 GB of FFN activations at the 14B, and only the entries after it are timed.
FILL_CHUNK = 2048


def fill_cache(fwd, tokens: list[int]) -> None:
    """The cache emptied, then holding `tokens`' K/V."""
    fwd.truncate(0)
    for start in range(0, len(tokens), FILL_CHUNK):
        fwd.causal(tokens[start:start + FILL_CHUNK], last_only=True)


# Before the first timed row, each entry runs for at least this long (and WARMUP_CALLS + 1
# calls): the first row of a CPU run was otherwise 10-85% slower than the same row timed
# again at the end (the pool's idle thread and the vCPU ramping up), a cold start that two
# warm-up calls did not cover.
WARMUP_SECONDS = 0.3


def warm_up(fwd, plan: BenchPlan, ids: _Tokens) -> None:
    fill_cache(fwd, ids(plan.fills[0]))
    for entry, n in ((fwd.causal, 1), (fwd.causal, plan.block), (fwd.bidirectional, plan.block)):
        started, calls = time.perf_counter(), 0
        while calls <= WARMUP_CALLS or time.perf_counter() - started < WARMUP_SECONDS:
            fwd.truncate(plan.fills[0])
            entry(ids(n))
            calls += 1


def time_entries(fwd, plan: BenchPlan, ids: _Tokens) -> list[dict]:
    """Median time of each compiled entry at each fill, from a cache truncated to the fill."""
    warm_up(fwd, plan, ids)
    rows = []

    def at_fill(fill: int, entry: Callable, n: int) -> float:
        if fwd.length < fill:  # positions below the fill must hold K/V
            fill_cache(fwd, ids(fill))

        def step():
            fwd.truncate(fill)
            entry(ids(n))
        return median_seconds(step, plan.repeat)

    for fill in plan.fills:
        for entry, name, fn, n in (("decode", "decode", fwd.causal, 1),
                                   ("verify", f"verify T={plan.block}", fwd.causal, plan.block),
                                   ("draft", f"draft T={plan.block}", fwd.bidirectional, plan.block)):
            rows.append({"entry": entry, "name": name, "tokens": n, "fill": fill,
                         "seconds": at_fill(fill, fn, n)})
    seconds = at_fill(0, lambda t: fwd.causal(t, last_only=True), plan.prefill)
    rows.append({"entry": "prefill", "name": f"prefill T={plan.prefill}", "tokens": plan.prefill,
                 "fill": 0, "seconds": seconds})
    return rows


# The sampled loops' settings, as the table names them. On a GPU build each is served from
# what the device hands over beside the rows where it can: llama-server's defaults (the usual
# non-greedy request) from the top candidates; the model card's request, temperature alone,
# from the chunk masses and the chunks draws land in; OpenAI clients' top-p alone from the
# candidates and the masses' total where they hold the nucleus, else from the whole rows.
SAMPLED = {"T 0.8, top-k 40, top-p 0.95, min-p 0.05":
           SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=0),
           "T 0.7 alone": SamplingParams(temperature=0.7, seed=0),
           "T 0.7, top-p 0.9": SamplingParams(temperature=0.7, top_p=0.9, seed=0)}


def time_ar_loop(fwd, plan: BenchPlan, ids: _Tokens, sampling: SamplingParams = SamplingParams()) -> dict:
    """AR from the first fill (greedy unless `sampling` says): decode steps with the decode
    loop's own host logic."""
    sampler = Sampler(sampling)
    prompt = ids(plan.fills[0] + 1)
    fill_cache(fwd, prompt[:-1])
    history = list(prompt)
    started = time.perf_counter()
    for _ in range(plan.ar_steps):
        history += ar_cycle(fwd, sampler, history).tokens
    seconds = time.perf_counter() - started
    return {"tokens": plan.ar_steps, "seconds": seconds, "tok_per_s": plan.ar_steps / seconds}


def time_spec_cycle(fwd, plan: BenchPlan, ids: _Tokens, mask_id: int, shift: bool,
                    sampling: SamplingParams = SamplingParams()) -> float:
    """One self-speculation cycle (draft T = block, verify, accept, truncate; greedy unless
    `sampling` says) from the first fill, decode.spec_cycle itself with its host logic."""
    sampler = Sampler(sampling)
    fill = plan.fills[0]
    history = ids(fill + 1)
    fill_cache(fwd, history[:-1])

    def cycle():
        fwd.truncate(fill)
        spec_cycle(fwd, sampler, history, plan.block - 1, mask_id, shift)
    return median_seconds(cycle, plan.repeat)


def time_decode_enqueue(fwd, repeat: int) -> dict:
    """One decode step launched (step inputs written, entry called, no outputs fetched) vs.
    launched and waited for: how long the host takes to enqueue the step against how long
    the device takes to finish it. On a GPU, enqueue close to the synced time means the step
    is launch-bound. On the CPU the call is synchronous and both are the step."""
    dev = fwd.engine.device
    enqueued, synced = [], []
    for i in range(WARMUP_CALLS + repeat):
        started = time.perf_counter()
        fwd.launch("decode", [7])  # at the current length, which it leaves alone
        returned = time.perf_counter()
        dev.sync()
        if i >= WARMUP_CALLS:
            enqueued.append(returned - started)
            synced.append(time.perf_counter() - started)
    return {"enqueue_seconds": float(np.median(enqueued)), "synced_seconds": float(np.median(synced))}


# --- the run -------------------------------------------------------------------------------

def bench_engine(loaded: Loaded, plan: BenchPlan, memory: MemoryWatch) -> dict:
    """Everything measured on our compiled engine. Keeps no reference to it afterwards."""
    engine, cfg = loaded.engine, loaded.engine.config
    fwd = engine.new_sequence(plan.n_ctx)
    memory.sample()
    ids = _Tokens(cfg.vocab)
    rows = time_entries(fwd, plan, ids)
    memory.sample()
    ar = time_ar_loop(fwd, plan, ids)
    spec = time_spec_cycle(fwd, plan, ids, cfg.mask_token_id, cfg.shift_logits)
    # sampling is host work on every row (a spec cycle's draft rows, its verify rows up to
    # the first rejection), fetched from the device
    sampled = [{"setting": setting, "ar": time_ar_loop(fwd, plan, ids, params),
                "spec_cycle_seconds": time_spec_cycle(fwd, plan, ids, cfg.mask_token_id,
                                                      cfg.shift_logits, params)}
               for setting, params in SAMPLED.items()]
    enqueue = time_decode_enqueue(fwd, plan.repeat)
    memory.sample()
    return {"rows": rows, "ar": ar, "spec_cycle_seconds": spec, "sampled": sampled,
            "decode_host": enqueue,
            "n_ctx": plan.n_ctx, "dtype": engine.dtype, "kv_cache": engine.kv_cache,
            "int8_dot": engine.manifest.get("int8_dot"), "amx": bool(engine.manifest.get("amx")),
            "cuda_graphs": engine.cuda_graph_report(),
            "dependent_launch": bool(engine.manifest.get("dependent_launch", False))}


def bench_torch(cfg: ModelConfig, plan: BenchPlan, target: str) -> dict:
    """The plain PyTorch model at the same geometry: decode, verify/draft T = block at each
    fill, and prefill (last row's logits), each step ending in argmax on the host as a decode
    loop needs it. bf16 on a GPU (where we run fp16); float32 on the CPU, where we run float32
    and bf16 matmuls are emulated on most CPUs. {"available": False, "why": ...} where torch
    cannot run."""
    from trimode.runtime.torch_baseline import TorchModel, torch_or_none

    torch = torch_or_none()
    if torch is None:
        return {"available": False, "why": "torch is not installed"}
    device = "cuda" if target == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return {"available": False, "why": "torch has no CUDA device"}
    dtype = "bfloat16" if device == "cuda" else "float32"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the copy-bandwidth buffers are not the model's
    model = TorchModel.random(cfg, plan.n_ctx, device, dtype)
    rows = _torch_rows(torch, model, plan, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"available": True, "version": torch.__version__, "device": device, "dtype": dtype,
            "rows": rows, "peak_mem_mib": peak}


def _torch_rows(torch, model, plan: BenchPlan, device: str) -> list[dict]:
    ids = _Tokens(model.config.vocab)
    rows = []
    with torch.inference_mode():
        def timed(fill: int, n: int, causal: bool = True, last_only: bool = False) -> float:
            tokens = torch.tensor(ids(n), device=device)
            return median_seconds(
                lambda: model.forward(tokens, fill, causal, last_only).argmax(-1).cpu(), plan.repeat)

        for fill in plan.fills:  # the cache's content does not change the time, only its length
            rows += [{"entry": "decode", "fill": fill, "seconds": timed(fill, 1)},
                     {"entry": "verify", "fill": fill, "seconds": timed(fill, plan.block)},
                     {"entry": "draft", "fill": fill, "seconds": timed(fill, plan.block, causal=False)}]
        rows.append({"entry": "prefill", "fill": 0, "seconds": timed(0, plan.prefill, last_only=True)})
    return rows


def run_bench(cfg: ModelConfig, plan: BenchPlan, target: str, load: Callable[[], Loaded],
              with_torch: bool = True, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """The whole bench in one run: bandwidth, load, our entries, then torch (ours freed
    first, so both fit on one GPU). `checkpoint` gets the report of ours before torch runs,
    and a torch that fails is reported, not raised: a device run cut short or a baseline
    that does not fit loses none of our figures."""
    bandwidth, measured_by = copy_bandwidth(target)
    memory = MemoryWatch(target)
    loaded = load()
    quantized = loaded.engine.quantized
    act_bytes = np.dtype(loaded.engine.dtype).itemsize
    # a cached element's bytes (a q8_0 row's scales included)
    kv_bytes = np.dtype(loaded.engine.kv_dtype).itemsize * loaded.engine.kv_row / cfg.head_dim
    ours = bench_engine(loaded, plan, memory)
    huge_pages = host_huge_pages_mib() if target != "cuda" else None  # the engine still loaded
    report = {"target": target, "device": device_name(target), "geometry": cfg.geometry_key(),
              "plan": asdict(plan), "copy_gb_per_s": bandwidth, "copy_measured_by": measured_by,
              "load_seconds": loaded.seconds, "load_source": loaded.source,
              "gpu_mem_peak_mib": memory.peak, "gpu_mem_engine_mib": memory.added(),
              "host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "host_huge_pages_mib": huge_pages, **ours}
    del loaded
    gc.collect()
    weight_bytes = weight_bytes_per_step(cfg, quantized, act_bytes)
    if checkpoint is not None:
        partial = copy.deepcopy({**report, "torch": {"available": False, "why": "not run yet"}})
        _add_derived(partial, cfg, weight_bytes, kv_bytes)
        checkpoint(partial)
    try:
        report["torch"] = (bench_torch(cfg, plan, target) if with_torch
                           else {"available": False, "why": "not asked for"})
    except Exception as err:  # the baseline's failure (say, out of memory) is a finding too
        report["torch"] = {"available": False, "why": f"failed: {type(err).__name__}: {err}"}
    _add_derived(report, cfg, weight_bytes, kv_bytes)
    return report


def _add_derived(report: dict, cfg: ModelConfig, weight_bytes: float, kv_bytes: int) -> None:
    """Bytes, GB/s, % of roofline and ratios for each row; decode at the same fill is the
    unit for x_decode (prefill: the first fill's decode)."""
    rows, bandwidth = report["rows"], report["copy_gb_per_s"]
    decode_at = {r["fill"]: r["seconds"] for r in rows if r["entry"] == "decode"}
    first_decode = decode_at[report["plan"]["fills"][0]]
    torch_at = {(r["entry"], r["fill"]): r["seconds"] for r in report["torch"].get("rows", [])}
    for r in rows:
        r["bytes"] = weight_bytes + cfg.kv_bytes_per_token(kv_bytes) * r["fill"]
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9
        r["roofline_pct"] = 100 * r["gb_per_s"] / bandwidth if bandwidth else None
        r["x_decode"] = r["seconds"] / decode_at.get(r["fill"], first_decode)
        r["tok_per_s"] = r["tokens"] / r["seconds"]
        theirs = torch_at.get((r["entry"], r["fill"]))
        r["torch_seconds"] = theirs
        r["ours_over_torch"] = r["seconds"] / theirs if theirs else None
    report["weight_bytes_per_step"] = weight_bytes
    report["spec_cycle_x_decode"] = report["spec_cycle_seconds"] / first_decode
    for loops in report["sampled"]:
        loops["spec_cycle_x_decode"] = loops["spec_cycle_seconds"] / first_decode
    report["prefill_tok_per_s"] = next(r["tok_per_s"] for r in rows if r["entry"] == "prefill")


def render_table(report: dict) -> str:
    """The bench as text: a header, one line per entry, then the loop figures."""
    def opt(value, fmt: str, none: str) -> str:
        return none if value is None else format(value, fmt)

    def mib(value) -> str:
        return "n/a" if value is None else f"{value:.0f} MiB"

    bw = report["copy_gb_per_s"]
    torch = report["torch"]
    lines = [f"== {report['geometry']} on {report['target']} ({report['device']}); cache "
             f"{report['n_ctx']} tokens ({report.get('kv_cache', 'f16')}), {report['dtype']} activations"
             + (f" (matmul inputs int8, {report['int8_dot']}{', blocks on AMX' if report.get('amx') else ''})"
                if report.get("int8_dot") else ""),
             f"copy bandwidth {opt(bw, '.0f', 'n/a')}{'' if bw is None else ' GB/s'} "
             f"({report['copy_measured_by']}); "
             f"weights read per step {report['weight_bytes_per_step'] / 1e6:.1f} MB",
             f"{'entry':<16}{'fill':>6}{'ms':>10}{'GB/s':>8}{'%roof':>7}{'x decode':>9}"
             f"{'torch ms':>10}{'ours/torch':>11}"]
    for r in report["rows"]:
        torch_ms = "-" if r["torch_seconds"] is None else f"{1e3 * r['torch_seconds']:.2f}"
        lines.append(f"{r['name']:<16}{r['fill']:>6}{1e3 * r['seconds']:>10.2f}{r['gb_per_s']:>8.1f}"
                     f"{opt(r['roofline_pct'], '.0f', '-'):>7}{r['x_decode']:>9.2f}"
                     f"{torch_ms:>10}{opt(r['ours_over_torch'], '.2f', '-'):>11}")
    host, graphs = report["decode_host"], report["cuda_graphs"]
    graph_use = (f"{', '.join(graphs['entries'])} ({'used' if graphs['used'] else 'not used'})"
                 if graphs["entries"] else "none")
    lines += [
        f"AR decode {report['ar']['tok_per_s']:.1f} tok/s ({report['ar']['tokens']} tokens from fill "
        f"{report['plan']['fills'][0]}, host logic included)",
        f"spec cycle (draft + verify T={report['plan']['block']}, host logic) "
        f"{1e3 * report['spec_cycle_seconds']:.2f} ms = {report['spec_cycle_x_decode']:.2f}x decode",
        *(f"sampled ({loops['setting']}): AR {loops['ar']['tok_per_s']:.1f} tok/s, spec cycle "
          f"{1e3 * loops['spec_cycle_seconds']:.2f} ms = {loops['spec_cycle_x_decode']:.2f}x decode"
          for loops in report["sampled"]),
        f"decode host enqueue {1e3 * host['enqueue_seconds']:.3f} ms, until done "
        f"{1e3 * host['synced_seconds']:.3f} ms; CUDA graphs: {graph_use}; dependent launch: "
        f"{'on' if report['dependent_launch'] else 'off'}",
        f"prefill {report['prefill_tok_per_s']:.0f} tok/s",
        f"model load {report['load_seconds']:.2f} s (from {report['load_source']}); peak GPU memory "
        f"{mib(report['gpu_mem_peak_mib'])} (engine {mib(report['gpu_mem_engine_mib'])}); "
        f"host peak RSS {report['host_peak_rss_mib']:.0f} MiB"
        + ("" if report.get("host_huge_pages_mib") is None
           else f", {report['host_huge_pages_mib']:.0f} MiB on huge pages"),
    ]
    if torch["available"]:
        lines.append(f"torch {torch['version']} {torch['dtype']} on {torch['device']}: peak memory "
                     f"{mib(torch['peak_mem_mib'])}; ours/torch < 1 means we are faster")
    else:
        lines.append(f"torch baseline: n/a ({torch['why']})")
    return "\n".join(lines)
