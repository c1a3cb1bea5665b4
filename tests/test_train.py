"""The training loop: schedules against torch's, optimiser groups, determinism, exact resume, early
stopping with best weights, budgets, hooks, NaN stops, bad input. Tiny models on 16x16 synthetic data."""

import pytest
import torch
from tiny import tiny_data
from torch import nn

from resnet_lessons import budget, checkpoints, runtime
from resnet_lessons.data import DataSplits
from resnet_lessons.models import build_model
from resnet_lessons.optim import lr_at, make_optimizer, schedule_curve
from resnet_lessons.profiles import get_profile
from resnet_lessons.train import (
    CHECKPOINT_NAME,
    Hook,
    RunOptions,
    StopTraining,
    TrainConfig,
    TrainingDiverged,
    config_from_profile,
    fit,
    replace,
)

DATA = tiny_data(per_class=24, val_per_class=6)
CFG = TrainConfig(model="resnet8", model_options={"width": 0.5}, epochs=3, batch_size=30, lr=0.2,
                  precision="fp32")  # exact comparisons: the same arithmetic on every CPU


def tiny_model(seed=0):
    runtime.seed_everything(seed)
    return build_model("resnet8", width=0.5)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def interrupted_and_resumed(cfg: TrainConfig, tmp_path) -> nn.Module:
    """A fit of ``cfg`` interrupted after its checkpoint of epoch 1, resumed into a differently seeded model."""

    def crash(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), DATA, cfg, device="cpu", hooks=[crash], checkpoint_dir=tmp_path)
    resumed = tiny_model(seed=5)
    fit(resumed, DATA, cfg, device="cpu", checkpoint_dir=tmp_path, resume=True)
    return resumed


# --- schedules and optimiser ---------------------------------------------------------------------


def test_step_schedule_matches_torch_multistep():
    cfg = replace(CFG, schedule="step", lr=0.1, step_milestones=(0.5, 0.75), step_gamma=0.1)
    total = 40
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[20, 30], gamma=0.1)
    for step in range(total):
        assert lr_at(step, total, cfg) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()


def test_cosine_after_warmup_matches_torch_cosine_annealing():
    cfg = replace(CFG, schedule="cosine", lr=0.4, warmup_fraction=0.2, final_factor=0.0)
    total, warmup = 50, 10
    assert [lr_at(s, total, cfg) for s in range(warmup)] == pytest.approx(
        [0.4 * (s + 1) / warmup for s in range(warmup)])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - 1 - warmup, eta_min=0.0)
    for step in range(warmup, total):
        assert lr_at(step, total, cfg) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        reference.step()


def test_onecycle_starts_low_peaks_after_warmup_and_ends_at_the_final_factor():
    cfg = replace(CFG, schedule="onecycle", lr=0.2, warmup_fraction=0.25, start_factor=0.04, final_factor=0.01)
    curve = schedule_curve(cfg, 100)
    assert curve[0] == pytest.approx(0.008 + (0.2 - 0.008) / 25)  # hand calculation: 1/25 of the way up
    assert max(curve) == pytest.approx(0.2) and curve.index(max(curve)) == 24
    assert curve[-1] == pytest.approx(0.002)
    assert all(a <= b for a, b in zip(curve[:25], curve[1:25])) and all(a >= b for a, b in zip(curve[24:], curve[25:]))


def test_no_weight_decay_on_batchnorm_and_bias_unless_asked():
    model = tiny_model()
    groups = make_optimizer(model, CFG).param_groups
    assert [g["weight_decay"] for g in groups] == [CFG.weight_decay, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    everything = make_optimizer(model, replace(CFG, decay_norm_and_bias=True)).param_groups
    assert len(everything) == 1 and everything[0]["weight_decay"] == CFG.weight_decay


@pytest.mark.parametrize("name,kind",
                         [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)])
def test_optimizer_choice(name, kind):
    optimizer = make_optimizer(tiny_model(), replace(CFG, optimizer=name))
    assert type(optimizer) is kind
    if name == "sgd":
        assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


