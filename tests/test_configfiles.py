"""Built-in configs: found by name from any folder, copied to edit, and never preferred over a user's file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bnctl import config as C, configfiles, study, sweep
from bnctl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An empty working directory, far from the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_config_the_commands_need_is_inside_the_package():
    assert configfiles.CONFIG_DIR == ROOT / "bnctl" / "configs"
    names = configfiles.names()
    for needed in ["quickstart", "seed", "seed_nobn", "lab_diagnostics", "sweeps/lr_tolerance"]:
        assert needed in names
    for profile in study.PROFILES:
        for section in study.SECTIONS:
            assert f"studies/{profile}/{section.key}" in names
    assert not (ROOT / "configs").exists()  # one copy, in the package
    # Top-level configs first: the list starts with what a newcomer runs.
    assert names[:4] == ["lab_diagnostics", "quickstart", "seed", "seed_nobn"]
    assert [configfiles.kind(n) for n in ("quickstart", "sweeps/lr_tolerance", "studies/quick/lr")] == [
        "config", "sweep", "study"]


def test_a_name_resolves_to_the_packaged_file_from_any_folder(elsewhere):
    quickstart = configfiles.CONFIG_DIR / "quickstart.yaml"
    assert configfiles.resolve("quickstart") == quickstart
    assert configfiles.resolve("quickstart.yaml") == quickstart
    assert configfiles.resolve(Path("studies/quick/lr")) == configfiles.STUDIES_DIR / "quick" / "lr.yaml"
    assert C.load(configfiles.resolve("quickstart")).name == "quickstart"


def test_a_users_file_wins_over_the_built_in_of_the_same_name(elsewhere):
    (elsewhere / "quickstart.yaml").write_text("name: mine\n")
    assert configfiles.resolve("quickstart.yaml") == Path("quickstart.yaml")
    assert configfiles.resolve("quickstart") == configfiles.CONFIG_DIR / "quickstart.yaml"  # no file of that name
    (elsewhere / "sub").mkdir()
    (elsewhere / "sub" / "seed.yaml").write_text("name: next_to_it\n")
    assert configfiles.resolve("seed.yaml", relative_to=elsewhere / "sub") == elsewhere / "sub" / "seed.yaml"
    (elsewhere / "seed_nobn").mkdir()  # a folder is not a config file: the built-in is meant
    assert configfiles.resolve("seed_nobn") == configfiles.CONFIG_DIR / "seed_nobn.yaml"
    with pytest.raises(ConfigError, match="is a directory"):
        C.load(configfiles.resolve("sub"))


@pytest.mark.parametrize("ref", ["nope", "../configs/quickstart", "/quickstart", "studies/quick", ""])
def test_an_unknown_name_lists_the_built_in_ones(elsewhere, ref):
    with pytest.raises(ConfigError) as err:
        configfiles.resolve(ref) if ref else configfiles.get(ref)
    assert "quickstart" in str(err.value) and "studies/quick/lr" in str(err.value)


def test_summary_is_the_first_sentence_of_the_opening_comment(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("# Adam at lr 1e-3, batch 4. More detail\n# on a second line.\nname: x\n# not this\n")
    assert configfiles.summary(path) == "Adam at lr 1e-3, batch 4."
    path.write_text("# A sweep over lr? norm x lr\n# and more\nname: x\n")
    assert configfiles.summary(path) == "A sweep over lr?"
    path.write_text("name: x\n# a comment after the first key is not a summary\n")
    assert configfiles.summary(path) == ""
    for name in configfiles.names():  # every shipped file says what it is
        assert len(configfiles.summary(configfiles.get(name))) > 20, name


def test_copied_sweep_files_plan_the_same_runs_outside_the_package(elsewhere):
    """A sweep file's base is a built-in name, so a user's copy anywhere plans exactly what the packaged one does."""
    for name in [n for n in configfiles.names() if configfiles.kind(n) != "config"]:
        target = configfiles.copy(name, elsewhere / "copy.yaml", force=True)
        assert target.read_text() == configfiles.get(name).read_text()  # comments and all
        copied, packaged = sweep.plan_from_file(target), sweep.plan_from_file(configfiles.get(name))
        assert copied.runs == packaged.runs and copied.configs() == packaged.configs(), name


def test_a_sweep_files_relative_base_is_read_next_to_it_before_the_built_in(elsewhere):
    (elsewhere / "exp").mkdir()
    raw = yaml.safe_load((configfiles.CONFIG_DIR / "quickstart.yaml").read_text())
    raw["name"], raw["train"]["epochs"] = "mine", 7
    (elsewhere / "exp" / "quickstart.yaml").write_text(yaml.safe_dump(raw))
    (elsewhere / "exp" / "s.yaml").write_text("base: quickstart.yaml\ngrid:\n  optimizer.lr: [0.1, 0.2]\n")
    (elsewhere / "exp" / "b.yaml").write_text("base: quickstart\ngrid:\n  optimizer.lr: [0.1, 0.2]\n")
    (elsewhere / "exp" / "up.yaml").write_text("base: ../base.yaml\ngrid:\n  optimizer.lr: [0.1, 0.2]\n")
    (elsewhere / "base.yaml").write_text(yaml.safe_dump(raw | {"name": "above"}))
    assert sweep.plan_from_file(elsewhere / "exp" / "s.yaml").config["train"]["epochs"] == 7
    assert sweep.plan_from_file(elsewhere / "exp" / "b.yaml").config["train"]["epochs"] != 7  # the built-in
    assert sweep.plan_from_file(elsewhere / "exp" / "up.yaml").config["name"] == "above"
    (elsewhere / "exp" / "gone.yaml").write_text("base: missing.yaml\ngrid:\n  optimizer.lr: [0.1, 0.2]\n")
    with pytest.raises(ConfigError, match="base config missing.yaml not found"):
        sweep.plan_from_file(elsewhere / "exp" / "gone.yaml")


def test_copy_never_overwrites_without_force(elsewhere):
    target = configfiles.copy("quickstart")
    assert target == Path("quickstart.yaml") and target.read_text().startswith("# The quickstart (README)")
    target.write_text("edited\n")
    with pytest.raises(ConfigError, match="already exists"):
        configfiles.copy("quickstart")
    assert target.read_text() == "edited\n"
    assert configfiles.copy("quickstart", force=True).read_text().startswith("# The quickstart (README)")
    (elsewhere / "d").mkdir()
    assert configfiles.copy("studies/quick/lr", elsewhere / "d") == elsewhere / "d" / "lr.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        configfiles.copy("seed", elsewhere / "no" / "seed.yaml")


def test_the_study_reads_its_profiles_from_the_package(elsewhere):
    assert study.studies_dir() == configfiles.STUDIES_DIR
    for profile in study.PROFILES:
        for section in study.SECTIONS:
            assert study.sweep_file(profile, section.key) == configfiles.STUDIES_DIR / profile / f"{section.key}.yaml"
    with pytest.raises(ConfigError, match="lr.yaml"):
        study.sweep_file("quick", "lr", elsewhere)


# ------------------------------------------------------------------ the command


def test_config_list_names_each_file_with_its_kind_and_purpose(cli, elsewhere):
    result = cli("config", "list")
    assert result.exit_code == 0, result.output
    for name in configfiles.names():
        assert name in result.output
    assert "The quickstart (README)" in result.output and "study" in result.output


def test_config_show_prints_the_file_or_its_resolved_form(cli, elsewhere):
    result = cli("config", "show", "quickstart")
    assert result.exit_code == 0 and result.output == (configfiles.CONFIG_DIR / "quickstart.yaml").read_text()
    resolved = cli("config", "show", "quickstart", "--resolved")
    assert resolved.exit_code == 0
    full = yaml.safe_load(resolved.output)
    assert C.validate(full) == C.load(configfiles.get("quickstart"))
    assert "weight_decay" in full["optimizer"]  # a default the file does not set
    swept = cli("config", "show", "sweeps/lr_tolerance", "--resolved")
    assert swept.exit_code == 2 and "bnctl sweep --sweep sweeps/lr_tolerance --dry-run" in swept.output
    missing = cli("config", "show", "quikstart")
    assert missing.exit_code == 2 and "nor is it a built-in config" in missing.output


def test_config_copy_writes_a_file_that_train_and_sweep_accept(cli, elsewhere):
    result = cli("config", "copy", "quickstart", "mine.yaml")
    assert result.exit_code == 0 and "bnctl train --config mine.yaml" in result.output
    assert cli("config", "copy", "quickstart", "mine.yaml").exit_code == 2  # exists
    assert cli("config", "copy", "quickstart", "mine.yaml", "--force").exit_code == 0
    printed = cli("train", "--config", "mine.yaml", "--print-config", "train.epochs=3")
    assert printed.exit_code == 0 and yaml.safe_load(printed.output)["train"]["epochs"] == 3
    copied = cli("config", "copy", "sweeps/lr_tolerance")
    assert copied.exit_code == 0 and "bnctl sweep --sweep lr_tolerance.yaml" in copied.output
    planned = cli("sweep", "--sweep", "lr_tolerance.yaml", "--dry-run")
    runs = len(sweep.plan_from_file(configfiles.get("sweeps/lr_tolerance")).runs)
    assert planned.exit_code == 0 and f"{runs} run(s)" in planned.output


def test_train_and_sweep_accept_built_in_names(cli, elsewhere):
    printed = cli("train", "--config", "quickstart", "--print-config")
    assert printed.exit_code == 0 and yaml.safe_load(printed.output)["name"] == "quickstart"
    planned = cli("sweep", "--sweep", "studies/quick/lr", "--dry-run")
    runs = len(sweep.plan_from_file(configfiles.STUDIES_DIR / "quick" / "lr.yaml").runs)
    assert planned.exit_code == 0 and f"{runs} run(s)" in planned.output
    inline = cli("sweep", "--config", "quickstart", "optimizer.lr=0.1,0.01", "--dry-run")
    assert inline.exit_code == 0 and "2 run(s)" in inline.output
    bad = cli("train", "--config", "quikstart")
    assert bad.exit_code == 2 and "config file not found: quikstart" in bad.output


def test_study_dry_run_counts_every_sections_runs_and_creates_nothing(cli, elsewhere):
    result = cli("study", "claims", "--dry-run", "--root", elsewhere / "studies")
    assert result.exit_code == 0, result.output
    plans = study.plan("quick", [])
    assert set(plans) == {s.key for s in study.SECTIONS}
    assert f"{sum(len(p.runs) for p in plans.values())} run(s) in {len(plans)} sweeps" in result.output
    for key, p in plans.items():
        assert key in result.output and p.name in result.output
    assert list(elsewhere.iterdir()) == []
    bad = cli("study", "claims", "--dry-run", "model.nrom=batch")
    assert bad.exit_code == 2 and list(elsewhere.iterdir()) == []
