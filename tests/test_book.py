"""The chapter set-up: profile, device and data, with a visible fallback when CIFAR-10 cannot be had."""

import pytest

from resnet_lessons import book
from resnet_lessons.data import DataUnavailable
from resnet_lessons.profiles import SettingsError

SMOKE = {"RESNET_LESSONS_PROFILE": "smoke"}


def test_setup_reports_profile_source_and_device(capsys):
    session = book.setup("A chapter", env=SMOKE)
    printed = capsys.readouterr().out
    assert session.profile.name == "smoke" and session.source == "synthetic"
    assert "profile: profile 'smoke'" in printed and "data: synthetic" in printed and "device: cpu" in printed
    assert session.fallback_reason is None
    assert len(session.data.val) == 10 * session.profile.val_per_class


def test_unreachable_cifar10_falls_back_to_synthetic_with_a_warning(monkeypatch):
    real_load = book.load

    def offline_load(source, **kwargs):
        if source == "cifar10":
            raise DataUnavailable("CIFAR-10 could not be downloaded; place cifar-10-python.tar.gz in /cache")
        return real_load(source, **kwargs)

    monkeypatch.setattr(book, "load", offline_load)
    session = book.setup("A chapter", env={**SMOKE, "RESNET_LESSONS_DATA": "cifar10"})
    assert session.source == "synthetic" and session.settings.source == "cifar10"
    banner = book._banner_html("A chapter", session)
    assert "admonition warning" in banner and "Not the real CIFAR-10" in banner
    assert "cifar-10-python.tar.gz in /cache" in banner
    assert session.data.classes[0] == "disc"


