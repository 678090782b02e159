"""Training configuration and the step-seeded data path (no cache needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dad.cache.schema import CacheSample
from dad.errors import ConfigError, DataError
from dad.train.config import build_config, parse_teacher_probs, read_config_file
from dad.train.data import StepSampler, augment_sample, student_input, teacher_for_step


def _base(**kw):
    return {"cache": ["c"], "output_dir": "o", "student_arch": "vits", **kw}


def test_defaults_follow_the_seed_guide():
    cfg = build_config({}, _base())
    assert (cfg.batch_size, cfg.lr, cfg.num_iterations, cfg.normalization, cfg.num_segments) == (4, 5e-5, 20000, "hybrid", 4)
    assert (cfg.lambda_lg, cfg.lambda_feat, cfg.lambda_grad, cfg.encoder_lr_mult) == (0.5, 1.0, 2.0, 0.1)
    assert (cfg.checkpoint_interval, cfg.log_interval, cfg.weight_decay, cfg.max_grad_norm) == (1000, 50, 0.01, 1.0)


@pytest.mark.parametrize("kw,flag", [({"num_segments": 3}, "--num-segments"), ({"batch_size": 0}, "--batch-size"),
                                     ({"normalization": "median"}, "--normalization"), ({"lr": -1.0}, "--lr"),
                                     ({"student_arch": ""}, "--student-arch"), ({"init_encoder_only": True}, "--init-encoder-only")])
def test_invalid_values_name_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        build_config({}, _base(**kw))


def test_compile_modes_and_what_they_exclude():
    assert build_config({}, _base(compile=True, compile_mode="reduce-overhead")).compile_mode == "reduce-overhead"
    assert build_config({}, _base(compile=True, grad_accum=2)).grad_accum == 2  # no CUDA graphs: accumulates
    with pytest.raises(ConfigError, match="^--compile-mode: must be one of default, reduce-overhead, "):
        build_config({}, _base(compile=True, compile_mode="fast"))
    with pytest.raises(ConfigError, match="^--compile-mode: reduce-overhead is a mode of --compile: add --compile$"):
        build_config({}, _base(compile_mode="reduce-overhead"))
    # CUDA graphs overwrite one micro-batch's gradients with the next one's: refused, with the ways out
    with pytest.raises(ConfigError, match=r"--grad-accum 2\): use --compile-mode default or --grad-accum 1"):
        build_config({}, _base(compile=True, compile_mode="reduce-overhead", grad_accum=2))
    with pytest.raises(ConfigError, match="use --compile-mode max-autotune-no-cudagraphs or --grad-accum 1"):
        build_config({}, _base(compile=True, compile_mode="max-autotune", grad_accum=4))


def test_cuda_graph_modes_are_for_one_process(monkeypatch):
    from dad.train.loop import check_compile_mode, train

    graphs = build_config({}, _base(compile=True, compile_mode="reduce-overhead"))
    check_compile_mode(graphs, world_size=1)
    for fine in (build_config({}, _base(compile=True)), build_config({}, _base())):
        check_compile_mode(fine, world_size=8)
    with pytest.raises(ConfigError, match=r"^--compile-mode reduce-overhead: .* not for the 8 ranks of a DDP run .*"
                                          r"use --compile-mode default under torchrun$"):
        check_compile_mode(graphs, world_size=8)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before any process group is made
    with pytest.raises(ConfigError, match="not for the 2 ranks of a DDP run"):
        train(graphs)


@pytest.mark.parametrize("kw", [{"flip_prob": 2.0}, {"color_jitter": 1.0}, {"feature_alpha": 1.5}, {"max_nonfinite_steps": 0}])
def test_invalid_file_only_values_name_the_files_key(kw):
    (key,) = kw
    with pytest.raises(ConfigError, match=f"^--config: {key}: "):  # no flag of that name exists to point at
        build_config(kw, _base())


def test_the_file_only_options_are_those_without_a_flag():
    import dataclasses

    from dad.cli import main
    from dad.train.config import CONFIG_FILE_ONLY, TrainConfig

    flags = {p.name for p in main.commands["train"].params}
    assert sorted(CONFIG_FILE_ONLY) == sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name not in flags)


def test_config_file_then_flags_override(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nbatch-size = 8\nlr = 1e-4\nteacher_probs = "a=0.7,b=0.3"\ncache = "x"\n')
    yaml = tmp_path / "run.yaml"
    yaml.write_text("batch_size: 8\nlr: 0.0001\n")
    for path in (toml, yaml):
        cfg = build_config(read_config_file(path), {"output_dir": "o", "student_arch": "vits", "lr": 3e-4, "cache": ["c"]})
        assert cfg.batch_size == 8 and cfg.lr == 3e-4 and cfg.cache == ["c"]
    assert build_config(read_config_file(toml), {"output_dir": "o", "student_arch": "vits"}).teacher_probs == {"a": 0.7, "b": 0.3}
    bad = tmp_path / "bad.toml"
    bad.write_text("bogus_option = 1\n")
    with pytest.raises(ConfigError, match="unknown option 'bogus_option'"):
        build_config(read_config_file(bad), _base())
    bad.write_text("batch_sise = 2\n")
    with pytest.raises(ConfigError, match="unknown option 'batch_sise' \\(did you mean 'batch_size'\\?\\)"):
        build_config(read_config_file(bad), _base())
    bad.write_text('num_iterations = "four"\n')  # a one-line error naming the key, not a TypeError deep inside
    with pytest.raises(ConfigError, match="--config: num_iterations = 'four' is not an int"):
        build_config(read_config_file(bad), _base())
    bad.write_text("compile = 1\nlr = 1\n")
    with pytest.raises(ConfigError, match="compile = 1 is not a bool"):
        build_config(read_config_file(bad), _base())
    bad.write_text("lr = 1\nnum_epochs = 3\nval = \"nyuv2:/d\"\n")  # ints are floats; optional and list values
    assert build_config(read_config_file(bad), _base()).lr == 1


def test_teacher_probs_parsing_and_draws():
    assert parse_teacher_probs("large=0.7, base=0.3") == {"large": 0.7, "base": 0.3}
    with pytest.raises(ConfigError, match="--teacher-probs"):
        parse_teacher_probs("large:0.7")
    draws = [teacher_for_step(0, s, ["large", "base"], {"large": 0.7, "base": 0.3}) for s in range(4000)]
    frac = draws.count("large") / len(draws)
    assert 0.67 < frac < 0.73
    assert draws == [teacher_for_step(0, s, ["large", "base"], {"large": 0.7, "base": 0.3}) for s in range(4000)]
    assert {teacher_for_step(0, s, ["a", "b"], {"a": 1.0}) for s in range(100)} == {"a"}
    with pytest.raises(ConfigError, match="teacher-probs"):
        teacher_for_step(0, 0, ["a"], {"z": 1.0})
    from dad.train.data import StepSampler, describe_probabilities

    with pytest.raises(ConfigError, match=r"no teacher large, base in the cache \(it has a, b\); .*--teacher-probs a=0.7,b=0.3"):
        StepSampler(8, 2, 1, ["a", "b"], {"large": 0.7, "base": 0.3}, 0)  # refused at start, not at the first draw
    assert describe_probabilities(StepSampler(8, 2, 1, ["a", "b"], {"a": 3.0}, 0).probabilities) == "a 1.00, b 0.00"


def test_sampler_is_disjoint_across_ranks_and_resumable():
    kw = dict(num_samples=37, batch_size=4, grad_accum=2, teachers=["a", "b"], teacher_probs={}, seed=3, total_steps=9)
    r0 = list(StepSampler(rank=0, world_size=2, **kw))
    r1 = list(StepSampler(rank=1, world_size=2, **kw))
    for p0, p1 in zip(r0, r1):
        assert not set(p0.indices) & set(p1.indices)
        assert p0.teacher == p1.teacher and p0.step == p1.step
    assert len(r0) == 9 * 2
    # an epoch (2 steps of 2 micro-batches of 4 on 18 samples per rank) never repeats a sample
    epoch = [i for p in r0 if p.step < 2 for i in p.indices]
    assert len(epoch) == len(set(epoch)) == 16
    resumed = list(StepSampler(rank=0, world_size=2, start_step=5, **kw))
    assert resumed == [p for p in r0 if p.step >= 5]
    assert {p.rank for p in r0} == {0} and {p.rank for p in r1} == {1}


def test_ranks_augment_the_same_slot_differently():
    # the same step, micro-batch and slot on two ranks must not share their flip and jitter
    from dad.train.data import BatchPlan, make_batch

    samples = [_sample()] * 4
    jitter = {rank: make_batch(samples, BatchPlan(7, 0, (0, 1, 2, 3), "t", rank), 0, 0.5, 0.4, False)["jitter"]
              for rank in (0, 1)}
    assert not torch.equal(jitter[0], jitter[1])
    again = make_batch(samples, BatchPlan(7, 0, (0, 1, 2, 3), "t", 1), 0, 0.5, 0.4, False)["jitter"]
    assert torch.equal(again, jitter[1])


def test_sampler_reads_each_teachers_own_pool():
    """--cache A --cache B with one teacher in each: a step's samples all have its teacher."""
    pools = {"a": np.arange(0, 20), "b": np.arange(20, 31)}
    kw = dict(num_samples=31, batch_size=2, grad_accum=1, teachers=["a", "b"], teacher_probs={}, seed=5, total_steps=40, pools=pools)
    r0 = list(StepSampler(rank=0, world_size=2, **kw))
    r1 = list(StepSampler(rank=1, world_size=2, **kw))
    assert {p.teacher for p in r0} == {"a", "b"}
    for p0, p1 in zip(r0, r1):
        assert set(p0.indices) <= set(pools[p0.teacher].tolist()) and len(p0.indices) == 2
        assert p0.teacher == p1.teacher and not set(p0.indices) & set(p1.indices)
    # teacher b's first epoch on rank 0 (5 of its samples per rank: 2 batches) repeats nothing
    b_steps = [p.indices for p in r0 if p.teacher == "b"][:2]
    assert len({i for idx in b_steps for i in idx}) == 4
    resumed = list(StepSampler(rank=0, world_size=2, start_step=23, **kw))
    assert resumed == [p for p in r0 if p.step >= 23]
    # pools that hold every sample change nothing
    full = {"a": np.arange(31), "b": np.arange(31)}
    same = dict(kw, pools=full)
    assert list(StepSampler(**same)) == list(StepSampler(**dict(kw, pools=None)))
    with pytest.raises(DataError, match="teacher 'b' has 1 cached samples"):
        StepSampler(**dict(kw, pools={"a": np.arange(30), "b": np.arange(30, 31)}))
    assert len(list(StepSampler(**dict(kw, pools={"a": np.arange(31), "b": np.zeros(0)}, teacher_probs={"a": 1.0})))) == 40


