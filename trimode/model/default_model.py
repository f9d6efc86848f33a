"""The model that ships inside the package: used whenever a command is given no -m.

A ~5M-parameter NLD-architecture model trained on the Python standard library's source
(PSF licence) with NLD's joint AR + block-diffusion objective; Q8_0. How it was made and
how well it does: train/README.md and the "Default model" section of BENCHMARKS.md.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL: Path = Path(__file__).resolve().parent.parent / "data" / "nld-tiny-code.gguf"


def model_or_default(model: "str | Path | None") -> Path:
    """The model file a command was given, or the embedded one when none was."""
    from trimode.model.config import ModelError

    if model:
        return Path(model)
    if not DEFAULT_MODEL.exists():
        raise ModelError(
            f"no -m given and the default model is not installed ({DEFAULT_MODEL}); pass "
            "-m MODEL.gguf (`trimode make-model --geometry tiny OUT.gguf` makes a test model)")
    return DEFAULT_MODEL
