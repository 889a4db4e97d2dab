"""Loss-landscape and internal-covariate-shift probes (Santurkar, Tsipras, Ilyas & Madry 2018).

Every ``train.landscape.every`` training steps, at the current weights x and on the current
training batch, after the step's backward pass and before the optimizer applies the step:

- the update u: the change the run's optimizer is about to make to every parameter (found by
  letting the optimizer take the step and putting weights and optimizer state back exactly);
- the direction d: ``direction: update`` (default) moves along u; ``direction: gradient`` moves
  along -lr*g, the paper's SGD step, with lr the learning rate of this step and g the batch gradient;
- for every step size c in ``scales`` (multiples of d):
    loss         L(x + c d)                                  ("variation of the loss": its range over c)
    grad_change  ||grad L(x + c d) - grad L(x)||_2            (gradient predictiveness)
    beta         grad_change / ||c d||_2                       (effective beta-smoothness: its max over c)
    curvature    <grad L(x + c d) - grad L(x), c d> / ||c d||^2  (the Hessian's Rayleigh quotient along d,
                                                             averaged over the segment; exact on a quadratic)
- per layer i (conv/linear i with the norm after it), Santurkar's Definition 2.1:
    G  = grad of layer i's parameters at x;  G' = the same gradient after layers 1..i-1 moved by
    their update u (layers i..k unchanged);  ics_l2 = ||G - G'||_2, ics_cos = cos(G, G').

Every forward pass of a probe runs in train mode (batch statistics, as the step itself) with one
fixed random seed per probe, so dropout masks and noisy-BN noise are the same in all of them and
differences come from the weights alone. The probe changes nothing about training: weights,
gradients, optimizer state and BN buffers are put back bit for bit, and every random draw is made
inside ``torch.random.fork_rng``, so the run's random streams are untouched.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnctl import rundir
from bnctl.errors import ConfigError

COLUMNS = ["step", "epoch", "layer", "scale", "measure", "value"]
SCALE_MEASURES = ("loss", "grad_change", "beta", "curvature")
# Per-probe summaries (layer and scale empty): what the figures plot.
SUMMARY_MEASURES = ("loss_here", "grad_norm", "step_norm", "lr", "loss_min", "loss_max", "loss_range",
                    "grad_change_max", "beta_max")
LAYER_MEASURES = ("ics_l2", "ics_cos", "grad_norm")

Tensors = list[torch.Tensor]


# ------------------------------------------------------------------ the measures (any loss, any parameters)

def _norm(vs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((v.double() ** 2).sum() for v in vs))


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def loss_and_grad(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Tensors]:
    """The loss at the parameters' current values and its gradient, leaving every .grad alone."""
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return loss.detach().double(), [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


@torch.no_grad()
def _set(params: Sequence[torch.Tensor], base: Sequence[torch.Tensor], moves: Sequence[torch.Tensor] | None,
         c: float = 1.0) -> None:
    for p, b, m in zip(params, base, moves if moves is not None else [None] * len(params)):
        p.copy_(b if m is None else b + c * m)


def along(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor],
          scales: Sequence[float], here: tuple[torch.Tensor, Tensors] | None = None) -> dict[str, Any]:
    """Loss, gradient change, beta and curvature at x + c*direction for each c; params end where they began.

    Returns tensors (no device sync): ``loss_here``, ``grad_norm``, ``step_norm`` (||direction||) and, per
    scale, stacked ``loss``, ``grad_change``, ``beta``, ``curvature``.
    """
    base = [p.detach().clone() for p in params]
    loss0, g0 = here if here is not None else loss_and_grad(loss_fn, params)
    d_norm = _norm(direction)
    out: dict[str, list] = {m: [] for m in SCALE_MEASURES}
    try:
        for c in scales:
            _set(params, base, direction, c)
            loss_c, g_c = loss_and_grad(loss_fn, params)
            diff = [a - b for a, b in zip(g_c, g0)]
            change, dist = _norm(diff), c * d_norm
            out["loss"].append(loss_c)
            out["grad_change"].append(change)
            out["beta"].append(change / dist)
            out["curvature"].append(c * _dot(diff, direction) / dist**2)
    finally:
        _set(params, base, None)
    return {"loss_here": loss0, "grad_norm": _norm(g0), "step_norm": d_norm,
            **{m: torch.stack(v) for m, v in out.items()}}


