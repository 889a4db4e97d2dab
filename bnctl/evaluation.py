"""Evaluating a saved checkpoint: BN modes (running vs batch statistics) and recalibration.

Everything here works on a copy of the weights: the checkpoint file is only ever read.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnctl import checkpoint, config as config_mod, rundir
from bnctl.data import Batches
from bnctl.engine import evaluate
from bnctl.errors import ConfigError, DataError
from bnctl.experiment import seeded_order, setup
from bnctl.norms import set_bn_batch_mode, uses_batch_stats

BN_MODES = ("running", "batch")  # eval --bn-mode: population statistics, or each test batch's own


def _has_running_stats(module: nn.Module) -> bool:
    return uses_batch_stats(module) and getattr(module, "running_mean", None) is not None


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Batches, num_images: int) -> int:
    """Recompute BN population statistics from training images with the weights frozen ("precise BN").

    Running estimates restart from scratch and become the plain average over the
    batches seen (momentum=None), so every image counts alike. Whole batches are
    used until at least num_images were seen. Only BN buffers change; the model is
    left in eval mode. Returns the number of images used.
    """
    bns = [m for m in model.modules() if _has_running_stats(m)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches, not an exponential one
    set_bn_batch_mode(model)  # dropout stays off: statistics of the deployed network, not a thinned one
    used = 0
    try:
        for x, _ in batches:
            if used >= num_images:
                break
            model(x)
            used += len(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
    return used


def _one_image_batch(n: int, batch_size: int, model: nn.Module, split_virtual: bool = True) -> bool:
    """Whether normalizing n images in batches of batch_size hands some BN layer a single image.

    ``split_virtual``: ghost BN cuts batches into virtual ones (in train mode, as --bn-mode batch runs it).
    """
    full, rest = divmod(n, batch_size)
    sizes = [batch_size] * full + ([rest] if rest else [])
    if rest == 1 and full:  # Batches folds a lone last image into the batch before it
        sizes[-2:] = [batch_size + 1]
    for m in model.modules():
        if not uses_batch_stats(m):
            continue
        virtual = getattr(m, "virtual_batch_size", None) if split_virtual else None
        for size in sizes:
            if size == 1 or (virtual is not None and size > virtual and size % virtual == 1):
                return True
    return False


def _recorded_data_root(raw: dict, path: Path) -> str | None:
    """A relative data.root as the run saw it: resolved against the working directory run.json recorded.

    None when data.root is absolute, exists from here, or does not exist from there either.
    """
    root = (raw.get("data") or {}).get("root")
    if not root or (raw.get("data") or {}).get("name", "synthetic") == "synthetic":
        return None
    if Path(root).expanduser().is_absolute() or Path(root).exists():
        return None
    try:
        cwd = rundir.read_json(rundir.run_dir_of(path) / rundir.RUN_INFO_FILE).get("cwd")
    except (OSError, ValueError, AttributeError):
        return None
    candidate = Path(cwd) / root if cwd else None
    return str(candidate) if candidate is not None and candidate.exists() else None


def _opt(name: str) -> str:
    """An option named for both callers: bnctl.evaluate's parameter and `bnctl eval`'s flag."""
    return f"{name} (--{name.replace('_', '-')})"


def evaluate_checkpoint(path: Path, *, data_root: str | None = None, device: str | None = None,
                        bn_mode: str = "running", batch_size: int | None = None, recalibrate: int = 0,
                        order_seed: int | None = None, recalibrate_batch_size: int | None = None) -> dict:
    """Rebuild a model from a checkpoint alone and evaluate it on the test split.

    ``bn_mode="batch"`` normalizes with each test batch's statistics: BN layers in train
    mode, everything else (dropout included) in eval mode. Those batches are drawn in a
    random order fixed by ``order_seed`` (default: the run's seed), so that class-sorted
    files do not make one-class batches. ``recalibrate=N`` first recomputes BN's running
    statistics from N training images. Both work on a copy of the weights: the checkpoint
    file is only read. On a device without the run's precision (fp16 off CUDA) the model is
    evaluated in fp32, and result["notes"] says so.
    """
    if bn_mode not in BN_MODES:
        raise ConfigError(f"unknown {_opt('bn_mode')} '{bn_mode}'; choose one of: {', '.join(BN_MODES)}")
    # The command line's options check these ranges too; a Python caller meets them here first.
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"{_opt('batch_size')} must be at least 1 (got {batch_size})")
    if recalibrate < 0:
        raise ConfigError(f"{_opt('recalibrate')} is a number of training images, at least 0 (got {recalibrate})")
    if recalibrate and bn_mode == "batch":
        raise ConfigError(f"{_opt('recalibrate')} recomputes BN's running statistics, which bn_mode 'batch' "
                          "does not use; recalibrate with bn_mode 'running'")
    if recalibrate_batch_size is not None and recalibrate_batch_size < 2:
        raise ConfigError(f"{_opt('recalibrate_batch_size')} must be at least 2: BN cannot take statistics of one image")
    state = checkpoint.load(path)
    raw = copy.deepcopy(state["config"])
    stored_root = (raw.get("data") or {}).get("root")
    if data_root is None:
        data_root = _recorded_data_root(raw, Path(path))  # a relative root from the folder the run started in
    if data_root is not None:
        raw = config_mod.apply_overrides(raw, {"data.root": data_root})
    if device is not None:
        raw = config_mod.apply_overrides(raw, {"device": device})
    cfg = config_mod.validate(raw, f"stored in {path}", moved=True)
    if batch_size is not None:
        cfg.train.eval_batch_size = batch_size
    try:
        exp = setup(cfg, moved=True)
    except DataError as err:
        if err.what is None:  # the data is there but wrong: its own message says it all
            raise
        tried = f" (data.root={stored_root} in the checkpoint, {cfg.data.root} tried)" \
            if stored_root != cfg.data.root else ""
        raise DataError(f"{err.what}{tried}. Point evaluation at the data with {_opt('data_root')}", err.what) from None
    checkpoint.check_classes(state, exp.data.classes, Path(path))  # first: it names both lists, even of other lengths
    checkpoint.load_model_state(exp.model, state["model"], Path(path))  # a checkpoint without classes: the count is checked here
    model = exp.model
    batch_stats = bn_mode == "batch" or config_mod.batch_stats_at_eval(cfg)
    if batch_stats:
        # Each batch's statistics shape its predictions, so the batches must mix the classes whatever
        # the files' order (image folders list theirs class by class): a seeded random order, recorded.
        order_seed = cfg.seed if order_seed is None else order_seed
        test = exp.batches(*seeded_order(exp.data.test_x, exp.data.test_y, order_seed), cfg.train.eval_batch_size)
    else:
        order_seed, test = None, exp.test_batches  # running statistics: the order cannot matter
    bn_layers = sum(uses_batch_stats(m) for m in model.modules())
    if batch_stats and _one_image_batch(len(test.y), test.batch_size, model, split_virtual=bn_mode == "batch"):
        why = ("bn_mode 'batch' normalizes" if bn_mode == "batch" else
               "this model keeps no running statistics (model.bn_track_running_stats=false), so eval mode normalizes")
        raise ConfigError(
            f"{why} each test batch with its own statistics, but {len(test.y)} test images "
            f"in batches of {test.batch_size} leave a batch of one image (counting ghost BN's virtual batches), "
            f"which has none; choose another {_opt('batch_size')}")
    result: dict[str, Any] = {"checkpoint": str(path), "epoch": state["epoch"], "bn_mode": bn_mode,
                              "data_root": cfg.data.root,
                              "batch_size": test.batch_size, "bn_layers": bn_layers, "classes": exp.data.classes,
                              "device": str(exp.device), "precision": cfg.train.precision, "order_seed": order_seed,
                              "notes": list(exp.notes)}
    if recalibrate:
        if not any(_has_running_stats(m) for m in model.modules()):
            raise ConfigError(f"{_opt('recalibrate')} needs BN layers that keep running statistics; this model has "
                              f"model.norm={cfg.model.norm}, bn_track_running_stats={cfg.model.bn_track_running_stats}")
        before = evaluate(model, test, exp.precision)
        model = copy.deepcopy(model)  # recalibrated statistics are reported, never written back
        # Shuffled whole training batches: class-sorted data (image folders) must not bias the statistics.
        recal = exp.batches(exp.data.train_x, exp.data.train_y,
                            recalibrate_batch_size or max(2, cfg.train.batch_size), shuffle=True,
                            drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
        if len(recal) == 0:  # reset statistics (mean 0, variance 1) would be reported as "recalibrated"
            raise DataError(f"{_opt('recalibrate')} needs at least one whole training batch of {recal.batch_size} "
                            f"images, but the training split has {len(recal.y)}; point {_opt('data_root')} at the "
                            "training data or evaluate without recalibrating")
        used = recalibrate_bn(model, recal, recalibrate)
        result["recalibration"] = {"images": used, "batch_size": recal.batch_size,
                                   "before_acc": before["acc"], "before_loss": before["loss"]}
    if bn_mode == "batch":
        model = copy.deepcopy(model)  # batch statistics must never reach the checkpoint's running estimates
    metrics = evaluate(model, test, exp.precision, exp.num_classes, bn_batch_stats=bn_mode == "batch")
    result |= {"loss": metrics["loss"], "acc": metrics["acc"], "images": metrics["images"],
               "confusion": metrics["confusion"]}
    result["per_class_acc"] = {
        c: 100.0 * row[i] / max(1, sum(row)) for i, (c, row) in enumerate(zip(exp.data.classes, metrics["confusion"]))
    }
    return result
