"""Held-out evaluation for COCO-format data: a seeded split recorded in split.json, or a separate
validation set; AP counts the held-out images only; training images are evaluated only by name."""
import json

import pytest
import torch
from torch import nn

from course_lib import checkpoints, data, evaluate, train_cli


# ---- data.split_indices and data.Subset ---------------------------------------------------------

@pytest.mark.parametrize("num_images, val_fraction, num_val", [(50, 0.1, 5), (10, 0.25, 2), (2, 0.1, 1), (7, 0.5, 4)])
def test_split_is_seeded_disjoint_and_covers_every_image(num_images, val_fraction, num_val):
    train, val = data.split_indices(num_images, val_fraction, seed=3)
    assert (train, val) == data.split_indices(num_images, val_fraction, seed=3)
    assert len(val) == num_val and not set(train) & set(val)
    assert sorted(train + val) == list(range(num_images)) and train == sorted(train) and val == sorted(val)


def test_another_seed_holds_out_other_images():
    assert data.split_indices(50, 0.1, seed=0)[1] != data.split_indices(50, 0.1, seed=1)[1]


@pytest.mark.parametrize("num_images, val_fraction, message", [
    (1, 0.1, r"val_fraction=0.1 of 1 images leaves 0 to train on; a held-out split needs at least 2 images"),
    (0, 0.5, "of 0 images leaves -1 to train on"),
    (10, 0.97, "val_fraction=0.97 of 10 images leaves 0 to train on"),
    (10, 0.0, r"val_fraction=0.0; expected a fraction strictly between 0 and 1"),
    (10, 1.0, r"val_fraction=1.0; expected a fraction strictly between 0 and 1"),
    (10, -0.2, r"val_fraction=-0.2; expected"),
])
def test_split_edge_cases_error_clearly(num_images, val_fraction, message):
    with pytest.raises(ValueError, match=message):
        data.split_indices(num_images, val_fraction, seed=0)


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory):
    """Ten 64 px shapes images (ids 0..9) written as a COCO folder."""
    return data.save_coco(data.ShapesDataset(10, image_size=64, seed=7), tmp_path_factory.mktemp("coco") / "set")


class Oracle(nn.Module):
    """A 'model' that predicts each image's ground truth exactly, with score 1."""

    def __init__(self, dataset):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.samples = [dataset[i] for i in range(len(dataset))]

    def forward(self, images):
        targets = [next(t for img, t in self.samples if torch.equal(img, image)) for image in images]
        return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                 "masks": t["masks"][:, None].float()} for t in targets]


def test_subset_keeps_labels_and_scores_its_own_images_only(coco_folder):
    full = data.CocoDataset(coco_folder / "images", coco_folder / "annotations.json")
    train, val = data.split_indices(len(full), 0.3, seed=0)
    subset = data.Subset(full, val)
    assert len(subset) == 3 and subset.classes == full.classes and subset.label_to_cat_id == full.label_to_cat_id
    assert not hasattr(subset, "coco")        # the full json would hold the training images' objects
    assert [subset[k][1]["image_id"] for k in range(3)] == [full.ids[i] for i in val]
    metrics = evaluate.coco_evaluate(Oracle(subset), subset)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    detections = evaluate.predict(Oracle(subset), subset)
    bbox_results, _ = evaluate.coco_results(detections, subset.label_to_cat_id)
    assert evaluate.coco_metrics(full.coco, bbox_results)["AP"] < 0.6  # what exposing full.coco would report
    with pytest.raises(ValueError, match=r"indices \[10\] are outside the data set of 10 images"):
        data.Subset(full, [0, 10])


# ---- the command line ---------------------------------------------------------------------------

def _main(out, folder, *flags):
    return train_cli.main(["--config", "quick", "--out", str(out), "--steps", "1", "--batch-size", "1",
                           "--no-progress", "--data", "coco", "--coco-images", str(folder / "images"),
                           "--coco-annotations", str(folder / "annotations.json"), *flags])


@pytest.fixture
def evaluated(monkeypatch):
    """The image ids each pycocotools evaluation took as ground truth and the ids of its results."""
    seen = []
    original = evaluate.coco_metrics

    def spy(coco_gt, results, *args, **kwargs):
        images = coco_gt.dataset["images"] if hasattr(coco_gt, "dataset") else coco_gt["images"]
        seen.append(({image["id"] for image in images}, {r["image_id"] for r in results}))
        return original(coco_gt, results, *args, **kwargs)
    monkeypatch.setattr(evaluate, "coco_metrics", spy)
    return seen


def _ids(records):
    return [record["id"] for record in records]


def test_own_coco_folder_is_evaluated_on_held_out_images_only(coco_folder, tmp_path, evaluated):
    _main(tmp_path / "a", coco_folder, "--val-fraction", "0.3")
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    train, val = data.split_indices(10, 0.3, seed=0)
    assert split["how"] == "seeded split: val_fraction 0.3, seed 0"
    assert _ids(split["train"]) == train and _ids(split["val"]) == val
    assert [r["file_name"] for r in split["val"]] == [f"{i:06d}.png" for i in val]
    assert evaluated and all(gt == set(val) and results <= set(val) for gt, results in evaluated)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert 0 <= summary["box_AP"] <= 1
    settings = checkpoints.read_checkpoint(tmp_path / "a" / "last.pt")["config"]["run"]
    assert settings["val_fraction"] == 0.3 and settings["eval_on_train"] is False
    assert settings["val_coco_images"] is None and settings["val_coco_annotations"] is None


