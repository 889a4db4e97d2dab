"""One timed training trial per process: `python bench/trials.py '<json spec>'` prints one JSON line.

bench/run.py starts every trial in a fresh process so that neither side inherits
the other's threads, caches or memory peak.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # notebook_loop sits next to this file


from bnctl import config as config_mod, engine, experiment  # noqa: E402
from bnctl.data import ImageData, load_dataset  # noqa: E402


def load_data(spec: dict) -> ImageData:
    """The benchmark's images as uint8 tensors: bnctl's synthetic set, or CIFAR-10 under spec['cifar_root']."""
    if spec.get("cifar_root"):
        cfg = config_mod.DataConfig(name="cifar10", root=spec["cifar_root"], train_limit=spec["train"])
    else:
        cfg = config_mod.DataConfig(name="synthetic", train_size=spec["train"], test_size=spec["test"])
    data = load_dataset(cfg)
    data.test_x, data.test_y = data.test_x[: spec["test"]], data.test_y[: spec["test"]]
    return data


def notebook_trial(spec: dict, data: ImageData) -> dict:
    import notebook_loop

    return notebook_loop.run(data, epochs=spec["epochs"], batch_size=spec["batch"], seed=spec["seed"])


def bnctl_trial(spec: dict, data: ImageData) -> dict:
    """bnctl's engine on the same data: train_one_epoch, then one eval-mode test pass, per epoch."""
    cfg = config_mod.validate({
        "name": "bench", "seed": spec["seed"], "device": "cpu",
        "model": {"name": "seed_cnn", "norm": "batch"}, "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": spec["epochs"], "batch_size": spec["batch"], "eval_batch_size": 1000,
                  **spec.get("settings", {})},
    })
    exp = experiment.setup(cfg, data)
    epoch_s, train_s, images = [], [], 0
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        train = engine.train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler,
                                       exp.precision, epoch)
        t1 = time.perf_counter()
        test = engine.evaluate(exp.forward, exp.test_batches, exp.precision)
        epoch_s.append(time.perf_counter() - t0)
        train_s.append(t1 - t0)
        images = train["images"]
    return {"epoch_s": epoch_s, "train_s": train_s, "train_images": images, "test_acc": test["acc"],
            "threads": experiment.training_threads(exp.device, cfg.train.batch_size)}


TRIALS = {"notebook": notebook_trial, "bnctl": bnctl_trial}


def main(spec: dict) -> dict:
    data = load_data(spec)
    result = TRIALS[spec["kind"]](spec, data)
    # ru_maxrss is in KiB on Linux. Children: the notebook's DataLoader workers (the largest one).
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