def test_sampler_too_small_cache_is_an_error():
    with pytest.raises(DataError, match="--batch-size"):
        StepSampler(3, 4, 1, ["a"], {}, 0)


def _sample() -> CacheSample:
    rng = np.random.default_rng(0)
    S, L = 28, 14
    return CacheSample(
        key="k#r0", image_key="k", region_index=0, image_size=(40, 50),
        region_box=np.array([5, 2, 35, 32], np.float32), patch_boxes=np.array([[0, 0, 14, 14], [16, 16, 30, 30]], np.float32),
        rgb_region=rng.integers(0, 255, (S, S, 3), dtype=np.uint8), rgb_patches=rng.integers(0, 255, (2, L, L, 3), dtype=np.uint8),
        depth_region={"t": rng.random((S, S), dtype=np.float32)}, depth_patches={"t": rng.random((2, L, L), dtype=np.float32)},
        features={"t": rng.random((2, 2, 8)).astype(np.float16)},
    )


def test_flip_moves_inputs_targets_and_boxes_together():
    s = _sample()
    flipped = augment_sample(s, "t", np.random.default_rng(0), flip_prob=1.0, color_jitter=0.0, want_features=True)
    plain = augment_sample(s, "t", np.random.default_rng(0), flip_prob=0.0, color_jitter=0.0, want_features=True)
    assert np.allclose(flipped["rgb"].numpy(), plain["rgb"].numpy()[:, :, ::-1])
    assert np.allclose(flipped["depth_region"].numpy(), plain["depth_region"].numpy()[:, ::-1])
    assert np.allclose(flipped["depth_patches"].numpy(), plain["depth_patches"].numpy()[:, :, ::-1])
    # region side 30: a box [0, 14] mirrors to [16, 30]
    assert flipped["patch_boxes"].numpy().tolist() == [[16, 0, 30, 14], [0, 16, 14, 30]]
    f = flipped["features"].numpy().reshape(2, 2, 8)
    assert np.allclose(f, plain["features"].numpy().reshape(2, 2, 8)[:, ::-1])


