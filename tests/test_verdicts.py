"""The claims' verdict rules on constructed results: exact estimands, gates, Holm, and the texts a user reads.

(The rules' error rates in simulated worlds are tests/test_calibration.py's.)
"""

import json
import math
import os
from pathlib import Path

import pytest

from bnctl import stats, studyspec, verdicts
from bnctl.verdicts import CONTRADICTED, EQUIVALENT, INCOMPLETE, INCONCLUSIVE, NOT_TESTABLE, SUPPORTED

CHANCE = 10.0
LR = studyspec.LrTolerance(estimand="lr_tolerance", claim="BN trains at higher learning rates.", smallest_effect=0.5)
INIT = studyspec.InitReference(estimand="init_reference", claim="BN is less sensitive to init.", smallest_effect=3)
REG = studyspec.GapReduction(estimand="gap_reduction", claim="BN regularizes like dropout.", smallest_effect=3,
                             dropout=0.3, fit_level=90)
BATCH = studyspec.BatchInteraction(estimand="batch_interaction", claim="BN suffers at small batches.",
                                   smallest_effect=3, reference_batch=64, control_tolerance=5)


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


LRK = ("model.norm", "optimizer.lr")


def test_lr_tolerance_is_the_largest_trainable_lr_per_seed_in_decades():
    table = {("batch", 1e-3): [80, 82, 81, 80, 79], ("none", 1e-3): [78, 80, 79, 80, 81],
             ("batch", 1e-2): [75, 77, 76, 15, 70], ("none", 1e-2): [None, 10, 11, 30, 12],
             ("batch", 1e-1): [12, 10, 11, 10, None], ("none", 1e-1): [None, None, None, None, None]}
    v = verdicts.lr_tolerance(rows(table, LRK), LR, CHANCE)
    # batch: 1e-2 in 4 seeds, 1e-3 in one (15% < 20%); none: 1e-3, except seed 3 (30% at 1e-2 trains)
    assert v.details == ["model.norm=batch: largest trainable lr per seed: 0.01, 0.01, 0.01, 0.001, 0.01",
                         "model.norm=none: largest trainable lr per seed: 0.001, 0.001, 0.001, 0.01, 0.001"]
    assert v.effect.effect == pytest.approx(0.8 - 0.2) and v.effect.method == "permutation"
    # the exact permutation p-value over the 252 splits of 5 + 5 values, by brute force
    import itertools
    vals = [-2, -2, -2, -3, -2, -3, -3, -3, -2, -3]
    obs = abs(sum(vals[:5]) / 5 - sum(vals[5:]) / 5)
    hits = sum(abs(sum(vals[i] for i in s) / 5 - (sum(vals) - sum(vals[i] for i in s)) / 5) >= obs - 1e-9
               for s in itertools.combinations(range(10), 5))
    assert v.effect.p == pytest.approx(hits / 252)
    assert v.kind == INCONCLUSIVE


def test_lr_tolerance_a_seed_that_trains_nowhere_sits_below_the_grid():
    table = {("batch", 1e-3): [80] * 5, ("batch", 1e-2): [80] * 5,
             ("none", 1e-3): [10] * 5, ("none", 1e-2): [10] * 5}
    v = verdicts.lr_tolerance(rows(table, LRK), LR, CHANCE)
    assert v.effect.effect == pytest.approx(2.0)  # 1e-2 against one step below 1e-3
    assert v.kind == SUPPORTED and "none" in v.details[1]


def test_init_reference_is_a_fixed_contrast_at_the_declared_scale():
    table = {("batch", 0.1): [70, 72, 71], ("batch", 1.0): [80, 81, 82], ("batch", 10.0): [59, 60, 62],
             ("none", 0.1): [40, 42, 41], ("none", 1.0): [80, 79, 81], ("none", 10.0): [None, None, 11]}
    v = verdicts.init_reference(rows(table, ("model.norm", "model.init_scale")), INIT, CHANCE, 0.2)
    bn_loss = 81 - (71 + (59 + 60 + 62) / 3) / 2
    none_loss = 80 - (41 + (10 + 10 + 11) / 3) / 2
    assert v.effect.effect == pytest.approx(none_loss - bn_loss)
    ref = stats.contrast([[80, 81, 82], [70, 72, 71], [59, 60, 62], [80, 79, 81], [40, 42, 41], [10, 10, 11]],
                         [-1, .5, .5, 1, -.5, -.5], stats.quantum_floor(0.2))
    assert (v.effect.lo, v.effect.hi) == pytest.approx((ref.lo, ref.hi))
    assert v.kind == SUPPORTED


