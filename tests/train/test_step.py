"""dad.train.loop.train_step: what one optimizer step asks of the device."""

from __future__ import annotations

import pytest
import torch

from dad.models import build_depth_model
from dad.train import normalization
from dad.train.config import TrainConfig
from dad.train.loop import DistillModule, build_optimizer, train_step
from dad.utils.profiling import OperatorCalls
from tests.conftest import TINY_JSON
from tests.train.helpers import tiny_training_batch


@pytest.mark.parametrize("stacked", [False, True], ids=["per-level (CPU)", "stacked (GPU)"])
def test_a_step_makes_the_host_wait_for_the_device_only_to_read_its_results(stacked, monkeypatch):
    # on a GPU every .item(), boolean mask, nonzero, ... drains the queue of kernels and leaves
    # the device idle while the host launches the next ones: a step, the decision to skip a
    # non-finite update included, must queue everything and wait for nothing
    monkeypatch.setattr(normalization, "STACKED", stacked)
    torch.manual_seed(0)
    module = DistillModule(build_depth_model(TINY_JSON), feature_dim=8)
    cfg = TrainConfig(student_arch=str(TINY_JSON), cache=["unused"], output_dir="unused", precision="fp32", device="cpu")
    optimizer = build_optimizer(module, cfg)
    before = [p.detach().clone() for p in module.parameters()]
    with OperatorCalls() as step:
        result = train_step(module, optimizer, [tiny_training_batch(), tiny_training_batch()], cfg, torch.device("cpu"))
    terms, applied = result.read()
    assert applied and all(v > 0 for k, v in terms.items()), terms
    assert step.host_waits == 0, step.waiting
    assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))


def test_a_nonfinite_step_leaves_weights_and_optimizer_state_as_they_were():
    torch.manual_seed(0)
    module = DistillModule(build_depth_model(TINY_JSON), feature_dim=8)
    cfg = TrainConfig(student_arch=str(TINY_JSON), cache=["unused"], output_dir="unused", precision="fp32", device="cpu")
    optimizer = build_optimizer(module, cfg)
    assert train_step(module, optimizer, [tiny_training_batch()], cfg, torch.device("cpu")).read()[1]
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    bad = tiny_training_batch()
    bad["depth_region"][0, 3, 3] = float("nan")
    with OperatorCalls() as step:
        result = train_step(module, optimizer, [bad], cfg, torch.device("cpu"))
    assert step.host_waits == 0, step.waiting  # the skip is decided on the device
    terms, applied = result.read()
    assert not applied and terms["loss_sc"] != terms["loss_sc"]  # NaN
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())
    assert all(torch.equal(v, optimizer.state[p][k]) for p in optimizer.state for k, v in state[id(p)].items())
    assert train_step(module, optimizer, [tiny_training_batch()], cfg, torch.device("cpu")).read()[1]
    assert int(next(iter(optimizer.state.values()))["step"]) == 2


def test_nonfinite_gradients_are_skipped_without_clipping_too():
    # --max-grad-norm 0: nothing is clipped, but a finite loss whose gradients overflow (a bf16
    # backward, say) must still not reach the weights
    torch.manual_seed(0)
    module = DistillModule(build_depth_model(TINY_JSON), feature_dim=8)
    cfg = TrainConfig(student_arch=str(TINY_JSON), cache=["unused"], output_dir="unused", precision="fp32", device="cpu",
                      max_grad_norm=0.0)
    optimizer = build_optimizer(module, cfg)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    hook = module.student.depth_head.scratch.output_conv2[0].weight.register_hook(lambda g: g * float("inf"))
    terms, applied = train_step(module, optimizer, [tiny_training_batch()], cfg, torch.device("cpu")).read()
    assert all(v == v and abs(v) != float("inf") for v in terms.values()) and not applied
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())
    hook.remove()
    assert train_step(module, optimizer, [tiny_training_batch()], cfg, torch.device("cpu")).read()[1]


def test_student_init_reads_any_file_as_the_student_and_encoder_only_leaves_the_head(tmp_path):
    import json

    from dad.errors import ConfigError
    from dad.models import load_depth_model
    from dad.train.loop import _init_student
    from tests.conftest import TINY_SAFETENSORS

    ref = load_depth_model(TINY_SAFETENSORS, arch=TINY_JSON).state_dict()
    foreign = tmp_path / "custom_size.pth"  # upstream layout, a size no name or metadata tells
    torch.save(ref, foreign)
    base = dict(cache=["unused"], output_dir="unused", student_init=str(foreign))
    student = _init_student(TrainConfig(student_arch=str(TINY_JSON), **base)).state_dict()
    assert all(torch.equal(student[k], v) for k, v in ref.items())
    narrow = tmp_path / "narrow_head.json"
    narrow.write_text(json.dumps({**json.loads(TINY_JSON.read_text()), "features": 8}))
    student = _init_student(TrainConfig(student_arch=str(narrow), init_encoder_only=True, **base)).state_dict()
    assert all(torch.equal(student[k], v) for k, v in ref.items() if k.startswith("pretrained."))
    assert student["depth_head.scratch.output_conv1.weight"].shape != ref["depth_head.scratch.output_conv1.weight"].shape
    with pytest.raises(ConfigError, match="--student-init does not fit --student-arch .*add --init-encoder-only"):
        _init_student(TrainConfig(student_arch=str(narrow), **base))
    with pytest.raises(ConfigError, match="its encoder does not fit --student-arch vits"):
        _init_student(TrainConfig(student_arch="vits", init_encoder_only=True, **base))


def _check_in_rank(rank: int, init_file: str, perturb, results) -> None:
    import torch.distributed as dist

    from dad.errors import DadError
    from dad.train.loop import check_ranks_agree

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        with torch.no_grad():
            if perturb == "nan":  # every rank broken alike: not a disagreement
                model.weight[0, 0] = float("nan")
            elif perturb and rank == 1:
                model.weight[0, 0] += 1e-3
        try:
            check_ranks_agree(model, step=7)
            results.put((rank, "agree"))
        except DadError as e:
            results.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("perturb", [False, True, "nan"])
def test_ranks_whose_weights_drifted_apart_are_caught(tmp_path, perturb):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_check_in_rank, args=(r, str(tmp_path / "init"), perturb, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    if perturb is True:
        assert all("step 7: the ranks' weights differ" in got[r] for r in (0, 1)), got
    else:
        assert got == {0: "agree", 1: "agree"}
