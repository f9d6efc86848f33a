"""llama.cpp on the same weights, beside trimode, on this machine: AR prefill and decode.

    python bench/llama_cpp_peer.py MODEL.gguf --llama-bench PATH/llama-bench
        [--prefill 512] [--depths 0,1024,3968] [--threads N] [--repeat 3]

Upstream llama.cpp's `dream` architecture is Dream-7B's diffusion graph: no KV cache (every
step recomputes the sequence) and an output projection as wide as the hidden size, so it can
neither decode autoregressively nor load NLD. NLD is a plain Ministral-3 decoder, which
llama.cpp runs as `llama`; the file is relabelled (same tensors, `dream.*` keys renamed, the
rope width given) and timed with llama-bench: pp = a prefill of --prefill tokens, tg = 32
decoded tokens after a context of each depth. trimode times the original file with `trimode
bench` (decode at those fills, prefill of --prefill tokens), two runs of each alternating. Both use the same threads; llama.cpp's
figure is its best of flash attention off and on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf

ROOT = Path(__file__).resolve().parent.parent
DECODE_TOKENS = 32
DROPPED = ("dream.attention.causal", "diffusion.")


def relabel_as_llama(src: Path, dst: Path) -> None:
    """A copy of a `dream` GGUF that llama.cpp loads as `llama` (tensors unchanged)."""
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    if arch != "dream":
        raise SystemExit(f"{src}: architecture {arch!r}, not 'dream'")
    writer = gguf.GGUFWriter(dst, arch="llama", endianess=reader.endianess)
    for field in reader.fields.values():
        name = field.name
        if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name.startswith(DROPPED):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        if name.startswith("dream."):
            name = "llama." + name[len("dream."):]
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    head_dim = reader.get_field("dream.attention.key_length").contents()
    writer.add_key_value("llama.rope.dimension_count", head_dim, gguf.GGUFValueType.UINT32)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def llama_bench(binary: str, model: Path, prefill: int, depths: list[int], threads: int,
                repeat: int) -> dict:
    """{"pp": tok/s, ("tg", depth): tok/s} from llama-bench's JSON, the faster of flash
    attention off and on for each (on, its CPU default, was 2.3x slower at depth 3968 here)."""
    out = subprocess.run([binary, "-m", str(model), "-p", str(prefill), "-n", str(DECODE_TOKENS),
                          "-d", ",".join(map(str, depths)), "-t", str(threads), "-r", str(repeat),
                          "-fa", "0,1", "-o", "json"], capture_output=True, text=True, check=True)
    rates = {}
    for run in json.loads(out.stdout):
        if run["n_prompt"] and not run["n_gen"]:
            key = "pp" if run["n_depth"] == 0 else None
        else:
            key = "tg", run["n_depth"]
        if key:
            rates[key] = max(rates.get(key, 0.0), run["avg_ts"])
    return rates


def trimode_bench(model: Path, prefill: int, depths: list[int], threads: int, repeat: int) -> dict:
    fills = ",".join(str(d + DECODE_TOKENS // 2) for d in depths)  # tg's mean context
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "trimode.cli", "bench", "-m", str(model), "--target", "llvm",
                          "--fills", fills, "--block", "4", "--prefill", str(prefill), "--repeat",
                          str(10 * repeat), "--no-torch", "--json"],
                         capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    report = json.loads(out.stdout)
    rates = {}
    for row in report["rows"]:
        if row["entry"] == "decode":
            rates["tg", row["fill"] - DECODE_TOKENS // 2] = 1 / row["seconds"]
        elif row["entry"] == "prefill":
            rates["pp"] = row["tokens"] / row["seconds"]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--llama-bench", required=True)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--depths", default="0,1024,3968")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        llama_file = Path(tmp) / "as-llama.gguf"
        relabel_as_llama(args.model, llama_file)
        runs = {"llama.cpp": [], "trimode": []}
        for _ in range(2):  # alternating: the spread of each pair shows the machine's drift
            runs["llama.cpp"].append(llama_bench(args.llama_bench, llama_file, args.prefill, depths,
                                                 args.threads, args.repeat))
            runs["trimode"].append(trimode_bench(args.model, args.prefill, depths, args.threads, args.repeat))
    keys = ["pp"] + [("tg", d) for d in depths]
    label = {k: f"prefill {args.prefill}" if k == "pp" else f"decode at {k[1]}" for k in keys}
    print(f"{args.model.name}, {args.threads} threads; tok/s, two alternating runs each")
    print(f"{'':<18}{'llama.cpp':>18}{'trimode':>18}{'ratio':>8}")
    for k in keys:
        peer, ours = ([rates[k] for rates in runs[name]] for name in ("llama.cpp", "trimode"))
        pair = lambda v: f"{v[0]:.1f} / {v[1]:.1f}"  # noqa: E731
        print(f"{label[k]:<18}{pair(peer):>18}{pair(ours):>18}{sum(ours) / sum(peer):>7.2f}x")


if __name__ == "__main__":
    main()
