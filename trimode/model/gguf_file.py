"""NLD GGUF files (arch `dream`, MODEL.md section 3): read into ModelConfig + ModelWeights, and write.

Parsing and writing go through the `gguf` package. Reading is memory-mapped: tensors are
checked from their headers at load, and the weights are materialized only when first used
(Q8_0 repacked once into int8 + fp16 scales, never dequantized), so `trimode info` on a
14 GB file reads almost nothing. Writing streams one tensor at a time, so a full geometry
never has to fit in memory.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from trimode.model.config import ModelConfig, ModelError
from trimode.model.weights import LayerWeights, ModelWeights, Q8_0_DTYPE, Q8Matrix

ARCH = "dream"
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
SUPPORTED_TYPES = FLOAT_TYPES + (GGMLType.Q8_0,)

# ModelWeights / LayerWeights attribute -> GGUF tensor name.
GLOBAL_TENSORS = {"embed": "token_embd.weight", "output_norm": "output_norm.weight",
                  "output": "output.weight"}
LAYER_TENSORS = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                 "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate",
                 "w_up": "ffn_up", "w_down": "ffn_down"}
NORMS = ("attn_norm", "ffn_norm", "output_norm")


def layer_tensor_name(layer: int, attr: str) -> str:
    return f"blk.{layer}.{LAYER_TENSORS[attr]}.weight"


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, in file order, with its numpy shape ([N, K] for a matrix
    of ggml shape {K, N}; [H] for a norm)."""
    c = config
    per_layer = {"attn_norm": (c.hidden,), "wq": (c.q_dim, c.hidden), "wk": (c.kv_dim, c.hidden),
                 "wv": (c.kv_dim, c.hidden), "wo": (c.hidden, c.q_dim), "ffn_norm": (c.hidden,),
                 "w_gate": (c.ffn, c.hidden), "w_up": (c.ffn, c.hidden), "w_down": (c.hidden, c.ffn)}
    shapes = {GLOBAL_TENSORS["embed"]: (c.vocab, c.hidden)}
    for layer in range(c.n_layers):
        shapes.update({layer_tensor_name(layer, attr): shape for attr, shape in per_layer.items()})
    shapes[GLOBAL_TENSORS["output_norm"]] = (c.hidden,)
    shapes[GLOBAL_TENSORS["output"]] = (c.vocab, c.hidden)
    return shapes


def _key(name: str) -> str:
    return f"{ARCH}.{name}"


# ---------------------------------------------------------------------------------------------
# Reading

class GGUFModel:
    """One opened model file: config, metadata and tensor types now; weights on first use."""

    def __init__(self, path: Path, reader: gguf.GGUFReader, config: ModelConfig,
                 metadata: dict[str, Any]):
        self.path = path
        self.config = config
        self.metadata = metadata
        self._tensors = {t.name: t for t in reader.tensors}
        self.tensor_types = {name: t.tensor_type.name for name, t in self._tensors.items()}

    @functools.cached_property
    def weights(self) -> ModelWeights:
        def get(name: str):
            return _to_engine_array(self._tensors[name])

        layers = [LayerWeights(**{attr: get(layer_tensor_name(i, attr)) for attr in LAYER_TENSORS})
                  for i in range(self.config.n_layers)]
        return ModelWeights(embed=get(GLOBAL_TENSORS["embed"]), layers=layers,
                            output_norm=get(GLOBAL_TENSORS["output_norm"]),
                            output=get(GLOBAL_TENSORS["output"]))

    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self._tensors.values())

    def weight_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self._tensors.values())

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decoded token reads: every tensor but the embedding table
        (only one row of it is gathered), at its stored size."""
        return sum(int(t.n_bytes) for name, t in self._tensors.items()
                   if name != GLOBAL_TENSORS["embed"])


def _to_engine_array(tensor) -> "Q8Matrix | np.ndarray":
    """Q8_0 -> Q8Matrix (8-bit kept); float types -> float32 (F32 stays a view of the map)."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if tensor.tensor_type == GGMLType.Q8_0:
        n, k = shape
        return Q8Matrix.from_blocks(tensor.data, n, k)
    if tensor.tensor_type == GGMLType.BF16:
        bits = np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.asarray(tensor.data, dtype=np.float32).reshape(shape)


