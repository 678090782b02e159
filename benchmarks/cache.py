"""Stage-1 throughput: the teacher forwards alone versus the whole `dad cache-teachers` pipeline.

    # on a GPU, the issue's setting (384 images: zarr and webdataset shards end inside the run)
    python benchmarks/cache.py --teacher-arch vitl --size 560 --images 384 --batch-size 8
    # CPU smoke run
    python benchmarks/cache.py --teacher-arch vits --size 112 --images 24 --batch-size 4
    # can this machine's CPUs feed a GPU forwarding 36 images/s (an H100 with ViT-L at batch 8)? no GPU needed
    python benchmarks/cache.py --teacher-checkpoint dad/assets/teacher_synthetic.safetensors \
        --images 256 --simulate-forward-rate 36

Side by side in one run, on the same synthetic images: images/s of the bare teacher forwards
over every view (region view + patches) of every image; images/s of the full pipeline (decode,
crop, forward, quantise, compress, write) for each format and RGB codec, over the whole run and
after the first batch (start-up excluded, what a long job sees); the ratio (goal >= 80%: I/O and
compression hidden behind compute); bytes per depth pixel and per image from `cache_info`; and
encode/decode MB/s of the codecs on the samples just cached (one process; the pipeline runs
encoders in parallel). The full codec comparison behind the choices is benchmarks/codecs.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import re
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-arch", default="vitl", help="random weights of this architecture (speed does not "
                    "depend on them; the depth's compressibility does)")
    ap.add_argument("--teacher-checkpoint", default=None, metavar="CKPT",
                    help="a trained teacher instead of --teacher-arch, for realistic depth to compress (e.g. "
                         "dad/assets/teacher_synthetic.safetensors, whose depth of these synthetic scenes is "
                         "smooth like a real teacher's)")
    ap.add_argument("--size", type=int, default=560, help="region view and patch size")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-workers", type=int, default=None, help="image processes (default: the pipeline's)")
    ap.add_argument("--variants", default="zarr/png2,webdataset/png2,zarr/png2/enc2,zarr/png2/no-patch-rgb",
                    help="FORMAT/RGB-CODEC[/no-patch-rgb][/eager][/encN] to run the pipeline with (eager: "
                         "--no-cuda-graphs; encN: N encoder threads instead of --encode-workers)")
    ap.add_argument("--encode-workers", type=int, default=None, help="encoder threads (default: the pipeline's)")
    ap.add_argument("--simulate-forward-rate", type=float, default=None, metavar="R",
                    help="no teacher compute: each forward waits as a GPU doing R images/s would (GIL released) and "
                         "returns the outputs of one real forward; measures whether this machine's CPUs keep up with R")
    args = ap.parse_args()

    import torch

    from dad.cache import cache_info
    from dad.infer import resolve_device
    from dad.models import build_depth_model, save_depth_model
    from dad.pipeline.teachers import Teacher, parse_teacher_specs

    work = Path(tempfile.mkdtemp(prefix="dad-bench-cache-"))
    images = work / "images"
    images.mkdir()
    side = int(args.size * 1.3)
    with ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn")) as pool:  # ~0.2 s an image
        list(pool.map(write_scene, [(i, side, str(images / f"img_{i:04d}.jpg")) for i in range(args.images)], chunksize=4))
    torch.manual_seed(0)
    ckpt = (Path(args.teacher_checkpoint) if args.teacher_checkpoint
            else save_depth_model(build_depth_model(args.teacher_arch), work / "teacher.safetensors"))
    device = resolve_device(args.device)

    if args.simulate_forward_rate:
        simulate_teacher(Teacher, args.simulate_forward_rate)
    variants = []
    for variant in args.variants.split(","):
        fmt, codec, *rest = variant.split("/")
        encoders = [r for r in rest if re.fullmatch(r"enc[1-9][0-9]*", r)]
        if any(r not in ("no-patch-rgb", "eager", *encoders) for r in rest) or len(encoders) > 1:
            ap.error(f"--variants {variant}: write FORMAT/CODEC, with /no-patch-rgb, /eager and/or /encN after it")
        variants.append((fmt, codec, "no-patch-rgb" not in rest, "eager" not in rest,
                         int(encoders[0][3:]) if encoders else args.encode_workers))

    # 1. forwards alone: the same number of views per image (1 region view + 4 patches), no I/O;
    # as in the pipeline, a batch's outputs come to the host while the next batch runs; with
    # CUDA graphs (the pipeline's default) and, if a variant asks for it, eager
    views = np.random.default_rng(0).integers(0, 255, (args.batch_size, args.size, args.size, 3), dtype=np.uint8)
    patches = np.random.default_rng(1).integers(0, 255, (4 * args.batch_size, args.size, args.size, 3), dtype=np.uint8)
    forward_rate = {}
    for graphs in sorted({v[3] for v in variants}, reverse=True):
        teacher = Teacher(parse_teacher_specs([f"t={ckpt}"])[0], device, cuda_graphs=graphs)
        teacher.set_projection(64, 0)
        teacher.launch_parts([views], [patches], True, residual_depth=True).arrays()  # warm-up (and the graph's capture)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        done, in_flight = 0, None
        while done < args.images:
            launched = teacher.launch_parts([views], [patches], True, residual_depth=True)  # as the pipeline
            if in_flight is not None:
                in_flight.arrays()
            in_flight, done = launched, done + args.batch_size
        in_flight.arrays()
        forward_rate[graphs] = done / (time.perf_counter() - start)
        del teacher, in_flight, launched

    del views, patches
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the pipelines below run in processes of their own

    # 2. the whole pipeline, per format and RGB codec, each in a fresh process, as a job runs:
    # nothing carries over from one variant to the next (run in one process, the later ones
    # once ran ~25% slower: the first zarr cache imported zarr, which changed how blosc was
    # locked). Start-up (teacher load, worker processes, the first CUDA kernels) is paid once
    # per job; 'steady' is the pipeline's own rate after its first batch, what a long job sees.
    rows, workers = [], None
    spawn = multiprocessing.get_context("spawn")
    for fmt, codec, patch_rgb, graphs, encode_workers in variants:
        label = (f"{fmt}, {codec}" + ("" if patch_rgb else ", no patch RGB") + ("" if graphs else ", eager")
                 + ("" if encode_workers == args.encode_workers else f", {encode_workers} encoders"))
        out = work / f"cache_{len(rows)}"
        job = dict(images=str(images), teachers=[f"t={ckpt}"], output=str(out), fmt=fmt,
                   global_crop_size=args.size, local_crop_size=args.size, min_region=args.size,
                   batch_size=args.batch_size, device=args.device, num_workers=args.num_workers,
                   encode_workers=encode_workers, rgb_codec=codec, patch_rgb=patch_rgb,
                   cuda_graphs=graphs, show_progress=False)
        result = work / f"result_{len(rows)}.pkl"
        start = time.perf_counter()
        process = spawn.Process(target=run_pipeline, args=(job, args.simulate_forward_rate, str(result)))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"benchmarks/cache.py: the pipeline {label} failed (exit {process.exitcode}; its error above)")
        whole = args.images / (time.perf_counter() - start)  # the process's start-up included, as a job's
        summary, threads = pickle.loads(result.read_bytes())
        rows.append((label, graphs, whole, summary["steady_images_per_second"] or whole, cache_info(out),
                     summary["time_split"], summary["main_process_cpu_ms_per_image"], summary["gpu_busy"],
                     summary["final_write_seconds"], threads))
        if encode_workers == args.encode_workers or workers is None:
            workers = summary["workers"]  # the defaults, which the header line names

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if args.simulate_forward_rate:
        name = f"none: forwards simulated at {args.simulate_forward_rate:g} images/s"
    encoders = "the writer thread" if workers["encode"] == 1 else f"{workers['encode']} encoder threads"
    teacher_name = args.teacher_checkpoint or f"{args.teacher_arch} (random weights)"
    print(f"teacher {teacher_name}, {args.size}px region view + 2x2 patches, batch {args.batch_size}, "
          f"{args.images} images, device {name}, {workers['prepare']} image processes, depth/features encoded by {encoders}")
    print(f"{'what':<38} {'images/s':>9} {'steady':>8} {'of forward':>11} {'B/depth px':>11} {'MB/image':>9}"
          f" {'CPU ms/img':>11} {'GPU busy':>9} {'end s':>6}   main thread: launch/teachers/input/writer")
    for graphs, rate in forward_rate.items():
        print(f"{'teacher forwards alone' + ('' if graphs else ', eager'):<38} {rate:>9.2f} {rate:>8.2f} {'100%':>11}")
    for label, graphs, whole, steady, info, split, cpu_ms, gpu_busy, final_write, _ in rows:
        per_image = info["bytes_total"] / max(1, info["samples"]) / 1e6
        bpp = info.get("depth_bytes_per_pixel") or float("nan")
        cpu = f"{cpu_ms:>11.1f}" if cpu_ms is not None else f"{'-':>11}"
        gpu = f"{100 * gpu_busy:>8.0f}%" if gpu_busy is not None else f"{'-':>9}"
        print(f"{'pipeline, ' + label:<38} {whole:>9.2f} {steady:>8.2f} {100 * steady / forward_rate[graphs]:>10.0f}% "
              f"{bpp:>11.3f} {per_image:>9.3f} {cpu} {gpu} {final_write:>6.2f}   " + "/".join(f"{100 * split[k]:.0f}%" for k in ("launch", "teachers", "input", "writer")))
    print("(images/s: the whole run, start-up included; steady: after the first batch; 'of forward' compares steady\n"
          " with the forwards alone run the same way (CUDA graphs or eager); CPU ms/img: the main process's CPU time\n"
          " per image after start-up, all its threads, teachers included; GPU busy: the share of that time the\n"
          " GPU worked on the batches (CUDA events; high with a low 'of forward': forwards slowed in the pipeline,\n"
          " low: a GPU the host left idle); end s: of the steady time, the seconds spent finishing the last\n"
          " shard after the last forwards (once per job); main thread: its time launching the teachers' forwards\n"
          " / waiting for their outputs / waiting for prepared images / waiting for the writer)")
    print("\nthe main process's CPU ms per image by thread, the whole run (start-up included):")
    for label, *_, threads in rows:
        print(f"  {label:<36} " + ", ".join(f"{name} {ms:.0f}" for name, ms in threads[:8]))
    print()
    print(codec_table(work / "cache_0"))  # the first variant's
    shutil.rmtree(work, ignore_errors=True)


class ThreadCPU:
    """CPU time of each thread of this process over a ``with`` block, from /proc (Linux; empty
    elsewhere), sampled every ``interval`` s so threads that end inside the block count up to
    their last sample. Python threads are named by their ``threading`` name (digits dropped:
    a pool's threads together), others by their kernel name (the CUDA driver's, torch's)."""

    def __init__(self, interval: float = 0.1) -> None:
        import threading

        self.interval, self._threading = interval, threading
        self._first: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()

    @staticmethod
    def _read(tid: str) -> tuple[str, float] | None:
        import os

        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            return None
        return comm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def _sample(self) -> None:
        import os
        import re

        if not os.path.isdir("/proc/self/task"):
            return
        names = {t.native_id: re.sub(r"[_-]?\d+$", "", t.name) for t in self._threading.enumerate()}
        before = not self._last  # threads there before the block count from now, later ones from 0
        for tid in os.listdir("/proc/self/task"):
            got = self._read(tid)
            if got is not None:
                self._first.setdefault(int(tid), got[1] if before else 0.0)
                self._last[int(tid)] = (names.get(int(tid), got[0]), got[1])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "ThreadCPU":
        self._sample()
        self._thread = self._threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def per_image(self, images: int) -> list[tuple[str, float]]:
        """(thread name, CPU ms per image), largest first; the sampler itself left out."""
        total: dict[str, float] = {}
        for tid, (name, seconds) in self._last.items():
            if name != "bench-sampler":
                total[name] = total.get(name, 0.0) + seconds - self._first.get(tid, 0.0)
        return sorted(((n, 1000 * s / max(1, images)) for n, s in total.items() if s > 0), key=lambda x: -x[1])


def write_scene(item: tuple[int, int, str]) -> None:
    """Synthetic photograph ``i`` of ``side`` x 4/3 ``side`` pixels, saved as a JPEG."""
    from dad.data.synthetic import render_scene

    i, side, path = item
    rgb, _ = render_scene(i, side, int(side * 4 / 3))
    Image.fromarray(rgb).save(path, quality=92)


def run_pipeline(job: dict, simulate_forward_rate: float | None, result: str) -> None:
    """One ``cache_teachers`` job in this (fresh) process; its summary and CPU time by thread
    go to the pickle file ``result``."""
    from dad.pipeline.cache_teachers import cache_teachers
    from dad.pipeline.teachers import Teacher

    if simulate_forward_rate:
        simulate_teacher(Teacher, simulate_forward_rate)
    with ThreadCPU() as threads:
        summary = cache_teachers(**job)
    Path(result).write_bytes(pickle.dumps((summary, threads.per_image(summary["num_images"]))))


def simulate_teacher(teacher_cls, rate: float) -> None:
    """Replace the teachers' forwards by what the CPU side sees of a GPU doing ``rate`` images/s:
    a device queue (a batch launched while another runs starts when that one ends), whose
    outputs the host waits for with the GIL released; they are those of one real forward per
    input shape, made during start-up. What is left to measure is the pipeline's CPU side
    against that rate."""
    real = teacher_cls.launch_parts
    made: dict = {}
    device_free_at = [0.0]

    class Simulated:
        def __init__(self, outputs, ready_at: float) -> None:
            self.outputs, self.ready_at = outputs, ready_at

        def arrays(self):
            time.sleep(max(0.0, self.ready_at - time.perf_counter()))
            return self.outputs

    def launch_parts(self, region_parts, patch_parts, features, residual_depth=False):
        key = (tuple(a.shape for a in region_parts), tuple(a.shape for a in patch_parts), features, residual_depth)
        if key not in made:
            made[key] = real(self, region_parts, patch_parts, features, residual_depth).arrays()
        start = max(time.perf_counter(), device_free_at[0])
        device_free_at[0] = start + sum(len(a) for a in region_parts) / rate
        return Simulated(made[key], device_free_at[0])

    teacher_cls.launch_parts = launch_parts  # predict and predict_parts go through it too


def codec_table(cache_dir: Path, samples: int = 8, repeat: int = 3) -> str:
    """Encode/decode MB/s (of the decoded arrays) of the codecs the cache uses, on its own
    decoded samples: the work each stage-1 encoder and each training data worker does."""
    from dad.cache import codecs, open_cache

    cache = open_cache(cache_dir)
    picked = [cache.get(i) for i in range(min(samples, len(cache)))]
    cache.close()
    rgb_codec = cache.config["rgb_codec"]
    depth = [d for s in picked for d in s.depth_region.values()]
    depth += [p for s in picked for d in s.depth_patches.values() for p in d]
    rgb = [s.rgb_region for s in picked] + [p for s in picked if s.rgb_patches is not None for p in s.rgb_patches]
    feats = [f for s in picked for f in s.features.values()]
    # stage 1 quantizes and predicts on the teacher's device: its encoder threads only compress
    residuals = {id(a): codecs.DepthResiduals(codecs.predict_depth(q), r) for a in depth for q, r in [codecs.quantize_depth(a)]}
    decode_depth = lambda a, e: codecs.decode_depth(e[0], a.shape, e[1])  # noqa: E731
    kinds = [
        ("depth (q14 planar, blosc)", depth, lambda a: codecs.encode_depth(a), decode_depth),
        ("depth, blosc of residuals", depth, lambda a: codecs.compress_depth(residuals[id(a)]), decode_depth),
        (f"rgb ({rgb_codec})", rgb, lambda a: codecs.encode_rgb(a, rgb_codec), lambda a, e: codecs.decode_rgb(e)),
        ("features (f16, shuffle+zstd)", feats, lambda a: codecs.encode_features(a), lambda a, e: codecs.decode_features(e, a.shape)),
    ]
    lines = [f"{'codec':<30} {'enc MB/s':>9} {'dec MB/s':>9} {'ratio':>7}"]
    for name, arrays, enc, dec in kinds:
        if not arrays:
            continue
        raw = sum(a.nbytes for a in arrays) * repeat / 1e6
        start = time.perf_counter()
        for _ in range(repeat):
            encoded = [enc(a) for a in arrays]
        enc_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(repeat):
            for a, e in zip(arrays, encoded):
                dec(a, e)
        dec_s = time.perf_counter() - start
        stored = sum(len(e[0]) + e[1].nbytes if isinstance(e, tuple) else len(e) for e in encoded)
        ratio = sum(a.nbytes for a in arrays) / stored
        lines.append(f"{name:<30} {raw / enc_s:>9.1f} {raw / dec_s:>9.1f} {ratio:>6.1f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
