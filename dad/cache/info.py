"""`dad cache-info` and `dad cache-verify`: what a cache holds and costs; is every shard intact."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dad.cache.layout import (
    MANIFEST,
    SHARDS,
    combined_checksum,
    leftover_temps,
    read_manifest,
    read_record,
    record_content_sha256,
    record_path,
    recorded_shards,
    sha256_file,
    shard_name,
)
from dad.cache.store import KINDS, TeacherCache
from dad.errors import CacheError
from dad.utils.parallel import ordered_map, usable_cpus
from dad.utils.progress import Progress, format_bytes


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """Counts, teachers, configuration, sizes (total, per sample, per depth pixel, per feature
    value, per RGB pixel), skipped inputs and completeness of the cache at ``path``."""
    root = Path(path)
    manifest = read_manifest(root)
    header = manifest["header"]
    num_shards = int(header["num_shards"])
    done = recorded_shards(root, num_shards)
    records = [read_record(root, k) for k in done]
    samples = sum(r["num_samples"] for r in records)
    by_kind = {k: sum(r["bytes_by_kind"].get(k, 0) for r in records) for k in KINDS}
    total = sum(r["bytes"] for r in records)
    depth_pixels = sum(r["depth_pixels"] for r in records)
    feature_values = sum(r["feature_values"] for r in records)
    rgb_pixels = sum(r["rgb_pixels"] for r in records)
    return {
        "path": str(root), "format": manifest["format"], "format_version": manifest["format_version"],
        "complete": len(done) == num_shards, "finalized": bool(manifest.get("complete")),
        "shards_complete": len(done), "shards_total": num_shards,
        "missing_shards": sorted(set(range(num_shards)) - set(done)),
        "images_total": int(header["num_images"]), "images_cached": sum(r["num_images"] for r in records),
        "samples": samples, "regions_per_image": header["regions_per_image"],
        "skipped": [s for r in records for s in r["skipped"]],
        "notes": summed_notes(records),
        "teachers": header["teachers"], "config": header.get("config", {}),
        "sizes": {k: header.get(k) for k in ("global_crop_size", "local_crop_size", "num_patches", "features",
                                             "feature_dim", "rgb_codec", "images_per_shard")},
        "patch_rgb": bool(header.get("patch_rgb", True)),
        "encoding": manifest.get("encoding", {}),
        "bytes_total": total, "bytes_by_kind": by_kind,
        "bytes_per_sample": _ratio(total, samples),
        "depth_bytes_per_pixel": _ratio(by_kind["depth"], depth_pixels),
        "feature_bytes_per_value": _ratio(by_kind["features"], feature_values),
        "rgb_bytes_per_pixel": _ratio(by_kind["rgb"], rgb_pixels),
        "temporary_files": [p.name for p in leftover_temps(root)],
    }


NOTE_MEANINGS = {"upscaled": "smaller than --local-crop-size: upscaled first",
                 "whole_short_side": "short side below --min-region: the whole short side is the region",
                 "patch_gaps": "the patch grid leaves gaps in the region (region > patches x --local-crop-size)"}


def summed_notes(records: list[dict[str, Any]]) -> dict[str, int]:
    """Samples per kind of note (records of older caches have no counts)."""
    out: dict[str, int] = {}
    for r in records:
        for kind, n in (r.get("note_counts") or {}).items():
            out[kind] = out.get(kind, 0) + int(n)
    return dict(sorted(out.items()))


def describe_notes(notes: dict[str, int]) -> str:
    return "; ".join(f"{n} {kind} ({NOTE_MEANINGS.get(kind, 'see the samples')})" for kind, n in notes.items())


def format_cache_info(info: dict[str, Any]) -> str:
    def num(x: float | None, fmt: str = "{:.3f}") -> str:
        return "-" if x is None else fmt.format(x)

    missing = info["missing_shards"]
    state = "yes" if info["complete"] else (
        f"NO, missing shards {', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}")
    sizes = info["sizes"]
    kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in info["bytes_by_kind"].items())
    lines = [
        f"cache      {info['path']} ({info['format']}, format v{info['format_version']})",
        f"complete   {info['shards_complete']}/{info['shards_total']} shards: {state}",
        f"images     {info['images_total']} listed, {info['images_cached']} cached, {len(info['skipped'])} skipped; "
        f"{info['samples']} samples ({info['regions_per_image']} region(s) per image)",
        "teachers   " + "; ".join(f"{t['name']} ({t['arch'].get('name') or 'embed ' + str(t['arch'].get('embed_dim'))}, "
                                  f"sha256 {t['sha256'][:12]}, {t['checkpoint']})" for t in info["teachers"]),
        f"views      region {sizes['global_crop_size']} px, {sizes['num_patches']} patches of {sizes['local_crop_size']} px, "
        f"rgb {sizes['rgb_codec']}{'' if info['patch_rgb'] else ' (region views only: --no-patch-rgb)'}, "
        f"features {'D=' + str(sizes['feature_dim']) if sizes['features'] else 'none'}",
        f"size       {format_bytes(info['bytes_total'])} ({kinds}); {num(info['bytes_per_sample'], '{:.0f}')} B/sample",
        f"per value  depth {num(info['depth_bytes_per_pixel'])} B/pixel, features {num(info['feature_bytes_per_value'])} B/value, "
        f"rgb {num(info['rgb_bytes_per_pixel'])} B/pixel",
        "config     " + ", ".join(f"{k}={v}" for k, v in sorted(info["config"].items())),
    ]
    if info["notes"]:
        lines.append(f"notes      samples: {describe_notes(info['notes'])}")
    if info["temporary_files"]:
        lines.append(f"temporary  {len(info['temporary_files'])} unfinished payload(s) in shards/ (a running or killed job)")
    for s in info["skipped"]:
        lines.append(f"skipped    {s['reason'] if s['reason'].startswith(s['key']) else s['key'] + ': ' + s['reason']}")
    return "\n".join(lines)


def _check_record(shard: int, record: dict[str, Any]) -> str | None:
    """None when the record is as written (its content_sha256; records of older caches have none)."""
    if "content_sha256" in record and record_content_sha256(record) != record["content_sha256"]:
        return (f"shard {shard_name(shard)}: its record (shards/{shard_name(shard)}.json) was changed after it was "
                f"written; delete it and shards/{record.get('path')}, then re-run `dad cache-teachers`")
    return None


def _check_files(root: Path, shard: int, record: dict[str, Any]) -> str | None:
    """None when every payload file of the shard has its recorded size and sha256."""
    label = f"shard {shard_name(shard)} (shards/{record.get('path')})"
    fix = f"delete shards/{shard_name(shard)}.json and shards/{record.get('path')}, then re-run `dad cache-teachers` to rewrite it"
    files = record.get("files") or {}
    if combined_checksum(files) != record.get("sha256"):
        return f"{label}: the record's file list does not match its checksum; {fix}"
    for rel in sorted(files):
        p = root / SHARDS / rel
        try:
            size, sha = sha256_file(p)
        except FileNotFoundError:
            return f"{label}: file {rel} is missing; {fix}"
        if size != files[rel]["bytes"] or sha != files[rel]["sha256"]:
            return f"{label}: file {rel} fails its checksum ({size} bytes, sha256 {sha[:12]}, recorded {files[rel]['bytes']} bytes, {files[rel]['sha256'][:12]}); {fix}"
    return None


def _check_sample(cache: TeacherCache, index: int, key: str) -> None:
    s = cache.get(index)
    geo = cache.geometry
    if s.key != key:
        raise CacheError(f"holds {s.key!r} where the record says {key!r}")
    size, psize, p = geo.region_size, geo.patch_size, geo.num_patches
    patches_shape = None if s.rgb_patches is None else s.rgb_patches.shape
    if s.rgb_region.shape != (size, size, 3) or patches_shape != ((p, psize, psize, 3) if geo.patch_rgb else None):
        raise CacheError(f"RGB shapes {s.rgb_region.shape} / {patches_shape} do not match the header")
    for t in geo.teachers:
        for what, arr in (("region", s.depth_region[t]), ("patches", s.depth_patches[t])):
            if not np.isfinite(arr).all():
                raise CacheError(f"teacher {t} {what} depth decodes to non-finite values")
        if geo.features and s.features[t].shape != geo.feature_shape:
            raise CacheError(f"teacher {t} features are {s.features[t].shape}, expected {geo.feature_shape}")
        if geo.features and not np.isfinite(s.features[t]).all():
            raise CacheError(f"teacher {t} features decode to non-finite values")


def verify_cache(path: str | os.PathLike, show_progress: bool = True, workers: int | None = None) -> list[str]:
    """Re-check every complete shard's files against their recorded sha256 and decode every
    sample; returns one line per problem, each naming its shard ([] when the cache is intact
    and complete), in shard order. ``workers`` threads check shards side by side (default: the
    CPUs, at most 16; hashing and decoding release the GIL)."""
    root = Path(path)
    manifest = read_manifest(root)
    problems: list[str] = []
    num_shards = int(manifest["header"]["num_shards"])
    done = recorded_shards(root, num_shards)
    if len(done) < num_shards:
        missing = sorted(set(range(num_shards)) - set(done))
        names = ", ".join(shard_name(k) for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
        problems.append(f"{root}: incomplete, {len(done)}/{num_shards} shards (missing {names}); "
                        "re-run `dad cache-teachers` with the same options to finish it (a split run: every "
                        "--shard-index / array task of it)")
    finalized = {int(s["shard"]): s for s in manifest.get("shards", [])} if manifest.get("complete") else {}
    cache = TeacherCache(root)  # reads what is complete now
    if finalized:
        import hashlib

        for k in done:
            raw = record_path(root, k).read_bytes()
            if k not in finalized or hashlib.sha256(raw).hexdigest() != finalized[k]["record_sha256"]:
                problems.append(f"shard {shard_name(k)}: its record differs from the one in {MANIFEST}; "
                                f"delete shards/{shard_name(k)}.json and its payload, then re-run `dad cache-teachers`")
    def check_shard(k: int) -> tuple[int, list[str]]:
        """(samples checked, problems) of shard k."""
        try:
            record = read_record(root, k)
        except CacheError as e:
            return 0, [f"shard {shard_name(k)}: {e}"]
        bad = _check_record(k, record) or _check_files(root, k, record)
        if bad:
            return 0, [bad]
        first = cache.first_index(k)
        for j, key in enumerate(record["keys"]):
            try:
                _check_sample(cache, first + j, key)
            except Exception as e:  # noqa: BLE001 - any failure to decode is a bad shard
                return j, [f"shard {shard_name(k)} (shards/{record['path']}): sample {key!r} does not decode ({e}); "
                           f"delete shards/{shard_name(k)}.json and shards/{record['path']}, then re-run `dad cache-teachers`"]
        return len(record["keys"]), []

    n_workers = min(16, usable_cpus()) if workers is None else max(1, int(workers))
    bar = Progress(len(cache), desc="cache-verify", unit="sample", enabled=show_progress)
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="dad-verify") if n_workers > 1 else None
    try:
        for checked, found in ordered_map(check_shard, cache.complete_shards, pool, lookahead=2 * n_workers):
            problems += found
            bar.update(checked)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        cache.close()
    return problems