def test_welch_contrast_matches_scipy_and_the_floor_only_acts_without_spread():
    from scipy import stats as sps

    d = stats.welch([1.0, 2.0, 3.0], [4.0, 5.0, 7.0])
    res = sps.ttest_ind([1.0, 2.0, 3.0], [4.0, 5.0, 7.0], equal_var=False)
    ci = res.confidence_interval(0.95)
    assert (d.lo, d.hi, d.p) == pytest.approx((ci.low, ci.high, res.pvalue))
    assert stats.welch([1.0, 2.0, 3.0], [4.0, 5.0, 7.0], stats.quantum_floor(0.2)).p == pytest.approx(res.pvalue)
    exact = stats.welch([5.0, 5.0], [3.0, 3.0])
    assert exact.lo == exact.hi == 2.0  # no floor declared: identical seeds give an exact difference
    floored = stats.welch([5.0, 5.0], [3.0, 3.0], stats.quantum_floor(0.2))
    se = math.sqrt(2 * 0.2 ** 2 / 12 / 2)
    assert floored.se == pytest.approx(se) and floored.lo < 2.0 < floored.hi


def test_holm_and_the_mde():
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    d = stats.welch([60, 62, 61, 63], [58, 59, 60, 57])
    from scipy import stats as sps
    assert stats.mde(d, 0.05) == pytest.approx((sps.t.ppf(0.975, d.df) + sps.t.ppf(0.8, d.df)) * d.se)


def _tested(p, effect=1.0, lo=0.5, hi=1.5, lo90=0.6, hi90=1.4, smallest=3.0):
    v = verdicts.Verdict("c", "claim", "estimand", "rule", "effect", "points", smallest)
    v.effect = stats.Difference(effect, lo, hi, (3, 3), "welch", p, 0.3, 4.0, lo90, hi90)
    return v


def test_decide_all_applies_holm_across_sections_and_the_equivalence_test():
    found = verdicts.decide_all([_tested(0.01), _tested(0.02, lo90=0.2, hi90=3.2),
                                 _tested(0.2, effect=0.1, lo=-2, hi=2.2, lo90=-1.5, hi90=1.7),
                                 _tested(0.03, effect=-1, lo=-1.5, hi=-0.5, lo90=-1.4, hi90=-0.6)])
    assert [v.p_adjusted for v in found] == pytest.approx([0.04, 0.06, 0.2, 0.06])
    # the last: not decisive after Holm, and its 90% interval lies within +-3, the smallest effect that matters
    assert [v.kind for v in found] == [SUPPORTED, INCONCLUSIVE, EQUIVALENT, EQUIVALENT]
    assert found[2].verdict == "no effect larger than 3 points"
    assert found[0].mde_alpha == pytest.approx(0.05 / 4)
    # alone, the last one is decisive: the correction is what holds it back
    assert verdicts.decide_all([_tested(0.03, effect=-1, lo=-1.5, hi=-0.5)])[0].kind == CONTRADICTED


def test_incomplete_and_not_testable_sections_stay_out_of_the_correction():
    v = verdicts.batch_interaction([{"model.norm": "batch", "train.batch_size": 2, "status": "pending"}],
                                   BATCH, CHANCE)
    found = verdicts.decide_all([v, _tested(0.03)])
    assert found[0].kind == INCOMPLETE and found[1].p_adjusted == pytest.approx(0.03)


# ---------------------------------------------------------------- what a user reads

GOLDEN = Path(__file__).parent / "golden" / "verdict_texts.json"