def test_a_missing_folder_is_not_silently_replaced(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        book.setup("A chapter", env={**SMOKE, "RESNET_LESSONS_DATA": str(tmp_path / "missing")})


def test_glue_returns_its_value_outside_a_book_build():
    assert book.glue("answer", 42) == 42


def test_glue_turns_numpy_and_torch_scalars_into_numbers():
    import numpy as np
    import torch

    assert type(book.glue("a", np.float64(0.5))) is float
    assert type(book.glue("b", torch.tensor(3))) is int


# --- the chapter's clock and budgets ----------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_share_is_its_fraction_of_the_budget_split_over_its_runs():
    fake = FakeTime()
    clock = book.ChapterClock(300, now=fake)
    assert clock.share(0.5, runs=4) == pytest.approx(150 / 4)
    fake.now += 200  # late: 100 s left, 30 s of it reserved for what follows
    assert clock.share(0.5) == pytest.approx(70)
    fake.now += 1000  # past the budget: the floor, so the run trains what fits instead of nothing
    assert clock.share(0.5, runs=2) == pytest.approx(0.02 * 300 / 2)


@pytest.mark.parametrize("fraction, runs", [(0, 1), (1.5, 1), (0.5, 0)])
def test_a_bad_share_is_refused(fraction, runs):
    with pytest.raises(ValueError, match="share|runs"):
        book.ChapterClock(60).share(fraction, runs)


def test_every_recipe_a_chapter_gets_is_budgeted():
    session = book.setup("A chapter", with_data=False, env=SMOKE)
    cfg = session.recipe(0.5, runs=2, lr=0.1)
    assert cfg.lr == 0.1 and 0 < cfg.budget_seconds <= session.profile.chapter_seconds / 4


def test_finish_glues_the_chapters_time(monkeypatch):
    shown, glued = [], {}
    session = book.setup("A chapter", with_data=False, env=SMOKE)
    monkeypatch.setattr(book, "_show", lambda html_text, plain: shown.append(plain))
    monkeypatch.setattr(book, "glue", lambda name, value, **kw: glued.setdefault(name, value))
    book.finish(session)
    seconds = int(glued["chapter_seconds"].removesuffix(" s"))
    assert 0 <= seconds < session.profile.chapter_seconds
    assert f"ran in {seconds} s, within its budget of 30 s" in shown[-1]


def test_a_budget_smaller_than_one_epoch_trains_what_fits_and_says_so():
    from tiny import tiny_data

    from resnet_lessons import train
    from resnet_lessons.models import build_model

    data = tiny_data(per_class=60, val_per_class=2, size=16)
    cfg = train.TrainConfig(model="resnet8", batch_size=8, budget_seconds=0.05, budget_probe_steps=2,
                            precision="fp32")
    with pytest.warns(UserWarning, match=r"allowed \d+ of the \d+ steps of one epoch"):
        result = train.fit(build_model("resnet8", width=0.25), data, cfg, device="cpu")
    assert result.epochs_trained < 1 and result.stopped in ("budget", "over_budget")
    assert "barely trained" in result.short_budget


# --- the reference model: keyed, cached, reused, rebuilt when damaged ---------------------------------------


def _tiny_session():
    from dataclasses import replace

    import torch
    from tiny import tiny_data

    from resnet_lessons.profiles import Settings, get_profile

    profile = replace(get_profile("smoke"), reference_seconds=1.0, batch_size=16)
    settings = Settings(profile=profile, source="synthetic", source_from_env=False)
    return book.Session(settings=settings, device=torch.device("cpu"), data=tiny_data(size=16))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_reference_model_is_trained_once_then_loaded(tmp_path, monkeypatch):
    import torch

    session = _tiny_session()
    first = book.reference_model(session, cache_dir=tmp_path)
    assert first.trained_now and first.path.exists() and first.path.parent == tmp_path

    def no_training(*args, **kwargs):
        raise AssertionError("the cached reference model was trained again")

    monkeypatch.setattr(book.train, "fit", no_training)
    second = book.reference_model(session, cache_dir=tmp_path)
    assert not second.trained_now and second.path == first.path
    for name, value in _weights(first.model).items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    assert second.epochs == pytest.approx(first.epochs) and len(second.history) == len(first.history)


def test_the_reference_key_follows_profile_data_and_recipe_but_not_run_options():
    from dataclasses import replace

    session = _tiny_session()
    profile, data = session.profile, session.data
    cfg = book.reference_recipe(profile)
    key = book.reference_key(profile, data, cfg)
    assert book.reference_key(replace(profile, quiet=not profile.quiet), data, cfg) == key
    assert book.reference_key(profile, data, replace(cfg, lr=cfg.lr / 2)) != key
    assert book.reference_key(replace(profile, name="other"), data, cfg) != key
    images = data.train.images.clone()
    images[0, 0, 0, 0] ^= 1  # one pixel of one image
    changed = replace(data, splits={**data.splits, "train": replace(data.train, images=images)})
    assert book.reference_key(profile, changed, cfg) != key


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other recipe"])
def test_a_damaged_or_foreign_cache_entry_is_rebuilt_not_trusted(tmp_path, damage):
    import torch

    from resnet_lessons import checkpoints

    session = _tiny_session()
    path = book.reference_model(session, cache_dir=tmp_path).path
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:  # a whole checkpoint, but made for another key
        saved = checkpoints.load_raw(path)
        saved["extra"]["reference_key"] = "another recipe"
        torch.save(saved, path)
    again = book.reference_model(session, cache_dir=tmp_path)
    assert again.trained_now
    assert checkpoints.load(path).extra["reference_key"] == book.reference_key(
        session.profile, session.data, book.reference_recipe(session.profile))


def test_a_reference_model_that_trained_less_than_an_epoch_is_not_cached(tmp_path):
    from dataclasses import replace

    from tiny import tiny_data

    session = _tiny_session()
    session.settings = replace(session.settings, profile=replace(session.profile, reference_seconds=0.05))
    session.data = tiny_data(per_class=80, size=16)  # 50 steps an epoch: more than 0.05 s allows
    first = book.reference_model(session, cache_dir=tmp_path)
    assert first.trained_now and first.epochs < 1 and not first.path.exists()
