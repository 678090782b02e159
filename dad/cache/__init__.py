"""Teacher caches: one logical schema (``schema``), two storage formats (zarr v3, webdataset),
one reader (``open_cache``). docs/cache-format.md describes the files."""

from dad.cache.info import cache_info, format_cache_info, verify_cache
from dad.cache.schema import CacheSample, SkippedInput, TeacherInfo
from dad.cache.store import CacheConcat, CacheWriter, TeacherCache, create_cache_writer, open_cache, open_caches
from dad.cache.tar_shards import decode_webdataset_sample

__all__ = [
    "CacheConcat", "CacheSample", "CacheWriter", "SkippedInput", "TeacherCache", "TeacherInfo", "cache_info",
    "create_cache_writer", "decode_webdataset_sample", "format_cache_info", "open_cache", "open_caches", "verify_cache",
]