def test_jitter_changes_only_the_student_input():
    s = _sample()
    a = augment_sample(s, "t", np.random.default_rng(1), flip_prob=0.0, color_jitter=0.4, want_features=False)
    b = augment_sample(s, "t", np.random.default_rng(1), flip_prob=0.0, color_jitter=0.0, want_features=False)
    assert torch.equal(a["rgb"], b["rgb"]) and a["rgb"].dtype == torch.uint8  # jittered on the device, later
    assert b["jitter"].tolist() == [1.0, 1.0, 1.0] and np.all(np.abs(a["jitter"].numpy() - 1) <= 0.4)
    xa = student_input(a["rgb"][None], a["jitter"][None])
    xb = student_input(b["rgb"][None], b["jitter"][None])
    assert not torch.allclose(xa, xb)
    assert torch.allclose(xb, student_input(b["rgb"][None], None), atol=1e-6)  # factors of 1 change nothing
    assert np.array_equal(a["depth_region"].numpy(), b["depth_region"].numpy())
    assert "features" not in a
    with pytest.raises(DataError, match="teacher 'u'"):
        augment_sample(s, "u", np.random.default_rng(1), 0.0, 0.0, False)


def test_student_input_by_hand():
    # one pixel row of 2: rgb (255, 0, 0) and (0, 0, 255); b = 0.5, c = 2, s = 0
    from dad.models import IMAGENET_MEAN, IMAGENET_STD

    rgb = torch.tensor([[[255, 0]], [[0, 0]], [[0, 255]]], dtype=torch.uint8)[None]  # (1, 3, 1, 2)
    x = student_input(rgb, torch.tensor([[0.5, 2.0, 0.0]]))
    # x * b: (.5, 0, 0), (0, 0, .5); mean 1/6; contrast 2: v -> 2 v - 1/6 -> (5/6, -1/6, -1/6), (-1/6, -1/6, 5/6);
    # saturation 0: each pixel its grey, (1/6, 1/6, 1/6) both; clip keeps it
    expected = (torch.full((1, 3, 1, 2), 1 / 6) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
