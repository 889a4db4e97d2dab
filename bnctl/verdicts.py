"""The verdict rules of `bnctl study claims`: per claim an estimand, a test, and a calibrated verdict.

Each section's sweep file declares its estimand (bnctl.studyspec): the contrast that tests the
claim and the smallest effect that matters. Every effect is signed so that **positive is the
direction the claim predicts**. A rule reduces result rows to that effect with a 95% interval,
a p-value and a minimum detectable effect, after checking that the design can test the claim
at all (its gates). Then, across the sections of a study (decide_all):

- "supported" / "contradicted": Holm-adjusted p below 5% and the 95% interval on the claim's
  side / the other side: the study-wide chance of any false decisive verdict is at most 5%;
- "no effect larger than X": the 90% interval lies within +-X, X the declared smallest effect
  that matters (two one-sided tests at 5%);
- "inconclusive": neither; the minimum detectable effect (80% power at Holm's strictest level)
  says how large an effect this budget could have found;
- "not testable here": a gate failed (the grid never reaches a limit, the positive control did
  not work, an arm did not fit its training set, the control is not flat), with the reason;
- "incomplete": some runs of the section have not finished yet.

The rules read only result rows (dicts from results.csv: swept keys, status, metrics), so they
are tested on simulated worlds and run on any machine (no torch). tests/test_calibration.py
measures their false-decision rates in null worlds.

Over 350 lines: every section's rule with its gates, and the study-wide decision they share (Holm,
equivalence, minimum detectable effects); the rules must stay consistent with one another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from bnctl import stats, studyspec

SUPPORTED, CONTRADICTED, EQUIVALENT, INCONCLUSIVE, NOT_TESTABLE, INCOMPLETE = (
    "supported", "contradicted", "no effect larger than", "inconclusive", "not testable", "incomplete")
TRAINS = 10.0  # points above chance: below this at its reference a norm has learned nothing a comparison could use
FINISHED = ("completed", "diverged", "failed")  # a failed run will not produce a result by waiting



# How a report names each test: proper names capitalized, as in the documentation.
METHOD_NAMES = {"welch": "Welch", "welch contrast": "Welch contrast", "paired t": "paired t",
                "permutation": "permutation"}


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def n_text(n: tuple[int, ...]) -> str:
    """'n=3/4' for two samples; 'n=3 per cell' (or 'n=2-3 per cell') for a contrast over many cells."""
    if len(n) <= 2:
        return "n=" + "/".join(map(str, n))
    return f"n={n[0]} per cell" if len(set(n)) == 1 else f"n={min(n)}-{max(n)} per cell"

@dataclass
class Verdict:
    """A claim's verdict: the estimand, the effect with its interval and p-values, and what the data say beside it."""

    claim: str  # short name of the claim
    statement: str  # the claim in words
    estimand: str  # what is estimated, in words, with the sign convention
    rule: str  # how the verdict follows from it
    effect_name: str
    unit: str
    smallest: float  # the declared smallest effect that matters, in unit
    effect: stats.Difference | None = None
    details: list[str] = field(default_factory=list)  # supporting numbers, one sentence each
    caveats: list[str] = field(default_factory=list)  # generated from the data: what limits the verdict
    reason: str | None = None  # why not testable / incomplete / no estimate
    status: str = "tested"  # tested | not testable | incomplete
    no_support: str | None = None  # a fact that forbids "supported" even when the test is decisive
    kind: str = INCONCLUSIVE
    p_adjusted: float | None = None
    mde: float | None = None
    mde_alpha: float = stats.ALPHA

    @property
    def verdict(self) -> str:
        if self.kind == EQUIVALENT:
            return f"{EQUIVALENT} {self.smallest:g} {self.unit}"
        return self.kind

    def mde_text(self) -> str:
        if self.effect is None:
            return "-"
        if self.mde is None:
            if self.effect.min_p > self.mde_alpha:
                return (f"none: with {n_text(self.effect.n)} the smallest possible p-value is "
                        f"{self.effect.min_p:.2g}, above {self.mde_alpha:.2g}")
            return "-"
        return f"{self.mde:.2f} {self.unit}"

    def effect_text(self) -> str:
        e = self.effect
        if e is None:
            return self.reason or "no estimate"
        p = "" if e.p is None else f", p={e.p:.2g}" + ("" if self.p_adjusted is None else
                                                          f", Holm-adjusted p={self.p_adjusted:.2g}")
        return (f"{self.effect_name} = {e.effect:+.2f} {self.unit}, 95% interval [{e.lo:+.2f}, {e.hi:+.2f}] "
                f"({method_name(e.method)}, {n_text(e.n)}{p})")

    def sentence(self) -> str:
        if self.status == NOT_TESTABLE:  # its reason starts "at this grid:", "at this budget:" or "here:"
            return f"{self.verdict} {self.reason}."
        if self.status != "tested" or self.effect is None:
            return f"{self.verdict}: {self.reason or 'no estimate'}."
        tail = {INCONCLUSIVE: f"; the smallest effect this budget detects with 80% power is {self.mde_text()}",
                EQUIVALENT: f"; the 90% interval [{self.effect.lo90:+.2f}, {self.effect.hi90:+.2f}] lies within "
                            f"+-{self.smallest:g}"}.get(self.kind, "")
        why = f" ({self.reason})" if self.reason and self.kind == INCONCLUSIVE else ""
        return f"{self.verdict}{why}: {self.effect_text()}{tail}."


