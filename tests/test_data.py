"""Datasets: the synthetic set, CIFAR-10 in its own file format, and image folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bnctl.config import DataConfig
from bnctl.data import SYNTHETIC_CLASSES, load_dataset, write_cifar_format
from bnctl.errors import DataError


def test_synthetic_is_deterministic_balanced_uint8():
    a = load_dataset(DataConfig(train_size=200, test_size=50))
    b = load_dataset(DataConfig(train_size=200, test_size=50))
    c = load_dataset(DataConfig(train_size=200, test_size=50, synthetic_seed=1))
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape == (200, 3, 32, 32)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.bincount(a.train_y).tolist() == [20] * 10
    assert a.classes == SYNTHETIC_CLASSES
    assert not torch.equal(a.train_x[:50], a.test_x)  # test images are drawn separately


def test_synthetic_classes_are_mirror_symmetric():
    """crop_flip flips images horizontally, so no class may depend on left vs right."""
    from bnctl.data import _shape_masks

    yy, xx = np.mgrid[-16:16, -16:16].astype(np.float32) + 0.5
    for i, mask in enumerate(_shape_masks(xx, yy, np.float32(10.0))):
        assert mask.any(), SYNTHETIC_CLASSES[i]
        assert np.array_equal(mask, mask[:, ::-1]), SYNTHETIC_CLASSES[i]


def test_train_limit_keeps_a_fixed_random_subset():
    full = load_dataset(DataConfig(train_size=100, test_size=20))
    limited = load_dataset(DataConfig(train_size=100, test_size=20, train_limit=30))
    again = load_dataset(DataConfig(train_size=100, test_size=20, train_limit=30))
    assert limited.train_x.shape[0] == 30 and len(limited.test_y) == 20
    assert torch.equal(limited.train_x, again.train_x)  # the same subset every time
    # every kept image is one of the full set's, with its own label
    rows = {bytes(img.numpy().tobytes()): int(y) for img, y in zip(full.train_x, full.train_y)}
    assert all(rows[bytes(img.numpy().tobytes())] == int(y) for img, y in zip(limited.train_x, limited.train_y))


def test_test_limit_keeps_the_same_random_subset_of_test_images(tmp_path):
    write_cifar(tmp_path, per_batch=10)
    full = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    a = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), test_limit=7))
    b = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), test_limit=7, train_limit=20))
    assert a.test_x.shape[0] == 7 and torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.test_x, full.test_x[:7])  # a random subset, not the first N
    assert torch.equal(a.train_x, full.train_x)  # training images untouched
    assert load_dataset(DataConfig(name="cifar10", root=str(tmp_path), test_limit=99)).test_x.shape[0] == 10


def test_train_limit_on_class_sorted_images_keeps_every_class(tmp_path):
    write_image_folder(tmp_path, per_class=20)
    data = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), train_limit=15))
    assert len(data.train_y) == 15 and set(data.train_y.tolist()) == {0, 1, 2}


def write_cifar(root: Path, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiny files in CIFAR-10's 'python version' format (bnctl.data.write_cifar_format); returns the training
    arrays as read back with plain pickle, so the checks below do not trust bnctl's reader."""
    folder = write_cifar_format(root, per_batch=per_batch, seed=seed)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        xs.append(entry["data"])
        ys += entry["labels"]
    return np.concatenate(xs), np.array(ys)


def test_write_cifar_format_matches_the_official_layout(tmp_path):
    folder = write_cifar_format(tmp_path, per_batch=7, test_images=3)
    assert sorted(p.name for p in folder.iterdir()) == [
        "batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    with open(folder / "test_batch", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert entry["data"].shape == (3, 3072) and entry["data"].dtype == np.uint8
    assert isinstance(entry["labels"], list) and all(0 <= v < 10 for v in entry["labels"])
    data = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert data.train_x.shape == (35, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)


def test_cifar10_reads_the_official_format(tmp_path):
    x, y = write_cifar(tmp_path)
    data = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    # Rows are stored channel-major (1024 reds, 1024 greens, 1024 blues).
    assert torch.equal(data.train_x[3, 1].flatten(), torch.from_numpy(x[3, 1024:2048]))
    assert data.train_y.tolist() == y.tolist() and data.classes[0] == "airplane"


def test_cifar10_missing_says_where_it_looked(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert f"data.root={tmp_path / 'nowhere'} does not exist" in msg and "data.download=true" in msg
    assert "Set data.root=" in msg and "\n" not in msg
    (tmp_path / "empty").mkdir()  # the folder exists but holds no CIFAR-10: say where it looked
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "empty")))
    assert "empty/cifar-10-batches-py" in str(err.value) and "data.download=true" in str(err.value)


def test_cifar10_trains_end_to_end(tmp_path, cli):
    write_cifar(tmp_path / "data", per_batch=16)
    result = cli("train", "--config", Path(__file__).resolve().parents[1] / "bnctl" / "configs" / "seed.yaml",
                 f"data.root={tmp_path / 'data'}", "train.epochs=1", "device=cpu", "--runs-root", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "checkpoints" / "best.pt").is_file()


def write_image_folder(root: Path, classes=("cat", "dog", "frog"), per_class=4, size=(40, 36)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")


def test_imagefolder_loads_and_resizes(tmp_path):
    write_image_folder(tmp_path)
    data = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32))
    assert data.classes == ["cat", "dog", "frog"]
    assert data.train_x.shape == (12, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_imagefolder_trains_with_its_own_class_count(tmp_path, cli):
    write_image_folder(tmp_path / "imgs", per_class=6)
    result = cli("train", "--config", Path(__file__).resolve().parents[1] / "bnctl" / "configs" / "quickstart.yaml",
                 "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "train.epochs=1",
                 "train.batch_size=4", "data.augment=none", "device=cpu", "--runs-root", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    import json

    assert json.loads((run / "run.json").read_text())["num_classes"] == 3
