"""The claims' verdict rules on constructed results: each rule can say supported, contradicted or inconclusive."""

import json
import os
from pathlib import Path

import pytest

from bnctl import stats, verdicts
from bnctl.verdicts import CONTRADICTED, INCONCLUSIVE, SUPPORTED

CHANCE = 10.0


def rows(table, keys, metric="final_test_acc", extra=None):
    """Result rows from {(key values...): [per-seed metric]}; None in a list marks a diverged run."""
    out = []
    for values, per_seed in table.items():
        for seed, v in enumerate(per_seed):
            row = {**dict(zip(keys, values)), "seed": seed}
            row.update({"status": "diverged"} if v is None else {"status": "completed", metric: v})
            if extra:
                row.update(extra(values, seed))
            out.append(row)
    return out


LR = ("model.norm", "optimizer.lr")


def test_higher_lr_supported_when_bn_trains_where_the_plain_net_diverges():
    table = {("batch", 1e-3): [80, 82, 81], ("none", 1e-3): [78, 80, 79],
             ("batch", 1e-2): [75, 77, 76], ("none", 1e-2): [None, 10, 11],
             ("batch", 1e-1): [12, 10, 11], ("none", 1e-1): [None, None, None]}
    v = verdicts.higher_lr(rows(table, LR), CHANCE)
    assert v.verdict == SUPPORTED
    assert v.effect.effect == pytest.approx(76 - 31 / 3)  # diverged counts as chance (10)
    assert "0.01" in v.effect_name
    assert v.details == ["model.norm=batch trains at lr 0.001, 0.01", "model.norm=none trains at lr 0.001"]


def test_higher_lr_contradicted_and_inconclusive():
    contra = {("batch", 1e-2): [20, 21, 19], ("none", 1e-2): [60, 62, 61]}
    assert verdicts.higher_lr(rows(contra, LR), CHANCE).verdict == CONTRADICTED
    noisy = {("batch", 1e-2): [40, 70, 55], ("none", 1e-2): [35, 72, 50]}
    v = verdicts.higher_lr(rows(noisy, LR), CHANCE)
    assert v.verdict == INCONCLUSIVE and v.effect.lo < 0 < v.effect.hi
    nothing = {("batch", 1e-2): [10, 11, 10], ("none", 1e-2): [10, 10, 12]}
    v = verdicts.higher_lr(rows(nothing, LR), CHANCE)
    assert v.verdict == INCONCLUSIVE and v.effect is None and v.details[0] == "model.norm=batch trains at no learning rate of the grid"
    assert "neither norm trains" in v.sentence() and "not enough finished runs" not in v.sentence()


INIT = ("model.norm", "model.init_scale")


def test_init_sensitivity_shortfall():
    flat_bn = {("batch", 0.1): [80, 81, 79], ("batch", 1.0): [82, 81, 83], ("batch", 10.0): [79, 80, 81],
               ("none", 0.1): [40, 42, 41], ("none", 1.0): [80, 79, 81], ("none", 10.0): [None, 10, 11]}
    v = verdicts.init_sensitivity(rows(flat_bn, INIT), CHANCE)
    # shortfall = best mean - mean of the means: none 80 - (41 + 80 + 31/3) / 3; batch 82 - 242/3
    assert v.verdict == SUPPORTED
    assert v.effect.effect == pytest.approx((80 - (41 + 80 + 31 / 3) / 3) - (82 - 242 / 3))
    assert "shortfall 1.3 points; spread 2.0 points" in v.details[0]
    swapped = {(("none" if n == "batch" else "batch"), s): accs for (n, s), accs in flat_bn.items()}
    assert verdicts.init_sensitivity(rows(swapped, INIT), CHANCE).verdict == CONTRADICTED
    similar = {("batch", 0.1): [60, 80, 70], ("batch", 10.0): [75, 65, 85],
               ("none", 0.1): [62, 78, 71], ("none", 10.0): [74, 66, 84]}
    assert verdicts.init_sensitivity(rows(similar, INIT), CHANCE).verdict == INCONCLUSIVE