def decide_all(found: Sequence[Verdict], alpha: float = stats.ALPHA) -> list[Verdict]:
    """Holm across the tested sections, then each verdict from its adjusted p, interval and equivalence test."""
    tested = [v for v in found if v.status == "tested" and v.effect is not None and v.effect.p is not None]
    adjusted = stats.holm([v.effect.p for v in tested])
    m = max(1, len(tested))
    for v in found:
        if v.status == NOT_TESTABLE:
            v.kind = NOT_TESTABLE
        elif v.status == INCOMPLETE:
            v.kind = INCOMPLETE
        elif v.effect is None or v.effect.p is None:
            v.kind = INCONCLUSIVE
    for v, p in zip(tested, adjusted):
        e = v.effect
        v.p_adjusted = p
        v.mde_alpha = alpha / m  # Holm's strictest step: what an effect alone must clear
        v.mde = stats.mde(e, v.mde_alpha)
        if p < alpha and e.lo > 0:
            v.kind = SUPPORTED
            if v.no_support:
                v.kind, v.reason = INCONCLUSIVE, v.no_support
        elif p < alpha and e.hi < 0:
            v.kind = CONTRADICTED
        elif e.equivalent_within(v.smallest):
            v.kind = EQUIVALENT
        else:
            v.kind = INCONCLUSIVE
    return list(found)


# ------------------------------------------------------------------ reading rows

def _match(row: dict, where: dict[str, Any]) -> bool:
    return all(_same(row.get(k), v) for k, v in where.items())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def values(rows: Sequence[dict], metric: str, chance: float | None = None, **where: Any) -> list[float]:
    """metric over the completed runs matching where; a diverged run counts as chance when chance is given."""
    out = []
    for r in rows:
        if not _match(r, where):
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


def _unfinished(rows: Sequence[dict]) -> str | None:
    """'k of n runs finished' when some runs of the section have not finished (nothing decided then)."""
    done = sum(r.get("status") in FINISHED for r in rows)
    return None if done == len(rows) else f"{done} of {len(rows)} runs finished; rerun with --resume to finish"


def _incomplete(v: Verdict, rows: Sequence[dict]) -> Verdict | None:
    """The section's verdict when some of its runs have not finished (nothing is decided then); otherwise
    None, after noting failed, interrupted or diverged runs among the caveats."""
    if (why := _unfinished(rows)) is not None:
        v.status, v.reason = INCOMPLETE, why
        return decide_all([v])[0]
    v.caveats += _status_caveats(rows)
    return None


def _status_caveats(rows: Sequence[dict]) -> list[str]:
    out = []
    failed = sum(r.get("status") == "failed" for r in rows)
    diverged = sum(r.get("status") == "diverged" for r in rows)
    if failed:
        out.append(f"{failed} run(s) failed and are left out of every number")
    if diverged:
        out.append(f"{diverged} run(s) diverged")
    return out


def _base(spec, claim: str, estimand: str, rule: str, effect_name: str) -> Verdict:
    return Verdict(claim, spec.claim, estimand, rule, effect_name, studyspec.UNIT[spec.estimand], spec.smallest_effect)


