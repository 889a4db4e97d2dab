"""Datasets as uint8 tensors, and batches served from the training device.

Every dataset is decoded once into ``uint8`` tensors of shape (N, 3, H, W) plus
int64 labels. :class:`Batches` keeps them on the device and forms each batch by
index-slicing a seeded permutation; normalization and augmentation then run on
the whole batch at once. No worker processes, no per-image Python on the hot path.
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from bnctl.config import DataConfig
from bnctl.errors import DataError

# Loading progress, for a caller that wants to show it: (what, done, total). The library never
# prints; the CLI installs a callback with `reporting_progress` for the datasets that take a while.
LoadProgress = Callable[[str, int, int], None]
_progress: contextvars.ContextVar[LoadProgress | None] = contextvars.ContextVar("bnctl_load_progress", default=None)


@contextlib.contextmanager
def reporting_progress(callback: LoadProgress) -> Iterator[None]:
    """Within this block, slow dataset loading (decoding image folders) reports its progress to callback."""
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)


def _not_found(what: str, fix: str) -> DataError:
    return DataError(f"{what}. {fix}", what)


def _looks_like_image_folders(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


@dataclass
class ImageData:
    """A train/test pair of uint8 image tensors with their labels and class names."""

    train_x: torch.Tensor  # (N, 3, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_x.shape[-2:])  # type: ignore[return-value]


# ------------------------------------------------------------------ synthetic

SYNTHETIC_CLASSES = ["disk", "square", "triangle", "ring", "plus", "cross", "diamond", "hbar", "vbar", "pair"]


def _shape_masks(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the ten shapes, in SYNTHETIC_CLASSES order, for offsets (dx, dy) from a centre.

    Every shape is mirror-symmetric left to right, so a horizontal flip (crop_flip
    augmentation) never changes an image's class.
    """
    ax, ay, dist = np.abs(dx), np.abs(dy), np.hypot(dx, dy)
    return [
        dist < r,  # disk
        np.maximum(ax, ay) < 0.8 * r,  # square
        (dy > -r) & (dy < 0.8 * r) & (ax < 0.55 * (dy + r)),  # triangle, apex up
        (dist < r) & (dist > 0.6 * r),  # ring
        ((ax < 0.3 * r) & (ay < r)) | ((ay < 0.3 * r) & (ax < r)),  # plus
        (np.abs(ax - ay) < 0.35 * r) & (np.maximum(ax, ay) < 0.85 * r),  # diagonal cross
        ax + ay < r,  # diamond
        (ax < r) & (ay < 0.35 * r),  # horizontal bar
        (ay < r) & (ax < 0.35 * r),  # vertical bar
        np.hypot(ax - 0.55 * r, dy) < 0.4 * r,  # two dots side by side
    ]


_SYNTHETIC_CHUNK = 2048  # images generated at a time (bounds the generator's memory)


