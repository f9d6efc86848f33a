"""The `trimode` command. Each subcommand lives in its own module and is imported only when run,
so `trimode generate` never pays for importing the TVM compiler."""
from __future__ import annotations

import importlib
import re
import sys

import click

# name -> "module:function" (modules under trimode.cli)
COMMANDS = {
    "info": "info:info",
    "make-model": "make_model:make_model",
    "generate": "generate:generate",
    "serve": "serve:serve",
    "compile": "compile:compile_cmd",
    "logits": "logits:logits",
    "tune": "tune:tune",
    "bench": "bench:bench",
    "export-onnx": "export_onnx:export_onnx",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(f"trimode.cli.{module}"), attr)

    def invoke(self, ctx):
        # A model or setting the engine cannot use is the user's error: one line, no traceback.
        from trimode.model.config import ModelError

        try:
            return super().invoke(ctx)
        except ModelError as err:
            raise OneLineError(str(err)) from None


class IntList(click.ParamType):
    """`1,2,3` -> [1, 2, 3] (token ids, cache fills); at least one integer."""
    name = "INTS"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            ints = [int(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            self.fail(f"expected comma-separated integers, e.g. 1,2,3, got {value!r}", param, ctx)
        if not ints:
            self.fail("expected at least one integer", param, ctx)
        return ints


INT_LIST = IntList()


def kv_cache_options(command):
    """llama.cpp's -ctk/-ctv (--cache-type-k/v): how the K/V cache keeps a row
    (model/kv_cache.py). K and V share one type here; kv_cache_of checks they agree."""
    from trimode.model.kv_cache import KV_CACHE_TYPES

    for flags, name, part in ((("-ctv", "--cache-type-v"), "cache_type_v", "V"),
                              (("-ctk", "--cache-type-k"), "cache_type_k", "K")):
        command = click.option(*flags, name, type=click.Choice(KV_CACHE_TYPES), default="f16",
                               show_default=True,
                               help=f"{part} cache type; q8_0 (CPU): half the memory, faster "
                                    "long-context decode (K and V take the same type)")(command)
    return command


def kv_cache_of(cache_type_k: str, cache_type_v: str) -> str:
    if cache_type_k != cache_type_v:
        raise click.UsageError(f"-ctk {cache_type_k} with -ctv {cache_type_v}: K and V take the same "
                               "cache type here (f16 or q8_0 for both)")
    return cache_type_k


class LogitBias(click.ParamType):
    """llama.cpp's `-l TOKEN_ID(+/-)BIAS`, e.g. `15043+1` or `15043-inf` -> (15043, 1.0)."""
    name = "ID+BIAS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([+-].+)", str(value))
        try:
            bias = float(match.group(2)) if match else None
        except ValueError:
            bias = None
        if bias is None or bias != bias:
            self.fail(f"expected TOKEN_ID+BIAS or TOKEN_ID-BIAS, e.g. 15043+1, got {value!r}", param, ctx)
        return int(match.group(1)), max(bias, -1e30)  # -inf bans the token, as a huge negative


LOGIT_BIAS = LogitBias()


class OneLineError(click.ClickException):
    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trimode")
def cli():
    """Tri-mode diffusion language models on Apache TVM."""


def main():
    try:
        cli(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.Abort:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
