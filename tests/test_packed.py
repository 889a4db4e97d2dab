"""Packed seeds (bnctl/packed.py, `bnctl sweep --pack K`): each member is its unpacked run, and members do not leak.

Tolerances. A packed member's step is its unpacked step computed by other kernels (a vmapped
convolution is a grouped one), so the two agree to float rounding after one step. Training then
amplifies rounding: on this network and data a perturbation of 6e-8 in the first layer's weights
grows about as fast as the packed-vs-unpacked difference does (to ~1e-3 in the weights after
48 SGD steps at lr 0.002, more at larger learning rates; bench/RESULTS.md). So:
  - a few steps: weights and BN buffers within 2e-5, losses within 1e-5;
  - three epochs (48 steps, SGD lr 0.002): losses within 0.01, accuracies within 2 points (5 of
    256 test images), each weight tensor within 25% of its largest value. Measured here: most
    members agree to 1e-4 in the losses and 0.3% in the weights; seed 0 with BN is the sensitive
    one (losses 0.005, a few test images, one weight tensor 16% off). Another seed's run differs
    by far more (weights ~200%), and the comparison must fail for it.
Isolation is stricter: without dropout or noisy BN, a member's numbers do not depend on which other
members share its pack (within 1e-6 over the few steps tested; its place in the stack can change its
sums' rounding). With them they do: the pack draws every member's masks from one generator.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from bnctl import checkpoint, config as config_mod, engine, packed, rundir, sweep
from bnctl.data import load_dataset
from bnctl.errors import ConfigError, InterruptedRun
from conftest import tiny_raw, write_config

pytestmark = pytest.mark.usefixtures("one_thread")

SGD = {"name": "sgd", "lr": 0.002, "momentum": 0.9}
NORMS = {"batch": {}, "batch_manual": {}, "ghost": {"virtual_batch_size": 8}, "group": {"groups": 4}}


def _cfg(seed: int, norm: str = "batch", *, name: str | None = None, lr: float = 0.002, epochs: int = 1,
         images: int = 64, test_images: int = 64, **model):
    raw = tiny_raw(seed=seed, name=name or f"{norm}-seed{seed}", optimizer={**SGD, "lr": lr},
                   data={"train_size": images, "test_size": test_images},
                   model={"norm": norm, "width": 0.5, **NORMS[norm], **model}, train={"epochs": epochs})
    return config_mod.validate(raw, "of a test")


def _pack(cfgs, root: Path, data=None):
    return packed.fit_packed(cfgs, [root / c.name for c in cfgs], data=data)


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def _rows(run_dir: Path) -> list[dict]:
    return rundir.read_csv(run_dir / "metrics.csv")


def _differences(a: Path, b: Path) -> dict[str, float]:
    """The largest metric and weight differences between two runs' files."""
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == len(rb)
    out = {k: max(abs(float(x[k]) - float(y[k])) for x, y in zip(ra, rb))
           for k in ("train_loss", "test_loss", "train_acc", "test_acc")}
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    out["weights_abs"] = max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)
    out["weights_rel"] = max(float((sa[k].double() - sb[k].double()).abs().max() / sb[k].double().abs().max().clamp_min(1e-12))
                             for k in sa if sa[k].is_floating_point())
    out["batches_tracked"] = max((int((sa[k] - sb[k]).abs().max()) for k in sa if k.endswith("num_batches_tracked")),
                                 default=0)
    return out


