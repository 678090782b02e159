"""The `dad` command line. Each command parses its options and calls one library function;
this is the only place where library exceptions become exit codes."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from dad import __version__
from dad.errors import DadError
from dad.train.config import COMPILE_MODES


def handle_errors(fn=None, *, on_interrupt: str = ""):
    """Library errors -> one line on stderr and exit code 2 (bad input), not a traceback;
    Ctrl-C -> 'interrupted' and ``on_interrupt`` (how to go on), exit code 130. Use as
    ``@handle_errors`` or ``@handle_errors(on_interrupt=...)``."""
    if fn is None:
        return functools.partial(handle_errors, on_interrupt=on_interrupt)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DadError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the job, not one per process
                click.echo(f"interrupted{': ' + on_interrupt if on_interrupt else ''}", err=True)
            sys.exit(130)

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
@click.option("--num-workers", "--num_workers", "num_workers", default=None, type=int,
              help="Threads decoding images ahead of the model and writing outputs behind it; 0: none "
                   "(default: the CPUs, at most 8).")
@click.argument("inputs", nargs=-1, required=True)
@handle_errors
def infer(checkpoint, arch, input_size, output_dir, save, batch_size, device, precision, num_workers, inputs):
    """Depth maps for images: INPUTS are files, directories (recursive) or globs.

    Each image gives OUTPUT_DIR/NAME.npy, NAME.png, NAME_color.png. NAME is the file's stem;
    images sharing a stem keep the folders that tell them apart (as sub-folders), or their
    extension, so no output is ever written twice."""
    from dad.infer import run_inference

    result = run_inference(checkpoint, inputs, output_dir, arch=arch, input_size=input_size, save=save,
                           batch_size=batch_size, device=device, precision=precision, num_workers=num_workers)
    click.echo(f"wrote {len(result.written)} files to {output_dir}")
    if result.failed:
        click.echo(f"{len(result.failed)} input(s) failed:", err=True)
        for path, reason in result.failed:  # the reason names the file already
            click.echo(f"  {reason if str(path) in reason else f'{path}: {reason}'}", err=True)
        sys.exit(1)


@main.command()
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--arch", "--arch-name", "--arch_name", "arch", default=None,
              help="Architecture if it cannot be read or detected from SRC.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Store weights in this dtype (default: float32).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@handle_errors
def convert(src, dst, arch, dtype, overwrite):
    """Convert any accepted checkpoint format to a self-describing dad safetensors file.

    --arch is a size name (vits|vitb|vitl|vitg) or a JSON file: upstream's {"encoder": "vits",
    "features": 64, "out_channels": [48, 96, 192, 384]}, or all of dad's fields (see the dad.arch
    metadata of any dad checkpoint)."""
    from dad.models import convert_checkpoint, read_checkpoint_metadata

    path = convert_checkpoint(src, dst, arch=arch, dtype=dtype, overwrite=overwrite)
    meta = read_checkpoint_metadata(path)
    click.echo(f"wrote {path} (arch {meta['arch']['name']}, {dtype or 'float32'})")


# ---------------------------------------------------------------------------------------------
# stage 2


_CACHE_GRID = " With --cache, if given, it must be the cache's."  # the crop grid is fixed when caching


def _seed_teacher_flags(command):
    """The seed's --teacher_models A B --teacher_checkpoints X Y: answered with dad's spelling."""
    def refuse(ctx, param, value):
        if value:
            raise click.UsageError(
                f"{param.opts[0]}: dad names each teacher with one repeated option, --teacher NAME=CKPT[:ARCH], e.g. "
                "--teacher large=depth_anything_v2_vitl.pth:vitl --teacher base=depth_anything_v2_vitb.pth:vitb; "
                "teachers run once in `dad cache-teachers`, and `dad train --cache` reads their outputs", ctx)
        return None

    for name in ("--teacher_checkpoints", "--teacher_models"):
        command = click.option(name, multiple=True, hidden=True, expose_value=False, callback=refuse)(command)
    return command


def _explicit(ctx: click.Context) -> dict:
    """The options the user actually gave (so a --config file fills only the rest)."""
    from click.core import ParameterSource

    out = {}
    for name, value in ctx.params.items():
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


@main.command()
@click.option("--config", "config_file", type=click.Path(), default=None, help="TOML or YAML file with the same options; flags override it.")
@click.option("--cache", multiple=True, help="Cache made by `dad cache-teachers` (repeatable).")
@click.option("--student-arch", "--student_arch", "student_arch", help="vits|vitb|vitl|vitg, an alias, or a config JSON.")
@click.option("--student-init", "--student_init", "student_init", default=None, help="Initialise the student from this checkpoint.")
@click.option("--init-encoder-only", "--init_encoder_only", "init_encoder_only", is_flag=True, help="Take only the encoder from --student-init.")
@click.option("--output-dir", "--output_dir", "output_dir", help="Checkpoints, train.log, metrics.jsonl, config.json.")
@click.option("--batch-size", "--batch_size", "batch_size", type=int, help="Per-rank batch size [4].")
@click.option("--lr", type=float, help="Learning rate of the head [5e-5].")
@click.option("--encoder-lr-mult", "--encoder_lr_mult", "encoder_lr_mult", type=float, help="Encoder lr = lr x this [0.1].")
@click.option("--weight-decay", "--weight_decay", "weight_decay", type=float, help="AdamW weight decay [0.01].")
@click.option("--warmup-steps", "--warmup_steps", "warmup_steps", type=int, help="Linear warm-up steps [0].")
@click.option("--num-iterations", "--num_iterations", "num_iterations", type=int, help="Optimizer steps [20000].")
@click.option("--num-epochs", "--num_epochs", "num_epochs", type=int, help="Train for N passes over the cache instead.")
@click.option("--grad-accum", "--grad_accum", "grad_accum", type=int, help="Micro-batches per optimizer step [1].")
@click.option("--max-grad-norm", "--max_grad_norm", "max_grad_norm", type=float, help="Gradient clipping; 0 disables [1.0].")
@click.option("--normalization", type=click.Choice(["global", "hybrid", "local", "none"]), help="Depth normalisation [hybrid].")
@click.option("--num-segments", "--num_segments", "num_segments", type=int, help="Finest hybrid/local level, power of 2 [4].")
@click.option("--lambda-lg", "--lambda_lg", "lambda_lg", type=float, help="Local-global loss weight [0.5].")
@click.option("--lambda-feat", "--lambda_feat", "lambda_feat", type=float, help="Feature alignment weight [1.0].")
@click.option("--lambda-grad", "--lambda_grad", "lambda_grad", type=float, help="Gradient matching weight [2.0].")
@click.option("--teacher-probs", "--teacher_probs", "teacher_probs", help="NAME=P,... per-step teacher probabilities [uniform].")
@click.option("--checkpoint-interval", "--checkpoint_interval", "checkpoint_interval", type=int, help="Steps between checkpoints [1000].")
@click.option("--keep-checkpoints", "--keep_checkpoints", "keep_checkpoints", type=int,
              help="Keep only the newest N step checkpoints (a vitl one is 1.3 GB); 0 keeps all [0].")
@click.option("--log-interval", "--log_interval", "log_interval", type=int, help="Steps between log lines; the logged losses are their means over those steps [50].")
@click.option("--val", multiple=True, help="Validate on DATASET[:N] every --val-interval steps (repeatable).")
@click.option("--val-interval", "--val_interval", "val_interval", type=int, help="Steps between validations [1000].")
@click.option("--val-input-size", "--val_input_size", "val_input_size", type=int, help="Validation input size [518].")
@click.option("--num-workers", "--num_workers", "num_workers", type=int,
              help="DataLoader worker processes; with --online, processes reading the images ahead "
                   "[on GPUs: this process's CPUs - 1, 2 to 8; on CPU: 2].")
@click.option("--seed", type=int, help="Seed of init, sample order, teacher draws, augmentation [0].")
@click.option("--device", help="auto|cpu|cuda|mps [auto].")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), help="bf16 autocast on GPU [bf16].")
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the student and the losses: faster steps on a GPU after a minute or two of compiling.")
@click.option("--compile-mode", "--compile_mode", "compile_mode",
              type=click.Choice(COMPILE_MODES),
              help="torch.compile mode of --compile; reduce-overhead replays each step's kernels from CUDA graphs [default].")
@click.option("--profile-steps", "--profile_steps", "profile_steps", type=int,
              help="Trace N steps (after the first 5) with torch.profiler into OUTPUT_DIR/profile/, a Chrome/Perfetto "
                   "JSON of host ops and GPU kernels: where a step's time goes [0: off].")
@click.option("--resume", is_flag=True, help="Continue from the training state in --output-dir.")
@click.option("--online", is_flag=True, help="Baseline: run the teachers live instead of reading a cache.")
@click.option("--teacher", "teachers", multiple=True, help="--online: teacher [NAME=]CKPT (repeatable).")
@click.option("--images", help="--online: image source, as for cache-teachers.")
@click.option("--global-crop-size", "--global_crop_size", "global_crop_size", type=int, help="--online: region view size [560]." + _CACHE_GRID)
@click.option("--local-crop-size", "--local_crop_size", "local_crop_size", type=int, help="--online: patch size [560]." + _CACHE_GRID)
@click.option("--min-region", "--min_local_crop", "--min-local-crop", "min_region", type=int, help="--online: smallest region side [644]." + _CACHE_GRID)
@click.option("--regions-per-image", "--regions_per_image", "regions_per_image", type=int, help="--online: regions per image [1]." + _CACHE_GRID)
@click.option("--patches", help="--online: patch grid AxB [2x2]." + _CACHE_GRID)
@click.option("--feature-dim", "--feature_dim", "feature_dim", type=int, help="--online: reduced feature width [64]." + _CACHE_GRID)
@click.option("--grid-seed", "--grid_seed", "grid_seed", type=int, help="--online: crop grid seed [0]." + _CACHE_GRID)
@_seed_teacher_flags
@click.pass_context
@handle_errors(on_interrupt="re-run the same command with --resume to continue (from the step the log names)")
def train(ctx, config_file, **_):
    """Train a student from cached teacher targets (cross-context distillation)."""
    from dad.train.config import build_config, read_config_file
    from dad.train.loop import train as run_training

    cli_values = _explicit(ctx)
    cli_values.pop("config_file", None)
    file_values = read_config_file(config_file) if config_file else {}
    cfg = build_config(file_values, cli_values)
    run_training(cfg)  # its log's last line names the final checkpoint


# ---------------------------------------------------------------------------------------------
# data


def _size(ctx, param, value):
    try:
        h, w = (int(v) for v in value.lower().split("x"))
        return h, w
    except ValueError:
        raise click.BadParameter("write HxW, e.g. 240x320") from None


@main.command()
@click.option("--out", required=True, type=click.Path(), help="Output folder (generic eval layout).")
@click.option("--num", default=100, show_default=True, type=int, help="Number of scenes.")
@click.option("--size", default="240x320", show_default=True, callback=_size, help="HxW in pixels.")
@click.option("--seed", default=0, show_default=True, type=int, help="Scene i is rendered from (seed, i).")
@handle_errors
def synth(out, num, size, seed):
    """Render synthetic RGB-D scenes with exact depth: X.png + X_depth.png (16-bit mm)."""
    from dad.data.synthetic import write_synthetic_dataset

    paths = write_synthetic_dataset(out, num, size, seed)
    click.echo(f"wrote {len(paths)} scenes to {out}")


# ---------------------------------------------------------------------------------------------
# evaluation


@main.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="Model checkpoint (any accepted format).")
@click.option("--arch", "--arch-name", "--arch_name", "arch", default=None, help="Architecture if not in the checkpoint.")
@click.option("--dataset", "datasets", multiple=True, required=True,
              help="nyuv2:PATH, kitti:ROOT, eth3d:ROOT, scannet:ROOT, diode:ROOT, or a generic folder (repeatable).")
@click.option("--split", default=None, type=click.Path(), help="Split file (one dataset only).")
@click.option("--input-size", "--input_size", "input_size", default=518, show_default=True, type=int)
@click.option("--output", default=None, type=click.Path(), help="Write results JSON here (and a markdown table beside it).")
@click.option("--save-predictions", "save_predictions", default=None, type=click.Path(),
              help="Write each raw prediction (before alignment, at GT resolution) as DIR/<stem>.npy.")
@click.option("--device", default="auto", show_default=True)
@click.option("--limit", default=None, type=int, help="Only the first N images of each dataset.")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="fp32", show_default=True)
@click.option("--depth-range", "depth_range", nargs=2, type=float, default=None, help="MIN MAX metres for generic folders [their meta.json depth_range, else 1e-3 inf].")
@handle_errors
def evaluate(checkpoint, arch, datasets, split, input_size, output, save_predictions, device, limit, precision, depth_range):
    """Zero-shot AbsRel / delta1 with the standard affine-invariant protocol."""
    from dad.eval.evaluate import format_markdown_table, run_eval

    results = run_eval(checkpoint, list(datasets), arch=arch, split=split, input_size=input_size, output=output,
                       save_predictions=save_predictions, device=device, limit=limit, precision=precision,
                       depth_range=tuple(depth_range) if depth_range else None)
    click.echo(format_markdown_table(results))
    if output:
        click.echo(f"wrote {output}")


# ---------------------------------------------------------------------------------------------
# stage 1


def _patches(ctx, param, value):
    try:
        a, b = (int(v) for v in value.lower().split("x"))
        if a < 1 or b < 1:
            raise ValueError
        return f"{a}x{b}"
    except ValueError:
        raise click.BadParameter("write AxB, e.g. 2x2") from None


@main.command("cache-teachers")
@click.option("--images", required=True,
              help="Image folder (recursive), a text file listing paths (relative ones from the list file's own "
                   "folder), or tar shards (glob/braces).")
@click.option("--teacher", "teachers", multiple=True, required=True, help="[NAME=]CKPT[:ARCH], repeatable; ARCH only for foreign checkpoints of custom size.")
@click.option("--output", required=True, type=click.Path(), help="Cache directory (created, or resumed if it exists).")
@click.option("--format", "fmt", type=click.Choice(["zarr", "webdataset"]), default="zarr", show_default=True)
@click.option("--global-crop-size", "--global_crop_size", "global_crop_size", default=560, show_default=True, type=int,
              help="Region view size (multiple of 14).")
@click.option("--local-crop-size", "--local_crop_size", "local_crop_size", default=560, show_default=True, type=int,
              help="Patch size (multiple of 14).")
@click.option("--min-region", "--min_local_crop", "--min-local-crop", "min_region", default=644, show_default=True, type=int,
              help="Smallest region side in original pixels.")
@click.option("--regions-per-image", "--regions_per_image", "regions_per_image", default=1, show_default=True, type=int)
@click.option("--patches", default="2x2", show_default=True, callback=_patches, help="Patch grid over each region.")
@click.option("--features/--no-features", default=True, show_default=True, help="Cache reduced teacher features.")
@click.option("--feature-dim", "--feature_dim", "feature_dim", default=64, show_default=True, type=int)
@click.option("--rgb-codec", "--rgb_codec", "rgb_codec", default="png2", show_default=True,
              help="pngN: lossless PNG at zlib level N (png = png6: ~6% smaller, 3.4x the CPU); jpegQQ: lossy, e.g. jpeg95.")
@click.option("--patch-rgb/--no-patch-rgb", "patch_rgb", default=True, show_default=True,
              help="Store the patches' RGB too. Training reads only the region view's: --no-patch-rgb makes the "
                   "cache about half the size (RGB is most of it) and stage 1 encode a fifth of the views.")
@click.option("--shard-size", "--shard_size", "shard_size", default=None, type=int, help="Images per shard.")
@click.option("--num-shards", "--num_shards", "num_shards", default=None, type=int,
              help="Split the work into K parts (default: SLURM array / torchrun world size / 1).")
@click.option("--shard-index", "--shard_index", "shard_index", default=None, type=int, help="Which part this job does (0-based).")
@click.option("--batch-size", "--batch_size", "batch_size", default=4, show_default=True, type=int, help="Images per teacher batch.")
@click.option("--device", default="auto", show_default=True)
@click.option("--grid-seed", "--grid_seed", "grid_seed", default=0, show_default=True, type=int, help="Seed of the crop grid.")
@click.option("--num-workers", "--num_workers", "num_workers", default=None, type=int,
              help="Processes that read, decode, crop and RGB-encode images ahead of the teachers; 0: the main "
                   "process (default: most of the job's CPUs).")
@click.option("--encode-workers", "--encode_workers", "encode_workers", default=None, type=int,
              help="Threads that compress the teachers' depth and features behind them (their codecs release "
                   "the GIL); 1: the writer thread itself (default: 3 per teacher, at most a quarter of the "
                   "job's CPUs, at least 2).")
@click.option("--cuda-graphs/--no-cuda-graphs", "cuda_graphs", default=True, show_default=True,
              help="On CUDA, replay each teacher forward from a CUDA graph (one launch; keeps the GPU busy while the "
                   "host encodes and writes). --no-cuda-graphs: eager forwards, no memory held by the graphs.")
@_seed_teacher_flags
@handle_errors(on_interrupt="finished shards are kept, nothing half-written is visible; run the same command "
                            "again to resume")
def cache_teachers_cmd(images, teachers, output, fmt, global_crop_size, local_crop_size, min_region, regions_per_image,
                       patches, features, feature_dim, rgb_codec, patch_rgb, shard_size, num_shards, shard_index, batch_size,
                       device, grid_seed, num_workers, encode_workers, cuda_graphs):
    """Stage 1: run the teachers once over the crop grid of every image and cache their outputs."""
    from dad.pipeline.cache_teachers import cache_teachers

    summary = cache_teachers(
        images=images, teachers=list(teachers), output=output, fmt=fmt, global_crop_size=global_crop_size,
        local_crop_size=local_crop_size, min_region=min_region, regions_per_image=regions_per_image, patches=patches,
        features=features, feature_dim=feature_dim, rgb_codec=rgb_codec, patch_rgb=patch_rgb, shard_size=shard_size,
        num_shards=num_shards,
        shard_index=shard_index, batch_size=batch_size, device=device, grid_seed=grid_seed, num_workers=num_workers,
        encode_workers=encode_workers, cuda_graphs=cuda_graphs,
    )
    click.echo(json.dumps(summary, indent=2, default=str))


@main.command("cache-info")
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@handle_errors
def cache_info_cmd(cache, as_json):
    """Counts, teachers, configuration, bytes per depth pixel and per feature value, skipped inputs."""
    from dad.cache import cache_info, format_cache_info

    info = cache_info(cache)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else format_cache_info(info))


@main.command("cache-verify")
@click.argument("cache", type=click.Path())
@click.option("--workers", default=None, type=int, help="Threads checking shards side by side (default: the CPUs, at most 16).")
@handle_errors
def cache_verify_cmd(cache, workers):
    """Re-check every shard's checksum and decode every sample; non-zero exit naming each bad shard."""
    from dad.cache import verify_cache

    problems = verify_cache(cache, workers=workers)
    if problems:
        for p in problems:
            click.echo(f"bad: {p}", err=True)
        sys.exit(1)
    click.echo(f"{cache}: ok")


# ---------------------------------------------------------------------------------------------
# the whole job


@main.command()
@click.option("--workdir", default="dad-quickstart", show_default=True, type=click.Path(), help="Where everything is written.")
@click.option("--device", default="auto", show_default=True)
@click.option("--fresh", is_flag=True, help="Delete WORKDIR first.")
@handle_errors
def quickstart(workdir, device, fresh):
    """The full pipeline on synthetic scenes and the bundled teacher: report.md with numbers and figures."""
    from dad.quickstart import run_quickstart

    summary = run_quickstart(workdir, device=device, fresh=fresh)
    for name, m in summary["metrics"].items():
        click.echo(f"{name:<16} AbsRel {m['abs_rel']:.3f}  delta1 {m['delta1']:.3f}")


if __name__ == "__main__":
    main()