def _synthetic_split(n: int, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Draw n images of simple shapes: the class is the shape.

    Each image shows one shape of random size, position and colour over a random
    background with a faint distracting texture and pixel noise. Low contrast and
    small sizes make some images hard, so the task is learnable but not trivially so.
    """
    labels = rng.permutation(np.arange(n) % len(SYNTHETIC_CLASSES))
    radius = rng.uniform(5.0, 11.0, n)[:, None, None]
    cx = rng.uniform(11, size - 11, n)[:, None, None]
    cy = rng.uniform(11, size - 11, n)[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg = rng.uniform(0.0, 1.0, (n, 3, 1, 1))
    contrast = rng.uniform(0.15, 0.6, (n, 1, 1, 1)) * rng.choice([-1.0, 1.0], (n, 1, 1, 1))
    fg = np.clip(bg + contrast * rng.uniform(0.5, 1.5, (n, 3, 1, 1)), 0.0, 1.0)
    theta, freq, phase = (rng.uniform(0, np.pi, n), rng.uniform(0.05, 0.3, n), rng.uniform(0, 2 * np.pi, n))

    # Pixels are drawn in chunks: the float64 intermediates of 50,000 images at once would need
    # several GB. The noise is the last draw and numpy's stream does not depend on how it is
    # split, so the images are identical to drawing them all at once.
    img = np.empty((n, 3, size, size), dtype=np.uint8)
    for s in range(0, n, _SYNTHETIC_CHUNK):
        c = slice(s, s + _SYNTHETIC_CHUNK)
        masks = _shape_masks(xx[None] - cx[c], yy[None] - cy[c], radius[c])  # each (chunk, H, W)
        shape = np.choose(labels[c, None, None], masks).astype(np.float32)[:, None]  # (chunk, 1, H, W)
        texture = np.sin(2 * np.pi * freq[c, None, None] * (xx * np.cos(theta[c])[:, None, None]
                                                            + yy * np.sin(theta[c])[:, None, None])
                         + phase[c, None, None])
        chunk = (bg[c] * (1 - shape) + fg[c] * shape + 0.08 * texture[:, None]
                 + rng.normal(0.0, 0.1, (len(shape), 3, size, size)))
        img[c] = np.clip(chunk * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return img, labels.astype(np.int64)


def load_synthetic(cfg: DataConfig) -> ImageData:
    """bnctl's embedded dataset: deterministic, offline, 10 classes of 32x32 RGB."""
    rng = np.random.default_rng(cfg.synthetic_seed)
    tx, ty = _synthetic_split(cfg.train_size, rng)
    vx, vy = _synthetic_split(cfg.test_size, rng)
    return ImageData(torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(vx),
                     torch.from_numpy(vy), list(SYNTHETIC_CLASSES))


# ------------------------------------------------------------------ CIFAR-10

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_FILES = ["test_batch"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# The only globals a CIFAR-10 batch file needs: numpy arrays and bytes. Anything
# else in a pickle (os.system, eval, ...) is refused before it can run.
_CIFAR_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a tampered file cannot run code."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) not in _CIFAR_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path} is not a valid CIFAR-10 batch file ({err})") from None
    if not isinstance(entry, dict) or "data" not in entry:
        raise DataError(f"{path} is not a valid CIFAR-10 batch file (no 'data' entry)")
    return _check_cifar_arrays(path, entry["data"], entry.get("labels"))


def _check_cifar_arrays(path: Path, data, labels) -> tuple[np.ndarray, np.ndarray]:
    """A batch's pixels and labels as arrays, after checking what training would otherwise trip over mid-epoch."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        found = f"a {data.dtype} array" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of N x 3072 pixels, got {found}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be N x 3072 pixels (32x32 RGB), got shape {data.shape}")
    if labels is None:
        raise DataError(f"{path} has no 'labels' entry (a CIFAR-10 batch holds 'data' and 'labels')")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError):
        raise DataError(f"{path}: 'labels' is not a list of class numbers") from None
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: 'labels' must be a flat list of integers, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    bad = labels[(labels < 0) | (labels >= len(CIFAR_CLASSES))]
    if bad.size:
        raise DataError(f"{path}: label {int(bad[0])} is outside CIFAR-10's classes 0..{len(CIFAR_CLASSES) - 1} "
                        f"({bad.size} such label(s))")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _download_cifar(root: Path) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise DataError(
            f"could not download CIFAR-10 into {root} ({type(err).__name__}: {err}); "
            f"without network access, copy the extracted '{CIFAR_DIR}' folder there"
        ) from None


def load_cifar10(cfg: DataConfig) -> ImageData:
    """CIFAR-10 from its official 'python version' files under data.root."""
    root = Path(cfg.root).expanduser()
    folder = root / CIFAR_DIR
    needed = CIFAR_TRAIN_FILES + CIFAR_TEST_FILES
    if root.name == CIFAR_DIR or (root / CIFAR_TRAIN_FILES[0]).is_file():
        raise _not_found(f"data.root={cfg.root} is the '{CIFAR_DIR}' folder itself",
                         f"use the parent folder: data.root={root.parent}")
    if cfg.download and not all((folder / f).is_file() for f in needed):
        _download_cifar(root)
    if not root.is_dir():
        raise _not_found(f"CIFAR-10 not found: data.root={cfg.root} does not exist (from {Path.cwd()})",
                         f"Set data.root=PATH to the folder holding '{CIFAR_DIR}/', "
                         "or add data.download=true to fetch it (needs network)")
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing and _looks_like_image_folders(root):
        raise _not_found(f"data.root={cfg.root} holds image folders (train/, test/), not CIFAR-10's python files",
                         "For class folders of images use data.name=imagefolder")
    if missing:
        raise _not_found(
            f"CIFAR-10 not found: looked for {folder}/ ({', '.join(missing)} missing)",
            f"Get it with data.download=true (needs network), extract cifar-10-python.tar.gz into {root}, "
            "or point data.root= at the folder holding it")
    train = [_read_cifar_batch(folder / f) for f in CIFAR_TRAIN_FILES]
    test = [_read_cifar_batch(folder / f) for f in CIFAR_TEST_FILES]
    cat = lambda parts, i: torch.from_numpy(np.concatenate([p[i] for p in parts]))  # noqa: E731
    return ImageData(cat(train, 0), cat(train, 1), cat(test, 0), cat(test, 1), list(CIFAR_CLASSES))


def write_cifar_format(root: Path, per_batch: int = 10000, test_images: int | None = None,
                       seed: int = 0) -> Path:
    """Write random images in CIFAR-10's own file format under root/cifar-10-batches-py; returns that folder.

    For tests and timings where the real files cannot be fetched: five data_batch files of
    per_batch images each and a test_batch (per_batch images unless test_images says), pickled
    exactly as the official 'python version' (uint8 N x 3072 rows, a list of labels). The default
    size is CIFAR-10's own (50,000 + 10,000 images, ~180 MB). The pixels are noise, so a network
    trained on them stays at chance: such data measure time and memory, never accuracy.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name in CIFAR_TRAIN_FILES + CIFAR_TEST_FILES:
        n = per_batch if name in CIFAR_TRAIN_FILES or test_images is None else test_images
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, len(CIFAR_CLASSES), n)]
        entry = {"batch_label": name, "labels": y, "data": x, "filenames": [f"{i}.png" for i in range(n)]}
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(entry, f)  # the highest protocol: bytes stored as they are (~31 MB a file, as the real ones)
        tmp.replace(folder / name)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return folder