def test_init_sensitivity_not_fooled_by_an_arm_at_chance_almost_everywhere():
    # The plain network trains at one scale only; BN at every scale, though less well at the edges.
    # Best minus worst would call BN the more sensitive one (spread 55 vs 50 points); it is not.
    means = {"batch": [70, 80, 85, 60, 30], "none": [10, 10, 60, 10, 10]}
    table = {(n, s): [m - 1, m, m + 1] for n, ms in means.items() for s, m in zip([0.1, 0.3, 1.0, 3.0, 10.0], ms)}
    v = verdicts.init_sensitivity(rows(table, INIT), CHANCE)
    assert "spread 55.0 points" in v.details[0] and "spread 50.0 points" in v.details[1]
    assert v.verdict == SUPPORTED and v.effect.effect == pytest.approx((60 - 20) - (85 - 65))
    assert v.details[0].endswith("at 5 of 5 scales") and v.details[1].endswith("at 1 of 5 scales")


def test_init_sensitivity_interval_is_a_welch_satterthwaite_contrast():
    # Shortfall of k cells = sum(w_i * mean_i) with w = 1 - 1/k at the best cell and -1/k elsewhere; the
    # effect (none's minus batch's) is that contrast, with a t-interval at the Satterthwaite df.
    from scipy import stats as sps

    table = {("batch", 0.1): [70, 74, 66], ("batch", 1.0): [80, 85, 75], ("batch", 10.0): [60, 50, 55],
             ("none", 0.1): [20, 30, 25], ("none", 1.0): [70, 60, 80], ("none", 10.0): [12, 10, 11]}
    v = verdicts.init_sensitivity(rows(table, INIT), CHANCE)
    w = {("none", 1.0): 2 / 3, ("none", 0.1): -1 / 3, ("none", 10.0): -1 / 3,
         ("batch", 1.0): -2 / 3, ("batch", 0.1): 1 / 3, ("batch", 10.0): 1 / 3}
    mean = {c: sum(x) / 3 for c, x in table.items()}
    var = {c: sum((xi - mean[c]) ** 2 for xi in x) / 2 for c, x in table.items()}
    effect = sum(w[c] * mean[c] for c in table)
    terms = {c: w[c] ** 2 * var[c] / 3 for c in table}
    se, df = sum(terms.values()) ** 0.5, sum(terms.values()) ** 2 / sum(t ** 2 / 2 for t in terms.values())
    half = sps.t.ppf(0.975, df) * se
    assert v.effect.effect == pytest.approx(effect)
    assert (v.effect.lo, v.effect.hi) == pytest.approx((effect - half, effect + half))


def test_init_sensitivity_inconclusive_with_one_seed_in_a_cell():
    table = {("batch", 0.1): [80, 81, 79], ("batch", 10.0): [79, 80, 81],
             ("none", 0.1): [40, 42, 41], ("none", 10.0): [80]}
    v = verdicts.init_sensitivity(rows(table, INIT), CHANCE)
    assert v.verdict == INCONCLUSIVE and v.effect is None


REG = ("model.norm", "model.dropout")


def _gap_rows(gaps):
    return rows(gaps, REG, metric="gap", extra=lambda values, seed: {"final_test_acc": 70.0})


def test_regularization_gap():
    shrinks = {("none", 0.0): [20, 22, 21], ("none", 0.3): [12, 13, 11],
               ("batch", 0.0): [10, 11, 12], ("batch", 0.3): [8, 9, 7]}
    v = verdicts.regularization(_gap_rows(shrinks))
    assert v.verdict == SUPPORTED and v.effect.effect == pytest.approx(10.0)
    assert any(d.startswith("dropout 0.3 changes the plain network's gap by -9.0") for d in v.details)
    grows = {("none", 0.0): [10, 11, 12], ("batch", 0.0): [20, 22, 21]}
    assert verdicts.regularization(_gap_rows(grows)).verdict == CONTRADICTED
    same = {("none", 0.0): [10, 15, 12], ("batch", 0.0): [11, 14, 12]}
    assert verdicts.regularization(_gap_rows(same)).verdict == INCONCLUSIVE