def load_model(path: str | os.PathLike) -> GGUFModel:
    """Open an NLD GGUF file; every problem is a ModelError naming the file."""
    path = Path(path)
    reader = _open_reader(path)

    def fail(problem: str):
        raise ModelError(f"{path}: {problem}")

    arch = _scalar(reader, "general.architecture")
    if arch is None:
        fail("no general.architecture key; not a model file")
    if arch != ARCH:
        fail(f"architecture is {arch!r}, expected {ARCH!r} (a Nemotron-Labs-Diffusion model)")

    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get(GLOBAL_TENSORS["embed"])
    if embed is None:
        fail(f"missing tensor {GLOBAL_TENSORS['embed']}")
    if len(embed.shape) != 2:
        fail(f"tensor {embed.name} has {len(embed.shape)} dimensions, expected 2")
    try:
        config = _config_from_keys(reader, vocab=int(embed.shape[1]), tensors=tensors)
    except ModelError as err:
        fail(str(err))
    _check_tensors(path, config, tensors)
    metadata = {name: _plain(field) for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    _check_tokenizer(path, config, metadata)
    return GGUFModel(path, reader, config, metadata)


class _Truncated(Exception):
    pass


class _Reader(gguf.GGUFReader):
    """gguf's reader over a plain-ndarray view of its memory map (still mapped, not copied),
    that says so when a read runs past the end of the file.

    The reader slices its map once per metadata element; on a np.memmap each slice pays
    the subclass's bookkeeping, which made a 131072-token vocabulary take ~4x longer."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._data = mapped.view(np.ndarray)

    def _get(self, offset, dtype, count=1, override_order=None):
        # Every read of gguf's reader comes through here; a short slice would otherwise
        # surface as whichever numpy error the short array causes next.
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self._data):
            raise _Truncated(end)
        return super()._get(offset, dtype, count, override_order)


def _open_reader(path: Path) -> gguf.GGUFReader:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelError(f"{path}: cannot open ({err.strerror})") from None
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file")
    size = path.stat().st_size
    try:
        return _Reader(path)
    except _Truncated as end:
        raise ModelError(f"{path}: truncated: it has {size:,} bytes, its contents need at "
                         f"least {end.args[0]:,}") from None
    except (ValueError, IndexError, OverflowError, KeyError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: corrupt GGUF file: {err}") from None


def _plain(field) -> Any:
    """A metadata field as a plain python value; float32 scalars as the decimal they were
    written from (1e-05, not 9.99999974738e-06)."""
    value = field.contents()
    if field.types and field.types[0] == gguf.GGUFValueType.FLOAT32:
        value = float(str(np.float32(value)))
    return value


def _scalar(reader: gguf.GGUFReader, key: str, kind: type | None = None) -> Any:
    """The single value of `key` (None when absent), checked to be a `kind` when given."""
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        raise ModelError(f"metadata key {key} is an array, expected a single value")
    value = _plain(field)
    if kind is None:
        return value
    accepted = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}[kind]
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
        noun = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}[kind]
        raise ModelError(f"metadata key {key} is {value!r}, expected {noun}")
    return kind(value)


# (GGUF key, ModelConfig field, python type). Absent keys keep ModelConfig's NLD default.
_OPTIONAL_KEYS = [
    (_key("context_length"), "context_length", int),
    (_key("attention.layer_norm_rms_epsilon"), "rms_eps", float),
    (_key("rope.freq_base"), "rope_theta", float),
    (_key("rope.scaling.type"), "rope_scaling", str),
    (_key("rope.scaling.factor"), "yarn_factor", float),
    (_key("rope.scaling.original_context_length"), "yarn_orig_ctx", int),
    (_key("rope.scaling.yarn_beta_fast"), "yarn_beta_fast", float),
    (_key("rope.scaling.yarn_beta_slow"), "yarn_beta_slow", float),
    ("tokenizer.ggml.bos_token_id", "bos_token_id", int),
    ("tokenizer.ggml.eos_token_id", "eos_token_id", int),
    ("diffusion.shift_logits", "shift_logits", bool),
]

# Keys whose only honoured value is NLD's; anything else would silently change the maths.
# yarn_ext_factor -1 is llama.cpp's "default", which is 1 for YaRN. (yarn_log_multiplier is
# not here: NVIDIA's reference does not rescale cos/sin, MODEL.md section 1.)
_FIXED_KEYS = {
    _key("rope.scaling.yarn_ext_factor"): (float, (1.0, -1.0)),
    _key("rope.scaling.yarn_attn_factor"): (float, (1.0,)),
    _key("rope.scaling.attn_factor"): (float, (1.0,)),
    _key("attention.causal"): (bool, (False,)),
}


def _config_from_keys(reader: gguf.GGUFReader, vocab: int, tensors: dict) -> ModelConfig:
    def required(name: str) -> int:
        value = _scalar(reader, _key(name), int)
        if value is None:
            raise ModelError(f"missing metadata key {_key(name)}")
        if value <= 0:
            raise ModelError(f"{_key(name)} is {value}")
        return value

    def optional(name: str, default: int) -> int:
        return default if reader.get_field(_key(name)) is None else required(name)

    n_heads = required("attention.head_count")
    n_kv_heads = optional("attention.head_count_kv", n_heads)  # llama.cpp's default
    q = tensors.get(layer_tensor_name(0, "wq"))
    # NLD's head_dim is not hidden / heads; without the key the query matrix says what it is.
    inferred = int(q.shape[-1]) // n_heads if q is not None and len(q.shape) == 2 else 0
    if reader.get_field(_key("attention.key_length")) is None and not inferred:
        raise ModelError(f"missing metadata key {_key('attention.key_length')}")
    head_dim = optional("attention.key_length", inferred)
    value_dim = optional("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise ModelError(f"{_key('attention.value_length')} ({value_dim}) differs from "
                         f"{_key('attention.key_length')} ({head_dim}); not supported")
    rope_dims = optional("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ModelError(f"{_key('rope.dimension_count')} ({rope_dims}) is not the head size "
                         f"({head_dim}); only full-head rotary embeddings are supported")
    for key, (kind, allowed) in _FIXED_KEYS.items():
        value = _scalar(reader, key, kind)
        if value is not None and value not in allowed:
            raise ModelError(f"{key} = {value!r} is not supported (only {allowed[0]!r})")

    mask = _scalar(reader, "tokenizer.ggml.mask_token_id", int)
    if mask is None:
        raise ModelError("no tokenizer.ggml.mask_token_id: not a diffusion model, or a file "
                         "without its mask token")
    values: dict[str, Any] = {"mask_token_id": mask}
    for key, attr, kind in _OPTIONAL_KEYS:
        value = _scalar(reader, key, kind)
        if value is not None:
            values[attr] = value
    config = ModelConfig(n_layers=required("block_count"), hidden=required("embedding_length"),
                         ffn=required("feed_forward_length"), n_heads=n_heads,
                         n_kv_heads=n_kv_heads, head_dim=head_dim, vocab=vocab, **values)
    for attr in ("bos_token_id", "eos_token_id", "mask_token_id"):
        if not 0 <= getattr(config, attr) < vocab:
            raise ModelError(f"{attr} {getattr(config, attr)} is outside the vocabulary of {vocab}")
    return config


def _check_tensors(path: Path, config: ModelConfig, tensors: dict) -> None:
    for name, shape in tensor_shapes(config).items():
        tensor = tensors.get(name)
        if tensor is None:
            raise ModelError(f"{path}: missing tensor {name}")
        ggml_shape = tuple(int(d) for d in tensor.shape.tolist())
        if ggml_shape != tuple(reversed(shape)):
            raise ModelError(f"{path}: tensor {name} has ggml shape {list(ggml_shape)}, expected "
                             f"{list(reversed(shape))} from the metadata")
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ModelError(f"{path}: tensor {name} has type {tensor.tensor_type.name}; supported: "
                             + ", ".join(t.name for t in SUPPORTED_TYPES))
        if len(shape) == 1 and tensor.tensor_type == GGMLType.Q8_0:
            raise ModelError(f"{path}: norm tensor {name} is Q8_0; expected a float type")


def _check_tokenizer(path: Path, config: ModelConfig, metadata: dict) -> None:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != config.vocab:
        raise ModelError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} entries but "
                         f"{GLOBAL_TENSORS['embed']} has {config.vocab} rows")


# ---------------------------------------------------------------------------------------------
# Writing

@dataclass
class TensorSource:
    """One tensor to write: its numpy shape ([N, K] or [H]), GGML type, and a function that
    makes its data (Q8_0 blocks or float32) only when the writer reaches it."""
    shape: tuple[int, ...]
    ggml_type: GGMLType
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        elements = int(np.prod(self.shape))
        if self.ggml_type == GGMLType.Q8_0:
            return elements // 32 * Q8_0_DTYPE.itemsize
        return elements * 4


def source_of(array: "Q8Matrix | np.ndarray") -> TensorSource:
    if isinstance(array, Q8Matrix):
        return TensorSource(array.shape, GGMLType.Q8_0, array.to_blocks)
    array = np.asarray(array)
    return TensorSource(array.shape, GGMLType.F32, lambda: np.asarray(array, np.float32))


def weight_sources(config: ModelConfig, weights: ModelWeights) -> dict[str, TensorSource]:
    arrays = {GLOBAL_TENSORS[attr]: getattr(weights, attr) for attr in GLOBAL_TENSORS}
    for i, layer in enumerate(weights.layers):
        arrays.update({layer_tensor_name(i, attr): getattr(layer, attr) for attr in LAYER_TENSORS})
    return {name: source_of(arrays[name]) for name in tensor_shapes(config)}


def write_model(path: str | os.PathLike, config: ModelConfig, weights: ModelWeights, vocab,
                name: str = "trimode model") -> None:
    """Write `weights` (Q8Matrix -> Q8_0, arrays -> F32) and `vocab` (trimode.model.vocab.Vocab)
    as an NLD GGUF file."""
    write_tensors(path, config, weight_sources(config, weights), vocab, name=name)


def write_tensors(path: str | os.PathLike, config: ModelConfig, sources: dict[str, TensorSource],
                  vocab, name: str = "trimode model",
                  progress: Callable[[int, int], None] | None = None) -> None:
    """Stream `sources` (one per name of tensor_shapes(config)) to an NLD GGUF file.

    The file appears under `path` only when complete. `progress(bytes_done, bytes_total)` is
    called after each tensor."""
    path = Path(path)
    expected = tensor_shapes(config)
    if set(sources) != set(expected):
        raise ValueError(f"tensors do not match the geometry: missing "
                         f"{sorted(set(expected) - set(sources))[:3]}, extra {sorted(set(sources) - set(expected))[:3]}")
    for tensor_name, shape in expected.items():
        if tuple(sources[tensor_name].shape) != shape:
            raise ValueError(f"{tensor_name} has shape {sources[tensor_name].shape}, expected {shape}")
    _check_vocab(config, vocab)

    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, ARCH)
    _add_metadata(writer, config, vocab, name, sources)
    for tensor_name, source in sources.items():
        byte_shape, dtype = _stored_shape(source)
        writer.add_tensor_info(tensor_name, byte_shape, dtype, source.nbytes,
                               raw_dtype=source.ggml_type)
    total, done = sum(s.nbytes for s in sources.values()), 0
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for source in sources.values():
            data = source.make()
            byte_shape, dtype = _stored_shape(source)
            writer.write_tensor_data(np.ascontiguousarray(data).view(dtype).reshape(byte_shape))
            done += source.nbytes
            if progress is not None:
                progress(done, total)
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def _stored_shape(source: TensorSource) -> tuple[tuple[int, ...], np.dtype]:
    """The numpy shape and dtype gguf's writer expects: uint8 bytes per row for Q8_0."""
    if source.ggml_type == GGMLType.Q8_0:
        n, k = source.shape
        return (n, k // 32 * Q8_0_DTYPE.itemsize), np.dtype(np.uint8)
    return tuple(source.shape), np.dtype(np.float32)


def _check_vocab(config: ModelConfig, vocab) -> None:
    if len(vocab.tokens) != config.vocab:
        raise ValueError(f"vocabulary has {len(vocab.tokens)} tokens, the model {config.vocab}")
    for attr, vocab_attr in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"),
                             ("mask_token_id", "mask_id")):
        if getattr(config, attr) != getattr(vocab, vocab_attr):
            raise ValueError(f"config {attr} {getattr(config, attr)} differs from the vocabulary's "
                             f"{getattr(vocab, vocab_attr)}")


def _add_metadata(writer: gguf.GGUFWriter, config: ModelConfig, vocab, name: str,
                  sources: dict[str, TensorSource]) -> None:
    c = config
    writer.add_name(name)
    if all(s.ggml_type == GGMLType.Q8_0 for s in sources.values() if len(s.shape) == 2):
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.hidden)
    writer.add_feed_forward_length(c.ffn)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_scaling_type(gguf.RopeScalingType(c.rope_scaling))
    if c.rope_scaling == "yarn":
        writer.add_rope_scaling_factor(c.yarn_factor)
        writer.add_rope_scaling_orig_ctx_len(c.yarn_orig_ctx)
        writer.add_rope_scaling_yarn_beta_fast(c.yarn_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(c.yarn_beta_slow)
    writer.add_causal_attention(False)
    writer.add_diffusion_shift_logits(c.shift_logits)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types([int(t) for t in vocab.token_types])
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    writer.add_mask_token_id(c.mask_token_id)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
