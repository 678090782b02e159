"""The `dad` command line. Each command parses its options and calls one library function;
this is the only place where library exceptions become exit codes."""

from __future__ import annotations

import functools
import sys

import click

from dad import __version__
from dad.errors import DadError


def handle_errors(fn):
    """Library errors -> one line on stderr and exit code 2 (bad input), not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DadError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _csv(ctx, param, value):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dad")
def main() -> None:
    """dad: distil monocular depth estimators from cached teacher outputs (Distill-Any-Depth)."""


# ---------------------------------------------------------------------------------------------
# models


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="Model checkpoint (any accepted format).")
@click.option("--arch", "--arch-name", "--arch_name", "arch", default=None,
              help="vits|vitb|vitl|vitg, depthanything-small|base|large|giant, or a config JSON; default: from the checkpoint.")
@click.option("--input-size", "--input_size", "input_size", default=518, show_default=True, type=int)
@click.option("--output-dir", "--output_dir", "output_dir", required=True, type=click.Path())
@click.option("--save", "save", default="npy,png16,color", show_default=True, callback=_csv,
              help="Comma list of npy (float32 disparity), png16 (16-bit min-max), color.")
@click.option("--batch-size", "--batch_size", "batch_size", default=1, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda|mps")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="bf16 autocast on CUDA; CPU always runs fp32.")
@click.argument("inputs", nargs=-1, required=True)
@handle_errors
def infer(checkpoint, arch, input_size, output_dir, save, batch_size, device, precision, inputs):
    """Depth maps for images: INPUTS are files, directories (recursive) or globs."""
    from dad.infer import run_inference

    result = run_inference(checkpoint, inputs, output_dir, arch=arch, input_size=input_size, save=save,
                           batch_size=batch_size, device=device, precision=precision)
    click.echo(f"wrote {len(result.written)} files to {output_dir}")
    if result.failed:
        click.echo(f"{len(result.failed)} input(s) failed:", err=True)
        for path, reason in result.failed:
            click.echo(f"  {path}: {reason}", err=True)
        sys.exit(1)


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--arch", "--arch-name", "--arch_name", "arch", default=None,
              help="Architecture if it cannot be read or detected from SRC.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Store weights in this dtype (default: float32).")
@handle_errors
def convert(src, dst, arch, dtype):
    """Convert any accepted checkpoint format to a self-describing dad safetensors file."""
    from dad.models import convert_checkpoint, read_checkpoint_metadata

    path = convert_checkpoint(src, dst, arch=arch, dtype=dtype)
    meta = read_checkpoint_metadata(path)
    click.echo(f"wrote {path} (arch {meta['arch']['name']}, {dtype or 'float32'})")


if __name__ == "__main__":
    main()