def _texts() -> dict:
    """Every claim's texts (estimand, rule, verdict, details, caveats, sentence) on constructed results."""
    lr = rows({("batch", 1e-3): [80, 82, 81, 80, 79], ("none", 1e-3): [78, 80, 79, 80, 81],
               ("batch", 1e-2): [75, 77, 76, 78, 70], ("none", 1e-2): [None, 10, 11, 12, 12]}, LRK)
    lr_top = rows({("batch", 1e-3): [80, 82, 81], ("none", 1e-3): [78, 80, 79],
                   ("batch", 1e-2): [75, 77, 76], ("none", 1e-2): [70, 72, 71]}, LRK)
    init = rows({("batch", 0.1): [80, 81, 79], ("batch", 1.0): [82, 80, 81], ("batch", 10.0): [79, 80, 81],
                 ("none", 0.1): [40, 42, 41], ("none", 1.0): [80, 79, 81], ("none", 10.0): [None, 10, 11]},
                ("model.norm", "model.init_scale"))
    reg_keys = ("model.norm", "model.dropout")
    test = {("none", 0.0): 60.0, ("none", 0.3): 70.0, ("batch", 0.0): 74.0, ("batch", 0.3): 76.0}
    reg = rows({k: [99.0 - t - s for s in range(3)] for k, t in test.items()}, reg_keys, metric="gap",
               extra=lambda values, seed: {"final_test_acc": test[values] + seed, "final_clean_train_acc": 99.0})
    unfit = rows({k: [80.0 - t for _ in range(3)] for k, t in test.items()}, reg_keys, metric="gap",
                 extra=lambda values, seed: {"final_test_acc": test[values], "final_clean_train_acc": 80.0})
    bkeys = ("model.norm", "train.batch_size")
    small = rows({("batch", 2): [40, None, 44], ("batch", 16): [70, 71, 72], ("batch", 64): [80, 81, 82],
                  ("group", 2): [76, 78, 77], ("group", 16): [78, 77, 79], ("group", 64): [79, 78, 80]}, bkeys)
    not_flat = rows({("batch", 2): [60, 61, 62], ("batch", 64): [46, 47, 45],
                     ("group", 2): [64, 65, 66], ("group", 64): [33, 32, 34]}, bkeys)
    found = [verdicts.lr_tolerance(lr, LR, CHANCE), verdicts.lr_tolerance(lr_top, LR, CHANCE),
             verdicts.init_reference(init, INIT, CHANCE, 0.2), verdicts.gap_reduction(reg, REG, 0.2),
             verdicts.gap_reduction(unfit, REG, 0.2),
             verdicts.batch_interaction(small, BATCH, CHANCE, 0.2), verdicts.batch_interaction(not_flat, BATCH, CHANCE),
             verdicts.notebook_eval([80.0, 70.0, 90.0], [70.0, 61.0, 79.0], [80.5, 70.2, 90.1]),
             verdicts.notebook_eval([48.2, 51.0], [40.0, 42.8], [48.2, 51.0]),
             verdicts.notebook_eval([80.0], [70.0], [80.0]),
             verdicts.notebook_eval([], [], [], incomplete="0 of 4 BN checkpoints at batch 4 evaluated")]
    return {f"{i}: {v.claim}": {"estimand": v.estimand, "rule": v.rule, "verdict": v.verdict, "details": v.details,
                                "caveats": v.caveats, "sentence": v.sentence()} for i, v in enumerate(found)}


def test_verdict_texts_are_the_reviewed_ones():
    """The estimand, rule, detail and caveat sentences are what users quote: a change to them must be deliberate.

    After a deliberate change, rewrite the file with BNCTL_UPDATE_GOLDEN=1 and review its diff.
    """
    texts = _texts()
    if os.environ.get("BNCTL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(texts, indent=2, ensure_ascii=False) + "\n")
        pytest.fail(f"rewrote {GOLDEN}; review its diff (git diff), then run the tests without BNCTL_UPDATE_GOLDEN")
    assert texts == json.loads(GOLDEN.read_text()), f"a verdict text changed; see {GOLDEN} and this test's docstring"
    for v in texts.values():  # every sentence starts with its verdict
        assert v["sentence"].startswith(v["verdict"])
    assert texts["1: higher learning rates"]["verdict"] == NOT_TESTABLE
    assert texts["4: regularization"]["sentence"].startswith("not testable at this budget: an arm did not fit")
    assert texts["6: small batches"]["sentence"].startswith("not testable here: group is not flat")
    assert texts["10: the notebook's evaluation"]["verdict"] == INCOMPLETE


def test_only_finished_and_diverged_runs_count():
    base = rows({("batch", 0.1): [70, 72, 71], ("batch", 1.0): [80, 81, 82],
                 ("none", 0.1): [60, 61, 62], ("none", 1.0): [80, 80, 81]}, ("model.norm", "model.init_scale"))
    extra = [{"model.norm": "none", "model.init_scale": 0.1, "status": "diverged", "final_test_acc": 55.0, "seed": 3},
             {"model.norm": "none", "model.init_scale": 0.1, "status": "failed", "final_test_acc": None, "seed": 4}]
    v = verdicts.init_reference(base + extra, INIT, CHANCE)
    # The diverged run counts as chance whatever accuracy it logged; the failed one measured nothing.
    assert v.effect.n == (3, 3, 3, 4) and v.effect.effect == pytest.approx(
        (80.333333 - (60 + 61 + 62 + 10) / 4) - (81 - 71), abs=1e-4)
    assert "1 run(s) failed and are left out of every number" in v.caveats


def test_effects_name_welch_with_a_capital_and_give_n_per_cell_for_contrasts():
    assert verdicts.n_text((3, 3)) == "n=3/3" and verdicts.n_text((4,)) == "n=4"
    assert verdicts.n_text((3,) * 10) == "n=3 per cell"  # not n=3/3/3/3/3/3/3/3/3/3
    assert verdicts.n_text((3, 2, 3, 3)) == "n=2-3 per cell"
    assert [verdicts.method_name(m) for m in ("welch", "welch contrast", "paired t")] == [
        "Welch", "Welch contrast", "paired t"]
    sentences = [v["sentence"] for v in _texts().values()]
    assert not any("welch" in s or "/3/3" in s for s in sentences)
    assert any("(Welch contrast, n=3 per cell," in s for s in sentences)
