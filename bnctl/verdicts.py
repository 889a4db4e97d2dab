"""The verdict rules of `bnctl study claims`: each claim's effect, its 95% interval, and what it lets us say.

Every rule reduces a sweep's results to one effect whose sign says which way the data
point, and to a 95% interval. The verdict is then the same for all claims:

- "supported": the interval lies entirely on the side the claim predicts;
- "contradicted": the interval lies entirely on the other side;
- "inconclusive at this budget": the interval includes zero (more seeds or epochs could
  move it either way; the data do not decide).

The rules read only result rows (dicts from results.csv: swept keys, status, metrics),
so they are tested on constructed results and run on any machine. They never read
anything the sweep did not measure; every verdict carries its rule in plain words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from bnctl import stats

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive at this budget"

# A cell "trains" when its mean final test accuracy is this many points above chance.
TRAINS_MARGIN = 10.0


@dataclass
class Verdict:
    """A claim's verdict: the rule, the effect with its 95% interval, and the facts the effect was built from."""

    claim: str
    rule: str
    verdict: str
    effect: stats.Difference | None
    effect_name: str  # what the effect measures, with its unit
    details: list[str] = field(default_factory=list)  # supporting facts, one sentence each
    no_effect: str = "not enough finished runs"  # why there is no effect, when there is none

    def sentence(self) -> str:
        if self.effect is None:
            return f"{self.verdict}: {self.no_effect}, so {self.effect_name} cannot be estimated."
        e = self.effect
        return (f"{self.verdict}: {self.effect_name} = {e.effect:+.2f} points, 95% interval "
                f"[{e.lo:+.2f}, {e.hi:+.2f}] ({e.method}, n={'/'.join(map(str, e.n))}).")


def decide(effect: stats.Difference | None) -> str:
    """The common rule: positive effects are what the claim predicts."""
    if effect is None:
        return INCONCLUSIVE
    if effect.lo > 0:
        return SUPPORTED
    if effect.hi < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def _values(rows: Sequence[dict], metric: str, chance: float | None = None, **where: Any) -> list[float]:
    """metric over the finished runs matching where; a diverged run counts as chance when chance is given."""
    out = []
    for r in rows:
        if any(r.get(k) != v for k, v in where.items()):
            continue
        if r.get("status") == "completed" and r.get(metric) is not None:
            out.append(float(r[metric]))
        elif r.get("status") == "diverged" and chance is not None:
            out.append(chance)
    return out


def _levels(rows: Sequence[dict], key: str) -> list:
    return sorted({r[key] for r in rows if r.get(key) is not None})


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------ claim 1

def higher_lr(rows: Sequence[dict], chance: float, norm_key: str = "model.norm", lr_key: str = "optimizer.lr",
              arm: str = "batch", control: str = "none") -> Verdict:
    """BN trains at higher learning rates: BN minus no-BN final test accuracy at the highest lr where either trains."""
    trains_at: dict[str, list] = {}
    for norm in (arm, control):
        trains_at[norm] = [lr for lr in _levels(rows, lr_key)
                           if (m := _mean(_values(rows, "final_test_acc", chance, **{norm_key: norm, lr_key: lr})))
                           is not None and m >= chance + TRAINS_MARGIN]
    either = sorted(set(trains_at[arm]) | set(trains_at[control]))
    rule = (f"A norm trains at a learning rate when its mean final test accuracy is at least {TRAINS_MARGIN:g} "
            f"points above chance ({chance:g}%), diverged runs counting as chance. At the highest learning rate "
            f"where either norm trains, compare final test accuracy, {arm} minus {control} (Welch's t-test): "
            "supported if the 95% interval is above 0, contradicted if below, inconclusive otherwise.")
    details = [(f"model.norm={norm} trains at lr " + ", ".join(f"{lr:g}" for lr in lrs)) if lrs
               else f"model.norm={norm} trains at no learning rate of the grid" for norm, lrs in trains_at.items()]
    if not either:
        return Verdict("higher learning rates", rule, INCONCLUSIVE, None, "the accuracy difference", details,
                       no_effect="neither norm trains at any learning rate of the grid")
    top = either[-1]
    effect = stats.welch(_values(rows, "final_test_acc", chance, **{norm_key: arm, lr_key: top}),
                         _values(rows, "final_test_acc", chance, **{norm_key: control, lr_key: top}))
    return Verdict("higher learning rates", rule, decide(effect), effect,
                   f"final test accuracy at lr {top:g}, {arm} minus {control}", details)


