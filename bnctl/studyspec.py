"""What a study section's sweep file declares: the claim, its estimand, the primary contrast and the smallest effect that matters.

A sweep file that answers a claim of `bnctl study claims` carries a ``study:`` block (one
mapping, or a list when one sweep answers two sections). Each entry names its estimand;
the estimand's fields are the design choices the verdict rule needs, declared before any
run so that nothing is tuned on the results. Positive effects always point the way the
claim predicts. Torch-free and cheap to import: plan validation reads it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from bnctl.errors import ConfigError


class _Estimand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    claim: str = Field(min_length=1)  # the claim in words, as the report states it
    norm_key: str = "model.norm"
    arm: str = "batch"  # the norm the claim is about
    control: str = "none"  # what it is compared with
    # The smallest effect that would matter, in the estimand's unit (see UNIT): below it, an
    # equivalence test may conclude "no effect larger than X".
    smallest_effect: float = Field(gt=0)


class LrTolerance(_Estimand):
    """Claim 1: per seed, the largest grid learning rate at which the run trains; arm minus control, in decades."""

    estimand: Literal["lr_tolerance"]
    lr_key: str = "optimizer.lr"
    trains_above_chance: float = Field(10.0, gt=0)  # a run trains when its final test acc is this far above chance


class InitReference(_Estimand):
    """Claim 2: accuracy lost by moving the init scale off a pre-declared reference; control's loss minus arm's."""

    estimand: Literal["init_reference"]
    scale_key: str = "model.init_scale"
    reference: float = Field(1.0, gt=0)  # PyTorch's default initialization, declared before the runs


class GapReduction(_Estimand):
    """Claim 3: how much the arm shrinks the plain network's train-test gap, beside dropout (the positive control)."""

    estimand: Literal["gap_reduction"]
    dropout_key: str = "model.dropout"
    dropout: float = Field(gt=0, lt=1)  # the positive control's dropout rate (a level of dropout_key)
    fit_level: float = Field(gt=0, le=100)  # eval-mode train accuracy % every arm must reach to be compared


class BatchInteraction(_Estimand):
    """Claim 4: how much more the arm than the control loses from the reference batch to the smallest, fitted over all."""

    estimand: Literal["batch_interaction"]
    control: str = "group"
    batch_key: str = "train.batch_size"
    reference_batch: int = Field(ge=2)  # where batch statistics are good; a level of batch_key
    control_tolerance: float = Field(gt=0)  # points the control may move across batch sizes and still count as flat


class NotebookEval(_Estimand):
    """Claim 5: eval-mode minus test-batch-statistics accuracy of the same checkpoints, paired."""

    estimand: Literal["notebook_eval"]
    control: str = "batch"
    eval_batch: int = Field(4, ge=2)  # the notebook's test batch size


class _Matched(_Estimand):
    """Shared by the landscape sections: per seed, the arm's and the control's run compared at matched training loss."""

    # A run's probes count only once its training loss (loss_here) is this fraction below its first probe's:
    # a network on its initial plateau looks smooth for that reason alone (docs/landscape.md).
    plateau_drop: float = Field(0.1, gt=0, lt=1)
    min_probes: int = Field(3, ge=1)  # probes of each run inside the matched window, else the seed pair is not comparable
    min_pairs: int = Field(3, ge=2)  # comparable seed pairs the test needs, else the section is not testable


class LandscapeSmoothness(_Matched):
    """Landscape claim: per seed, ln(control's / arm's median measure) at matched training loss; positive: the arm is smoother."""

    estimand: Literal["landscape_smoothness"]
    measure: Literal["beta_max", "loss_range", "grad_change_max"] = "beta_max"  # a landscape.csv summary measure


class IcsReduction(_Matched):
    """ICS claim: per seed, the mean over layers of ln(control's / arm's median ICS) at matched loss; positive: the arm has less."""

    estimand: Literal["ics_reduction"]
    # relative_l2: ||G - G'|| / ||G|| per layer and probe (scale-free: the arms' gradients differ in size); l2: ||G - G'||
    measure: Literal["relative_l2", "l2"] = "relative_l2"


Estimand = Annotated[Union[LrTolerance, InitReference, GapReduction, BatchInteraction, NotebookEval,
                           LandscapeSmoothness, IcsReduction],
                     Field(discriminator="estimand")]
ESTIMANDS = {"lr_tolerance": LrTolerance, "init_reference": InitReference, "gap_reduction": GapReduction,
             "batch_interaction": BatchInteraction, "notebook_eval": NotebookEval,
             "landscape_smoothness": LandscapeSmoothness, "ics_reduction": IcsReduction}
UNIT = {"lr_tolerance": "decades of learning rate", "init_reference": "points", "gap_reduction": "points",
        "batch_interaction": "points", "notebook_eval": "points",
        "landscape_smoothness": "ln ratio", "ics_reduction": "ln ratio"}
_ADAPTER = TypeAdapter(list[Estimand])


def parse(raw: Any, source: str = "sweep file") -> list[_Estimand]:
    """The estimands of a ``study:`` block (a mapping or a list of mappings), validated; ConfigError names the field."""
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{source}: study must be a mapping (or a list of mappings) with an estimand: "
                          f"one of {', '.join(ESTIMANDS)}")
    for item in items:
        if item.get("estimand") not in ESTIMANDS:
            raise ConfigError(f"{source}: study.estimand must be one of {', '.join(ESTIMANDS)} "
                              f"(got {item.get('estimand')!r})")
    try:
        return list(_ADAPTER.validate_python(items))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"][2:] or first["loc"])
        raise ConfigError(f"{source}: study.{where}: {first['msg']}") from None


def check_against_grid(specs: list[_Estimand], grid: dict[str, list], source: str) -> None:
    """Every declared level (arm, control, reference scale, dropout, reference batch) must be a level of the sweep."""
    for spec in specs:
        if isinstance(spec, NotebookEval):
            continue
        wanted = [(spec.norm_key, spec.arm), (spec.norm_key, spec.control)]
        if isinstance(spec, LrTolerance):
            wanted.append((spec.lr_key, None))
        elif isinstance(spec, InitReference):
            wanted.append((spec.scale_key, spec.reference))
        elif isinstance(spec, GapReduction):
            wanted += [(spec.dropout_key, spec.dropout), (spec.dropout_key, 0.0)]
        elif isinstance(spec, BatchInteraction):
            wanted.append((spec.batch_key, spec.reference_batch))
        for key, level in wanted:
            if key not in grid:
                raise ConfigError(f"{source}: the {spec.estimand} estimand needs {key} in the grid")
            if level is not None and level not in grid[key]:
                raise ConfigError(f"{source}: the {spec.estimand} estimand declares {key}={level}, "
                                  f"which is not a level of the grid ({grid[key]})")


def dump(specs: list[_Estimand]) -> list[dict[str, Any]]:
    return [s.model_dump() for s in specs]
