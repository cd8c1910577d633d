"""Checkpoints that cannot run code: a crafted, truncated or foreign file is refused by name at every
entry point (the library, ``fit``, the command line) and nothing in it runs; a saved model rebuilds
exactly from its file alone. (Kill-and-resume bit-identity: tests/test_train.py, tests/test_train_cli.py.)"""
import os
import pathlib

import numpy as np
import pytest
import torch

from course_lib import checkpoints, data, model, presets, train, train_cli
from course_lib.config import TrainConfig, TransfinerConfig

TINY = presets.quick_config(width=8, representation_size=32, mask_conv_channels=8, mask_num_convs=1,
                            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                            rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)


class WritesAFile:
    """Unpickling this object calls ``pathlib.Path.write_text(target, "pwned")``: code run by loading."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.write_text, (self.target, "pwned")


class RunsAShellCommand:
    """Unpickling this object calls ``os.system("touch target")``."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch '{self.target}'",)


PAYLOADS = [WritesAFile, RunsAShellCommand]


def crafted(path, payload, target):
    """A file that looks like a course checkpoint (format, step, model) but carries ``payload``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": checkpoints.FORMAT, "model_config": None, "model": {}, "step": 1,
                "history": {"train": [], "eval": []}, "hook": payload(target)}, path)
    return path


def real_checkpoint(path):
    net = model.FasterRCNN(TINY)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoints.save_checkpoint(path, net, optimizer, scheduler, 2, {"train": [], "eval": []})
    return path


def truncated(path):
    whole = real_checkpoint(path).read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return path


def random_bytes(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def empty(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


BROKEN = {"truncated": truncated, "random bytes": random_bytes, "empty": empty}


def assert_one_clear_line(error, path):
    message = str(error)
    assert str(path) in message and "\n" not in message and "\x1b" not in message, message


def cli_resume(out):
    return train_cli.main(["--config", "quick", "--out", str(out), "--steps", "2", "--no-progress", "--resume"])


def fit_resume(out):
    dataset = data.ShapesDataset(4, image_size=64, seed=0)
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1)
    return train.fit(model.MaskRCNN(TINY), dataset, config, out=out, resume=True, progress=False)


# ---- a crafted pickle: refused before any of its code runs ----------------------------------------

@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_bait_is_real(tmp_path, payload):
    """Without ``weights_only`` the crafted file does run its code, so the tests below prove something."""
    path = crafted(tmp_path / "evil.pt", payload, tmp_path / "pwned")
    torch.load(path, weights_only=False)
    assert (tmp_path / "pwned").exists()


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("load", [checkpoints.read_checkpoint, checkpoints.load_model,
                                  lambda p: checkpoints.load_checkpoint(p, model.FasterRCNN(TINY))],
                         ids=["read_checkpoint", "load_model", "load_checkpoint"])
def test_crafted_checkpoint_is_refused_by_the_library(tmp_path, payload, load):
    path = crafted(tmp_path / "evil.pt", payload, tmp_path / "pwned")
    refused = r"refused: it asks to load the Python object (getattr|posix.system), and unpickling it could run code"
    with pytest.raises(checkpoints.CheckpointError, match=refused) as error:
        load(path)
    assert_one_clear_line(error.value, path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_last_pt_is_refused_by_fit_resume(tmp_path, payload):
    path = crafted(tmp_path / "run" / "last.pt", payload, tmp_path / "pwned")
    with pytest.raises(checkpoints.CheckpointError, match="refused") as error:
        fit_resume(tmp_path / "run")
    assert_one_clear_line(error.value, path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_last_pt_is_refused_by_the_command_line(tmp_path, payload):
    path = crafted(tmp_path / "run" / "last.pt", payload, tmp_path / "pwned")
    with pytest.raises(SystemExit, match=f"^course_lib.train: error: checkpoint '{path}' refused") as error:
        cli_resume(tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "pwned").exists()


# ---- truncated, random and empty files: a CheckpointError naming the file, no torch traceback -------

@pytest.mark.parametrize("broken", BROKEN.values(), ids=BROKEN.keys())
@pytest.mark.parametrize("load", [checkpoints.read_checkpoint, checkpoints.load_model],
                         ids=["read_checkpoint", "load_model"])
def test_broken_file_is_a_checkpoint_error(tmp_path, broken, load):
    path = broken(tmp_path / "c.pt")
    with pytest.raises(checkpoints.CheckpointError) as error:
        load(path)
    assert_one_clear_line(error.value, path)


@pytest.mark.parametrize("broken, reason", [(truncated, r"cannot be read \(truncated or corrupt\?\)"),
                                            (random_bytes, "cannot be read: not a PyTorch checkpoint")])
def test_broken_file_says_what_is_wrong(tmp_path, broken, reason):
    with pytest.raises(checkpoints.CheckpointError, match=reason):
        checkpoints.read_checkpoint(broken(tmp_path / "c.pt"))


@pytest.mark.parametrize("broken", BROKEN.values(), ids=BROKEN.keys())
def test_broken_last_pt_through_fit_and_the_command_line(tmp_path, broken):
    path = broken(tmp_path / "run" / "last.pt")
    with pytest.raises(checkpoints.CheckpointError) as error:
        fit_resume(tmp_path / "run")
    assert_one_clear_line(error.value, path)
    with pytest.raises(SystemExit, match=f"^course_lib.train: error: checkpoint '{path}'") as error:
        cli_resume(tmp_path / "run")
    assert "\n" not in str(error.value)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="nowhere.pt' does not exist"):
        checkpoints.load_model(tmp_path / "nowhere.pt")


# ---- a file that is not a course checkpoint -----------------------------------------------------

@pytest.mark.parametrize("content", [{"a": 1}, [1, 2], {"format": "another tool 3", "model": {}}])
def test_foreign_file_is_refused_by_name(tmp_path, content):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(checkpoints.CheckpointError, match="foreign.pt' is not a course_lib checkpoint"):
        checkpoints.load_model(path)


def test_checkpoint_without_model_config_cannot_be_rebuilt(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"format": checkpoints.FORMAT, "model": {}}, path)
    with pytest.raises(checkpoints.CheckpointError, match="bare.pt' holds no model_config"):
        checkpoints.load_model(path)


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "swapped.pt"
    checkpoints.save_model(path, model.MaskRCNN(TINY))
    state = torch.load(path, weights_only=True)
    state["model_config"]["width"] = 16                            # the weights are width 8
    torch.save(state, path)
    with pytest.raises(checkpoints.CheckpointError, match="swapped.pt'.*do not rebuild a model"):
        checkpoints.load_model(path)


# ---- save_model / load_model: the exact model from the file alone --------------------------------

def test_save_model_load_model_round_trip_with_a_refiner(tmp_path):
    torch.manual_seed(0)
    plain = model.MaskRCNN(presets.quick_config()).eval()
    image = data.ShapesDataset(1, seed=0)[0][0]
    with torch.no_grad():
        third_best = float(plain([image])[0]["scores"].sort(descending=True).values[2])
    refiner = TransfinerConfig(d_model=32, ffn_dim=64, detector_channels=16, max_nodes=64, score_thresh=third_best)
    refined = model.add_refiner(plain, refiner).eval()
    checkpoints.save_model(tmp_path / "m.pt", refined, classes=list(data.CLASSES), image_size=128)
    loaded, info = checkpoints.load_model(tmp_path / "m.pt")
    assert info == {"classes": list(data.CLASSES), "image_size": 128}
    assert loaded.config == refined.config and loaded.config.refiner == refiner and not loaded.training
    assert loaded.state_dict().keys() == refined.state_dict().keys()
    for name, value in refined.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    with torch.no_grad():
        expected, got = refined([image])[0], loaded([image])[0]
    assert len(expected["boxes"]) >= 3                              # the refiner refined some masks
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(expected[key], got[key]), key


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="is a folder, not a checkpoint file"):
        checkpoints.read_checkpoint(tmp_path)