@pytest.mark.parametrize("norm", list(NORMS))
def test_a_packed_member_takes_its_unpacked_runs_steps(tmp_path, norm):
    """Two steps (64 images, batch 32): weights, running statistics and losses are the unpacked runs' to rounding."""
    cfgs = [_cfg(s, norm) for s in (0, 1, 2)]
    data = load_dataset(cfgs[0].data)
    results = _pack(cfgs, tmp_path / "packed", data)
    assert [r.outcome for r in results] == ["completed"] * 3
    for cfg in cfgs:
        engine.fit(cfg, run_dir=tmp_path / "alone" / cfg.name, data=data)
        d = _differences(tmp_path / "packed" / cfg.name, tmp_path / "alone" / cfg.name)
        assert d["weights_abs"] < 2e-5 and d["train_loss"] < 1e-5 and d["test_loss"] < 1e-5, (cfg.name, d)
        assert d["batches_tracked"] == 0  # every BN layer counted its member's batches
    if norm != "group":  # the members' running statistics are their own: seeds differ, so do they
        s0, s1 = _state(tmp_path / "packed" / cfgs[0].name), _state(tmp_path / "packed" / cfgs[1].name)
        assert not torch.allclose(s0["features.1.running_mean"], s1["features.1.running_mean"])
        assert int(s0["features.1.num_batches_tracked"]) == (2 * 32 // 8 if norm == "ghost" else 2)


@pytest.mark.slow
@pytest.mark.parametrize("norm", list(NORMS))
def test_packed_members_match_their_unpacked_runs_over_three_epochs(tmp_path, norm):
    cfgs = [_cfg(s, norm, epochs=3, images=512, test_images=256) for s in (0, 1)]
    data = load_dataset(cfgs[0].data)
    _pack(cfgs, tmp_path / "packed", data)
    for cfg in cfgs:
        engine.fit(cfg, run_dir=tmp_path / "alone" / cfg.name, data=data)

    def agree(d: dict[str, float]) -> bool:  # the documented tolerance (module docstring)
        return (d["train_loss"] < 0.01 and d["test_loss"] < 0.01 and d["train_acc"] <= 2.0 and d["test_acc"] <= 2.0
                and d["weights_rel"] < 0.25)

    for cfg in cfgs:
        d = _differences(tmp_path / "packed" / cfg.name, tmp_path / "alone" / cfg.name)
        assert agree(d), (cfg.name, d)
    # The tolerance tells runs apart: member 0 against seed 1's run is far outside it.
    wrong = _differences(tmp_path / "packed" / cfgs[0].name, tmp_path / "alone" / cfgs[1].name)
    assert not agree(wrong)


def test_a_diverging_member_is_recorded_as_diverged_and_leaves_the_others_unchanged(tmp_path):
    """One member with a huge lr diverges as its unpacked run does; the others match a pack without it."""
    ok = [_cfg(s, epochs=2) for s in (0, 1)]
    wild = _cfg(2, name="wild", lr=1e6, epochs=2)
    data = load_dataset(wild.data)
    with_wild = _pack([ok[0], wild, ok[1]], tmp_path / "with", data)
    assert [r.outcome for r in with_wild] == ["completed", "diverged", "completed"]
    assert "training diverged" in with_wild[1].error
    without = _pack(ok, tmp_path / "without", data)
    assert [r.outcome for r in without] == ["completed", "completed"]
    for cfg in ok:
        d = _differences(tmp_path / "with" / cfg.name, tmp_path / "without" / cfg.name)
        assert all(v <= 1e-6 for v in d.values()), (cfg.name, d)
        assert len(_rows(tmp_path / "with" / cfg.name)) == 2
    # Recorded exactly as the unpacked run records its divergence: the same status, epoch and step.
    with pytest.raises(Exception, match="training diverged"):
        engine.fit(wild, run_dir=tmp_path / "alone" / "wild", data=data)
    packed_summary = rundir.read_json(tmp_path / "with" / "wild" / "summary.json")
    alone_summary = rundir.read_json(tmp_path / "alone" / "wild" / "summary.json")
    assert packed_summary["status"] == alone_summary["status"] == "diverged"
    assert packed_summary["diverged"] == alone_summary["diverged"]


def test_a_member_diverging_between_a_gpus_lagged_checks_leaves_the_others_unchanged(tmp_path, monkeypatch):
    """On a GPU losses are read every few steps: the diverged member's NaN steps until then touch only its own weights."""
    monkeypatch.setattr(packed, "_lagged", lambda device: True)
    ok = [_cfg(s, epochs=1, images=384) for s in (0, 1)]  # 12 steps: checks after steps 10 and 12
    wild = _cfg(2, name="wild", lr=1e6, epochs=1, images=384)
    data = load_dataset(wild.data)
    with_wild = _pack([ok[0], wild, ok[1]], tmp_path / "with", data)
    assert [r.outcome for r in with_wild] == ["completed", "diverged", "completed"]
    assert rundir.read_json(tmp_path / "with" / "wild" / "summary.json")["diverged"]["step"] == 10
    _pack(ok, tmp_path / "without", data)
    for cfg in ok:
        d = _differences(tmp_path / "with" / cfg.name, tmp_path / "without" / cfg.name)
        assert all(v <= 1e-6 for v in d.values()), (cfg.name, d)


def test_dropout_draws_differ_between_members(tmp_path):
    """Two members with the same seed are the same run; with dropout each draws its own masks."""
    for dropout in (0.0, 0.5):
        twins = [_cfg(0, name=f"twin{k}-{dropout}", dropout=dropout) for k in (0, 1)]
        _pack(twins, tmp_path)
        a, b = (_state(tmp_path / c.name) for c in twins)
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same == (dropout == 0.0), dropout


def test_each_members_checkpoint_keeps_its_own_seeds_random_streams(tmp_path):
    """One shared state in every member's checkpoint would give members resumed alone identical dropout masks."""
    cfgs = [_cfg(s, dropout=0.5) for s in (3, 4)]
    _pack(cfgs, tmp_path)
    saved = [torch.load(tmp_path / c.name / "checkpoints" / "last.pt", weights_only=False)["rng"] for c in cfgs]
    assert not torch.equal(saved[0]["torch"], saved[1]["torch"])
    for cfg, rng in zip(cfgs, saved):
        engine.prepare(cfg)  # what its unpacked run starts from
        start = checkpoint.capture_process_rng()
        assert torch.equal(rng["torch"], start["torch"]) and torch.equal(rng["numpy"][1], start["numpy"][1])


def test_the_packs_shared_stream_is_no_members_own_and_checkpointing_leaves_it_alone(tmp_path, monkeypatch):
    """A member resumed alone must not replay the pack's draws; saving its streams must not move the pack's."""
    cfgs = [_cfg(s, dropout=0.5, epochs=2) for s in (3, 4)]
    real_train, pack_start = packed._train, []

    def train(members, progress):
        pack_start.append(torch.get_rng_state())
        return real_train(members, progress)
    monkeypatch.setattr(packed, "_train", train)
    _pack(cfgs, tmp_path / "a")
    for c in cfgs:
        own = torch.load(tmp_path / "a" / c.name / "checkpoints" / "last.pt", weights_only=False)["rng"]["torch"]
        assert not torch.equal(own, pack_start[0])
    monkeypatch.setattr(packed, "_own_rng", lambda m: contextlib.nullcontext())  # no swap at checkpoints
    _pack(cfgs, tmp_path / "b")
    for c in cfgs:
        a, b = _state(tmp_path / "a" / c.name), _state(tmp_path / "b" / c.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_packed_checkpoint_is_a_plain_run_for_eval_and_resume(tmp_path, cli):
    cfgs = [_cfg(s, epochs=2) for s in (0, 1)]
    _pack(cfgs, tmp_path)
    member = tmp_path / cfgs[1].name
    info = rundir.read_json(member / "run.json")
    assert info["packed"] == {"members": 2, "index": 1, "runs": [cfgs[0].name, cfgs[1].name]}
    result = cli("eval", member / "checkpoints" / "last.pt")
    assert result.exit_code == 0, result.output
    evaluation = json.loads(next((member / "eval").glob("*.json")).read_text())
    assert evaluation["acc"] == pytest.approx(float(_rows(member)[-1]["test_acc"]))


def test_ctrl_c_stops_every_member_consistently(tmp_path, monkeypatch):
    """Ctrl-C after member 0 kept epoch 1, before member 1 did: 0 is resumable, 1 is removed like any unstarted run."""
    cfgs = [_cfg(s, epochs=2) for s in (0, 1)]
    calls = []

    def progress(name, epoch, epochs):
        calls.append(name)
        raise KeyboardInterrupt

    results = packed.fit_packed(cfgs, [tmp_path / c.name for c in cfgs], progress=progress)
    assert calls == [cfgs[0].name]
    assert [r.outcome for r in results] == ["interrupted", "interrupted"]
    summary = rundir.read_json(tmp_path / cfgs[0].name / "summary.json")
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1
    assert len(_rows(tmp_path / cfgs[0].name)) == 1
    assert not (tmp_path / cfgs[1].name).exists()
    resumed = engine.fit(cfgs[0], resume=tmp_path / cfgs[0].name)
    assert resumed.summary["status"] == "completed" and len(_rows(tmp_path / cfgs[0].name)) == 2


@pytest.mark.parametrize("change, message", [
    ({"model": {"bn_momentum": None}}, "bn_momentum=null"),
    ({"device": "cuda", "train": {"precision": "fp16"}}, "GradScaler"),  # refused before the device is looked for
    ({"train": {"diagnostics": True}}, "train.diagnostics"),
    ({"train": {"precision": "bf16"}}, "bf16"),  # device: cpu (torch's BN under vmap)
])
def test_what_cannot_be_packed_is_refused_with_the_reason(tmp_path, cli, change, message):
    config = write_config(tmp_path / "c.yaml", tiny_raw(**change))
    result = cli("sweep", "--config", config, "--seeds", "2", "--pack", "2", "--root", tmp_path / "sw")
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "sw").exists()  # refused before any sweep directory


def test_members_must_differ_only_in_seed_optimizer_and_schedule():
    with pytest.raises(ConfigError, match="differ in model"):
        packed.check_packable([_cfg(0), _cfg(1, "group")])
    packed.check_packable([_cfg(0), _cfg(1, lr=0.1)])  # an optimizer setting may differ


def test_a_packed_sweep_stopped_and_resumed_finishes_every_run_once(tmp_path, cli):
    """--pack 2 over 3 seeds: a pack of two and one alone. Ctrl-C at the pack's first epoch, then --resume."""
    config = write_config(tmp_path / "c.yaml", tiny_raw(data={"train_size": 64, "test_size": 64},
                                                        model={"width": 0.5}, train={"epochs": 2}))
    plan = sweep.plan_inline(config, [], seeds=3)
    plan.pack = 2
    d = sweep.create(plan, tmp_path / "sw")

    class StopAtFirstEpoch(sweep.SilentSweepReporter):
        def run_progress(self, spec, epoch, epochs):
            raise KeyboardInterrupt

    with pytest.raises(InterruptedRun):
        sweep.execute(d, reporter=StopAtFirstEpoch())
    statuses = {r["run"]: r["status"] for r in sweep.load(d)[1]}
    assert statuses == {"base-seed0": "interrupted", "base-seed1": "pending", "base-seed2": "pending"}
    result = cli("sweep", "--resume", d)
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in sweep.load(d)[1]}
    assert {r["status"] for r in rows.values()} == {"completed"} and {r["epochs"] for r in rows.values()} == {2}
    seed0 = rundir.read_json(d / "runs" / "base-seed0" / "run.json")
    assert seed0["packed"]["runs"] == ["base-seed0", "base-seed1"]  # started packed ...
    assert [r["from_epoch"] for r in seed0["resumes"]] == [1]  # ... and resumed alone from its checkpoint
    seed1 = rundir.read_json(d / "runs" / "base-seed1" / "run.json")
    assert seed1["packed"]["runs"] == ["base-seed1", "base-seed2"] and "resumes" not in seed1


