"""Run under torchrun by tests/test_distributed.py (not a test module itself).

For each input kind (conv features, fully connected features) bnctl's synchronized BN
runs on this rank's contiguous slice of the same seeded 8-sample batches: back-propagate
a fixed random projection of the output, sum the parameter gradients over ranks (the
per-rank losses add up to the global one) and take an SGD step. Everything the layer
produced is saved for the test to compare with one process on all 8 samples.
It also records what train.dist_bn does to unsynchronized running statistics, and how
the ranks agree on a failure that happens on one of them.
"""

import sys

import torch
import torch.distributed as td
from torch import nn

from bnctl.distributed import AgreedError, process_group, reconcile_running_stats
from bnctl.norms import SyncBatchNorm
from bnctl.errors import DataError

STEPS, GLOBAL_BATCH = 4, 8
SHAPES = {"conv": (GLOBAL_BATCH, 3, 5, 5), "fc": (GLOBAL_BATCH, 6)}


def batch(shape, step):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1,
            torch.randn(shape, generator=g, dtype=torch.float64))


def sync_bn_steps(dist, shape):
    layer = SyncBatchNorm(shape[1], momentum=0.3)
    mine = dist.part(GLOBAL_BATCH)
    record = []
    for step in range(STEPS):
        x, proj = batch(shape, step)
        x = x[mine].requires_grad_()
        y = layer(x)
        (y * proj[mine]).sum().backward()
        grads = torch.cat([layer.weight.grad, layer.bias.grad])
        td.all_reduce(grads)
        with torch.no_grad():
            layer.weight -= 0.1 * grads[: shape[1]]
            layer.bias -= 0.1 * grads[shape[1]:]
        layer.weight.grad = layer.bias.grad = None
        record.append({"y": y.detach(), "dx": x.grad, "grads": grads, "running_mean": layer.running_mean.clone(),
                       "running_var": layer.running_var.clone(),
                       "num_batches_tracked": layer.num_batches_tracked.clone()})
    return record


def dist_bn(dist, mode):
    model = nn.Sequential(nn.BatchNorm2d(2), SyncBatchNorm(2))
    for m in model:
        m.running_mean.fill_(dist.rank + 1)
        m.running_var.fill_(2.0 * (dist.rank + 1))
        m.num_batches_tracked.fill_(dist.rank + 5)
    touched = reconcile_running_stats(model, dist, mode)
    return {"touched": touched, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def agreement(dist):
    """What each rank sees when only rank 1 fails (e.g. its node lacks the data), and rank 0's shared value."""
    def only_rank_1_fails():
        if dist.rank == 1:
            raise DataError("no data on this node")
        return "from rank 0"

    try:
        dist.agree(only_rank_1_fails)
        failed = None
    except AgreedError as err:
        failed = (str(err), err.exit_code)
    return {"failed": failed, "shared": dist.agree(lambda: f"rank {dist.rank}", share=True)}


def main(out: str) -> None:
    torch.set_default_dtype(torch.float64)
    with process_group("cpu") as dist:
        result = {"rank": dist.rank, "world": dist.world_size,
                  "steps": {kind: sync_bn_steps(dist, shape) for kind, shape in SHAPES.items()},
                  "dist_bn": {mode: dist_bn(dist, mode) for mode in ("broadcast", "reduce", "none")},
                  "agree": agreement(dist)}
        torch.save(result, f"{out}/rank{dist.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
