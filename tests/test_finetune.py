"""Fine-tuning: weights in (torchvision's format, our checkpoints, the hub cache, offline), the head replaced,
what a strategy freezes and which learning rate each group gets, BatchNorm statistics under a linear probe,
the transfer-experiment helpers, and bad input. Tiny models on 16x16 synthetic data; no network."""

import json
import socket
import urllib.error

import pytest
import torch
import torchvision
from clirun import run_cli
from tiny import tiny_data
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from resnet_lessons import checkpoints, runtime, transfer
from resnet_lessons import finetune as ft
from resnet_lessons import weights as wt
from resnet_lessons.data import few_labels, make_synthetic, resize_splits, select_classes, sources
from resnet_lessons.models import build_model
from resnet_lessons.train import TrainConfig

DATA = tiny_data()
CFG = TrainConfig(model="resnet8", epochs=1, batch_size=30, lr=0.5, schedule="constant",
                  crop_padding=2)


def tiny_model(num_classes=10, seed=0) -> nn.Module:
    runtime.seed_everything(seed)
    return build_model("resnet8", num_classes=num_classes, width=0.5)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tv18_file(tmp_path_factory):
    """A torchvision ResNet-18 state dict, as torchvision's own weights files hold it."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    torch.save(model.state_dict(), path)
    return path, model


# --- strategies: frozen parts stay bit-identical, learning rates per group ------------------------------


def test_linear_probe_keeps_backbone_and_batchnorm_statistics_bit_identical():
    model = tiny_model()
    before = snapshot(model)
    result = ft.finetune(model, DATA, CFG, strategy="linear", device="cpu")
    assert result.steps >= 1
    after = model.state_dict()
    backbone = [k for k in before if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone) and any("num_batches_tracked" in k for k in backbone)
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    assert not changed, f"the frozen backbone changed: {changed[:5]}"
    assert not torch.equal(before["fc.weight"], after["fc.weight"]), "the head did not train"


def test_full_finetuning_moves_batchnorm_statistics():
    model = tiny_model()
    before = transfer.batchnorm_statistics(model)
    ft.finetune(model, DATA, CFG, strategy="full", device="cpu")
    shift = transfer.batchnorm_shift(before, transfer.batchnorm_statistics(model))
    assert not shift["identical"].any() and (shift["mean shift"] > 0).all()


def test_frozen_batchnorm_stays_in_eval_mode_under_train():
    model = tiny_model()
    ft.prepare(model, "linear", lr=0.1, weight_decay=0.0)
    model.train()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert norms and not any(m.training for m in norms.values())
    assert model.training and model.fc.training
    ft.set_trainable(model, ["layer3"])
    model.train()
    assert all(m.training == n.startswith("layer3") for n, m in norms.items())


def test_the_batchnorm_rule_keeps_the_same_tensors_and_the_state_dict():
    model = tiny_model()
    before = {name: id(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    keys = list(model.state_dict())
    ft.prepare(model, "linear", lr=0.1, weight_decay=0.0)
    ft.prepare(model, "gradual", lr=0.1, weight_decay=0.0)  # a second time changes nothing more
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is ft.FreezableBatchNorm2d for m in norms)
    assert {name: id(t) for name, t in [*model.named_parameters(), *model.named_buffers()]} == before
    assert list(model.state_dict()) == keys
    ft.set_trainable(model, ft.stages(model))
    assert all(m.training for m in model.train().modules())  # nothing frozen: every layer trains


def test_parameter_groups_carry_the_intended_learning_rates():
    model = tiny_model()
    plan = ft.prepare(model, "discriminative", lr=0.4, weight_decay=5e-4, decay=0.5)
    assert plan.learning_rates() == pytest.approx(
        {"fc": 0.4, "layer3": 0.2, "layer2": 0.1, "layer1": 0.05, "stem": 0.025})
    for group in plan.groups:  # weight decay only on conv/linear weights
        assert group["weight_decay"] == (0.0 if "no decay" in group["name"] else 5e-4)
    grouped = [id(p) for g in plan.groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert ft.prepare(tiny_model(), "full", lr=0.4, weight_decay=0.0).learning_rates() == pytest.approx(
        dict.fromkeys(["stem", "layer1", "layer2", "layer3", "fc"], 0.4))
    linear = ft.prepare(tiny_model(), "linear", lr=0.4, weight_decay=0.0)
    assert set(linear.learning_rates()) == {"fc"}


def test_training_steps_use_each_groups_learning_rate():
    """The optimiser that train.fit builds steps with lr * lr_scale per group (constant schedule)."""
    seen = []

    def record(optimizer, args, kwargs):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    handle = register_optimizer_step_post_hook(record)
    try:
        ft.finetune(tiny_model(), DATA, CFG, strategy="discriminative", device="cpu", decay=0.1)
    finally:
        handle.remove()
    assert seen and all(step["fc"] == pytest.approx(0.5) and step["layer3"] == pytest.approx(0.05)
                        and step["stem"] == pytest.approx(0.5e-4) for step in seen)


def test_gradual_unfreezing_opens_one_stage_per_epoch_from_the_top():
    model = tiny_model()
    before = snapshot(model)
    ft.finetune(model, DATA, CFG.__class__(**{**CFG.as_dict(), "epochs": 2}), strategy="gradual", device="cpu")
    after = model.state_dict()
    # epoch 1 trains the head only; layer3 opens after it, layer2 after epoch 2 (too late to train)
    assert not torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])
    assert not torch.equal(before["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])
    assert torch.equal(before["layer2.0.conv1.weight"], after["layer2.0.conv1.weight"])
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])


# --- weights: torchvision format, head replacement, the hub cache, offline ---------------------------------


def test_torchvision_state_dict_loads_into_our_model(tv18_file):
    path, reference = tv18_file
    ready = ft.pretrained_model("resnet18", 1000, path, new_head=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ready.model.eval()(x), reference.eval()(x))
    assert ready.mean == pytest.approx((0.485, 0.456, 0.406))  # torchvision weights want ImageNet statistics


def test_new_head_replaces_the_1000_way_layer(tv18_file):
    path, reference = tv18_file
    ready = ft.pretrained_model("resnet18", 7, path)
    assert isinstance(ready.model.fc, nn.Linear) and ready.model.fc.out_features == 7
    assert ready.model.fc.in_features == 512 and ready.new_modules == ("fc",)
    assert ready.model.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    assert torch.equal(ready.model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_cifar_stem_swap_keeps_the_blocks_and_renews_the_stem(tv18_file):
    path, reference = tv18_file
    ready = ft.pretrained_model("resnet18", 10, path, stem="cifar")
    assert ready.model.conv1.kernel_size == (3, 3) and set(ready.new_modules) == {"conv1", "bn1", "fc"}
    assert torch.equal(ready.model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    plan = ft.prepare(ready.model, "linear", lr=0.1, weight_decay=0.0, new_modules=ready.new_modules)
    assert set(plan.learning_rates()) == {"stem", "fc"}  # a fresh stem must train even in a linear probe


def test_article_stacking_a_linear_on_the_1000_logits_fails():
    backbone = torchvision.models.resnet18(weights=None)
    article = nn.Sequential(backbone, nn.Linear(512, 10))
    with pytest.raises(RuntimeError, match="1000"):
        article(torch.randn(2, 3, 32, 32))


def test_offline_error_names_the_hub_cache_and_the_local_file_option(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(wt.WeightsUnavailable) as caught:
        ft.pretrained_model("resnet18", 10, "imagenet", hub_dir=tmp_path)
    message = str(caught.value)
    folder = tmp_path / "checkpoints"
    assert str(folder / "resnet18-f37072fd.pth") in message and "no network in this test" in message
    assert "--weights" in message and "ResNet18_Weights.IMAGENET1K_V1" in message
    with pytest.raises(wt.WeightsUnavailable, match="download=False"):
        wt.load_weights("imagenet", "resnet18", hub_dir=tmp_path / "other", download=False)


def test_weights_placed_by_hand_in_the_hub_cache_load_without_network(tmp_path, monkeypatch, tv18_file):
    path, reference = tv18_file
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried the network"))
    folder = wt.hub_checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / wt.weights_file_name("resnet18")).write_bytes(path.read_bytes())
    loaded = wt.load_weights("imagenet", "resnet18", hub_dir=tmp_path)
    assert loaded.source == "ResNet18_Weights.IMAGENET1K_V1" and loaded.num_outputs == 1000
    assert torch.equal(loaded.state["conv1.weight"], reference.conv1.weight)


def test_a_weights_download_runs_under_a_socket_timeout(tmp_path, monkeypatch, tv18_file):
    seen = []

    def spy(url, **kwargs):
        seen.append(socket.getdefaulttimeout())
        return torch.load(tv18_file[0], weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", spy)
    previous = socket.getdefaulttimeout()
    assert wt.load_weights("imagenet", "resnet18", hub_dir=tmp_path).num_outputs == 1000
    assert seen == [sources.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == previous


def test_imagenet_weights_use_the_weights_enum_not_pretrained_true():
    member = wt.imagenet_weights("resnet18")
    assert member is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert wt.imagenet_weights("resnet50", "IMAGENET1K_V2").url.endswith(".pth")
    with pytest.raises(wt.WeightsError, match="resnet20"):
        wt.imagenet_weights("resnet20")


# --- our own checkpoints, and bad input -------------------------------------------------------------------


def save_checkpoint(path, model, classes, name="resnet8", options=None):
    payload = checkpoints.make_checkpoint(model, model_name=name, model_options=options or {"width": 0.5},
                                          classes=classes, mean=(0.5,) * 3, std=(0.25,) * 3)
    return checkpoints.save(payload, path)


def test_own_checkpoint_head_must_fit_unless_a_new_head_is_asked_for(tmp_path):
    path = save_checkpoint(tmp_path / "animals.pt", tiny_model(num_classes=6), DATA.classes[:6])
    with pytest.raises(wt.WeightsError, match="6 outputs.*--new-head"):
        ft.pretrained_model("resnet8", 4, path)
    with pytest.raises(wt.WeightsError, match="new-head"):  # same count, other class names
        ft.pretrained_model("resnet8", 6, path, classes=DATA.classes[4:])
    kept = ft.pretrained_model("resnet8", 6, path, classes=DATA.classes[:6])
    assert kept.new_modules == () and kept.mean == (0.5, 0.5, 0.5)  # the checkpoint's normalisation
    fresh = ft.pretrained_model("resnet8", 4, path, new_head=True)
    assert fresh.model.fc.out_features == 4 and fresh.new_modules == ("fc",)


def test_weights_for_another_architecture_name_both(tmp_path, tv18_file):
    path, _ = tv18_file
    with pytest.raises(wt.WeightsError, match="resnet18.*resnet50"):
        ft.pretrained_model("resnet50", 10, path)
    own = save_checkpoint(tmp_path / "r8.pt", tiny_model(), DATA.classes)
    with pytest.raises(wt.WeightsError, match="resnet8.*resnet20"):
        ft.pretrained_model("resnet20", 10, own)
    narrow = tmp_path / "narrow.pth"
    torch.save(build_model("resnet18", num_classes=1000, width=0.5).state_dict(), narrow)
    with pytest.raises(wt.WeightsError, match="shape"):
        ft.pretrained_model("resnet18", 10, narrow)


@pytest.mark.parametrize("content, match", [
    (b"", "cannot read"),
    (b"not a pytorch file at all", "cannot read"),
    ("truncated", "cannot read"),
    ("list", "not a state dict"),
    ("tensor", "not a state dict"),
])
def test_files_that_are_not_state_dicts_or_are_corrupt(tmp_path, tv18_file, content, match):
    path = tmp_path / "weights.pth"
    if content == "truncated":
        path.write_bytes(tv18_file[0].read_bytes()[:5000])
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    with pytest.raises(wt.WeightsError, match=match):
        ft.pretrained_model("resnet18", 10, path)


def test_unknown_strategy_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="linear, full, discriminative, gradual"):
        ft.prepare(tiny_model(), "freeze-half", lr=0.1, weight_decay=0.0)
    with pytest.raises(wt.WeightsError, match="no weights file"):
        wt.load_weights(tmp_path / "missing.pth", "resnet18")


# --- the transfer experiment's helpers ----------------------------------------------------------------------


def test_class_subsets_and_few_labels():
    source, target = transfer.transfer_classes(DATA.classes)
    assert source == DATA.classes[:6] and target == DATA.classes[6:]
    assert transfer.transfer_classes(("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                      "ship", "truck")) == (transfer.CIFAR10_ANIMALS, transfer.CIFAR10_VEHICLES)
    vehicles = select_classes(DATA, target)
    assert vehicles.classes == target and set(vehicles.train.labels.tolist()) == {0, 1, 2, 3}
    assert len(vehicles.val) == 4 * 3
    few = few_labels(vehicles, 0.25, seed=0)
    assert list(few.train.counts().values()) == [2, 2, 2, 2] and few.val is vehicles.val
    assert list(few_labels(vehicles, 0.001).train.counts().values()) == [1, 1, 1, 1]
    cfg = transfer.steps_config(CFG, n_train=8, min_steps=5)
    assert cfg.batch_size == 8 and cfg.epochs == 5


def test_upsampling_and_input_costs():
    big = resize_splits(DATA, 24)
    assert big.train.image_size == (24, 24) and big.train.images.dtype == torch.uint8
    costs = transfer.input_handling_costs("resnet18", transfer.INPUT_HANDLING[:3])
    article, cifar, up64 = costs["GMACs per image"]
    assert cifar > 10 * article and up64 == pytest.approx(4 * article, rel=0.01)


# --- the finetune command ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two synthetic classes as PNGs, 60 each (the smoke profile holds out 50 per class for val)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    images = make_synthetic(60, image_size=32, seed=5)
    for index in range(len(images)):
        label = int(images.labels[index])
        if label < 2:
            target = root / images.classes[label]
            target.mkdir(exist_ok=True)
            Image.fromarray(images.images[index].permute(1, 2, 0).numpy()).save(target / f"{index:04d}.png")
    return root


def test_finetune_command_writes_what_train_writes_and_evaluate_and_predict_read_it(tmp_path, folder, capsys):
    source = save_checkpoint(tmp_path / "pretrained.pt", tiny_model(num_classes=3), DATA.classes[2:5])
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", "--weights", source, "--data", folder, "--out", out, "--profile",
                           "smoke", "--epochs", "2", "--strategy", "linear", "--new-head")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["finetune"]["strategy"] == "linear"
    assert (out / "history.csv").read_text().startswith("epoch,step,lr,train_loss")
    saved = checkpoints.load(out / "model.pt")
    assert saved.classes == DATA.classes[:2] and saved.model_options == {"width": 0.5}
    assert saved.mean == (0.5, 0.5, 0.5)  # the pretrained weights' normalisation travels with the model
    pretrained = checkpoints.load(source).model_state
    assert torch.equal(saved.model_state["layer2.0.bn1.running_mean"], pretrained["layer2.0.bn1.running_mean"])
    code, text, err = run_cli(capsys, "evaluate", out / "model.pt", "--data", folder, "--json")
    assert code == 0, err
    assert json.loads(text)["n"] == 100
    image = next((folder / DATA.classes[0]).iterdir())
    code, text, err = run_cli(capsys, "predict", out / "model.pt", image, "--json")
    assert code == 0, err
    assert json.loads(text)[0]["top"][0]["class"] in DATA.classes[:2]


def test_finetune_command_bad_input_is_one_line_with_exit_code_1(tmp_path, folder, capsys, monkeypatch, tv18_file):
    source = save_checkpoint(tmp_path / "pretrained.pt", tiny_model(num_classes=3), DATA.classes[2:5])
    common = ["--data", folder, "--profile", "smoke", "--epochs", "1"]
    code, _, err = run_cli(capsys, "finetune", "--weights", source, "--out", tmp_path / "a", *common)
    assert code == 1 and "--new-head" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "finetune", "--weights", tv18_file[0], "--model", "resnet34",
                           "--out", tmp_path / "b", *common)
    assert code == 1 and "resnet18" in err and "resnet34" in err
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    code, _, err = run_cli(capsys, "finetune", "--weights", "imagenet", "--hub-dir", tmp_path / "hub",
                           "--out", tmp_path / "c", *common)
    assert code == 1 and str(tmp_path / "hub" / "checkpoints") in err and "--weights" in err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    code, _, err = run_cli(capsys, "finetune", "--weights", garbage, "--out", tmp_path / "d", *common)
    assert code == 1 and "cannot read" in err
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c", "d"))  # nothing written on failure


def test_transfer_experiment_runs_end_to_end_and_its_figures_draw():
    from matplotlib.figure import Figure

    from resnet_lessons import plots

    cfg = TrainConfig(model="resnet8", model_options={"width": 0.5}, epochs=1, batch_size=16, lr=0.1,
                      crop_padding=2)
    result = transfer.transfer_experiment(DATA, model_name="resnet8", model_options={"width": 0.5},
                                          pretrain_cfg=cfg, finetune_cfg=cfg, fractions=(0.2, 0.5),
                                          strategies={0.2: ("linear",), 0.5: ("linear", "full")}, min_steps=2,
                                          device="cpu")
    table = result.table
    assert list(table["method"]) == ["scratch", "linear", "scratch", "linear", "full"]
    assert table["val accuracy"].between(0, 1).all() and (table["steps"] >= 2).all()
    assert result.batchnorm_shifts[(0.5, "linear")]["identical"].all()
    assert not result.batchnorm_shifts[(0.5, "full")]["identical"].any()
    assert result.histories[(0.2, "linear")]["val_accuracy"].isna().all()  # no per-epoch val below curves_for
    assert result.histories[(0.5, "full")]["val_accuracy"].notna().all()
    curves = {m: h for (f, m), h in result.histories.items() if f == 0.5}
    shifts = {m: t for (f, m), t in result.batchnorm_shifts.items() if f == 0.5}
    for figure in (plots.transfer_bars(table, metric="val accuracy"), plots.strategy_curves(curves),
                   plots.batchnorm_shift_bars(shifts)):
        assert isinstance(figure, Figure)


def test_finetune_command_with_imagenet_weights_placed_in_the_hub_cache(tmp_path, folder, capsys, monkeypatch,
                                                                         tv18_file):
    """The --weights imagenet path end to end, with a torchvision-format file placed by hand (random weights:
    this checks the plumbing, not what ImageNet weights reach); upsampled images and predict agree on the size."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried the network"))
    folder_hub = wt.hub_checkpoint_dir(tmp_path / "hub")
    folder_hub.mkdir(parents=True)
    (folder_hub / wt.weights_file_name("resnet18")).write_bytes(tv18_file[0].read_bytes())
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", "--weights", "imagenet", "--hub-dir", tmp_path / "hub", "--data",
                           folder, "--out", out, "--profile", "smoke", "--epochs", "1", "--image-size", "40")
    assert code == 0, err
    saved = checkpoints.load(out / "model.pt")
    assert saved.model_name == "resnet18" and saved.model_options["stem"] == "imagenet"
    assert saved.mean == pytest.approx((0.485, 0.456, 0.406)) and saved.extra["data"]["image_size"] == 40
    assert saved.extra["metrics"]["finetune"]["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    image = next((folder / DATA.classes[1]).iterdir())
    code, text, err = run_cli(capsys, "predict", out / "model.pt", image, "--json")
    assert code == 0, err
    assert len(json.loads(text)[0]["top"]) == 2
