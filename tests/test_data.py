"""Datasets: the synthetic set, CIFAR-10 in its own file format, and image folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bnctl.config import DataConfig
from bnctl.data import CIFAR_CLASSES, SYNTHETIC_CLASSES, load_dataset
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


def test_train_limit_on_class_sorted_images_keeps_every_class(tmp_path):
    write_image_folder(tmp_path, per_class=20)
    data = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), train_limit=15))
    assert len(data.train_y) == 15 and set(data.train_y.tolist()) == {0, 1, 2}


def write_cifar(root: Path, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write tiny files in CIFAR-10's 'python version' format; returns the training arrays."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_x, all_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": y, "data": x, "filenames": [f"{i}.png" for i in y]}, f)
        if name != "test_batch":
            all_x.append(x)
            all_y += y
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_vis": 3072}, f)
    return np.concatenate(all_x), np.array(all_y)


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