@pytest.mark.slow
def test_packs_in_worker_processes_give_the_numbers_of_packs_in_this_process(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_raw(data={"train_size": 64, "test_size": 64}, model={"width": 0.5}))
    plan = sweep.plan_inline(config, ["model.norm=batch,group"], seeds=2)
    here, workers = sweep.create(plan, tmp_path / "here"), sweep.create(plan, tmp_path / "workers")
    assert sweep.execute(here, pack=2).ok
    outcome = sweep.execute(workers, jobs=2, pack=2)
    assert outcome.ok and sorted(outcome.completed) == sorted(r.name for r in plan.runs)
    for spec in plan.runs:
        info = rundir.read_json(workers / "runs" / spec.name / "run.json")
        assert info["packed"]["runs"] == [f"{spec.cell}-seed0", f"{spec.cell}-seed1"]
        a, b = _rows(here / "runs" / spec.name), _rows(workers / "runs" / spec.name)
        assert [r["test_loss"] for r in a] == [r["test_loss"] for r in b]


def test_the_api_and_a_sweep_file_pack_and_the_pack_is_kept_for_resume(tmp_path):
    import bnctl
    from bnctl import plan as plan_mod

    raw = tiny_raw(data={"train_size": 64, "test_size": 64}, model={"width": 0.5}, train={"epochs": 1})
    result = bnctl.run_sweep(raw, {"model.norm": ["batch"]}, seeds=2, pack=2, root=tmp_path, progress=False)
    assert sorted(result.completed) == ["norm-batch-seed0", "norm-batch-seed1"]
    assert sweep.read_plan(result.dir).pack == 2  # sweep.yaml keeps it: a resume packs the same way
    info = rundir.read_json(result.dir / "runs" / "norm-batch-seed1" / "run.json")
    assert info["packed"]["members"] == 2
    spec = write_config(tmp_path / "s.yaml", {"base": raw, "grid": {"model.norm": ["batch"]}, "seeds": 2, "pack": 3})
    assert sweep.plan_from_file(spec).pack == 3
    bad = write_config(tmp_path / "bad.yaml", {"base": raw, "seeds": 2, "pack": 0})
    with pytest.raises(ConfigError, match="at least 1"):
        plan_mod.plan_from_file(bad)