BATCH = ("model.norm", "train.batch_size")


def test_small_batches_drop():
    gn_holds = {("batch", 2): [40, 42, 44], ("batch", 64): [80, 81, 82],
                ("group", 2): [76, 78, 77], ("group", 64): [79, 80, 78], ("none", 2): [70, 71, 72]}
    v = verdicts.small_batches(rows(gn_holds, BATCH), CHANCE)
    assert v.verdict == SUPPORTED and v.effect.effect == pytest.approx((81 - 42) - (79 - 77))
    assert any(d.startswith("model.norm=batch: drop from batch 64 to 2 = +39.0") for d in v.details)
    reverse = {("batch", 2): [79, 80, 81], ("batch", 64): [80, 81, 82],
               ("group", 2): [50, 52, 51], ("group", 64): [79, 80, 78]}
    assert verdicts.small_batches(rows(reverse, BATCH), CHANCE).verdict == CONTRADICTED
    noisy = {("batch", 2): [60, 80, 70], ("batch", 64): [75, 85, 65],
             ("group", 2): [62, 78, 70], ("group", 64): [70, 80, 75]}
    assert verdicts.small_batches(rows(noisy, BATCH), CHANCE).verdict == INCONCLUSIVE


def test_small_batches_interval_is_not_narrowed_by_few_seeds():
    # Effect (80 - 50) - (80 - 75) = 25 with a seed sd of 10 in every cell: a
    # percentile bootstrap over 3 seeds calls this supported; the t-interval (df 8) rightly does not.
    table = {("batch", 2): [50, 40, 60], ("batch", 64): [80, 70, 90],
             ("group", 2): [75, 65, 85], ("group", 64): [80, 70, 90]}
    v = verdicts.small_batches(rows(table, BATCH), CHANCE)
    assert v.effect.effect == pytest.approx(25.0) and v.effect.method == "welch contrast"
    assert v.verdict == INCONCLUSIVE and v.effect.lo < 0 < v.effect.hi
    one_seed = {("batch", 2): [10], ("batch", 64): [80, 81, 82], ("group", 2): [76, 78, 77], ("group", 64): [79, 80]}
    assert verdicts.small_batches(rows(one_seed, BATCH), CHANCE).verdict == INCONCLUSIVE


def test_notebook_eval_is_paired_by_checkpoint():
    running, batch4, recal = [80.0, 70.0, 90.0], [70.0, 61.0, 79.0], [80.5, 70.2, 90.1]
    v = verdicts.notebook_eval(running, batch4, recal)
    # Differences 10, 9, 11: the seeds' large spread cancels within each checkpoint.
    assert v.verdict == SUPPORTED and v.effect.effect == pytest.approx(10.0) and v.effect.method == "paired t"
    assert "recalibration changes eval-mode accuracy by +0.27" in v.details[0]
    assert verdicts.notebook_eval(batch4, running, recal).verdict == CONTRADICTED
    assert verdicts.notebook_eval([80.0, 70.0, 90.0], [79.0, 72.0, 89.5], recal).verdict == INCONCLUSIVE
    v = verdicts.notebook_eval([80.0], [70.0], [80.0])
    assert v.verdict == INCONCLUSIVE and "not enough finished runs" in v.sentence()


@pytest.mark.parametrize("lo,hi,expected", [(0.1, 2, SUPPORTED), (-2, -0.1, CONTRADICTED), (-1, 1, INCONCLUSIVE),
                                            (0.0, 1, INCONCLUSIVE), (-1, 0.0, INCONCLUSIVE),
                                            (-0.5, 0.5, INCONCLUSIVE), (0.5, 0.9, SUPPORTED)])
def test_decide_needs_the_whole_interval_on_one_side(lo, hi, expected):
    from bnctl.stats import Difference

    assert verdicts.decide(Difference((lo + hi) / 2, lo, hi, (3, 3), "welch")) == expected