# ------------------------------------------------------------------ image folders

def _read_image_folder(split_dir: Path, size: int, limit: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a split's images once into uint8; with limit, only the data.train_limit subset is decoded."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(split_dir), loader=lambda p: p)  # we decode below, once, into uint8
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"image folder {split_dir}: {err}. Expected {split_dir}/<class>/<image files>") from None
    empty = [c for c in folder.classes if not any(t == folder.class_to_idx[c] for _, t in folder.samples)]
    if empty:
        raise DataError(f"image folder {split_dir}: no images in class folder(s) {', '.join(empty)}")
    samples = folder.samples
    if limit is not None and limit < len(samples):
        samples = [samples[i] for i in limit_indices(len(samples), limit).tolist()]
    report = _progress.get()
    what = f"decoding {split_dir}"
    every = max(1, len(samples) // 100)
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                images[i] = np.asarray(im)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot decode image {path}: {err}") from None
        except Image.DecompressionBombError:  # PIL's guard against images made to exhaust memory
            raise DataError(f"image {path} is too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} "
                            "pixels, PIL's decompression-bomb limit); shrink it or remove it") from None
        if report is not None and ((i + 1) % every == 0 or i + 1 == len(samples)):
            report(what, i + 1, len(samples))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([t for _, t in samples], dtype=torch.int64)
    return x, y, list(folder.classes)


def load_imagefolder(cfg: DataConfig) -> ImageData:
    """Images in data.root/{train,test}/<class>/*, resized to data.image_size."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise _not_found(f"image folder dataset not found: data.root={cfg.root} does not exist (from {Path.cwd()})",
                         "Set data.root=PATH to the folder holding train/<class>/* and test/<class>/*")
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing and (root / CIFAR_DIR).is_dir():
        raise _not_found(f"data.root={cfg.root} holds CIFAR-10's python files ({CIFAR_DIR}/), not image folders",
                         "For them use data.name=cifar10")
    if missing:
        raise _not_found(
            f"image folder dataset at {root}: missing split folder(s) {', '.join(missing)}",
            f"expected {root}/train/<class>/* and {root}/test/<class>/* (or point data.root= elsewhere)"
        )
    tx, ty, classes = _read_image_folder(root / "train", cfg.image_size, cfg.train_limit)
    vx, vy, test_classes = _read_image_folder(root / "test", cfg.image_size)
    if classes != test_classes:
        raise DataError(f"{root}: train and test have different class folders ({classes} vs {test_classes})")
    return ImageData(tx, ty, vx, vy, classes)


DATASETS: dict[str, Callable[[DataConfig], ImageData]] = {
    "synthetic": load_synthetic,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
}


def load_dataset(cfg: DataConfig) -> ImageData:
    """Load the configured dataset as uint8 tensors, applying data.train_limit and data.test_limit."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset '{cfg.name}'; choose one of {', '.join(DATASETS)}")
    data = DATASETS[cfg.name](cfg)
    if cfg.train_limit is not None and cfg.train_limit < len(data.train_y):  # loaders that did not apply it
        keep = limit_indices(len(data.train_y), cfg.train_limit)
        data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    if cfg.test_limit is not None and cfg.test_limit < len(data.test_y):  # the same fixed subset for every run
        keep = limit_indices(len(data.test_y), cfg.test_limit)
        data.test_x, data.test_y = data.test_x[keep], data.test_y[keep]
    return data


