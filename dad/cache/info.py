"""`dad cache-info` and `dad cache-verify`: what a cache holds and costs; is every shard intact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dad.cache.store import TeacherCache, _read_records, _sha256_files, read_manifest
from dad.errors import CacheError
from dad.utils.progress import Progress


def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    root = Path(path)
    manifest = read_manifest(root)
    header = manifest["header"]
    records = _read_records(root)
    depth_bytes = sum(r.get("depth_bytes", 0) for r in records)
    depth_pixels = sum(r.get("depth_pixels", 0) for r in records)
    feature_bytes = sum(r.get("feature_bytes", 0) for r in records)
    feature_values = sum(r.get("feature_values", 0) for r in records)
    samples = sum(r["num_samples"] for r in records)
    return {
        "path": str(root), "format": manifest["format"], "format_version": manifest["format_version"],
        "complete": len(records) == header["num_shards"],
        "shards_complete": len(records), "shards_total": header["num_shards"],
        "images_total": header["num_images"], "samples": samples,
        "skipped": [s for r in records for s in r["skipped"]],
        "teachers": header["teachers"], "config": header.get("config", {}),
        "bytes_total": sum(r["bytes"] for r in records),
        "bytes_per_sample": sum(r["bytes"] for r in records) / samples if samples else None,
        "depth_bytes_per_pixel": depth_bytes / depth_pixels if depth_pixels else None,
        "feature_bytes_per_value": feature_bytes / feature_values if feature_values else None,
    }


def format_cache_info(info: dict[str, Any]) -> str:
    def num(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    lines = [
        f"cache      {info['path']} ({info['format']}, format v{info['format_version']})",
        f"complete   {'yes' if info['complete'] else 'NO'}: {info['shards_complete']}/{info['shards_total']} shards",
        f"images     {info['images_total']} listed, {info['samples']} samples cached, {len(info['skipped'])} skipped",
        "teachers   " + ", ".join(f"{t['name']} ({t['arch'].get('name', 'custom')}, sha256 {t['sha256'][:12]})" for t in info["teachers"]),
        f"size       {info['bytes_total'] / 1e6:.1f} MB; {num(info['bytes_per_sample'], '{:.0f}')} B/sample; "
        f"depth {num(info['depth_bytes_per_pixel'])} B/pixel; features {num(info['feature_bytes_per_value'])} B/value",
        "config     " + ", ".join(f"{k}={v}" for k, v in sorted(info["config"].items())),
    ]
    for s in info["skipped"]:
        lines.append(f"skipped    {s['key']}: {s['reason']}")
    return "\n".join(lines)


def verify_cache(path: str | os.PathLike, show_progress: bool = True) -> list[str]:
    """Every shard's checksum re-computed and every sample decoded; a list of problems, each
    naming its shard ([] when the cache is intact)."""
    root = Path(path)
    problems: list[str] = []
    cache = TeacherCache(root)
    if not cache.is_complete:
        problems.append(f"{root}: incomplete, {len(cache.records)}/{cache.config['num_shards']} shards; re-run `dad cache-teachers`")
    bar = Progress(len(cache), desc="cache-verify", unit="sample", enabled=show_progress)
    for pos, record in enumerate(cache.records):
        shard_path = root / "shards" / record["path"]
        files = [p for p in shard_path.rglob("*") if p.is_file()] if shard_path.is_dir() else [shard_path]
        if not shard_path.exists():
            problems.append(f"shard {record['path']}: missing; delete {record['path'].split('.')[0]}.json and re-run `dad cache-teachers`")
            continue
        checksum, _ = _sha256_files(files, root / "shards")
        if checksum != record["sha256"]:
            problems.append(f"shard {record['path']}: checksum mismatch; delete it and its .json record, then re-run `dad cache-teachers`")
            bar.update(record["num_samples"])
            continue
        for j in range(record["num_samples"]):
            try:
                cache.get(int(cache._starts[pos]) + j)
            except Exception as e:  # noqa: BLE001 - any decode failure is a bad shard
                problems.append(f"shard {record['path']}: sample {record['keys'][j]} does not decode ({e})")
                break
            bar.update()
    bar.close()
    return problems