def covariate_shift(loss_fn: Callable[[], torch.Tensor], layers: Sequence[tuple[str, Sequence[torch.Tensor]]],
                    update: Sequence[Sequence[torch.Tensor]],
                    here: Sequence[Sequence[torch.Tensor]] | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Santurkar's Definition 2.1 for layers 2..k: (name, ||G - G'||, cos(G, G'), ||G||).

    ``layers`` are (name, parameters) in forward order and ``update[i]`` the update of layer i's
    parameters; ``here[i]``, when given, is G for layer i (the gradient at the current weights).
    Layer 1 is left out: nothing comes before it, so G' = G by definition.
    """
    params = [p for _, ps in layers for p in ps]
    base = [p.detach().clone() for p in params]
    if here is None:
        _, flat = loss_and_grad(loss_fn, params)
        here, k = [], 0
        for _, ps in layers:
            here.append(flat[k:k + len(ps)])
            k += len(ps)
    found = []
    try:
        for i in range(1, len(layers)):
            with torch.no_grad():  # layer i-1 joins the updated ones (layers before it already moved)
                for p, u in zip(layers[i - 1][1], update[i - 1]):
                    p.add_(u)
            ps = list(layers[i][1])
            if not ps:
                continue
            _, g_after = loss_and_grad(loss_fn, ps)
            g = here[i]
            diff = _norm([a - b for a, b in zip(g, g_after)])
            gn, gn_after = _norm(g), _norm(g_after)
            cos = _dot(g, g_after) / (gn * gn_after).clamp_min(1e-300)
            found.append((layers[i][0], diff, cos, gn))
    finally:
        _set(params, base, None)
    return found


# ------------------------------------------------------------------ layers and the optimizer's update

def model_layers(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The model's layers in registration (= forward, for seed_cnn and vgg) order: each conv/linear
    layer with the parameters of the modules after it up to the next one (its norm's gamma and beta).

    Names follow diagnostics.csv's (conv1, conv2, ..., fc1, fc2), the last classifier layer included.
    """
    layers: list[tuple[str, list[nn.Parameter]]] = []
    counts = {"conv": 0, "fc": 0}
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            kind = "conv" if isinstance(m, nn.Conv2d) else "fc"
            counts[kind] += 1
            layers.append((f"{kind}{counts[kind]}", own))
        elif own:
            if not layers:
                layers.append(("input", []))
            layers[-1][1].extend(own)
    return layers


def optimizer_update(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Tensors:
    """The change optimizer.step() would make to params now; parameters, gradients and state are put back.

    The optimizer takes the step for real (any optimizer, any options), the change is read off, and
    everything it touched is restored bit for bit, so the training step that follows is unchanged.
    """
    before = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    state = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    optimizer.step()
    update = [p.detach() - b for p, b in zip(params, before)]
    _set(params, before, None)
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
        else:
            p.grad.copy_(g)
    for p in list(optimizer.state):
        if p not in state:
            del optimizer.state[p]
    for p, s in state.items():
        optimizer.state[p] = s
    return update


# ------------------------------------------------------------------ the probe the training loop calls

class LandscapeProbe:
    """Landscape and ICS measurements every few steps into landscape.csv (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: Any, path: Path,
                 seed: int = 0, precision: Any = None, keep_before_epoch: int = 1):
        self.model, self.optimizer, self.settings = model, optimizer, settings
        self.every, self.scales = settings.every, [float(c) for c in settings.scales]
        self.precision, self.seed = precision, seed
        self.step, self.epoch, self.due = 0, 0, False
        self.layers = model_layers(model)
        self.rows: list[tuple] = []
        self.path, self.writer = path, None
        self._kept: list[tuple] = []
        if keep_before_epoch > 1 and path.is_file():  # a resumed run keeps the probes of its finished epochs
            self._kept = [tuple("" if r[c] is None else r[c] for c in COLUMNS) for r in rundir.read_csv(path)
                          if isinstance(r["epoch"], int) and r["epoch"] < keep_before_epoch]

    @classmethod
    def for_experiment(cls, exp: Any, run_dir: Path, start_epoch: int) -> "LandscapeProbe":
        if exp.dist.enabled:
            raise ConfigError("train.landscape probes one process's model; run it without torchrun "
                              "(its forward passes would wait for the other processes' BN statistics)")
        if exp.precision.scaler.is_enabled():
            raise ConfigError("train.landscape needs train.precision fp32 or bf16 (fp16's loss scaling "
                              "changes the gradients it compares)")
        return cls(exp.model, exp.optimizer, exp.cfg.train.landscape, run_dir / rundir.LANDSCAPE_FILE,
                   seed=exp.cfg.seed, precision=exp.precision, keep_before_epoch=start_epoch)

    def open(self) -> None:
        """Start landscape.csv afresh with the kept rows (separate from reading, which may fail)."""
        self.writer = rundir.CsvAppender(self.path, COLUMNS)
        self.writer.extend(self._kept)
        self._kept = []

    def start_step(self, step: int, epoch: int) -> None:
        self.step, self.epoch = step, epoch
        self.due = step % self.every == 0

    def after_backward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        """Measure at this step's weights and batch (its gradients are in .grad), then leave no trace."""
        if not self.due or x is None:
            return
        self.due = False
        model = self.model
        layers = [(n, ps) for n, ps in self.layers]
        params = [p for _, ps in layers for p in ps]
        update = optimizer_update(self.optimizer, params)
        buffers = [b.detach().clone() for b in model.buffers()]
        device = x.device
        seed = (self.seed * 1_000_003 + self.step) % (2**63)
        autocast = self.precision.autocast if self.precision is not None else contextlib.nullcontext

        def loss_fn() -> torch.Tensor:
            torch.manual_seed(seed)  # the same dropout masks and BN noise in every pass of this probe
            with autocast():
                return F.cross_entropy(model(x).float(), y)

        try:
            # manual_seed in loss_fn reseeds every CUDA device of the process, so every one is restored.
            with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if device.type == "cuda" else []):
                loss0, g0 = loss_and_grad(loss_fn, params)
                if self.settings.direction == "gradient":
                    lr = {id(p): group["lr"] for group in self.optimizer.param_groups for p in group["params"]}
                    direction = [-lr[id(p)] * g for p, g in zip(params, g0)]
                else:
                    direction = update
                found = along(loss_fn, params, direction, self.scales, here=(loss0, g0))
                shift = []
                if self.settings.ics:
                    here, k = [], 0
                    for _, ps in layers:
                        here.append(g0[k:k + len(ps)])
                        k += len(ps)
                    ups, k = [], 0
                    for _, ps in layers:
                        ups.append(update[k:k + len(ps)])
                        k += len(ps)
                    shift = covariate_shift(loss_fn, layers, ups, here)
        finally:
            with torch.no_grad():  # the probe's passes must not count in BN's running statistics
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
        self._record(found, shift)

    def _record(self, found: dict[str, Any], shift: list) -> None:
        lr = float(self.optimizer.param_groups[0]["lr"])
        values = torch.stack([found["loss_here"], found["grad_norm"], found["step_norm"],
                              *found["loss"], *found["grad_change"], *found["beta"], *found["curvature"],
                              *[v for _, l2, cos, gn in shift for v in (l2, cos, gn)]]).cpu().tolist()  # one sync
        loss_here, grad_norm, step_norm = values[:3]
        n = len(self.scales)
        per = {m: values[3 + j * n: 3 + (j + 1) * n] for j, m in enumerate(SCALE_MEASURES)}
        rest = values[3 + 4 * n:]
        s, e = self.step, self.epoch
        rows = [(s, e, "", c, m, per[m][j]) for j, c in enumerate(self.scales) for m in SCALE_MEASURES]
        summary = {"loss_here": loss_here, "grad_norm": grad_norm, "step_norm": step_norm, "lr": lr,
                   "loss_min": min(per["loss"]), "loss_max": max(per["loss"]),
                   "loss_range": max(per["loss"]) - min(per["loss"]),
                   "grad_change_max": max(per["grad_change"]), "beta_max": max(per["beta"])}
        rows += [(s, e, "", "", m, summary[m]) for m in SUMMARY_MEASURES]
        for i, (name, *_rest) in enumerate(shift):
            for j, m in enumerate(LAYER_MEASURES):
                rows.append((s, e, name, "", m, rest[3 * i + j]))
        self.rows += rows

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.extend(self.rows)
        self.rows.clear()

    def close(self) -> None:
        self.flush()  # an unfinished epoch's probes; a resumed run drops and redoes them


class Probes:
    """Several probes called as one by the training loop (BN diagnostics, landscape)."""

    def __init__(self, *probes: Any):
        self.probes = [p for p in probes if p is not None]

    @property
    def rows(self) -> list:
        """The BN diagnostics' samples (what TensorBoard shows), none when only the landscape is probed."""
        return next((p.rows for p in self.probes if not isinstance(p, LandscapeProbe)), [])

    def open(self) -> None:
        for p in self.probes:
            p.open()

    def start_step(self, step: int, epoch: int) -> None:
        for p in self.probes:
            p.start_step(step, epoch)

    def after_backward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        for p in self.probes:
            p.after_backward(x, y)

    def flush(self) -> None:
        for p in self.probes:
            p.flush()

    def close(self) -> None:
        for p in self.probes:
            p.close()


def attach(probe: Any, exp: Any, run_dir: Path, start_epoch: int) -> Any:
    """The training loop's probe: the given one (BN diagnostics or None), plus the landscape probe when on."""
    if not exp.cfg.train.landscape.every:
        return probe
    return Probes(probe, LandscapeProbe.for_experiment(exp, run_dir, start_epoch))