def limit_indices(n: int, limit: int) -> torch.Tensor:
    """The data.train_limit subset of n training images: a fixed random one, not the first N
    (image folders list their images class by class). Loaders that can skip decoding apply it early."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit]


# ------------------------------------------------------------------ batching

def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4,
              within: tuple[int, int] | None = None) -> torch.Tensor:
    """Random pad-and-crop plus horizontal flip of a whole uint8 batch at once.

    ``within=(start, total)``: x holds positions start.. of a batch of ``total`` images.
    The randomness is drawn for all ``total`` positions, as one process drawing the whole
    batch does, and x gets its positions' share: a data-parallel rank augments its
    slice exactly as a single process would.
    """
    n = len(x)
    start, total = within if within is not None else (0, n)
    dy, dx, flip = crop_flip_draw(generator, total, pad)
    mine = slice(start, start + n)
    return crop_flip_apply(x, dy[mine].to(x.device), dx[mine].to(x.device), flip[mine].to(x.device), pad)


def crop_flip_draw(generator: torch.Generator, total: int, pad: int = 4) -> tuple[torch.Tensor, ...]:
    """crop_flip's randomness for a batch of ``total`` images: row and column offsets, flips (CPU tensors)."""
    dy = torch.randint(0, 2 * pad + 1, (total,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (total,), generator=generator)
    flip = torch.rand(total, generator=generator) < 0.5
    return dy, dx, flip


def crop_flip_apply(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                    pad: int = 4) -> torch.Tensor:
    """Pad x by ``pad`` pixels, crop each image at (dy, dx) and mirror those with flip; all on x's device."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n,1,h,1)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (n,w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # flipping = reading columns backwards
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


@dataclass
class EpochPlan:
    """An epoch's randomness, drawn before its first batch and moved to the device in one copy.

    The draws are those the batches would make one by one (the permutation, then each
    batch's crop_flip offsets and flips, in order), so the numbers, the generator's state
    afterwards and hence exact resume are unchanged; a GPU step then never waits for a
    host-to-device copy of a few random numbers.
    """

    order: torch.Tensor | None  # (n,) permutation, or None without shuffling
    dy: torch.Tensor | None  # (sum of batch sizes,) per-image offsets, all batches concatenated; None without crop_flip
    dx: torch.Tensor | None
    flip: torch.Tensor | None


class Batches:
    """One split resident on the device, served as normalized float batches.

    Training order and augmentation draw from ``generator`` (a CPU generator the
    engine owns and checkpoints), so a seed fixes every batch exactly.
    ``part=(rank, world_size)`` serves one data-parallel rank its contiguous share of
    each batch: every rank draws the same order and augmentation, so together they
    see exactly the batches one process would (``batch_size`` stays the global batch).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, device: torch.device,
                 mean, std, shuffle: bool = False, drop_last: bool = False, augment: str = "none",
                 generator: torch.Generator | None = None, channels_last: bool = False,
                 part: tuple[int, int] = (0, 1)):
        self.x = x.to(device)
        self.part = part
        self.y = y.to(device)
        self.batch_size = batch_size
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.generator = generator
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # (x/255 - mean)/std folded into one multiply-add.
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std_t), -mean_t / std_t

    def __len__(self) -> int:
        n, size = len(self.y), self.batch_size
        if self.drop_last:
            return n // size
        # A lone last image joins the batch before it: BN normalizing with batch statistics
        # (train mode, --bn-mode batch, bn_track_running_stats=false) cannot handle one sample.
        return max(1, n // size) if n % size == 1 else -(-n // size)

    def _bounds(self) -> list[tuple[int, int]]:
        """Each batch's (start, end) positions in the epoch's order."""
        n, count = len(self.y), len(self)
        return [(i * self.batch_size, n if (i == count - 1 and not self.drop_last) else (i + 1) * self.batch_size)
                for i in range(count)]

    def plan_epoch(self) -> EpochPlan:
        """Draw the coming epoch's permutation and augmentation (see EpochPlan); one transfer to the device."""
        order = torch.randperm(len(self.y), generator=self.generator) if self.shuffle else None
        draws = [crop_flip_draw(self.generator, end - start) for start, end in self._bounds()] \
            if self.augment == "crop_flip" else []
        parts = [order] if order is not None else []
        if draws:
            parts += [torch.cat(column).to(torch.int64) for column in zip(*draws)]  # dy, dx, flip
        if not parts:
            return EpochPlan(None, None, None, None)
        flat = torch.cat(parts)
        cuda = self.x.device.type == "cuda"
        if cuda:  # from pinned memory the copy is asynchronous: the host goes on queueing work
            flat = flat.pin_memory()
        pieces = list(flat.to(self.x.device, non_blocking=cuda).split([len(p) for p in parts]))
        order_d = pieces.pop(0) if order is not None else None
        if not draws:
            return EpochPlan(order_d, None, None, None)
        dy, dx, flip = pieces
        return EpochPlan(order_d, dy, dx, flip.bool())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan_epoch()
        rank, world = self.part
        for start_pos, end in self._bounds():
            total = end - start_pos
            start = rank * total // world  # this rank's contiguous share of the (global) batch
            mine = slice(start_pos + start, start_pos + (rank + 1) * total // world)
            idx = plan.order[mine] if plan.order is not None else mine
            xb = self.x[idx]
            if plan.dy is not None:  # the drawn offsets are laid out like the epoch's positions
                xb = crop_flip_apply(xb, plan.dy[mine], plan.dx[mine], plan.flip[mine])
            # Change layout while the batch is still 1 byte per value; the float result keeps it.
            xb = xb.contiguous(memory_format=self.memory_format)
            yield torch.addcmul(self.shift, xb.float(), self.scale), self.y[idx]
