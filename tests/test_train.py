"""fit: the learning-rate schedule, the data order, and a resume that is bit-identical."""
import math

import pytest
import torch

from course_lib import checkpoints, data, model, presets, train
from course_lib.config import TrainConfig

TINY = presets.quick_config(width=8, representation_size=32, mask_conv_channels=8, mask_num_convs=1,
                            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50)


def test_lr_factor_warmup_then_cosine():
    assert train.lr_factor(0, 100, 10) == pytest.approx(0.001)
    assert train.lr_factor(5, 100, 10) == pytest.approx(0.001 + 0.999 * 0.5)
    assert train.lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert train.lr_factor(55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert train.lr_factor(100, 100, 10) == pytest.approx(0.0)
    assert train.lr_factor(0, 100, 10, "onecycle") == pytest.approx(1 / 25)
    assert train.lr_factor(70, 100, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule='step'"):
        train.lr_factor(0, 10, 1, "step")


def test_batch_indices_are_a_pure_permutation_per_epoch():
    epoch0 = [i for step in range(5) for i in train.batch_indices(step, 10, 2, seed=3)]
    assert sorted(epoch0) == list(range(10))
    assert train.batch_indices(7, 10, 2, seed=3) == train.batch_indices(7, 10, 2, seed=3)
    assert train.batch_indices(5, 10, 2, seed=3) != train.batch_indices(0, 10, 2, seed=3) or \
        train.batch_indices(6, 10, 2, seed=3) != train.batch_indices(1, 10, 2, seed=3)
    with pytest.raises(ValueError, match="batch_size=20"):
        train.batch_indices(0, 10, 20, seed=0)


def _run(tmp_path, stop_at=None, resume=False, fresh_seed=0):
    torch.manual_seed(fresh_seed)  # a resumed run must not depend on the fresh model's init
    net = model.MaskRCNN(TINY)
    ds = data.ShapesDataset(6, image_size=64, seed=2)
    config = TrainConfig(steps=4, batch_size=2, lr=0.01, warmup_steps=2, schedule="cosine")
    history = train.fit(net, ds, config, out=tmp_path, resume=resume, progress=False, stop_at=stop_at)
    return net, history


def test_resume_is_bit_identical(tmp_path):
    straight, history = _run(tmp_path / "a")
    _run(tmp_path / "b", stop_at=2)
    resumed, resumed_history = _run(tmp_path / "b", resume=True, fresh_seed=123)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    assert [h["loss"] for h in history["train"]] == [h["loss"] for h in resumed_history["train"]]
    assert [h["step"] for h in resumed_history["train"]] == [1, 2, 3, 4]
    assert (history["resumed_from"], resumed_history["resumed_from"]) == (0, 2)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["last.pt", "metrics.jsonl"]  # no temp file left


def test_checkpoint_roundtrip_restores_rng(tmp_path):
    net = model.FasterRCNN(TINY)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(7)
    checkpoints.save_checkpoint(tmp_path / "c.pt", net, opt, sched, 3, {"train": [], "eval": []})
    expected = torch.rand(3)
    state = checkpoints.load_checkpoint(tmp_path / "c.pt", model.FasterRCNN(TINY), opt, sched)
    assert state["step"] == 3 and torch.equal(torch.rand(3), expected)
