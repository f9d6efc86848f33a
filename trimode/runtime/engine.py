"""The compiled model at run time: weights on the device, one VM, and a Forward per sequence.

Engine loads once (artifact, weights); `new_sequence(n_ctx)` gives a CompiledForward that
owns one KV buffer [layers, 2, kv_heads, n_ctx, head_dim], the rope tables, the step inputs
(position int32 [1], tokens int32 [MAX_BLOCK]) and its own VM, and maps the Forward interface
onto the compiled entries:
  causal, last row only      -> prefill (any T)
  causal, one token          -> decode
  causal, all rows           -> verify  (T <= MAX_BLOCK per call, longer inputs in chunks)
  bidirectional              -> draft   (T <= MAX_BLOCK)
On CUDA, decode/verify/draft run as CUDA graphs (model.py, pipeline.py): each VM captures one
graph per entry and T on first use and replays it after, so a step is one graph launch plus a
few small copies. The graphs bake in the sequence's tensors, hence one VM per sequence; the
per-step values travel in the step-input tensors, written before each call.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from trimode.artifacts import (MANIFEST, artifact_dir, build_key, cpu_amx, resolve_target,
                               schedules_for)
from trimode.model.config import ModelConfig, ModelError
from trimode.model.kv_cache import check_kv_cache, kv_row
from trimode.model.weights import (FEATURES_PER_PACK, INT8_DOT_GROUP, Q8_BLOCK,
                                   ModelWeights, Q8Matrix, pack_for_int8_dot, pack_features,
                                   packed_shape, quantized_parts)
from trimode.runtime.forward import MAX_BLOCK, ContextFull, StepResult
from trimode.runtime.tvm_runtime import Device, cuda_arch, cuda_device_name, default_target



# Unpacking Q8_0 blocks is a strided copy that numpy runs without the GIL: row chunks of about
# this many bytes go to a thread pool.
UNPACK_CHUNK_BYTES = 8 << 20
UNPACK_THREADS = min(8, os.cpu_count() or 1)


class HostBuffers:
    """Two host buffers that Q8_0 groups take turns to fill: one is uploading while the next
    group is unpacked into the other. Reusing them spares the page faults of fresh memory for
    every group (most of the host time of a load on a fresh process). A third, `scratch`,
    holds a group that is repacked before it uploads (the CPU's packed layout)."""

    ALIGN = 64
    SCRATCH = 2

    def __init__(self):
        self._buffers = [np.empty(0, np.uint8) for _ in range(3)]
        self._turn = 0

    def arrays(self, *specs: tuple[tuple[int, ...], type], scratch: bool = False) -> list[np.ndarray]:
        sizes = [-(-int(np.prod(shape)) * np.dtype(dtype).itemsize // self.ALIGN) * self.ALIGN
                 for shape, dtype in specs]
        which = self.SCRATCH if scratch else self._turn
        if self._buffers[which].nbytes < sum(sizes):
            self._buffers[which] = np.empty(sum(sizes), np.uint8)
        buffer = self._buffers[which]
        if not scratch:
            self._turn = 1 - self._turn
        out, at = [], 0
        for (shape, dtype), size in zip(specs, sizes):
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            out.append(buffer[at:at + nbytes].view(dtype).reshape(shape))
            at += size
        return out


def _stacked(prefix: str, mats: list, as_q8: bool, dtype: str, pool: ThreadPoolExecutor,
             buffers: HostBuffers, float_name: str = "weight", interleaved: bool = False,
             packed: int = 0) -> dict[str, np.ndarray]:
    """One parameter (a Q8_0 q/scale pair, or one float matrix) made of `mats` stacked along
    the output dimension (q|k|v -> qkv), unpacked in one pass over the file's blocks.
    interleaved: row i of every matrix in turn (gate, up -> gate_up with rows gate 0, up 0,
    gate 1, ...: the CUDA matmul's epilogue finds each pair side by side for silu(gate) * up).
    packed: Q8_0 laid out 16 features to a vector, as the CPU matmul reads it: q in groups
    of `packed` inputs (1: weights.pack_features; INT8_DOT_GROUP: weights.pack_for_int8_dot)."""
    if not as_q8:
        dense = [m.dequantize() if isinstance(m, Q8Matrix) else np.asarray(m) for m in mats]
        stacked = np.stack(dense, axis=1).reshape(-1, dense[0].shape[1]) if interleaved else np.concatenate(dense)
        return {f"{prefix}.{float_name}": np.asarray(stacked, dtype)}
    k = mats[0].shape[1]
    n = sum(m.shape[0] for m in mats)
    q, scale = buffers.arrays(((n, k), np.int8), ((n, k // Q8_BLOCK), np.float16), scratch=bool(packed))
    if interleaved:  # matrix i's rows are every len(mats)-th row from i: strided views
        rows = mats[0].shape[0]
        q_parts = [q.reshape(rows, len(mats), k)[:, i] for i in range(len(mats))]
        scale_parts = [scale.reshape(rows, len(mats), -1)[:, i] for i in range(len(mats))]
    else:
        bounds = np.cumsum([0] + [m.shape[0] for m in mats])
        q_parts = [q[a:b] for a, b in zip(bounds, bounds[1:])]
        scale_parts = [scale[a:b] for a, b in zip(bounds, bounds[1:])]
    step = max(1, UNPACK_CHUNK_BYTES // k)
    jobs = []
    for m, q_part, scale_part in zip(mats, q_parts, scale_parts):
        for a in range(0, m.shape[0], step):
            b = min(m.shape[0], a + step)
            jobs.append(pool.submit(m.unpack_into, q_part[a:b], scale_part[a:b], slice(a, b)))
    for job in jobs:
        job.result()
    if packed:
        q, scale = _packed(q, scale, pool, buffers, packed)
    return {f"{prefix}.q": q, f"{prefix}.scale": scale}


def _packed(q: np.ndarray, scale: np.ndarray, pool: ThreadPoolExecutor, buffers: HostBuffers,
            group: int) -> tuple[np.ndarray, np.ndarray]:
    """q and scale repacked 16 features to a vector (q's inputs in groups of `group`), by
    chunks of packs on the pool."""
    (n, k), cols = q.shape, scale.shape[1]
    for_dot = group == INT8_DOT_GROUP
    packed_q, packed_scale = buffers.arrays((packed_shape(n, k, group), np.uint8 if for_dot else np.int8),
                                            (packed_shape(n, cols), np.float16))
    pack_q = pack_for_int8_dot if for_dot else pack_features
    step = max(1, UNPACK_CHUNK_BYTES // (k * FEATURES_PER_PACK))
    jobs = [pool.submit(pack, rows, out, slice(a, a + step)) for a in range(0, len(packed_q), step)
            for pack, rows, out in ((pack_q, q, packed_q), (pack_features, scale, packed_scale))]
    for job in jobs:
        job.result()
    return packed_q, packed_scale


def parameter_groups(weights: ModelWeights, quantized: dict[str, bool], dtype: str,
                     pool: ThreadPoolExecutor,
                     packed: dict[str, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Host arrays named as the compiled module's parameters, a group at a time. A group's
    arrays stay valid until two more groups have been produced (HostBuffers), so loading
    holds two unpacked parameters at most, in memory it reuses. `packed`: the Q8_0 parameters
    (by prefix) the module reads packed, and how (packed_parameters)."""
    buffers = HostBuffers()

    def stacked(prefix, mats, as_q8, **how):
        return _stacked(prefix, mats, as_q8, dtype, pool, buffers, packed=(packed or {}).get(prefix, 0), **how)
    yield stacked("embed", [weights.embed], quantized["embed"], float_name="table")
    q8 = quantized["layers"]
    for i, layer in enumerate(weights.layers):
        p = f"layers.{i}"
        yield {f"{p}.attn_norm.weight": np.asarray(layer.attn_norm, np.float32),
               f"{p}.ffn_norm.weight": np.asarray(layer.ffn_norm, np.float32)}
        yield stacked(f"{p}.qkv", [layer.wq, layer.wk, layer.wv], q8)
        yield stacked(f"{p}.o", [layer.wo], q8)
        yield stacked(f"{p}.gate_up", [layer.w_gate, layer.w_up], q8, interleaved=True)
        yield stacked(f"{p}.down", [layer.w_down], q8)
    yield {"output_norm.weight": np.asarray(weights.output_norm, np.float32)}
    yield stacked("head", [weights.output], quantized["output"])


def packed_parameters(manifest: dict) -> dict[str, int]:
    """The Q8_0 parameters a compiled module reads packed 16 features to a vector, with the
    inputs q groups: those whose q it declares 3-D ([packs, K / group, 16 group];
    compiler/kernel_table.py q8_weight_shapes)."""
    return {p["name"].removesuffix(".q"): p["shape"][2] // FEATURES_PER_PACK for p in manifest["params"]
            if p["name"].endswith(".q") and len(p["shape"]) == 3}


def find_or_compile(cfg: ModelConfig, quantized: dict[str, bool], target: str,
                    arch: str | None = None, log=None, kv_cache: str = "f16") -> Path:
    """The cached artifact for this build, compiling it (importing the compiler) on a miss."""
    check_kv_cache(kv_cache, cfg.head_dim, target)
    spec = resolve_target(target, arch)
    gpu = cuda_device_name() if target == "cuda" else None
    out = artifact_dir(cfg, quantized, target,
                       build_key(cfg, quantized, spec, schedules_for(spec, gpu)[1], kv_cache))
    if (out / MANIFEST).exists():
        return out
    from trimode.compiler.build import compile_model  # the only runtime path into the compiler

    return compile_model(cfg, quantized, target, arch, log=log or _stderr, gpu_name=gpu,
                         kv_cache=kv_cache)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Engine:
    def __init__(self, config: ModelConfig, weights: ModelWeights, target: str | None = None,
                 metadata: dict | None = None, log=_stderr, artifact: Path | None = None,
                 kv_cache: str = "f16"):
        """`artifact` names a compiled folder to use as it is (a GPU box that holds only the
        runtime libraries and artifacts built elsewhere; its manifest says its cache type); by
        default the cache is searched and a miss compiled. kv_cache: model/kv_cache.py."""
        self.config = config
        self.metadata = metadata or {}
        self.target = target or default_target()
        self.device = Device(self.target)
        self.quantized = quantized = quantized_parts(weights)
        if artifact is None:
            arch = cuda_arch() if self.target == "cuda" else None
            artifact = find_or_compile(config, quantized, self.target, arch, log, kv_cache)
        self.artifact = Path(artifact)
        self.manifest = json.loads((self.artifact / MANIFEST).read_text())
        self.dtype = self.manifest["dtype"]
        # the cache's dtype (an artifact from before it was its own kept it in the activations')
        self.kv_dtype = self.manifest.get("kv_dtype", self.dtype)
        self.kv_cache = self.manifest.get("kv_cache", "f16")
        self.kv_row = kv_row(self.kv_cache, config.head_dim)  # the cache tensor's last dimension
        # CPU builds of processors with int8 dot products quantize the matmuls' activations
        self.int8_activations = self.manifest.get("activations") == "int8"
        if self.manifest.get("amx") and not cpu_amx():
            raise ModelError(f"{self.artifact} runs its block and prefill matmuls on AMX tiles, which this "
                             "processor or its Linux does not let this process use; use a build compiled here")
        started = time.time()
        self.library = self.device.load_library(self.artifact / "model.so")
        # Entries that replay CUDA graphs (the artifact's own list: eager builds have none).
        self.graph_entries = set(self.manifest.get("cuda_graph_entries", [])) \
            if self.target == "cuda" else set()
        self.graph_passes = 0  # passes run through a CUDA graph, over all sequences
        uploaded = self._upload_weights(weights)
        # One ffi Array, converted once: a Python list would be converted at every call.
        self.params = self.device.ffi.convert([uploaded[p["name"]] for p in self.manifest["params"]])
        self.load_seconds = time.time() - started
        self._tokenizer = None

    def _upload_weights(self, weights: ModelWeights) -> dict:
        """Device tensors by parameter name. The next group is unpacked on the host while the
        current one uploads (an upload returns once the host array may be reused)."""
        wanted = {p["name"]: p for p in self.manifest["params"]}
        uploaded = {}
        with ThreadPoolExecutor(UNPACK_THREADS) as pool, ThreadPoolExecutor(1) as ahead:
            groups = parameter_groups(weights, self.quantized, self.dtype, pool,
                                      packed_parameters(self.manifest))
            pending = ahead.submit(next, groups, None)
            while (arrays := pending.result()) is not None:
                pending = ahead.submit(next, groups, None)
                for name, array in arrays.items():
                    if name in wanted:
                        uploaded[name] = self._upload_param(wanted[name], array)
        missing = [name for name in wanted if name not in uploaded]
        if missing:
            raise ModelError(f"parameter {missing[0]}: the compiled artifact needs it, the model has none")
        return uploaded

    def _upload_param(self, param: dict, array: np.ndarray):
        if list(array.shape) != param["shape"] or str(array.dtype) != param["dtype"]:
            raise ModelError(f"parameter {param['name']}: compiled for {param['dtype']}"
                             f"{param['shape']}, model gives {array.dtype}{list(array.shape)}")
        return self.device.upload(array)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from trimode.model.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_metadata(self.metadata)
        return self._tokenizer

    def cuda_graph_report(self) -> dict:
        """Whether CUDA graphs were used: the entries built with them, and how many passes
        replayed (or captured) one so far."""
        return {"entries": sorted(self.graph_entries), "passes": self.graph_passes,
                "used": self.graph_passes > 0}

    def new_sequence(self, n_ctx: int) -> "CompiledForward":
        if n_ctx < 1:
            raise ModelError(f"context size must be positive, got {n_ctx}")
        return CompiledForward(self, n_ctx)


def load_engine(model_path: str | Path, target: str | None = None, log=_stderr,
                kv_cache: str = "f16") -> Engine:
    from trimode.model.gguf_file import load_model

    model = load_model(model_path)
    return Engine(model.config, model.weights, target, model.metadata, log, kv_cache=kv_cache)


class CompiledForward:
    """Forward over the compiled entries; one KV buffer, one sequence."""

    def __init__(self, engine: Engine, n_ctx: int):
        cfg, dev = engine.config, engine.device
        self.engine, self.config, self.n_ctx = engine, cfg, n_ctx
        self.vm = dev.new_vm(engine.library)
        self.entries = {name: self.vm[name] for name in engine.manifest["entries"]}
        self.kv = dev.empty([cfg.n_layers, 2, cfg.n_kv_heads, n_ctx, engine.kv_row], engine.kv_dtype)
        cos, sin = cfg.rope_tables(n_ctx)
        self.rope = [dev.upload(cos.astype(np.float32)), dev.upload(sin.astype(np.float32)),
                     dev.upload(cfg.q_scale(np.arange(n_ctx)).astype(np.float32))]
        # The step inputs, read by the kernels on the device (the same tensors at every call,
        # so a CUDA graph serves every position); host copies, rewritten before each call.
        self._host_pos, self._host_tokens = np.zeros(1, np.int32), np.zeros(MAX_BLOCK, np.int32)
        self.pos, self.tokens = dev.upload(self._host_pos), dev.upload(self._host_tokens)
        self._host_inv_t = np.ones(1, np.float32)  # chunk_mass's temperature, written per call
        self.inv_t = dev.upload(self._host_inv_t)
        self._static = [self.pos, self.kv, *self.rope]
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def _check(self, tokens: Sequence[int]) -> None:
        """Refuses a pass before any of it runs, so a refused call leaves the sequence as it was."""
        n = len(tokens)
        if n == 0:
            raise ValueError("a forward pass needs at least one token")
        if self._length + n > self.n_ctx:
            raise ContextFull(f"context full: {self._length} cached + {n} new tokens > {self.n_ctx}")
        if min(tokens) < 0 or max(tokens) >= self.config.vocab:
            raise ValueError(f"token id out of range [0, {self.config.vocab})")

    def launch(self, entry: str, tokens: Sequence[int]):
        """Runs one compiled entry at the current length (which it leaves alone) and returns
        its outputs on the device, nothing fetched: (logits, argmax, prob[, kv])."""
        dev, engine = self.engine.device, self.engine
        ids = np.asarray(tokens, dtype=np.int32)
        self._host_pos[0] = self._length
        dev.write(self.pos, self._host_pos)
        if entry == "prefill":  # any T: a fresh tensor, run eagerly
            args = [dev.upload(ids), *self._static]
        else:
            self._host_tokens[:len(ids)] = ids
            dev.write(self.tokens, self._host_tokens)
            shape = [] if entry == "decode" else [dev.ffi.Shape([len(ids)])]
            args = [*shape, self.tokens, *self._static]
        out = self.entries[entry](*args, engine.params)
        if entry in engine.graph_entries:
            engine.graph_passes += 1
        return out

    def _run(self, entry: str, tokens: Sequence[int]) -> StepResult:
        dev = self.engine.device
        out = self.launch(entry, tokens)
        logits = out[0]
        top, mass = self.entries.get("top_candidates"), self.entries.get("chunk_mass")

        def masses(inv_temperature: float):
            self._host_inv_t[0] = inv_temperature
            dev.write(self.inv_t, self._host_inv_t)
            return tuple(map(dev.download, mass(logits, self.inv_t)))
        return StepResult(argmax=dev.download(out[1]).astype(np.int64),
                          prob=dev.download(out[2]),
                          fetch_rows=lambda start, stop: dev.download_rows(logits, start, stop),
                          fetch_top=None if top is None else lambda: tuple(map(dev.download, top(logits))),
                          fetch_mass=None if mass is None else masses,
                          fetch_span=lambda row, start, stop: dev.download_span(
                              logits, row, start, min(stop, int(logits.shape[1]))))

    def causal(self, tokens: Sequence[int], last_only: bool = False) -> StepResult:
        self._check(tokens)
        if len(tokens) == 1:
            step = self._run("decode", tokens)
        elif last_only:
            step = self._run("prefill", tokens)
        else:
            return self._causal_rows(tokens)
        self._length += len(tokens)
        return step

    def _causal_rows(self, tokens: Sequence[int]) -> StepResult:
        steps = []
        for start in range(0, len(tokens), MAX_BLOCK):
            chunk = tokens[start:start + MAX_BLOCK]
            steps.append(self._run("verify", chunk))
            self._length += len(chunk)
        if len(steps) == 1:
            return steps[0]
        return StepResult(argmax=np.concatenate([s.argmax for s in steps]),
                          prob=np.concatenate([s.prob for s in steps]),
                          fetch_rows=lambda start, stop: np.concatenate([s.logits() for s in steps])[start:stop])

    def bidirectional(self, tokens: Sequence[int]) -> StepResult:
        self._check(tokens)
        if len(tokens) > MAX_BLOCK:
            raise ValueError(f"a bidirectional block holds at most {MAX_BLOCK} tokens, got {len(tokens)}")
        return self._run("draft", tokens)

    def truncate(self, n: int) -> None:
        # Positions past n are simply overwritten by the next causal pass.
        if not 0 <= n <= self._length:
            raise ValueError(f"cannot truncate a cache of {self._length} tokens to {n}")
        self._length = n