@pytest.mark.slow  # a sweep in a subprocess with worker processes, stopped by a signal
def test_sigterm_to_a_packed_jobs_2_sweep_leaves_every_member_resumable_or_unstarted(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])}
    config = write_config(tmp_path / "c.yaml", tiny_raw(data={"train_size": 256, "test_size": 64},
                                                        model={"width": 0.5}, train={"epochs": 40}))
    d = tmp_path / "sw"
    proc = subprocess.Popen([sys.executable, "-m", "bnctl", "sweep", "-c", str(config), "model.norm=batch,group",
                             "--seeds", "2", "--pack", "2", "--jobs", "2", "--sweep-dir", str(d)],
                            text=True, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not any(m.is_file() and m.read_text().count("\n") >= 2 for m in d.glob("runs/*/metrics.csv")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err
    statuses = {spec.name: sweep.run_status(d, spec)[0] for spec in sweep.read_plan(d).runs}
    assert "interrupted" in statuses.values(), statuses  # the stop came after a member kept an epoch
    for spec in sweep.read_plan(d).runs:
        status, summary = sweep.run_status(d, spec)
        folder = d / "runs" / spec.name
        # Each member is what an unpacked run stopped now would be: resumable from its kept epochs, or not started.
        assert status in ("interrupted", "pending"), (spec.name, status)
        if status == "interrupted":
            assert summary["stopped_by"] == "SIGTERM" and summary["epochs_completed"] >= 1
            assert len(_rows(folder)) == summary["epochs_completed"]
            assert (folder / "checkpoints" / "last.pt").is_file()
        else:
            assert not folder.exists()


def test_a_pack_that_cannot_claim_a_folder_leaves_no_folder_behind(tmp_path):
    cfgs = [_cfg(s) for s in (0, 1)]
    (tmp_path / cfgs[1].name).mkdir()
    (tmp_path / cfgs[1].name / "note.txt").write_text("someone else's")
    with pytest.raises(ConfigError):
        _pack(cfgs, tmp_path)
    assert not (tmp_path / cfgs[0].name).exists()  # member 0's folder, made first, is gone again
    assert (tmp_path / cfgs[1].name / "note.txt").read_text() == "someone else's"  # the other is untouched


def test_a_packed_member_records_the_clean_train_metrics_its_unpacked_run_records(tmp_path):
    """train.eval_train adds clean_train_* columns to metrics.csv; a member fills them as its unpacked run does."""
    cfgs = [_cfg(s) for s in (0, 1)]
    for cfg in cfgs:
        cfg.train.eval_train = True
    data = load_dataset(cfgs[0].data)
    _pack(cfgs, tmp_path / "packed", data)
    for cfg in cfgs:
        engine.fit(cfg, run_dir=tmp_path / "alone" / cfg.name, data=data)
        packed_rows, alone_rows = _rows(tmp_path / "packed" / cfg.name), _rows(tmp_path / "alone" / cfg.name)
        for a, b in zip(packed_rows, alone_rows):
            assert a["clean_train_loss"] not in ("", None) and a["clean_train_acc"] not in ("", None), a
            assert float(a["clean_train_loss"]) == pytest.approx(float(b["clean_train_loss"]), abs=1e-5)
            assert float(a["clean_train_acc"]) == pytest.approx(float(b["clean_train_acc"]), abs=1e-9)


@pytest.mark.parametrize("norm", ["batch", "ghost"])
def test_bf16_with_torchs_batch_norm_is_refused_on_the_cpu_before_any_folder(tmp_path, norm):
    """vmap's batch-norm rule on the CPU rejects autocast's bf16 activations with float32 weights and statistics."""
    cfgs = [_cfg(s, norm) for s in (0, 1)]
    for cfg in cfgs:
        cfg.train.precision = "bf16"
        cfg.device = "auto"  # resolved when the pack starts: the CPU here
    with pytest.raises(ConfigError, match="bf16"):
        _pack(cfgs, tmp_path)
    assert not any(tmp_path.iterdir())
    manual = [_cfg(s, "batch_manual") for s in (0, 1)]  # bnctl's own BN computes in float32: it packs in bf16
    for cfg in manual:
        cfg.train.precision = "bf16"
    assert [r.outcome for r in _pack(manual, tmp_path / "manual")] == ["completed", "completed"]


def test_each_member_steps_its_own_schedule_on_its_own_augmented_batches(tmp_path):
    """A cosine schedule and crop_flip augmentation (four steps): each member is its unpacked run, lr column included."""
    cfgs = []
    for s in (0, 1):
        raw = tiny_raw(seed=s, name=f"aug-seed{s}", optimizer={**SGD, "lr": 0.01}, scheduler={"name": "cosine"},
                       data={"train_size": 64, "test_size": 64, "augment": "crop_flip"},
                       model={"width": 0.5}, train={"epochs": 2})
        cfgs.append(config_mod.validate(raw, "of a test"))
    data = load_dataset(cfgs[0].data)
    _pack(cfgs, tmp_path / "packed", data)
    for cfg in cfgs:
        engine.fit(cfg, run_dir=tmp_path / "alone" / cfg.name, data=data)
        d = _differences(tmp_path / "packed" / cfg.name, tmp_path / "alone" / cfg.name)
        assert d["weights_abs"] < 2e-5 and d["train_loss"] < 1e-5 and d["test_loss"] < 1e-5, (cfg.name, d)
        lrs = [float(r["lr"]) for r in _rows(tmp_path / "packed" / cfg.name)]
        assert lrs == [float(r["lr"]) for r in _rows(tmp_path / "alone" / cfg.name)] and lrs[1] < lrs[0]