def test_higher_lr_counts_diverged_runs_as_chance_when_deciding_and_comparing():
    table = {("batch", 1e-3): [80, 81, 82], ("none", 1e-3): [70, 71, 72],
             ("batch", 1e-2): [60, None, 62], ("none", 1e-2): [50, 52, None],
             # At 0.1 the plain net's only finished run reaches 25%, but two of its three runs diverged:
             # as chance, its mean is 15%, under the 20% that counts as training.
             ("batch", 1e-1): [10, 10, 11], ("none", 1e-1): [None, None, 25]}
    v = verdicts.higher_lr(rows(table, LR), CHANCE)
    assert v.effect_name == "final test accuracy at lr 0.01, batch minus none"
    assert v.effect.effect == pytest.approx((60 + 10 + 62) / 3 - (50 + 52 + 10) / 3) and v.effect.n == (3, 3)
    assert v.details == ["model.norm=batch trains at lr 0.001, 0.01", "model.norm=none trains at lr 0.001, 0.01"]


def test_a_cell_exactly_the_margin_above_chance_trains():
    edge = {("batch", 0.5): [19, 20, 21], ("none", 0.5): [10, 10, 10]}  # batch's mean is exactly chance + 10
    v = verdicts.higher_lr(rows(edge, LR), CHANCE)
    assert v.details[0] == "model.norm=batch trains at lr 0.5" and v.effect is not None
    init = {("batch", 1.0): [19, 20, 21], ("batch", 2.0): [50, 50, 50],
            ("none", 1.0): [10, 10, 10], ("none", 2.0): [50, 51, 49]}
    v = verdicts.init_sensitivity(rows(init, INIT), CHANCE)
    assert v.details[0].endswith("; trains (>= 20%) at 2 of 2 scales")
    assert v.details[1].endswith("; trains (>= 20%) at 1 of 2 scales")


def test_init_sensitivity_needs_two_scales_and_every_cell():
    two = {("batch", 1.0): [80, 81, 79], ("batch", 2.0): [70, 71, 69],
           ("none", 1.0): [80, 82, 81], ("none", 2.0): [40, 41, 42]}
    v = verdicts.init_sensitivity(rows(two, INIT), CHANCE)
    assert v.effect is not None and v.effect.n == (3, 3, 3, 3)
    assert v.effect.effect == pytest.approx((81 - (81 + 41) / 2) - (80 - (80 + 70) / 2))
    one = {("batch", 1.0): [80, 81, 79], ("none", 1.0): [80, 82, 81]}
    v = verdicts.init_sensitivity(rows(one, INIT), CHANCE)
    assert v.verdict == INCONCLUSIVE and v.effect is None
    missing = {("batch", 1.0): [80, 81, 79], ("batch", 2.0): [70, 71, 69], ("none", 1.0): [80, 82, 81]}
    v = verdicts.init_sensitivity(rows(missing, INIT), CHANCE)  # model.norm=none never ran at scale 2
    assert v.verdict == INCONCLUSIVE and v.effect is None
    assert len(v.details) == 1 and v.details[0].startswith("model.norm=batch: mean accuracy by scale 1: 80.0%, 2: 70.0%")


# ---------------------------------------------------------------- what a user reads

GOLDEN = Path(__file__).parent / "golden" / "verdict_texts.json"


