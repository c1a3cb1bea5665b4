"""transfer.py's recipes of their own (the article's fine-tuning beside the four strategies): each run gets
exactly the recipe it names, checked against the optimiser torch builds and the data it is fed; bad input."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_data
from torch.optim.optimizer import register_optimizer_step_post_hook

from resnet_lessons import finetune, train, transfer
from resnet_lessons.train import TrainConfig

DATA = tiny_data()
CFG = TrainConfig(model="resnet8", model_options={"width": 0.5}, epochs=1, batch_size=16, lr=0.1,
                  crop_padding=2)


def test_the_articles_recipe_is_its_section_5_2():
    recipe = transfer.ARTICLE_RECIPE
    cfg = train.replace(CFG, **recipe.changes)
    assert recipe.strategy == "full"  # Adam(model.parameters()): every layer trains
    assert (cfg.optimizer, cfg.lr, cfg.schedule, cfg.weight_decay) == ("adam", 1e-3, "constant", 0.0)
    assert (cfg.label_smoothing, cfg.crop_padding, cfg.flip) == (0.0, 0, False)
    assert recipe.mean == recipe.std == (0.5, 0.5, 0.5)


def test_a_recipe_runs_beside_the_strategies_with_its_own_optimiser_lr_and_normalisation(monkeypatch):
    seen = []
    real = finetune.finetune

    def spy(model, data, cfg, **kwargs):
        seen.append((kwargs["strategy"], cfg, data.mean, data.std))
        return real(model, data, cfg, **kwargs)

    monkeypatch.setattr(transfer, "finetune", spy)
    optimisers = []  # every optimiser that stepped, in the order of its first step

    def record(optimizer, args, kwargs):
        if not any(optimizer is seen_before for seen_before in optimisers):
            optimisers.append(optimizer)

    handle = register_optimizer_step_post_hook(record)
    try:
        result = transfer.transfer_experiment(
            DATA, model_name="resnet8", model_options={"width": 0.5}, pretrain_cfg=CFG, finetune_cfg=CFG,
            fractions=(0.5,), strategies=("full", "article"), recipes={"article": transfer.ARTICLE_RECIPE},
            min_steps=2, device="cpu")
    finally:
        handle.remove()
    assert list(result.table["method"]) == ["scratch", "full", "article"]
    (full_strategy, full_cfg, full_mean, _), (strategy, cfg, mean, std) = seen
    assert full_strategy == strategy == "full"
    assert full_cfg.optimizer == "sgd" and full_cfg.lr == pytest.approx(CFG.lr * finetune.STRATEGY_LR["full"])
    assert cfg.optimizer == "adam" and cfg.lr == 1e-3 and cfg.schedule == "constant"  # not scaled by STRATEGY_LR
    assert (cfg.weight_decay, cfg.crop_padding, cfg.flip) == (0.0, 0, False)
    assert mean == std == (0.5, 0.5, 0.5) and full_mean == pytest.approx(result.pretrained.mean)
    *_, sgd, adam = optimisers  # pretraining, scratch, full, article: the last two are the fine-tunings
    assert type(sgd) is torch.optim.SGD and type(adam) is torch.optim.Adam
    assert {g["weight_decay"] for g in adam.param_groups} == {0.0}
    assert all(g["lr"] == pytest.approx(1e-3) for g in adam.param_groups)  # full: one rate for every stage
    article_row = result.table.set_index("method").loc["article"]
    assert article_row["lr"] == 1e-3 and article_row["steps"] >= 2
    assert not result.batchnorm_shifts[(0.5, "article")]["identical"].any()  # full: every BatchNorm moves


def test_lrs_overrides_a_recipes_rate():
    result = transfer.transfer_experiment(
        DATA, model_name="resnet8", model_options={"width": 0.5}, pretrain_cfg=CFG, finetune_cfg=CFG,
        fractions=(0.5,), strategies=("article",), recipes={"article": transfer.ARTICLE_RECIPE},
        lrs={"article": 3e-4}, min_steps=1, device="cpu")
    assert result.table.set_index("method").loc["article", "lr"] == 3e-4


def test_bad_recipes_are_named():
    with pytest.raises(ValueError, match="unknown strategy 'freeze-half'"):
        transfer.Recipe("freeze-half")
    with pytest.raises(ValueError, match=r"no field\(s\) \['learning_rate'\]"):
        transfer.Recipe("full", {"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="both mean and std"):
        transfer.Recipe("full", mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="taken by the built-in methods"):
        transfer.transfer_experiment(DATA, model_name="resnet8", pretrain_cfg=CFG, finetune_cfg=CFG,
                                     recipes={"full": transfer.ARTICLE_RECIPE}, device="cpu")