def test_default_split_holds_out_a_tenth_the_same_way_every_run(coco_folder, tmp_path):
    _main(tmp_path / "a", coco_folder)
    _main(tmp_path / "b", coco_folder)
    first, second = (json.loads((tmp_path / name / "split.json").read_text()) for name in "ab")
    assert first == second and len(first["val"]) == 1 and len(first["train"]) == 9


def test_separate_validation_set_is_used_when_given(coco_folder, tmp_path, evaluated):
    val_folder = data.save_coco(data.ShapesDataset(3, image_size=64, seed=8, image_id_offset=100), tmp_path / "val")
    _main(tmp_path / "run", coco_folder, "--val-images", str(val_folder / "images"),
          "--val-annotations", str(val_folder / "annotations.json"))
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["how"] == "separate validation set"
    assert _ids(split["train"]) == list(range(10)) and _ids(split["val"]) == [100, 101, 102]
    assert evaluated and all(gt == {100, 101, 102} and results <= gt for gt, results in evaluated)


def test_training_images_are_evaluated_only_when_asked_by_name(coco_folder, tmp_path, evaluated):
    with pytest.raises(SystemExit, match=r"--val-fraction 0 \(RunConfig.val_fraction\) holds out no images; to "
                                         r"evaluate on the training images say so with --eval-on-train"):
        _main(tmp_path / "run", coco_folder, "--val-fraction", "0")
    _main(tmp_path / "run", coco_folder, "--eval-on-train")
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["how"] == "evaluated on the training images (--eval-on-train)"
    assert _ids(split["train"]) == _ids(split["val"]) == list(range(10))
    assert evaluated and all(gt == set(range(10)) for gt, _ in evaluated)


def test_resume_keeps_the_split_and_refuses_another(coco_folder, tmp_path):
    _main(tmp_path / "run", coco_folder, "--steps", "2", "--stop-at", "1")
    before = (tmp_path / "run" / "split.json").read_text()
    _main(tmp_path / "run", coco_folder, "--steps", "2", "--resume")
    assert (tmp_path / "run" / "split.json").read_text() == before
    with pytest.raises(SystemExit, match=r"split.json' records another split of the images than this run makes"):
        _main(tmp_path / "run", coco_folder, "--steps", "2", "--resume", "--val-fraction", "0.3")


@pytest.fixture
def other_folders(coco_folder, tmp_path):
    """A copy of the set with other category names, and a one-image set."""
    other = json.loads((coco_folder / "annotations.json").read_text())
    other["categories"][0]["name"] = "box"
    (tmp_path / "other.json").write_text(json.dumps(other))
    single = json.loads((coco_folder / "annotations.json").read_text())
    single["images"] = single["images"][:1]
    single["annotations"] = [a for a in single["annotations"] if a["image_id"] == single["images"][0]["id"]]
    (tmp_path / "single.json").write_text(json.dumps(single))
    return tmp_path / "other.json", tmp_path / "single.json"


def test_split_edge_cases_on_the_command_line(coco_folder, other_folders, tmp_path):
    other, single = other_folders
    images = str(coco_folder / "images")
    cases = [
        (["--val-fraction", "1"], r"RunConfig.val_fraction=1.0 \(--val-fraction\); expected a fraction in \[0, 1\)"),
        (["--val-fraction", "-0.1"], r"RunConfig.val_fraction=-0.1 \(--val-fraction\)"),
        (["--eval-on-train", "--val-fraction", "0.2"], r"--eval-on-train \(RunConfig.eval_on_train\) evaluates on "
                                                       r"the training images: it takes --val-fraction 0 \(got 0.2\)"),
        (["--val-images", images], r"a separate validation set needs both --val-images DIR and --val-annotations FILE"),
        (["--val-images", str(tmp_path / "nowhere"), "--val-annotations", str(other)],
         r"--val-images '.*nowhere': no such folder"),
        (["--val-images", images, "--val-annotations", str(tmp_path / "no.json")],
         r"--val-annotations '.*no.json': no such file"),
        (["--val-images", images, "--val-annotations", str(other)],
         r"--val-annotations declares the categories \{1: 'box', 2: 'circle', 3: 'triangle'\}, --coco-annotations "
         r"\{1: 'square', 2: 'circle', 3: 'triangle'\}; labels would not mean the same class in both"),
        (["--val-images", images, "--val-annotations", str(single)],
         r"--val-images and --coco-images share 1 image files \(first: '000000.png'\); a validation set must hold "
         r"images the model does not train on"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit, match="^course_lib.train: error: " + message):
            _main(tmp_path / "run", coco_folder, *flags)
    with pytest.raises(SystemExit, match=r"val_fraction=0.1 of 1 images leaves 0 to train on"):
        train_cli.main(["--config", "quick", "--out", str(tmp_path / "run"), "--no-progress", "--data", "coco",
                        "--coco-images", images, "--coco-annotations", str(single)])
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("flag", [["--val-fraction", "0.2"], ["--eval-on-train"], ["--val-images", "x"]])
def test_split_flags_apply_to_coco_data_only(tmp_path, flag):
    with pytest.raises(SystemExit, match=f"^course_lib.train: error: {flag[0]} applies to --data coco only$"):
        train_cli.main(["--config", "quick", "--out", str(tmp_path), *flag])