# ------------------------------------------------------------------ claim 2

def _shortfall_weights(means: Sequence[float]) -> list[float]:
    """Weights w with sum(w_i * mean_i) = max(means) - mean(means): the shortfall as a linear contrast of cell means."""
    k, best = len(means), max(range(len(means)), key=lambda i: means[i])
    return [(1.0 if i == best else 0.0) - 1.0 / k for i in range(k)]


def init_sensitivity(rows: Sequence[dict], chance: float, norm_key: str = "model.norm",
                     scale_key: str = "model.init_scale", arm: str = "batch", control: str = "none") -> Verdict:
    """BN reduces sensitivity to initialization: per norm, how far its accuracy falls short of its best scale on average.

    The shortfall (best per-scale mean minus the mean over scales of the per-scale means) is not
    fooled by an arm that fails almost everywhere: a spread (best minus worst) is small for an arm
    at chance at most scales, the shortfall is large.
    """
    scales = _levels(rows, scale_key)
    samples = [_values(rows, "final_test_acc", chance, **{norm_key: n, scale_key: s})
               for n in (arm, control) for s in scales]
    rule = (f"Per norm, the shortfall is its best mean final test accuracy over the {scale_key} grid minus "
            "its mean accuracy averaged over all scales of the grid (diverged runs count as chance): how many "
            "points a scale picked from the grid costs on average, against the norm's best one. Effect: "
            f"{control}'s shortfall minus {arm}'s. With each norm's best scale taken as found, this is a linear "
            "contrast of cell means, so its 95% interval is a Welch-Satterthwaite t-interval (it stays honest with "
            "3 seeds per cell, where a percentile bootstrap is far too narrow); picking the best cell from the same "
            "data favours both norms' shortfall alike: supported if above 0, contradicted if below, "
            "inconclusive otherwise. The spread (best minus worst) and the number of scales each norm trains at are reported "
            "beside it.")
    details = []
    for n, chunk in ((arm, samples[:len(scales)]), (control, samples[len(scales):])):
        means = [_mean(s) for s in chunk]
        if all(m is not None for m in means) and means:
            trains = [f"{s:g}" for s, m in zip(scales, means) if m >= chance + TRAINS_MARGIN]
            details.append(f"model.norm={n}: mean accuracy by scale " + ", ".join(
                f"{s:g}: {m:.1f}%" for s, m in zip(scales, means))
                + f"; shortfall {max(means) - sum(means) / len(means):.1f} points"
                + f"; spread {max(means) - min(means):.1f} points"
                + f"; trains (>= {chance + TRAINS_MARGIN:g}%) at {len(trains)} of {len(scales)} scales")
    effect = None
    arm_means, control_means = [_mean(s) for s in samples[:len(scales)]], [_mean(s) for s in samples[len(scales):]]
    if len(scales) >= 2 and None not in arm_means + control_means:
        weights = [-w for w in _shortfall_weights(arm_means)] + _shortfall_weights(control_means)
        effect = stats.contrast(samples, weights)
    return Verdict("initialization", rule, decide(effect), effect,
                   f"shortfall from the best init scale, {control} minus {arm}", details)


# ------------------------------------------------------------------ claim 3

def regularization(rows: Sequence[dict], norm_key: str = "model.norm", dropout_key: str = "model.dropout",
                   arm: str = "batch", control: str = "none", dropout: float = 0.3) -> Verdict:
    """BN regularizes like dropout: does BN shrink the train-test gap of the plain network, as dropout does?"""
    def gaps(**where):
        return _values(rows, "gap", **where)

    base = gaps(**{norm_key: control, dropout_key: 0.0})
    effect = stats.welch(base, gaps(**{norm_key: arm, dropout_key: 0.0}))
    reference = stats.welch(base, gaps(**{norm_key: control, dropout_key: dropout}))
    rule = ("The gap is eval-mode train accuracy minus test accuracy at the last epoch (train.eval_train). "
            f"Effect: the gap without normalization minus the gap with {arm} norm, both without dropout (Welch): "
            "supported if the 95% interval is above 0 (BN shrinks the gap), contradicted if below, inconclusive "
            f"otherwise. Dropout {dropout:g} on the plain network is the reference regularizer. The gap is taken "
            "after a fixed number of epochs: an arm that has not yet fit its training set has a small gap for "
            "that reason alone, so read it beside each arm's train accuracy (test accuracy plus gap).")
    details = []
    for n in (control, arm):
        for d in (0.0, dropout):
            s = stats.summarize(gaps(**{norm_key: n, dropout_key: d}))
            acc = stats.summarize(_values(rows, "final_test_acc", **{norm_key: n, dropout_key: d}))
            if s.n:
                accuracy = f", test acc {acc.mean:.1f}%" if acc.n else ""  # results without it: the gap alone
                details.append(f"norm={n}, dropout={d:g}: gap {s.mean:.1f} points{accuracy} (n={s.n})")
    if reference is not None:
        details.append(f"dropout {dropout:g} changes the plain network's gap by {-reference.effect:+.1f} points, "
                       f"95% interval [{-reference.hi:+.1f}, {-reference.lo:+.1f}] (Welch)")
    return Verdict("regularization", rule, decide(effect), effect,
                   f"train-test gap, {control} minus {arm} (no dropout)", details)