def test_config_from_profile_takes_the_profile_recipe():
    profile = get_profile("cpu")
    cfg = config_from_profile(profile, epochs=2)
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.weight_decay) == (
        profile.model, profile.batch_size, profile.lr, profile.weight_decay)
    assert (cfg.label_smoothing, cfg.seed, cfg.epochs, cfg.optimizer, cfg.schedule) == (
        profile.label_smoothing, profile.seed, 2, profile.optimizer, "onecycle")
    assert cfg.muon_lr == profile.muon_lr
    assert config_from_profile(get_profile("smoke")).optimizer == "sgd"
    with pytest.raises(TypeError, match="no field"):
        config_from_profile(profile, epoch=3)
    assert (cfg.precision, config_from_profile(get_profile("smoke")).precision) == ("auto", "fp32")


@pytest.mark.parametrize("device, native, expected", [
    ("cpu", True, "bf16"), ("cpu", False, "fp32"), ("cuda", True, "bf16"), ("cuda", False, "fp16"),
])
def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch, device, native, expected):
    import resnet_lessons.train as train_module

    monkeypatch.setattr(runtime, "native_bf16", lambda d: native)
    assert train_module.resolve_precision("auto", torch.device(device)) == expected
    assert train_module.resolve_precision("fp32", torch.device(device)) == "fp32"


def test_native_bf16_reads_the_cpu_probes(monkeypatch):
    for avx512_bf16, amx, expected in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert runtime.native_bf16(torch.device("cpu")) is expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert runtime.native_bf16(torch.device("cpu")) is False  # an older torch without the probes: fp32


@pytest.mark.parametrize("budget", [0, -5.0])
def test_a_budget_of_zero_or_less_is_rejected(budget):
    with pytest.raises(ValueError, match="budget_seconds must be more than 0"):
        TrainConfig(budget_seconds=budget)


# --- the loop -------------------------------------------------------------------------------------