def _texts() -> dict:
    """Every claim's texts (name, rule, effect name, details, sentence) on one constructed set of results."""
    lr = rows({("batch", 1e-3): [80, 82, 81], ("none", 1e-3): [78, 80, 79], ("batch", 1e-2): [75, 77, 76],
               ("none", 1e-2): [None, 10, 11]}, LR)
    init = rows({("batch", 0.1): [80, 81, 79], ("batch", 10.0): [79, 80, 81],
                 ("none", 0.1): [40, 42, 41], ("none", 10.0): [80, 79, 81]}, INIT)
    accuracy = {("none", 0.0): 60.0, ("none", 0.3): 65.0, ("batch", 0.0): 75.0}
    gap = rows({("none", 0.0): [20, 22, 21], ("none", 0.3): [12, 13, 11], ("batch", 0.0): [10, 11, 12]}, REG,
               metric="gap", extra=lambda values, seed: {"final_test_acc": accuracy[values] + seed})
    # Three batch sizes (the drop is from the largest to the smallest) and diverged runs (counted as chance).
    small = rows({("batch", 2): [40, None, 44], ("batch", 16): [70, 71, 72], ("batch", 64): [80, 81, 82],
                  ("group", 2): [76, 78, 77], ("group", 16): [60, 61, 62], ("group", 64): [79, None, 78]}, BATCH)
    found = [verdicts.higher_lr(lr, CHANCE), verdicts.higher_lr(rows({("batch", 1e-2): [10, 11, 10]}, LR), CHANCE),
             verdicts.init_sensitivity(init, CHANCE), verdicts.regularization(gap),
             verdicts.small_batches(small, CHANCE), verdicts.small_batches(rows({("batch", 2): [40]}, BATCH), CHANCE),
             verdicts.notebook_eval([80.0, 70.0, 90.0], [70.0, 61.0, 79.0], [80.5, 70.2, 90.1]),
             verdicts.notebook_eval([80.0], [70.0], [80.0]),
             # Other arms, controls and settings than the study's defaults: the texts must follow them.
             verdicts.higher_lr(rows({("ghost", 1e-2): [70, 71, 72], ("batch", 1e-2): [60, 62, 61]}, LR), CHANCE,
                                arm="ghost", control="batch"),
             verdicts.regularization(rows({("none", 0.0): [20, 22, 21], ("none", 0.5): [12, 13, 11],
                                           ("layer", 0.0): [10, 11, 12]}, REG, metric="gap"), arm="layer", dropout=0.5),
             verdicts.notebook_eval([80.0, 70.0, 90.0], [70.0, 61.0, 79.0], [80.5, 70.2, 90.1], batch_size=8)]
    return {f"{i}: {v.claim}": {"rule": v.rule, "verdict": v.verdict, "effect_name": v.effect_name,
                                "details": v.details, "sentence": v.sentence()} for i, v in enumerate(found)}


def test_verdict_texts_are_the_reviewed_ones():
    """The rule, effect and detail sentences are what users quote: a change to them must be deliberate.

    After a deliberate change, rewrite the file with BNCTL_UPDATE_GOLDEN=1 and review its diff.
    """
    texts = _texts()
    if os.environ.get("BNCTL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(texts, indent=2, ensure_ascii=False) + "\n")
        pytest.fail(f"rewrote {GOLDEN}; review its diff (git diff), then run the tests without BNCTL_UPDATE_GOLDEN")
    assert texts == json.loads(GOLDEN.read_text()), f"a verdict text changed; see {GOLDEN} and this test's docstring"
    for v in texts.values():  # every rule states the common decision; every sentence names its verdict
        assert v["sentence"].startswith(v["verdict"] + ": ")
    d = stats.welch([75, 77, 76], [10, 10, 11])  # the diverged run counts as chance (10)
    assert texts["0: higher learning rates"]["sentence"] == (
        f"supported: final test accuracy at lr 0.01, batch minus none = +65.67 points, 95% interval "
        f"[{d.lo:+.2f}, {d.hi:+.2f}] (welch, n=3/3).")


def test_only_finished_and_diverged_runs_count():
    base = rows({("batch", 1e-2): [70, 72, 71], ("none", 1e-2): [60, 61, 62]}, LR)
    extra = [{"model.norm": "none", "optimizer.lr": 1e-2, "status": "diverged", "final_test_acc": 55.0},
             {"model.norm": "none", "optimizer.lr": 1e-2, "status": "failed", "final_test_acc": None},
             {"model.norm": "none", "optimizer.lr": 1e-2, "status": "interrupted"}]
    v = verdicts.higher_lr(base + extra, CHANCE)
    # The diverged run counts as chance whatever accuracy it logged before diverging; failed and
    # interrupted runs measured nothing and are left out.
    assert v.effect.n == (3, 4) and v.effect.effect == pytest.approx(71 - (60 + 61 + 62 + 10) / 4)
