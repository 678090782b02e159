"""DataLoader workers reading a cache: under fork after the parent has used it (open file
descriptors must not be shared) and under forkserver (the cache object is pickled)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dad.cache import open_cache
from tests.cache.helpers import make_header, write_cache


class CacheDataset(Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        s = self.cache.get(i, teachers=["beta"])
        return {"index": i, "rgb": torch.from_numpy(s.rgb_region), "depth": torch.from_numpy(s.depth_region["beta"]),
                "features": torch.from_numpy(s.features["beta"])}


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_two_workers_return_the_same_samples(tmp_path, context):
    write_cache(tmp_path / "c", "zarr", make_header())
    cache = open_cache(tmp_path / "c")
    expected = [cache.get(i, teachers=["beta"]) for i in range(len(cache))]  # the parent has open shards now
    loader = DataLoader(CacheDataset(cache), batch_size=3, num_workers=2, multiprocessing_context=context,
                        shuffle=False, persistent_workers=False)
    seen = []
    for batch in loader:
        for j, i in enumerate(batch["index"].tolist()):
            ref = expected[i]
            np.testing.assert_array_equal(batch["rgb"][j].numpy(), ref.rgb_region)
            np.testing.assert_array_equal(batch["depth"][j].numpy(), ref.depth_region["beta"])
            np.testing.assert_array_equal(batch["features"][j].numpy(), ref.features["beta"])
            seen.append(i)
    assert sorted(seen) == list(range(len(cache)))
    assert cache.get(0).key == expected[0].key  # the parent's handles still work afterwards


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_threads_share_a_cache_with_few_open_shards(tmp_path, fmt):
    from concurrent.futures import ThreadPoolExecutor

    from dad.cache.store import TeacherCache

    write_cache(tmp_path / "c", fmt, make_header(num_images=7, per_shard=1))
    cache = TeacherCache(tmp_path / "c", max_open_shards=1)  # every other read evicts a shard reader
    expected = [open_cache(tmp_path / "c").get(i) for i in range(len(cache))]
    order = [i % len(cache) for i in range(7 * len(cache))]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: cache.get(i), order))
    for i, s in zip(order, got):
        np.testing.assert_array_equal(s.depth_patches["alpha"], expected[i].depth_patches["alpha"])
        np.testing.assert_array_equal(s.rgb_region, expected[i].rgb_region)