def test_fit_learns_records_history_and_is_deterministic():
    rows = []
    a, b = tiny_model(), tiny_model()
    result = fit(a, DATA, CFG, device="cpu", hooks=[rows.append])
    fit(b, DATA, CFG, device="cpu")
    history = result.history
    assert list(history.columns[:7]) == [
        "epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    assert history["epoch"].tolist() == [1, 2, 3] and len(rows) == 3 and rows[-1]["epoch"] == 3
    steps_per_epoch = len(DATA.train) // CFG.batch_size
    assert result.steps == result.total_steps == 3 * steps_per_epoch
    assert result.images_seen == 3 * steps_per_epoch * CFG.batch_size
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert (history["seconds"] > 0).all() and result.stopped == "completed"
    assert same_weights(a, b), "same seed, same data, same config: the same weights on the CPU"


def test_history_accuracy_matches_a_direct_evaluation():
    from resnet_lessons.evaluate import evaluate

    model = tiny_model()
    result = fit(model, DATA, replace(CFG, epochs=1), device="cpu")
    check = evaluate(model, DATA.val.images, DATA.val.labels, classes=DATA.classes, mean=DATA.mean, std=DATA.std)
    assert result.history["val_accuracy"].iloc[-1] == pytest.approx(check.accuracy)
    assert result.history["val_loss"].iloc[-1] == pytest.approx(check.loss, rel=1e-5)


def test_hook_objects_see_start_rows_and_end_and_can_stop_the_run():
    class Watcher(Hook):
        def __init__(self):
            self.plan, self.rows, self.result = None, [], None

        def on_fit_start(self, plan):
            self.plan = plan

        def on_epoch_end(self, row):
            self.rows.append(row)
            if row["epoch"] == 2:
                raise StopTraining

        def on_fit_end(self, result):
            self.result = result

    watcher = Watcher()
    result = fit(tiny_model(), DATA, replace(CFG, epochs=5), device="cpu", hooks=[watcher])
    assert watcher.plan["epochs"] == 5 and watcher.plan["steps_per_epoch"] == len(DATA.train) // CFG.batch_size
    assert [r["epoch"] for r in watcher.rows] == [1, 2] and watcher.result is result and result.stopped == "hook"


def test_early_stopping_restores_the_weights_of_the_best_epoch():
    # Validation labels shuffled: the train fit does not carry over, so the best epoch comes early.
    generator = torch.Generator().manual_seed(1)
    val = DATA.val
    shuffled = type(val)(val.images, val.labels[torch.randperm(len(val), generator=generator)], val.classes)
    noisy = DataSplits(DATA.source, {"train": DATA.train, "val": shuffled}, DATA.mean, DATA.std)
    snapshots = {}
    model = tiny_model()

    def hook(row):
        snapshots[row["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    cfg = replace(CFG, epochs=8, lr=0.4)
    result = fit(model, noisy, cfg, device="cpu", hooks=[hook], options=RunOptions(patience=2, monitor="val_loss"))
    best = int(result.history["val_loss"].idxmin()) + 1
    assert result.best_epoch == best and result.best_score == pytest.approx(result.history["val_loss"].min())
    if result.stopped == "early_stopping":
        assert len(result.history) == best + 2
    assert all(torch.equal(v, snapshots[best][k]) for k, v in model.state_dict().items())


def test_budget_run_plans_its_steps_to_end_within_the_budget(monkeypatch):
    import resnet_lessons.train as train_module

    clock = iter(range(10**9))  # a fake clock: 10 ms per reading, so the plan is the same on any machine
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(clock) * 0.01)
    cfg = replace(CFG, epochs=1, budget_seconds=1.5, budget_probe_steps=3)
    result = fit(tiny_model(), DATA, cfg, device="cpu")
    assert result.stopped == "budget" and result.steps == result.total_steps
    assert result.total_steps > len(DATA.train) // CFG.batch_size  # more than cfg.epochs: the budget decides
    assert result.seconds <= cfg.budget_seconds
    assert result.history["lr"].iloc[-1] == pytest.approx(lr_at(result.total_steps - 1, result.total_steps, cfg))


def test_budget_run_replans_after_each_epoch(monkeypatch):
    """The probe's first steps are slow (a cold start); the plans made after each epoch use the budget left."""
    import resnet_lessons.train as train_module

    plans, now = [], [0.0]

    def clock():  # 50 ms per reading until the first plan (the probe), 10 ms after
        now[0] += 0.05 if not plans else 0.01
        return now[0]

    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    cfg = replace(CFG, epochs=1, batch_size=10, budget_seconds=10.0, budget_probe_steps=3)  # 18 steps per epoch
    real_plan = budget.plan_steps
    monkeypatch.setattr(budget, "plan_steps", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    result = fit(tiny_model(), DATA, cfg, device="cpu")
    assert len(plans) == len(result.history) and plans[1] > 1.5 * plans[0]  # epoch 1 showed that many more fit
    assert result.stopped == "budget" and result.steps == result.total_steps == plans[-1]
    assert 0.85 * cfg.budget_seconds <= result.seconds <= cfg.budget_seconds


def test_budget_run_that_slows_down_still_ends_within_its_budget(monkeypatch):
    """After the plan made at the end of epoch 1, every step costs 5x what was measured."""
    import resnet_lessons.train as train_module

    plans, now = [], [0.0]

    def clock():
        now[0] += 0.01 if len(plans) < 2 else 0.05
        return now[0]

    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    real_plan = budget.plan_steps
    monkeypatch.setattr(budget, "plan_steps", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    cfg = replace(CFG, epochs=1, batch_size=10, budget_seconds=10.0, budget_probe_steps=3)
    result = fit(tiny_model(), DATA, cfg, device="cpu")
    assert len(plans) >= 3 and plans[-1] < plans[1]  # the slow epoch made the plan shrink
    assert result.stopped in ("budget", "over_budget") and result.seconds <= cfg.budget_seconds


def test_the_deadline_guard_scales_the_remaining_work_by_the_slowdown_of_the_last_step(monkeypatch):
    import resnet_lessons.train as train_module

    monkeypatch.setattr(train_module.time, "perf_counter", lambda: 9.5)
    # planned: 0.1 s per step, 0.2 s for the last validation; budget 10 s, started at 0
    assert not budget.past_deadline(10.0, 0.0, 9.4, 0.1, 0.2)  # on plan: 9.5 + 0.3 fits
    assert budget.past_deadline(10.0, 0.0, 9.0, 0.1, 0.2)  # the step took 0.5 s: 9.5 + 5 * 0.3 does not
    assert not budget.past_deadline(10.0, 0.0, 9.0, 0.0, 0.0)  # before any plan only an overrun stops


def test_resume_after_an_interruption_ends_with_the_same_weights(tmp_path):
    reference = tiny_model()
    fit(reference, DATA, CFG, device="cpu")

    def crash(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt  # after the checkpoint of epoch 1, before that of epoch 2

    model = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        fit(model, DATA, CFG, device="cpu", hooks=[crash], checkpoint_dir=tmp_path)
    assert checkpoints.load(tmp_path / CHECKPOINT_NAME).train_state["epoch"] == 1
    resumed = tiny_model(seed=123)  # a different initialisation: every weight must come from the checkpoint
    result = fit(resumed, DATA, CFG, device="cpu", checkpoint_dir=tmp_path, resume=True)
    assert result.history["epoch"].tolist() == [1, 2, 3]
    assert same_weights(reference, resumed)


def test_resume_refuses_a_changed_recipe_and_a_second_run_does_not_overwrite(tmp_path):
    fit(tiny_model(), DATA, replace(CFG, epochs=1), device="cpu", checkpoint_dir=tmp_path)
    with pytest.raises(FileExistsError, match="already exists"):
        fit(tiny_model(), DATA, replace(CFG, epochs=1), device="cpu", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"recipe changed \(lr: 0.2 -> 0.1"):
        fit(tiny_model(), DATA, replace(CFG, epochs=1, lr=0.1), device="cpu", checkpoint_dir=tmp_path, resume=True)


class NaNAfter(nn.Module):
    """A tiny network whose training forward returns NaN from its ``after``-th call on."""

    def __init__(self, after):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
        self.calls, self.after = 0, after

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    steps_per_epoch = len(DATA.train) // CFG.batch_size
    model = NaNAfter(after=steps_per_epoch + 3)  # the 3rd step of epoch 2
    cfg = replace(CFG, model=None, model_options={})
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite in epoch 2 \(by batch 3.*last good checkpoint"):
        fit(model, DATA, cfg, device="cpu", checkpoint_dir=tmp_path)
    saved = checkpoints.load(tmp_path / CHECKPOINT_NAME)
    assert saved.train_state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved.model_state.values())


def test_gradient_clipping_bounds_the_update():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    before = [p.detach().clone() for p in model.parameters()]
    cfg = replace(CFG, model=None, epochs=1, optimizer="sgd", momentum=0.0, schedule="constant", lr=1.0,
                  weight_decay=0.0, grad_clip=1e-3, batch_size=len(DATA.train), crop_padding=0, flip=False)
    fit(model, DATA, cfg, device="cpu")
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)  # one step of lr 1 along a gradient of norm 1e-3


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="a-file"):
        fit(tiny_model(), DATA, replace(CFG, epochs=1), device="cpu", checkpoint_dir=blocker / "run")


def test_train_loss_is_torch_cross_entropy_with_label_smoothing():
    import torch.nn.functional as F

    from resnet_lessons.evaluate import infer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    cfg = replace(CFG, model=None, epochs=1, lr=1e-12, momentum=0.0, label_smoothing=0.3, crop_padding=0, flip=False)
    logits = infer(model, DATA.train.images, mean=DATA.mean, std=DATA.std)  # before: lr 1e-12 moves nothing
    result = fit(model, DATA, cfg, device="cpu")
    assert len(DATA.train) % cfg.batch_size == 0  # every image is used once
    expected = F.cross_entropy(logits, DATA.train.labels, label_smoothing=0.3).item()
    assert result.history["train_loss"].iloc[0] == pytest.approx(expected, rel=1e-5)


def test_param_groups_step_with_their_share_of_the_scheduled_lr_and_frozen_ones_open_later():
    """The lr each group's SGD step really used (-<update, grad> / <grad, grad>) is lr_at * lr_scale; the first
    group starts frozen and a hook unfreezes it after epoch 1."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.ReLU(), nn.Linear(16, 10))
    model[1].requires_grad_(False)
    groups = [{"params": list(model[1].parameters()), "lr_scale": 0.1, "name": "body"},
              {"params": list(model[3].parameters()), "weight_decay": 0.0}]
    cfg = replace(CFG, model=None, epochs=2, momentum=0.0, weight_decay=0.0, crop_padding=0, flip=False)
    before, used = {}, []

    def pre(optimizer, args, kwargs):
        before.update({i: [(p, p.detach().clone(), p.grad.clone()) for p in g["params"] if p.grad is not None]
                       for i, g in enumerate(optimizer.param_groups)})

    def post(optimizer, args, kwargs):
        step = {}
        for i in range(len(optimizer.param_groups)):
            pairs = [(p.detach() - old, grad) for p, old, grad in before[i]]
            if pairs:
                step[i] = float(-sum((d * grad).sum() for d, grad in pairs)
                                / sum((grad * grad).sum() for _, grad in pairs))
        used.append(step)

    unfreeze = lambda row: model[1].requires_grad_(True)  # noqa: E731
    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        result = fit(model, DATA, cfg, device="cpu", hooks=[unfreeze], param_groups=groups)
    finally:
        for handle in handles:
            handle.remove()
    per_epoch = len(DATA.train) // cfg.batch_size
    assert len(used) == result.steps == 2 * per_epoch
    for step, lrs in enumerate(used):
        scheduled = lr_at(step, result.total_steps, cfg)
        assert lrs[1] == pytest.approx(scheduled, rel=1e-4)
        assert (0 in lrs) == (step >= per_epoch)  # frozen during epoch 1, then trained
        if 0 in lrs:
            assert lrs[0] == pytest.approx(0.1 * scheduled, rel=1e-4)
    assert result.history["lr"].iloc[-1] == pytest.approx(lr_at(result.steps - 1, result.total_steps, cfg))
    assert "lr" not in groups[1]  # the caller's dicts are not changed
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr_scale'\]"):
        fit(model, DATA, cfg, device="cpu", param_groups=[{"params": model.parameters(), "lr_scale": -1}])
    with pytest.raises(ValueError, match="not the model's"):
        fit(model, DATA, cfg, device="cpu", param_groups=[{"params": [nn.Parameter(torch.zeros(1))]}])


def test_a_custom_loss_fn_is_the_training_loss():
    import torch.nn.functional as F

    from resnet_lessons.evaluate import infer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    cfg = replace(CFG, model=None, epochs=1, lr=1e-12, momentum=0.0, crop_padding=0, flip=False)
    calls = []

    def tripled(logits, labels):
        calls.append(len(labels))
        return 3 * F.cross_entropy(logits, labels)

    logits = infer(model, DATA.train.images, mean=DATA.mean, std=DATA.std)  # lr 1e-12 moves nothing
    val_logits = infer(model, DATA.val.images, mean=DATA.mean, std=DATA.std)
    result = fit(model, DATA, cfg, device="cpu", loss_fn=tripled)
    assert calls == [cfg.batch_size] * result.steps
    expected = 3 * F.cross_entropy(logits, DATA.train.labels).item()
    assert result.history["train_loss"].iloc[0] == pytest.approx(expected, rel=1e-5)
    val_expected = F.cross_entropy(val_logits, DATA.val.labels).item()  # validation: the plain cross-entropy
    assert result.history["val_loss"].iloc[0] == pytest.approx(val_expected, rel=1e-5)


def test_a_training_split_smaller_than_one_batch_is_named():
    small = DataSplits(DATA.source, {"train": DATA.train.subset(torch.arange(7)), "val": DATA.val}, DATA.mean, DATA.std)
    with pytest.raises(ValueError, match=r"training split has 7 images, fewer than one batch \(batch_size 30\)"):
        fit(tiny_model(), small, CFG, device="cpu")


def test_bf16_autocast_on_the_cpu_trains_and_keeps_fp32_weights():
    model = tiny_model()
    result = fit(model, DATA, replace(CFG, precision="bf16"), device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]


def test_a_whitened_recipe_starts_from_the_patch_whitening_of_a_seeded_sample_and_keeps_it_frozen():
    from resnet_lessons.data import normalise
    from resnet_lessons.models import whiten_first_conv
    from resnet_lessons.run import WHITEN_IMAGES

    cfg = replace(CFG, epochs=1, whiten=True)
    model = tiny_model()
    fit(model, DATA, cfg, device="cpu")
    expected = tiny_model()  # the reference: the same function on the same seeded sample, by hand
    rows = torch.randperm(len(DATA.train), generator=torch.Generator().manual_seed(cfg.seed))[:WHITEN_IMAGES]
    whiten_first_conv(expected, normalise(DATA.train.images[rows], DATA.mean, DATA.std))
    assert not model.conv1.weight.requires_grad
    assert torch.allclose(model.conv1.weight, expected.conv1.weight)  # trained for an epoch, still the same


def test_a_recipe_field_added_after_a_checkpoint_was_written_counts_as_its_default(tmp_path):
    recipe, defaults = CFG.as_dict(), TrainConfig().as_dict()
    saved = {k: v for k, v in recipe.items() if k != "whiten"}  # written before the recipe had `whiten`
    checkpoints.check_resumable(saved, recipe, tmp_path / "checkpoint.pt", defaults)  # whiten=False: the same
    with pytest.raises(ValueError, match=r"the recipe changed \(whiten: False -> True\)"):
        checkpoints.check_resumable(saved, {**recipe, "whiten": True}, tmp_path / "checkpoint.pt", defaults)


# --- Muon, progressive resizing ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (32, 32)])
def test_orthogonalise_keeps_the_singular_vectors_and_sets_the_singular_values_near_one(shape):
    from resnet_lessons.optim import orthogonalise

    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    result = orthogonalise(matrix)
    assert result.shape == matrix.shape and result.dtype == matrix.dtype
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.5 and singular.max() < 1.3  # Newton-Schulz's band around 1, not exactly 1
    # in the input's singular basis the result is diagonal: the directions are the input's, only sizes change
    inner = u.T @ result @ vh.T
    off_diagonal = inner - torch.diag(torch.diagonal(inner))
    assert off_diagonal.norm() < 0.05 * inner.norm()


def test_muon_orthogonalises_the_filters_at_a_fixed_norm_and_steps_the_rest_as_sgd():
    from resnet_lessons.optim import MuonSGD, orthogonalise

    cfg = replace(CFG, optimizer="muon", lr=0.1, muon_lr=0.05, muon_momentum=0.6, momentum=0.9, weight_decay=1e-3)
    model = tiny_model()
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, MuonSGD)
    filters = {id(p) for p in model.parameters() if p.ndim == 4}
    for group in optimizer.param_groups:
        assert all((id(p) in filters) == group["orthogonalise"] for p in group["params"])
        assert group.get("lr_scale", 1.0) == (0.5 if group["orthogonalise"] else 1.0)  # muon_lr / lr
    reference = tiny_model()  # the same weights; the non-filters stepped by torch's SGD
    others = [p for p in reference.parameters() if p.ndim != 4]
    sgd = torch.optim.SGD([{"params": [p for p in others if p.ndim > 1]},  # the head: decayed, as by default
                           {"params": [p for p in others if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = DATA.train.images[:8].float() / 255, DATA.train.labels[:8]
    conv = model.conv1.weight
    buffer = torch.zeros_like(conv)
    for _ in range(3):
        for net in (model, reference):
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * group.get("lr_scale", 1.0)
        before, grad = conv.detach().clone(), conv.grad.clone()
        optimizer.step()
        sgd.step()
        with torch.no_grad():  # the reference takes the filters' step from the model: the same network each time
            for mine, theirs in zip(model.parameters(), reference.parameters()):
                if mine.ndim == 4:
                    theirs.copy_(mine)
        buffer = 0.6 * buffer + grad
        direction = orthogonalise((grad + 0.6 * buffer).reshape(len(conv), -1)).view_as(conv)
        expected = before * (len(conv) ** 0.5 / before.norm()) - 0.05 * direction
        torch.testing.assert_close(conv.detach(), expected)
    for mine, theirs in zip((p for p in model.parameters() if p.ndim != 4), others):
        torch.testing.assert_close(mine, theirs)


def test_a_muon_fit_learns_and_resumes_exactly(tmp_path):
    cfg = replace(CFG, optimizer="muon", muon_lr=0.1)
    reference = tiny_model()
    result = fit(reference, DATA, cfg, device="cpu")
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]
    resumed = interrupted_and_resumed(cfg, tmp_path)
    assert same_weights(reference, resumed)  # the momentum buffers came back with the checkpoint


def test_progressive_resizing_trains_the_first_share_of_steps_on_smaller_crops():
    from resnet_lessons.optim import crop_work, size_at

    cfg = replace(CFG, progressive_size=12, progressive_fraction=0.4)
    sides = [size_at(step, 10, cfg) for step in range(10)]
    assert sides == [12] * 4 + [None] * 6
    assert crop_work(0, 10, 10, cfg, 16, 16) == pytest.approx(4 * (12 / 16) ** 2 + 6)
    assert crop_work(2, 7, 10, cfg, 16, 16) == pytest.approx(sum((12 * 12 / 256 if s else 1.0) for s in sides[2:7]))
    assert crop_work(0, 10, 10, replace(cfg, progressive_size=0), 16, 16) == 10

    model = tiny_model()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])) if module.training
                                    else None)
    result = fit(model, DATA, cfg, device="cpu")
    total = result.total_steps
    assert seen == [(12, 12)] * round(0.4 * total) + [(16, 16)] * (total - round(0.4 * total))


def test_a_progressive_budget_run_plans_for_its_cheaper_first_steps(monkeypatch):
    """Under a fake clock a step costs its pixels (10 ms at 16 px): the plan counts the 12 px steps' lower cost."""
    import resnet_lessons.train as train_module

    now = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: now[0])
    model = tiny_model()
    model.register_forward_pre_hook(
        lambda module, args: now.__setitem__(0, now[0] + 0.01 * args[0].shape[-1] ** 2 / 256) if module.training
        else now.__setitem__(0, now[0] + 0.001))
    cfg = replace(CFG, epochs=1, batch_size=10, budget_seconds=2.0, budget_probe_steps=3, progressive_size=8,
                  progressive_fraction=0.5)
    result = fit(model, DATA, cfg, device="cpu")
    cheap = round(0.5 * result.total_steps)
    assert result.stopped == "budget" and result.steps == result.total_steps
    # all steps at full size would be about 2 s / 10 ms = 200 steps; half of them at a quarter of the cost: more
    assert result.total_steps > 1.3 * 0.97 * 2.0 / 0.01 * 0.9
    assert result.seconds <= cfg.budget_seconds
    assert cheap * 0.0025 + (result.total_steps - cheap) * 0.01 <= cfg.budget_seconds


def test_lookahead_follows_its_rule_step_by_step():
    from resnet_lessons.optim import Lookahead

    net = nn.Linear(1, 1, bias=False)
    lookahead = Lookahead(net, every=2)
    slow, total = 0.0, 8
    with torch.no_grad():
        net.weight.fill_(0.0)
        lookahead.load_state_dict({"weight": torch.zeros(1, 1)})
        for step in range(1, total + 1):
            net.weight.add_(1.0)  # an optimiser step
            live = net.weight.item()
            lookahead.step(step, total)
            if step % 2 == 0:  # slow = d * slow + (1 - d) * live, then live = slow
                decay = 0.95 ** 2 * (step / total) ** 3
                slow = decay * slow + (1 - decay) * live
                assert net.weight.item() == pytest.approx(slow)
            else:
                assert net.weight.item() == pytest.approx(live)
        net.weight.add_(1.0)  # a step after the last pull is dropped by finish
    lookahead.finish()
    assert net.weight.item() == pytest.approx(slow)
    assert slow < total  # the average lags the live weights


def test_a_lookahead_fit_ends_on_the_slow_weights_and_resumes_exactly(tmp_path):
    from resnet_lessons.evaluate import evaluate

    cfg = replace(CFG, lookahead_every=3)  # 8 steps an epoch: a checkpoint falls between two pulls
    reference = tiny_model()
    result = fit(reference, DATA, cfg, device="cpu")
    plain = tiny_model()
    fit(plain, DATA, CFG, device="cpu")
    assert not same_weights(reference, plain)  # the averaging changed the weights
    val = DATA.val
    scored = evaluate(reference, val.images, val.labels, classes=DATA.classes, mean=DATA.mean, std=DATA.std)
    assert scored.accuracy == pytest.approx(result.history["val_accuracy"].iloc[-1])  # validated as kept
    resumed = interrupted_and_resumed(cfg, tmp_path)
    assert same_weights(reference, resumed)  # the slow weights came back with the checkpoint
    with pytest.raises(ValueError, match="lookahead_every must be at least 0"):
        replace(CFG, lookahead_every=-1)


def test_frozen_batchnorm_scales_stay_at_one_while_their_shifts_train():
    model = tiny_model()
    fit(model, DATA, replace(CFG, epochs=1, freeze_bn_scale=True), device="cpu")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert any(m.bias.abs().sum() > 0 for m in norms)  # the shifts (0 at initialisation) moved


def test_bn_momentum_sets_the_weight_of_each_batch_in_the_running_statistics():
    model = tiny_model()
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    batch_means = []  # the per-channel mean of every training batch the first BatchNorm normalises
    norm.register_forward_pre_hook(
        lambda module, args: batch_means.append(args[0].detach().double().mean((0, 2, 3))) if module.training
        else None)
    fit(model, DATA, replace(CFG, epochs=1, bn_momentum=0.4), device="cpu")
    assert all(m.momentum == 0.4 for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    def running(weight):
        mean = torch.zeros_like(batch_means[0])
        for batch in batch_means:
            mean = (1 - weight) * mean + weight * batch
        return mean

    assert len(batch_means) == len(DATA["train"]) // CFG.batch_size
    assert torch.allclose(norm.running_mean.double(), running(0.4), atol=1e-5)
    assert not torch.allclose(norm.running_mean.double(), running(0.1), atol=1e-3)  # torch's default differs
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="bn_momentum must be in"):
            replace(CFG, bn_momentum=bad)


def test_dirac_init_starts_each_convolution_passing_its_inputs_through():
    model, reference = tiny_model(), tiny_model()  # the same seed: the same default initialisation
    first_weights = {}  # each 3x3 convolution's filters at its first training forward, before any step

    def keep(module, args):
        first_weights.setdefault(module, module.weight.detach().clone())

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    for conv in convs:
        conv.register_forward_pre_hook(keep)
    fit(model, DATA, replace(CFG, epochs=1, dirac_init=True), device="cpu")
    originals = [m.weight for m in reference.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and len(first_weights) == len(convs) == len(originals)
    for conv, original in zip(convs, originals):
        weight, kept = first_weights[conv], min(conv.in_channels, conv.out_channels)
        x = torch.randn(2, conv.in_channels, 6, 6)
        out = nn.functional.conv2d(x, weight, padding=1)
        assert torch.allclose(out[:, :kept], x[:, :kept])  # the first filters copy their input channel
        assert torch.equal(weight[kept:], original[kept:])  # the others keep their initialisation
