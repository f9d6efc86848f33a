"""`trimode export-onnx`: write the model's causal and bidirectional graphs as ONNX."""
from __future__ import annotations

import click


@click.command("export-onnx")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
def export_onnx(model, out_dir):
    """Write MODEL as causal.onnx and bidirectional.onnx (opset 21, Q8_0 as blocked
    DequantizeLinear) into OUT_DIR, with their shared weights.bin and inputs.json, which
    describes the inputs (rope tables and query scale come from the host; see
    trimode.compiler.onnx_export.graph_inputs)."""
    try:
        from trimode.compiler.onnx_export import INPUTS_FILE, WEIGHTS_FILE
        from trimode.compiler.onnx_export import export_onnx as write
    except ModuleNotFoundError as err:
        if err.name != "onnx":
            raise
        # onnx is a test-time dependency (the `test` extra), not needed to serve.
        raise click.ClickException("export-onnx needs the onnx package: pip install 'onnx>=1.16'") from None
    from trimode.model.gguf_file import load_model

    loaded = load_model(model)
    try:
        paths = write(loaded.config, loaded.weights, out_dir)
    except OSError as err:
        raise click.ClickException(f"cannot write {out_dir}: {err.strerror or err}") from None
    names = ", ".join(p.name for p in paths.values())
    click.echo(f"wrote {names}, {WEIGHTS_FILE} and {INPUTS_FILE} to {out_dir}", err=True)