# ------------------------------------------------------------------ claim 4

def small_batches(rows: Sequence[dict], chance: float, norm_key: str = "model.norm",
                  batch_key: str = "train.batch_size", arm: str = "batch", control: str = "group") -> Verdict:
    """BN suffers at small batches more than GN: each norm's accuracy drop from the largest to the smallest batch."""
    sizes = _levels(rows, batch_key)
    rule = (f"Per norm, the drop is mean final test accuracy at the largest {batch_key} minus at the smallest "
            f"(diverged runs count as chance; Welch interval per norm). Effect: {arm}'s drop minus {control}'s, "
            "a difference in differences with a Welch-Satterthwaite 95% t-interval: supported if above 0, "
            "contradicted if below, inconclusive otherwise. All batch sizes train for the same number of epochs, "
            f"so smaller batches take more steps; {control}, which does not use batch statistics, is the control "
            "for that (and for anything else that changes with the batch size), which holds as far as both norms "
            "gain alike from the extra steps. Each norm's own drop mixes both.")
    if len(sizes) < 2:
        return Verdict("small batches", rule, INCONCLUSIVE, None, "the difference in drops")
    big, small = sizes[-1], sizes[0]
    details = []
    for n in _levels(rows, norm_key):
        d = stats.welch(_values(rows, "final_test_acc", chance, **{norm_key: n, batch_key: big}),
                        _values(rows, "final_test_acc", chance, **{norm_key: n, batch_key: small}))
        if d is not None:
            details.append(f"model.norm={n}: drop from batch {big} to {small} = {d.effect:+.1f} points, "
                           f"95% interval [{d.lo:+.1f}, {d.hi:+.1f}]")
    samples = [_values(rows, "final_test_acc", chance, **{norm_key: n, batch_key: b})
               for n in (arm, control) for b in (big, small)]
    effect = stats.contrast(samples, (1, -1, -1, 1))
    return Verdict("small batches", rule, decide(effect), effect,
                   f"accuracy drop from batch {big} to {small}, {arm} minus {control}", details)


# ------------------------------------------------------------------ claim 5

def notebook_eval(running: Sequence[float], batch_stats: Sequence[float], recalibrated: Sequence[float],
                  batch_size: int = 4) -> Verdict:
    """The notebook's evaluation (train-mode BN on test batches) costs accuracy: paired over the same checkpoints."""
    effect = stats.paired(running, batch_stats)
    rule = (f"Each BN checkpoint is evaluated three ways: eval mode (running statistics), BN with each test "
            f"batch of {batch_size}'s own statistics (the notebook's evaluation), and eval mode after "
            "recalibrating the statistics. Effect: eval-mode minus test-batch accuracy, paired by checkpoint "
            "(paired t-test): supported (the notebook's evaluation understates accuracy) if the 95% interval is "
            "above 0, contradicted if below, inconclusive otherwise.")
    details = []
    recal = stats.paired(recalibrated, running)
    if recal is not None:
        details.append(f"recalibration changes eval-mode accuracy by {recal.effect:+.2f} points, 95% interval "
                       f"[{recal.lo:+.2f}, {recal.hi:+.2f}] (paired t, n={recal.n[0]})")
    return Verdict("the notebook's evaluation", rule, decide(effect), effect,
                   f"eval-mode minus batch-{batch_size}-statistics accuracy", details)
