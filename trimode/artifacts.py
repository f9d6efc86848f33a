"""Where compiled artifacts live and what names them; shared by compile time and run time.

Computing a key needs no TVM import (the version comes from package metadata), so the
runtime finds a cached build in milliseconds and imports the compiler only on a miss.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from trimode import __version__
from trimode.model.config import ModelConfig

MANIFEST = "manifest.json"
COMPILER_DIR = Path(__file__).parent / "compiler"


def default_root() -> Path:
    """artifacts/ of a source checkout, else a per-user cache ($TRIMODE_ARTIFACTS wins)."""
    if os.environ.get("TRIMODE_ARTIFACTS"):
        return Path(os.environ["TRIMODE_ARTIFACTS"])
    checkout = Path(__file__).resolve().parent.parent / "artifacts"
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        return checkout
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trimode" / "artifacts"


def layout_key(cfg: ModelConfig, quantized: dict[str, bool]) -> str:
    kinds = "".join("q" if quantized[part] else "f" for part in ("embed", "layers", "output"))
    return f"{cfg.geometry_key()}-{kinds}"


def compiler_source_hash() -> str:
    """Any edit of the compiler's own code invalidates its artifacts."""
    digest = hashlib.sha256()
    for path in sorted(COMPILER_DIR.rglob("*.py")):
        digest.update(path.relative_to(COMPILER_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resolve_target(name: str, arch: str | None = None) -> dict:
    if name == "llvm":
        return {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    if name == "cuda":
        return {"kind": "cuda", "arch": arch or "sm_90a", "max_shared_memory_per_block": 49152,
                "max_threads_per_block": 1024, "thread_warp_size": 32}
    raise ValueError(f"unknown target {name!r} (llvm or cuda)")


def schedules_for(target: dict, gpu_name: str | None = None) -> tuple[dict, str]:
    """The tuned schedule database of the GPU named, or ({}, "none"): default schedules."""
    if target["kind"] != "cuda":
        return {}, "none"
    from trimode.schedules import database_for

    return database_for(gpu_name)


def cuda_graphs_enabled(target: dict) -> bool:
    """CUDA builds capture each entry's kernels into CUDA graphs unless TRIMODE_CUDA_GRAPHS=0
    (the eager build, kept for comparison and as a fallback)."""
    return target["kind"] == "cuda" and os.environ.get("TRIMODE_CUDA_GRAPHS", "1") != "0"


def dependent_launch_enabled(target: dict) -> bool:
    """CUDA kernels start while the previous one drains (compiler/grid_dependency.py) unless
    TRIMODE_PDL=0 (the plain-launch build, kept for comparison)."""
    return target["kind"] == "cuda" and os.environ.get("TRIMODE_PDL", "1") != "0"


@lru_cache(maxsize=1)
def first_cpu_info() -> list[str] | None:
    """The first processor's lines of /proc/cpuinfo (None where there is none); read once, as
    the build key asks for them twice a start."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return info.split("\n\n")[0].splitlines()


def cpu_flags() -> set[str]:
    """This processor's feature flags as /proc/cpuinfo names them (empty where there is none):
    x86's "flags", Arm's "Features"."""
    for line in first_cpu_info() or []:
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


# The int8 dot products the CPU build can use, widest first, by LLVM's feature names (the
# int8 kernel's q8_matmul.INT8_DOTS), and the /proc/cpuinfo flags each needs: AVX-512 VNNI
# (vpdpbusd, 64 byte products into 16 int32 lanes an instruction), AVX-VNNI (its 256-bit
# VEX form: Intel's client cores without AVX-512), AVX-512BW without VNNI (Skylake-SP: six
# instructions for 64), AVX2 (six for 32); on Arm, sdot (Armv8.2 dotprod, 16 for 4 lanes).
INT8_DOT_FLAGS = {"avx512vnni": {"avx512_vnni", "avx512bw"}, "avxvnni": {"avx_vnni"},
                  "avx512bw": {"avx512bw"}, "avx2": {"avx2"}, "sdot": {"asimddp"}}


def cpu_int8_dots() -> list[str]:
    """The int8 dot products this processor has, widest first."""
    flags = cpu_flags()
    return [dot for dot, needs in INT8_DOT_FLAGS.items() if needs <= flags]


def cpu_int8_dot() -> str | None:
    """This processor's widest int8 dot product (None: it has none)."""
    return next(iter(cpu_int8_dots()), None)


def int8_activations_enabled(target: dict) -> str | None:
    """The dot product of a CPU build that quantizes each Q8_0 matmul's activations to int8
    per 32, as llama.cpp's CPU path does: this processor's, unless TRIMODE_INT8=0 (the
    fp32-activation build, kept for comparison; the only one where there is none)."""
    if target["kind"] != "llvm" or os.environ.get("TRIMODE_INT8", "1") == "0":
        return None
    return cpu_int8_dot()


# Intel AMX's tiles and their int8 products (Sapphire Rapids on), as /proc/cpuinfo names them
AMX_FLAGS = {"amx_tile", "amx_int8"}
# Linux's arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): a process must ask for the tile
# state before its first tile instruction (without it, SIGILL)
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


def cpu_amx() -> bool:
    """Whether this processor has AMX int8 tiles and Linux lets this process use them (asked
    for once, for every thread of the process; True from then on)."""
    return AMX_FLAGS <= cpu_flags() and _tile_state_granted()


@lru_cache(maxsize=1)
def _tile_state_granted() -> bool:
    if platform.machine() != "x86_64" or platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def amx_enabled(target: dict) -> bool:
    """A CPU build's block and prefill matmuls run on AMX tiles (q8_matmul_amx.py) where its
    int8 matmuls run on AVX-512 VNNI (every processor with AMX has it) and cpu_amx() says so."""
    return int8_activations_enabled(target) == "avx512vnni" and cpu_amx()


def cpu_fingerprint() -> str:
    """This processor's model and feature flags (a CPU build targets them: -mcpu=native)."""
    info = first_cpu_info()
    if info is None:
        return platform.machine()
    lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def build_key(cfg: ModelConfig, quantized: dict[str, bool], target: dict, schedules_id: str,
              kv_cache: str = "f16") -> str:
    parts = {
        "kv_cache": kv_cache,
        "cuda_graphs": cuda_graphs_enabled(target),
        "dependent_launch": dependent_launch_enabled(target),
        "int8_activations": int8_activations_enabled(target),
        "amx": amx_enabled(target),
        "layout": layout_key(cfg, quantized),
        "target": target,
        "tvm": metadata.version("apache-tvm"),
        "schedules": schedules_id,
        "trimode": __version__,
        "compiler": compiler_source_hash(),
    }
    if target["kind"] == "llvm":
        parts["cpu"] = cpu_fingerprint()  # CPU builds use this processor's instruction set
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def artifact_dir(cfg: ModelConfig, quantized: dict[str, bool], target_name: str, key: str,
                 root: Path | None = None) -> Path:
    root = Path(root) if root else default_root()
    return root / f"{layout_key(cfg, quantized)}-{target_name}-{key}"
