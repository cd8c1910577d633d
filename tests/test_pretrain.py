"""The pretrained trunk (the course's ImageNet): it learns its labels, loads into a detector, and a grid uses it."""
import dataclasses
import functools
import json
import math

import pytest
import torch

from course_lib import data, experiments, model, presets, pretrain

SMALL = dict(image_size=64, min_size=12, max_size=40)


def test_presence_labels_name_each_class_once():
    targets = [{"labels": torch.tensor([2, 2, 3])}, {"labels": torch.tensor([], dtype=torch.long)}]
    assert pretrain._presence(targets, num_classes=4).tolist() == [[0, 1, 1], [0, 0, 0]]


def test_pretraining_starts_at_chance_and_learns_its_images():
    images = data.ShapesDataset(32, seed=5, **SMALL)
    config = presets.quick_config()
    _, first = pretrain.pretrain_trunk(config, images, steps=1, progress=False)
    assert abs(first["final_loss"] - math.log(2)) < 0.1      # a fresh head: every class at p ~ 1/2
    trunk, report = pretrain.pretrain_trunk(config, images, steps=80, val_dataset=images, progress=False)
    assert report["final_loss"] < 0.35 and report["val_accuracy"] > report["majority"] + 0.1
    assert report["device"] == "cpu" and all(v.device.type == "cpu" for v in trunk.values())
    assert set(trunk) >= {"stem.0.weight", "stages.3.0.conv1.weight"}  # all four stages, up to C5


def test_load_trunk_copies_the_stages_a_detector_has_and_refuses_another_width():
    config = presets.quick_config(stride=16)
    trunk = {k: torch.randn_like(v.float()).to(v.dtype)
             for k, v in pretrain._Classifier(config).trunk.state_dict().items()}
    net = model.MaskRCNN(config)
    pretrain.load_trunk(net, trunk)
    own = net.backbone.state_dict()
    assert "stages.3.0.conv1.weight" in trunk and "stages.3.0.conv1.weight" not in own  # C5 is left out
    assert all(torch.equal(v, trunk[k]) for k, v in own.items())
    wider = model.MaskRCNN(dataclasses.replace(config, width=config.width * 2))
    with pytest.raises(ValueError, match="does not fit this backbone"):
        pretrain.load_trunk(wider, trunk)


def test_a_grid_starts_every_run_from_one_cached_trunk(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "PRETRAINED_DIR", tmp_path / "pretrained")
    settings = dataclasses.replace(experiments.Settings.quick(), pretrain_steps=2)
    calls, starts = [], []
    real_pretrain, real_fit = pretrain.pretrain_trunk, experiments.train.fit

    def counted_pretrain(*args, **kwargs):
        calls.append(1)
        return real_pretrain(*args, **kwargs)

    def fit_noting_the_start(net, *args, **kwargs):
        starts.append({k: v.clone() for k, v in net.backbone.state_dict().items()})
        return real_fit(net, *args, **kwargs)

    monkeypatch.setattr(pretrain, "pretrain_trunk", counted_pretrain)
    monkeypatch.setattr(experiments.train, "fit", fit_noting_the_start)
    trunk, _ = experiments.pretrained_trunk(settings)
    out = tmp_path / "results.json"
    records = experiments.run_grid({"align": {}}, out, seeds=(0, 1), settings=settings, progress=False,
                                   plateau_seeds=())
    assert len(calls) == 1 and [r["status"] for r in records] == ["ok", "ok"]   # trained once, then read
    assert len(starts) == 2 and all(torch.equal(v, trunk[k]) for start in starts for k, v in start.items())
    saved = json.loads(out.read_text())
    assert saved["pretrain"]["steps"] == 2 and saved["settings"]["pretrain_steps"] == 2
    # every record names the trunk it started from; one changed weight is another trunk
    assert {r["trunk"] for r in saved["runs"]} == {saved["pretrain"]["trunk"]} == {pretrain.fingerprint(trunk)}
    nudged = {k: v.clone() for k, v in trunk.items()}
    nudged["stem.0.weight"].view(-1)[0] += 1e-6
    assert pretrain.fingerprint(nudged) != pretrain.fingerprint(trunk)


def test_a_file_written_before_pretraining_existed_keeps_its_settings(monkeypatch):
    stored = json.loads(json.dumps(dataclasses.asdict(experiments.Settings(pretrain_steps=0))))
    del stored["pretrain_steps"]
    assert experiments.same_settings(stored, experiments.Settings(pretrain_steps=0))
    assert experiments.Settings().pretrain_steps > 0   # today's grid starts pretrained: the old file is not today's
    assert not experiments.same_settings(stored, experiments.Settings())
    # its runs started from scratch, whatever the default becomes; a field nobody added is not guessed
    monkeypatch.setattr(experiments, "Settings", functools.partial(experiments.Settings, pretrain_steps=100))
    assert experiments.same_settings(stored, experiments.Settings(pretrain_steps=0))
    del stored["num_val"]
    assert not experiments.same_settings(stored, experiments.Settings(pretrain_steps=0))