def _fmt_level(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# ------------------------------------------------------------------ claim 1: learning-rate tolerance

def lr_tolerance(rows: Sequence[dict], spec: studyspec.LrTolerance, chance: float) -> Verdict:
    """Per seed the largest grid lr at which the run trains; arm minus control in decades, exact permutation test."""
    lrs = _levels(rows, spec.lr_key)
    threshold = chance + spec.trains_above_chance
    logs = [math.log10(lr) for lr in lrs]
    step = max((b - a for a, b in zip(logs, logs[1:])), default=1.0)
    v = _base(spec, "higher learning rates",
              f"per seed, the largest learning rate of the grid at which the run trains (final test accuracy at "
              f"least {threshold:g}%, chance + {spec.trains_above_chance:g}; a diverged run does not train), on a "
              f"log10 scale; {spec.arm} minus {spec.control}, in decades (positive: {spec.arm} tolerates larger "
              "learning rates). A seed that trains at no learning rate of the grid sits one step below it.",
              "The mean difference in decades with an exact permutation test over seeds (ties allowed; this is "
              "ordinal data on the grid); its 95% interval inverts the same test over shifts and is widened by half "
              "a grid step for the grid's resolution. Not testable when every seed of both norms trains at the "
              "grid's largest learning rate (no limit reached) or none trains anywhere.",
              f"largest trainable lr, {spec.arm} minus {spec.control}")
    if (early := _incomplete(v, rows)) is not None:
        return early
    if len(lrs) < 2:
        v.status, v.reason = NOT_TESTABLE, f"at this grid: it has {len(lrs)} learning rate(s); a limit needs at least two"
        return decide_all([v])[0]
    limits: dict[str, list[float]] = {}
    censored: dict[str, int] = {}
    for norm in (spec.arm, spec.control):
        limits[norm], censored[norm] = [], 0
        seeds = sorted({r.get("seed") for r in rows if _match(r, {spec.norm_key: norm})}, key=str)
        for seed in seeds:
            mine = [r for r in rows if _match(r, {spec.norm_key: norm, "seed": seed})]
            if any(r.get("status") == "failed" for r in mine):
                continue  # the seed's limit is unknown
            ok = [r[spec.lr_key] for r in mine if r.get("status") == "completed"
                  and r.get("final_test_acc") is not None and float(r["final_test_acc"]) >= threshold]
            limits[norm].append(math.log10(max(ok)) if ok else logs[0] - step)
            censored[norm] += bool(ok) and _same(max(ok), lrs[-1])
        shown = ", ".join(f"{10 ** x:g}" if x >= logs[0] else "none" for x in limits[norm])
        v.details.append(f"{spec.norm_key}={norm}: largest trainable lr per seed: {shown or 'no finished seed'}")
    a, b = limits[spec.arm], limits[spec.control]
    if a and b and censored[spec.arm] == len(a) and censored[spec.control] == len(b):
        v.status = NOT_TESTABLE
        v.reason = (f"at this grid: both norms train at its largest learning rate ({lrs[-1]:g}) in every "
                    "seed, so neither norm's limit is reached; extend the grid upward")
        return decide_all([v])[0]
    if a and b and max(a + b) < logs[0]:
        v.status = NOT_TESTABLE
        v.reason = "at this grid: neither norm trains at any of its learning rates; extend it downward"
        return decide_all([v])[0]
    span = logs[-1] - logs[0] + step
    v.effect = stats.permutation(a, b, step, span)
    if v.effect is None:
        v.status, v.reason = NOT_TESTABLE, "here: fewer than 2 seeds per norm have a known limit"
        return decide_all([v])[0]
    both = censored[spec.arm] and censored[spec.control]
    for norm in (spec.arm, spec.control):
        if censored[norm]:
            bound = ("unknown in direction there, since both norms are censored" if both else
                     f"{'a lower' if norm == spec.arm else 'an upper'} bound there")
            v.caveats.append(f"{spec.norm_key}={norm} trains at the grid's largest lr ({lrs[-1]:g}) in {censored[norm]} "
                             f"of {len(limits[norm])} seeds: its limit lies above the grid (censored), so the "
                             f"difference is {bound}")
    if step > spec.smallest_effect:
        v.caveats.append(f"the grid's step ({step:g} decade{'' if step == 1 else 's'}) is coarser than the smallest effect that matters "
                         f"({spec.smallest_effect:g}): the grid cannot show that an effect is absent")
    return decide_all([v])[0]


# ------------------------------------------------------------------ claim 2: initialization

def init_reference(rows: Sequence[dict], spec: studyspec.InitReference, chance: float,
                   quantum: float | None = None) -> Verdict:
    """Per norm the accuracy lost by leaving the declared reference scale; control's loss minus arm's (Welch contrast)."""
    scales = _levels(rows, spec.scale_key)
    others = [s for s in scales if not _same(s, spec.reference)]
    v = _base(spec, "initialization",
              f"per norm, the loss: mean final test accuracy at the reference scale {spec.scale_key}="
              f"{spec.reference:g} (declared before the runs: PyTorch's default initialization) minus the average "
              f"over the other {len(others)} scales of the grid (diverged runs count as chance, {chance:g}%); "
              f"{spec.control}'s loss minus {spec.arm}'s, in points (positive: {spec.arm} loses less when the "
              "scale is off).",
              "A fixed linear contrast of cell means (no scale is picked from the data, so there is no selection "
              "bias) with a Welch-Satterthwaite t-interval; each cell's variance is floored at the test set's "
              "rounding.",
              f"loss off the reference scale, {spec.control} minus {spec.arm}")
    if (early := _incomplete(v, rows)) is not None:
        return early
    if not others or not any(_same(s, spec.reference) for s in scales):
        v.status, v.reason = NOT_TESTABLE, f"at this grid: it needs the reference scale {spec.reference:g} and at least one other"
        return decide_all([v])[0]
    ordered = [spec.reference, *others]
    samples = {n: [values(rows, "final_test_acc", chance, **{spec.norm_key: n, spec.scale_key: s}) for s in ordered]
               for n in (spec.arm, spec.control)}
    for n, cells in samples.items():
        means = [_mean(c) for c in cells]
        if None in means:
            continue
        loss = means[0] - sum(means[1:]) / len(others)
        best = max(range(len(ordered)), key=lambda i: means[i])
        v.details.append(f"{spec.norm_key}={n}: mean accuracy by scale " + ", ".join(
            f"{s:g}: {m:.1f}%" for s, m in sorted(zip(ordered, means))) + f"; loss off the reference {loss:+.1f} points")
        if best != 0:
            v.caveats.append(f"{spec.norm_key}={n} does best at scale {ordered[best]:g} ({means[best]:.1f}%), not at "
                             f"the reference {spec.reference:g} ({means[0]:.1f}%)")
        if means[0] < chance + TRAINS:
            v.status = NOT_TESTABLE
            v.reason = (f"here: {spec.norm_key}={n} does not train at the reference scale {spec.reference:g} "
                        f"({means[0]:.1f}%, chance {chance:g}%): its loss off the reference means nothing")
    if v.status == NOT_TESTABLE:
        return decide_all([v])[0]
    k = len(others)
    weights = [-1.0] + [1.0 / k] * k + [1.0] + [-1.0 / k] * k  # arm: -(loss); control: +loss
    v.effect = stats.contrast(samples[spec.arm] + samples[spec.control], weights, stats.quantum_floor(quantum))
    if v.effect is None:
        v.status, v.reason = NOT_TESTABLE, "here: a cell of the grid has fewer than 2 finished runs"
        return decide_all([v])[0]
    return decide_all([v])[0]


# ------------------------------------------------------------------ claim 3: regularization

def gap_reduction(rows: Sequence[dict], spec: studyspec.GapReduction, quantum: float | None = None) -> Verdict:
    """How much the arm shrinks the control's train-test gap, gated on fitting and on dropout (the positive control)."""
    arm, ctl, d, key = spec.arm, spec.control, spec.dropout, spec.dropout_key
    v = _base(spec, "regularization",
              f"the train-test gap (eval-mode train accuracy minus test accuracy at the last epoch) of {ctl} minus "
              f"that of {arm}, both without dropout, in points (positive: {arm} shrinks the gap). Dropout "
              f"{d:g} on {ctl}, the reference regularizer, is measured on the same scale: {ctl}'s gap without "
              "dropout minus with it.",
              f"Welch's t-test on the gaps. Gates, else not testable: every compared arm fits its training set to "
              f"{spec.fit_level:g}% (an arm that has not fit has a small gap for that reason alone), and dropout "
              f"shrinks {ctl}'s gap detectably (one-sided 5%; if the positive control fails, the setup cannot show "
              f"regularization). Not supported when {arm}'s test accuracy is detectably below {ctl}'s.",
              f"gap reduction, {ctl} minus {arm} (no dropout)")
    if (early := _incomplete(v, rows)) is not None:
        return early
    completed = [r for r in rows if r.get("status") == "completed"]
    if completed and all(r.get("gap") is None for r in completed):
        v.status = NOT_TESTABLE
        v.reason = ("here: the sweep did not measure eval-mode train accuracy (train.eval_train is off), so there is no "
                    "train-test gap; run the section with train.eval_train=true")
        return decide_all([v])[0]
    floor = stats.quantum_floor(quantum)
    cells = {(ctl, 0.0): f"{ctl} (no dropout)", (ctl, d): f"{ctl} with dropout {d:g}",
             (arm, 0.0): f"{arm} (no dropout)", (arm, d): f"{arm} with dropout {d:g}"}
    gap, test, train = {}, {}, {}
    for c, name in cells.items():
        where = {spec.norm_key: c[0], key: c[1]}
        gap[c], test[c] = values(rows, "gap", **where), values(rows, "final_test_acc", **where)
        train[c] = values(rows, "final_clean_train_acc", **where)
        if gap[c]:
            v.details.append(f"{name}: train {_mean(train[c]):.1f}%, test {_mean(test[c]):.1f}%, gap "
                             f"{_mean(gap[c]):.1f} points (n={len(gap[c])})")
    compared = [(ctl, 0.0), (ctl, d), (arm, 0.0)]
    if any(len(gap[c]) < 2 for c in compared):
        v.status, v.reason = NOT_TESTABLE, "here: a compared arm has fewer than 2 finished runs with a gap"
        return decide_all([v])[0]
    control = stats.welch(gap[(ctl, 0.0)], gap[(ctl, d)], floor)
    v.details.append(f"dropout {d:g} shrinks {ctl}'s gap by {control.effect:+.1f} points, 95% interval "
                     f"[{control.lo:+.1f}, {control.hi:+.1f}] (Welch)")
    unfit = [f"{cells[c]} reached {_mean(train[c]):.1f}% train accuracy" for c in compared
             if _mean(train[c]) < spec.fit_level]
    if unfit:
        v.status = NOT_TESTABLE
        v.reason = (f"at this budget: an arm did not fit its training set to {spec.fit_level:g}% "
                    f"({'; '.join(unfit)}); train longer or on fewer images")
        v.caveats += [f"did not fit its training set: {u}" for u in unfit]
        if not control.lo90 > 0:
            v.caveats.append(f"dropout {d:g}, the positive control, did not shrink {ctl}'s gap detectably either "
                             f"({control.effect:+.1f} points, 90% interval [{control.lo90:+.1f}, {control.hi90:+.1f}])")
        return decide_all([v])[0]
    if not control.lo90 > 0:
        v.status = NOT_TESTABLE
        v.reason = (f"at this budget: dropout {d:g}, the positive control, did not shrink {ctl}'s gap "
                    f"detectably ({control.effect:+.1f} points, 90% interval [{control.lo90:+.1f}, "
                    f"{control.hi90:+.1f}]), so this setup cannot show regularization")
        return decide_all([v])[0]
    v.effect = stats.welch(gap[(ctl, 0.0)], gap[(arm, 0.0)], floor)
    if control.effect > 0:
        v.details.append(f"{arm}'s reduction is {v.effect.effect / control.effect:.2f} times dropout's")
    if len(gap[(arm, d)]) >= 2 and len(gap[(ctl, d)]) >= 2:
        both = stats.welch(gap[(ctl, d)], gap[(arm, d)], floor)
        v.details.append(f"with dropout {d:g} in both, {arm} shrinks the gap by {both.effect:+.1f} points more, "
                         f"95% interval [{both.lo:+.1f}, {both.hi:+.1f}] (Welch)")
    else:
        v.details.append(f"the {arm} + dropout cell was not run, so whether {arm} adds to dropout is not measured")
    acc = stats.welch(test[(arm, 0.0)], test[(ctl, 0.0)], floor)
    if acc is not None:
        v.details.append(f"test accuracy, {arm} minus {ctl}: {acc.effect:+.1f} points, 95% interval "
                         f"[{acc.lo:+.1f}, {acc.hi:+.1f}]")
        if acc.hi < 0:
            v.no_support = f"{arm}'s gap is smaller but its test accuracy is lower by {-acc.effect:.1f} points"
            v.caveats.append(v.no_support)
        elif not acc.lo90 > -spec.smallest_effect:
            # A gap can shrink because train accuracy falls; a regularizer like dropout must not cost test
            # accuracy, so "supported" needs BN's test accuracy shown no worse than the margin (one-sided 5%).
            v.no_support = (f"{arm}'s test accuracy is not shown to be within {spec.smallest_effect:g} points of "
                            f"{ctl}'s ({acc.effect:+.1f} points, 90% interval [{acc.lo90:+.1f}, {acc.hi90:+.1f}]): "
                            "a smaller gap bought with lower accuracy is not regularization")
            v.caveats.append(v.no_support)
    return decide_all([v])[0]


# ------------------------------------------------------------------ claim 4: small batches

def batch_interaction(rows: Sequence[dict], spec: studyspec.BatchInteraction, chance: float,
                      quantum: float | None = None) -> Verdict:
    """(arm - control) at the reference batch minus at the smallest, from a line in log2(batch) through every size."""
    sizes = _levels(rows, spec.batch_key)
    arm, ctl, ref = spec.arm, spec.control, spec.reference_batch
    v = _base(spec, "small batches",
              f"D(b) = mean final test accuracy of {arm} minus {ctl} at batch b (diverged runs count as chance, "
              f"{chance:g}%); a least-squares line of D against log2(b) over every batch size of the grid; the "
              f"estimand is the line's D at the reference batch {ref} minus at the smallest batch, in points "
              f"(positive: {arm} loses more than {ctl} as the batch shrinks). Every batch size trains for the same "
              "epochs; a sweep's lr_scaling keeps the noise scale equal across batch sizes.",
              f"A linear contrast of the cell means with a Welch-Satterthwaite t-interval. {ctl} is the control: if "
              f"its mean at some batch size differs from its mean at the reference batch by more than "
              f"{spec.control_tolerance:g} points, the difference in differences is not trusted and the section "
              f"is not testable. Not supported unless {arm}'s own fitted accuracy falls detectably as the batch "
              f"shrinks (a drift of {ctl} within the tolerance alone is not a loss of {arm}'s).",
              f"fitted loss from batch {ref} to {sizes[0] if sizes else '?'}, {arm} minus {ctl}")
    if (early := _incomplete(v, rows)) is not None:
        return early
    if len(sizes) < 2 or ref not in sizes or ref == sizes[0]:
        v.status, v.reason = NOT_TESTABLE, f"at this grid: it needs the reference batch {ref} and a smaller one"
        return decide_all([v])[0]
    samples = {(n, b): values(rows, "final_test_acc", chance, **{spec.norm_key: n, spec.batch_key: b})
               for n in (arm, ctl) for b in sizes}
    if any(len(s) < 2 for s in samples.values()):
        v.status, v.reason = NOT_TESTABLE, "here: a cell of the grid has fewer than 2 finished runs"
        return decide_all([v])[0]
    untrained = [(n, _mean(samples[(n, ref)])) for n in (arm, ctl) if _mean(samples[(n, ref)]) < chance + TRAINS]
    if untrained:  # at chance both norms "agree" at every batch size; that is no evidence about the claim
        v.status = NOT_TESTABLE
        v.reason = "here: " + "; ".join(f"{spec.norm_key}={n} does not train at the reference batch {ref} ({m:.1f}%, "
                                        f"chance {chance:g}%)" for n, m in untrained) + ", so there is no accuracy to lose"
        return decide_all([v])[0]
    floor = stats.quantum_floor(quantum)
    x = [math.log2(b) for b in sizes]
    mx = sum(x) / len(x)
    sxx = sum((xi - mx) ** 2 for xi in x)
    span = math.log2(ref) - math.log2(sizes[0])
    c = [(xi - mx) / sxx * span for xi in x]  # slope weights times the distance: the line's D(ref) - D(smallest)
    v.effect = stats.contrast([samples[(arm, b)] for b in sizes] + [samples[(ctl, b)] for b in sizes],
                              c + [-ci for ci in c], floor)
    own = stats.contrast([samples[(arm, b)] for b in sizes], c, floor)  # the arm's own fitted loss, ref to smallest
    v.details.append(f"{arm}'s own fitted loss from batch {ref} to {sizes[0]}: {own.effect:+.1f} points, 95% "
                     f"interval [{own.lo:+.1f}, {own.hi:+.1f}]")
    if not own.lo > 0:
        v.no_support = (f"{arm}'s own accuracy does not fall detectably as the batch shrinks ({own.effect:+.1f} "
                        f"points from batch {ref} to {sizes[0]}, 95% interval [{own.lo:+.1f}, {own.hi:+.1f}]): "
                        f"the difference comes from {ctl} moving")
    means = {k: _mean(s) for k, s in samples.items()}
    for n in (arm, ctl):
        v.details.append(f"{spec.norm_key}={n}: mean accuracy by batch " + ", ".join(
            f"{b}: {means[(n, b)]:.1f}%" for b in sizes))
    for b in sizes:
        if b == ref:
            continue
        dd = stats.contrast([samples[(arm, ref)], samples[(arm, b)], samples[(ctl, ref)], samples[(ctl, b)]],
                            (1, -1, -1, 1), floor)
        v.details.append(f"from batch {ref} to {b}: {arm} loses {dd.effect:+.1f} points more than {ctl}, "
                         f"95% interval [{dd.lo:+.1f}, {dd.hi:+.1f}]")
    moved = [(b, means[(ctl, b)] - means[(ctl, ref)]) for b in sizes if b != ref]
    worst = max(moved, key=lambda t: abs(t[1]))
    if abs(worst[1]) > spec.control_tolerance:
        v.status = NOT_TESTABLE
        v.reason = (f"here: {ctl} is not flat across batch sizes: its accuracy at batch {worst[0]} differs from "
                    f"batch {ref}'s by {worst[1]:+.1f} points (tolerance +-{spec.control_tolerance:g}), so something besides batch statistics "
                    "changes with the batch size (steps, noise, under-training) and the comparison is confounded")
        v.caveats.append(f"{ctl} is not flat across batch sizes ({worst[1]:+.1f} points at batch {worst[0]})")
        return decide_all([v])[0]
    return decide_all([v])[0]


# ------------------------------------------------------------------ claim 5: the notebook's evaluation

def notebook_eval(running: Sequence[float], batch_stats: Sequence[float], recalibrated: Sequence[float],
                  spec: studyspec.NotebookEval | None = None, quantum: float | None = None,
                  incomplete: str | None = None, chance: float | None = None) -> Verdict:
    """Eval-mode minus test-batch-statistics accuracy of the same checkpoints (paired t, variance floored)."""
    spec = spec or studyspec.NotebookEval(estimand="notebook_eval", claim=(
        "The notebook's evaluation (train-mode BN on test batches) understates the network's accuracy."),
        smallest_effect=1.0)
    b = spec.eval_batch
    v = _base(spec, "the notebook's evaluation",
              f"each BN checkpoint evaluated in eval mode (running statistics) and with each test batch of {b}'s own "
              "statistics (the notebook's evaluation); eval-mode minus test-batch accuracy, paired by checkpoint, in "
              "points (positive: the notebook's evaluation understates accuracy).",
              "A paired t-test; the variance of the differences is floored at twice the test set's rounding "
              "variance, so agreeing checkpoints do not give a zero-width interval.",
              f"eval-mode minus batch-{b}-statistics accuracy")
    if incomplete:
        v.status, v.reason = INCOMPLETE, incomplete
        return decide_all([v])[0]
    floor = stats.quantum_floor(quantum if quantum is not None else _quantum_of(list(running) + list(batch_stats)))
    v.effect = stats.paired(running, batch_stats, floor)
    recal = stats.paired(recalibrated, running, floor)
    if recal is not None:
        v.details.append(f"recalibration changes eval-mode accuracy by {recal.effect:+.2f} points, 95% interval "
                         f"[{recal.lo:+.2f}, {recal.hi:+.2f}] (paired t, n={recal.n[0]})")
    if v.effect is None:
        v.status, v.reason = NOT_TESTABLE, f"here: fewer than 2 evaluated checkpoints ({len(list(running))})"
        return decide_all([v])[0]
    if chance is not None and (m := _mean([float(a) for a in running])) < chance + TRAINS:
        v.status = NOT_TESTABLE
        v.reason = (f"here: the checkpoints did not train ({m:.1f}% in eval mode, chance {chance:g}%), so both "
                    "evaluations sit at chance and their agreement says nothing about the notebook's")
        return decide_all([v])[0]
    return decide_all([v])[0]


def _quantum_of(accuracies: Sequence[float]) -> float | None:
    """The largest of 0.01 .. 1 points (a test set of 10,000 .. 100 images) that every accuracy is a multiple of."""
    xs = [float(a) for a in accuracies if a is not None]
    for q in (1.0, 0.5, 0.25, 0.2, 0.1, 0.05, 0.04, 0.02, 0.01):
        if xs and all(abs(a / q - round(a / q)) < 1e-6 for a in xs):
            return q
    return None


# ------------------------------------------------------------------ the landscape claims (Santurkar et al. 2018)

def _off_plateau(losses: dict[int, float], drop: float) -> dict[int, float]:
    """The probes after a run's loss first fell ``drop`` (a fraction) below its first probe's loss."""
    if not losses:
        return {}
    steps = sorted(losses)
    below = losses[steps[0]] * (1 - drop)
    left = next((t for t in steps if losses[t] <= below), None)
    return {} if left is None else {t: losses[t] for t in steps if t >= left}


def _seed_pairs(rows: Sequence[dict], spec) -> list[tuple[Any, dict | None, dict | None]]:
    """(seed, arm's row, control's row) for every seed of the section, in seed order."""
    by: dict[Any, dict[str, dict]] = {}
    for r in rows:
        norm = r.get(spec.norm_key)
        if norm in (spec.arm, spec.control):
            by.setdefault(r.get("seed"), {})[norm] = r
    return [(s, d.get(spec.arm), d.get(spec.control)) for s, d in sorted(by.items(), key=lambda t: str(t[0]))]


def _matched_pair(arm_row: dict | None, ctl_row: dict | None, landscapes: dict[str, dict | None], spec):
    """(arm's and control's series, their probed steps in the matched window, the window) or a reason they don't compare."""
    from bnctl import landscape_plot

    for row, name in ((arm_row, spec.arm), (ctl_row, spec.control)):
        if row is None:
            return f"no {name} run"
        if row.get("status") != "completed":
            return f"the {name} run {row.get('status')}"
        if landscapes.get(row["run"]) is None:
            return f"the {name} run has no landscape.csv (train.landscape.every is 0)"
    series = (landscapes[arm_row["run"]], landscapes[ctl_row["run"]])
    kept = []
    for data, name in zip(series, (spec.arm, spec.control)):
        losses = data["summary"].get("loss_here", {})
        off = _off_plateau(losses, spec.plateau_drop)
        if not off:
            first = losses[min(losses)] if losses else float("nan")
            return (f"{name} never left its plateau (its training loss never fell {spec.plateau_drop:.0%} below "
                    f"its first probe's {first:.3g})")
        kept.append(off)
    m = landscape_plot.matched_window(kept[0], kept[1], spec.min_probes)
    if m["reason"] is not None:
        return f"not comparable at matched training loss: {m['reason']}"
    return series, m["steps"], m["window"]


def _log_at(points: Sequence[tuple[float, float | None]], at: float) -> float | None:
    """ln(measure) at training loss ``at``, from the least-squares line of ln(measure) on loss through the points.

    A run that passes the window quickly has its probes bunched at one end of it; a median over the window
    would then compare the arms at different losses (the measures change with the loss). The line evaluates
    both arms at the same loss. With one distinct loss it is the mean of ln(measure). Non-positive values: None.
    """
    pts = [(x, math.log(y)) for x, y in points if y is not None and math.isfinite(y) and y > 0]
    if len(pts) < len(points) or not pts:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx <= 1e-12 * max(1.0, mx * mx):
        return my
    return my + sum((x - mx) * (y - my) for x, y in pts) / sxx * (at - mx)


def _ics_points(data: dict, layer: str, steps: Sequence[int], relative: bool) -> list[tuple[float, float]]:
    """(training loss, ICS) of one layer at the probed steps (relative: divided by the layer's gradient norm)."""
    l2 = data["ics"].get("ics_l2", {}).get(layer, {})
    norm = data["ics"].get("grad_norm", {}).get(layer, {})
    loss = data["summary"]["loss_here"]
    if not relative:
        return [(loss[t], l2[t]) for t in steps if t in l2]
    return [(loss[t], l2[t] / norm[t]) for t in steps if t in l2 and norm.get(t)]


def _landscape_rule(rows: Sequence[dict], landscapes: dict[str, dict | None], spec, v: Verdict,
                    per_seed: Callable) -> Verdict:
    """Shared by both landscape claims: pair the runs by seed, match their losses, test the per-seed log ratios."""
    if (early := _incomplete(v, rows)) is not None:
        return early
    ratios, skipped = [], []
    for seed, arm_row, ctl_row in _seed_pairs(rows, spec):
        pair = _matched_pair(arm_row, ctl_row, landscapes, spec)
        if isinstance(pair, str):
            skipped.append(f"seed {seed}: {pair}")
            continue
        (a, c), (sa, sc), (lo, hi) = pair
        got = per_seed(a, c, sa, sc, (lo + hi) / 2)
        if isinstance(got, str):
            skipped.append(f"seed {seed}: {got}")
            continue
        r, text = got
        ratios.append(r)
        v.details.append(f"seed {seed}: training loss {lo:.3g}..{hi:.3g} (probes {len(sa)} {spec.arm} / {len(sc)} "
                         f"{spec.control}): {text}; ln ratio {r:+.2f}")
    if skipped:
        v.caveats.append(f"{len(skipped)} seed pair(s) not compared: " + "; ".join(skipped))
    if len(ratios) < spec.min_pairs:
        v.status = NOT_TESTABLE
        v.reason = (f"here: {len(ratios)} seed pair(s) can be compared at matched training loss, fewer than "
                    f"{spec.min_pairs} (" + ("; ".join(skipped) or "no seeds") + ")")
        return decide_all([v])[0]
    v.effect = stats.paired(ratios, [0.0] * len(ratios))
    v.details.append(f"geometric mean ratio {spec.control} / {spec.arm}: {math.exp(v.effect.effect):.2f} "
                     f"(95% interval {math.exp(v.effect.lo):.2f} to {math.exp(v.effect.hi):.2f})")
    return decide_all([v])[0]


_MATCHED_RULE = ("Per seed, the {arm} and {ctl} runs of that seed are compared at matched training loss: each run's "
                 "probes count from the first at which its training loss fell {drop:.0%} below its first probe's "
                 "(a network on its initial plateau looks smooth for that reason alone); the window is the overlap "
                 "of the two runs' 10th-90th percentile ranges of that loss, with at least {k} probes of each run "
                 "inside it, else the pair is not comparable. Each run's ln(measure) is evaluated at the window's "
                 "middle loss by a least-squares line of ln(measure) on the loss through its probes in the window "
                 "(a median would compare a fast run's probes, bunched at the low end, with a slow run's spread "
                 "over it). A one-sample t-test on the per-seed log ratios; not testable with fewer than {pairs} "
                 "comparable seed pairs.")


def landscape_smoothness(rows: Sequence[dict], landscapes: dict[str, dict | None],
                         spec: studyspec.LandscapeSmoothness) -> Verdict:
    """Per seed, ln(control's / arm's median landscape measure) at matched training loss; t-test across seeds."""
    arm, ctl = spec.arm, spec.control
    words = {"beta_max": "effective beta-smoothness (the largest gradient change per distance moved along the step)",
             "loss_range": "loss range along the step (the variation of the loss over the probed step sizes)",
             "grad_change_max": "largest gradient change along the step (gradient predictiveness)"}[spec.measure]
    v = _base(spec, "landscape smoothness",
              f"per seed, ln of {ctl}'s {words} divided by {arm}'s, both at the middle training loss of the "
              f"matched-loss window (positive: {arm}'s landscape is smoother, as the claim predicts); the mean over seeds.",
              _MATCHED_RULE.format(arm=arm, ctl=ctl, drop=spec.plateau_drop, k=spec.min_probes, pairs=spec.min_pairs),
              f"ln({spec.measure} {ctl} / {arm})")

    def per_seed(a, c, sa, sc, at):
        la, lc = (_log_at([(d["summary"]["loss_here"][t], d["summary"].get(spec.measure, {}).get(t)) for t in ts], at)
                  for d, ts in ((a, sa), (c, sc)))
        if la is None or lc is None:
            return f"{spec.measure} missing or not positive at a probe in the window"
        return lc - la, f"{spec.measure} at loss {at:.3g}: {math.exp(la):.3g} {arm} / {math.exp(lc):.3g} {ctl}"

    return _landscape_rule(rows, landscapes, spec, v, per_seed)


def ics_reduction(rows: Sequence[dict], landscapes: dict[str, dict | None], spec: studyspec.IcsReduction) -> Verdict:
    """Per seed, the mean over layers of ln(control's / arm's median ICS) at matched training loss; t-test across seeds."""
    arm, ctl = spec.arm, spec.control
    relative = spec.measure == "relative_l2"
    what = "||G - G'|| / ||G||" if relative else "||G - G'||"
    v = _base(spec, "internal covariate shift",
              f"internal covariate shift per layer (Santurkar et al. 2018, definition 2.1: G, a layer's gradient, "
              f"and G', the same after the layers before it took their step) as {what}; per seed, the mean over the "
              f"layers both runs probed of ln({ctl}'s / {arm}'s) at the middle loss of the matched-loss "
              f"window (positive: {arm} has less ICS, as the claim predicts; Santurkar et al. found it does not).",
              _MATCHED_RULE.format(arm=arm, ctl=ctl, drop=spec.plateau_drop, k=spec.min_probes, pairs=spec.min_pairs),
              f"mean over layers of ln(ICS {ctl} / {arm})")

    def per_seed(a, c, sa, sc, at):
        layers = [n for n in a["layers"] if n in c["layers"]]
        logs = {}
        for layer in layers:
            pa, pc = _ics_points(a, layer, sa, relative), _ics_points(c, layer, sc, relative)
            la, lc = (_log_at(p, at) if p else None for p in (pa, pc))
            if la is not None and lc is not None:
                logs[layer] = lc - la
        if not logs:
            return "no layer with ICS in the window of both runs (train.landscape.ics is off?)"
        return (sum(logs.values()) / len(logs),
                "ln ratio by layer " + ", ".join(f"{n} {r:+.2f}" for n, r in logs.items()))

    return _landscape_rule(rows, landscapes, spec, v, per_seed)
