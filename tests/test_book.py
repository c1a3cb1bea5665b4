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
