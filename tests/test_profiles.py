import dataclasses

import pytest

from resnet_lessons import profiles
from resnet_lessons.profiles import PROFILES, SettingsError, from_env


def test_profile_names_and_defaults_by_hardware():
    assert set(PROFILES) == {"smoke", "cpu", "gpu"}
    assert from_env({}, cuda_available=True).profile.name == "gpu"
    assert from_env({}, cuda_available=False).profile.name == "cpu"
    assert from_env({"RESNET_LESSONS_PROFILE": "smoke"}).profile is PROFILES["smoke"]


def test_default_source_follows_profile_and_env_overrides_it():
    assert from_env({"RESNET_LESSONS_PROFILE": "smoke"}).source == "synthetic"
    assert from_env({"RESNET_LESSONS_PROFILE": "cpu"}).source == "cifar10"
    settings = from_env({"RESNET_LESSONS_PROFILE": "smoke", "RESNET_LESSONS_DATA": "cifar10"})
    assert settings.source == "cifar10" and settings.source_from_env


def test_profiles_are_frozen_and_replace_derives_a_variant():
    smoke = PROFILES["smoke"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        smoke.epochs = 99  # type: ignore[misc]
    longer = profiles.replace(smoke, epochs=smoke.epochs + 1)
    assert longer.epochs == smoke.epochs + 1 and PROFILES["smoke"].epochs == smoke.epochs


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(SettingsError, match="smoke, cpu, gpu") as error:
        from_env({"RESNET_LESSONS_PROFILE": "laptop"})
    assert "'laptop'" in str(error.value)


def test_missing_data_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SettingsError, match="no-such-folder") as error:
        from_env({"RESNET_LESSONS_PROFILE": "smoke", "RESNET_LESSONS_DATA": str(missing)})
    assert "cifar10, synthetic" in str(error.value)


def test_existing_data_path_is_accepted(tmp_path):
    settings = from_env({"RESNET_LESSONS_PROFILE": "cpu", "RESNET_LESSONS_DATA": str(tmp_path)})
    assert settings.source == str(tmp_path)


def test_only_profiles_reads_the_environment():
    """profiles.py reads the environment; distributed.py reads only torchrun's RANK/WORLD_SIZE."""
    from pathlib import Path

    package = Path(profiles.__file__).parent
    readers = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if p.name not in ("profiles.py", "distributed.py")
        and ("os.environ" in p.read_text() or "getenv(" in p.read_text())
    ]
    assert readers == []


def test_a_chapter_budget_from_the_environment_scales_the_reference_models_too():
    settings = from_env({"RESNET_LESSONS_PROFILE": "cpu", "RESNET_LESSONS_CHAPTER_SECONDS": "60"})
    cpu = PROFILES["cpu"]
    assert settings.profile.chapter_seconds == 60
    assert settings.profile.reference_seconds == pytest.approx(60 * cpu.reference_seconds / cpu.chapter_seconds)


@pytest.mark.parametrize("bad", ["0", "-5", "inf", "nan", "ten"])
def test_a_bad_chapter_budget_is_refused_by_name(bad):
    with pytest.raises(SettingsError, match="RESNET_LESSONS_CHAPTER_SECONDS"):
        from_env({"RESNET_LESSONS_PROFILE": "cpu", "RESNET_LESSONS_CHAPTER_SECONDS": bad})


def test_every_profile_budgets_its_chapters_within_the_bounds_it_promises():
    """smoke: at most 60 s a chapter on 2 cores; cpu: 5 minutes; gpu: 10 minutes on a T4-class GPU."""
    bounds = {"smoke": 60, "cpu": 300, "gpu": 600}
    for name, profile in PROFILES.items():
        assert 0 < profile.reference_seconds < profile.chapter_seconds <= bounds[name], name


def test_quiet_from_the_environment_turns_progress_output_off():
    assert from_env({"RESNET_LESSONS_PROFILE": "cpu", "RESNET_LESSONS_QUIET": "1"}).profile.quiet
    assert not from_env({"RESNET_LESSONS_PROFILE": "cpu", "RESNET_LESSONS_QUIET": "0"}).profile.quiet
    with pytest.raises(SettingsError, match="RESNET_LESSONS_QUIET must be 1"):
        from_env({"RESNET_LESSONS_PROFILE": "cpu", "RESNET_LESSONS_QUIET": "yes please"})
