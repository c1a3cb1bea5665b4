"""The one training loop: :func:`fit` trains any model on any :class:`DataSplits` with a :class:`TrainConfig`.

Everything a run needs is in the config (read it top to bottom: it is the recipe). The loop is
plain: for each epoch, for each batch, set the learning rate from the schedule, forward, loss,
backward, clip, step; then evaluate on the validation split, record a history row, call the hooks,
maybe stop early, write a checkpoint. Three things make it trustworthy:

* the schedule is a pure function of the step (:func:`lr_at`), so resuming a run is exact;
* a ``budget_seconds`` run times its first steps, then fixes the number of steps so it ends in time;
* a NaN or infinite loss stops the run with a message, and the last good checkpoint is kept.

The loop knows nothing of notebooks or plots: chapters watch it through hooks.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints, distributed

CHECKPOINT_NAME = "checkpoint.pt"  # the resumable checkpoint that fit writes into checkpoint_dir

Optimizer = Literal["sgd", "adamw", "adam"]
Schedule = Literal["onecycle", "cosine", "step", "constant"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. Frozen: derive variants with ``dataclasses.replace(cfg, lr=0.1)``."""

    # what is trained (recorded in checkpoints so that they can rebuild the network)
    model: str | None = None  # registry name from resnet_lessons.models; None for a hand-made network
    model_options: dict[str, Any] = field(default_factory=dict)  # build_model keyword arguments
    # how long
    epochs: int = 10  # passes over the training split; a budget run plans its own number of steps instead
    budget_seconds: float | None = None  # wall-clock seconds for the whole fit; None: train for `epochs`
    budget_probe_steps: int = 8  # steps timed (after 2 warm-up steps, at most 5% of the budget) to plan a budget run
    # batches
    batch_size: int = 128  # images per optimiser step, over all processes together (the global batch)
    eval_batch_size: int = 1000  # images per forward pass when evaluating (no gradients, so it can be large)
    # optimiser
    optimizer: Optimizer = "sgd"  # "sgd" (with momentum), "adamw" (decoupled decay), or "adam" (the article's)
    lr: float = 0.1  # peak learning rate (the schedule scales it per step)
    momentum: float = 0.9  # SGD momentum, and beta1 of Adam/AdamW
    nesterov: bool = True  # Nesterov momentum for SGD: a look-ahead step, a little better for one-cycle
    weight_decay: float = 5e-4  # L2 penalty (SGD, Adam) or decoupled decay (AdamW) per step
    decay_norm_and_bias: bool = False  # also decay BatchNorm and bias parameters (off: they do not overfit)
    grad_clip: float | None = None  # clip the global gradient norm to this value; None: no clipping
    # schedule (a pure function of the step: see lr_at)
    schedule: Schedule = "onecycle"  # "onecycle", "cosine" (with warm-up), "step" (the paper), "constant"
    warmup_fraction: float = 0.2  # share of all steps spent warming up (onecycle, cosine)
    start_factor: float = 0.04  # onecycle: first lr = lr * start_factor (1/25, as torch's OneCycleLR)
    final_factor: float = 0.0  # onecycle and cosine: last lr = lr * final_factor
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # step: shares of all steps where lr is multiplied
    step_gamma: float = 0.1  # step: the factor at each milestone (He et al.: /10 at 32k and 48k of 64k)
    # loss
    label_smoothing: float = 0.0  # target smoothing epsilon in the cross-entropy (0.1 is usual)
    # augmentation (DeviceLoader's Augment)
    crop_padding: int = 4  # random crop after zero padding by this many pixels; 0: no crop
    flip: bool = True  # random horizontal flips
    cutout: int = 0  # side of a random square blanked out; 0: none
    # early stopping on the validation split (the article's step 6)
    patience: int | None = None  # stop after this many epochs without a better validation score; None: never
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"  # what "better" means
    restore_best: bool = True  # with early stopping: end with the weights of the best epoch
    # speed (all off on the CPU, where they do not help; "auto" turns bf16 and channels_last on for CUDA)
    precision: Precision = "auto"  # mixed precision on CUDA: bf16, or fp16 with a gradient scaler
    channels_last: bool | None = None  # NHWC memory layout (faster convolutions on tensor cores); None: auto
    compile: bool = False  # torch.compile the model (minutes of compiling; pays off for long GPU runs)
    # bookkeeping
    checkpoint_every: int = 1  # epochs between checkpoints when fit has a checkpoint_dir
    seed: int = 0  # seeds the shuffling and augmentation (initialise the model with runtime.seed_everything)
    quiet: bool = False  # no progress bars (tests, CI logs)

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            problems.append(f"budget_seconds must be more than 0, got {self.budget_seconds}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            problems.append(f"batch sizes must be at least 1, got {self.batch_size} and {self.eval_batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be more than 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw", "adam"):
            problems.append(f"optimizer must be 'sgd', 'adamw' or 'adam', got {self.optimizer!r}")
        if self.schedule not in ("onecycle", "cosine", "step", "constant"):
            problems.append(f"schedule must be onecycle, cosine, step or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.patience is not None and self.patience < 1:
            problems.append(f"patience must be at least 1 (or None), got {self.patience}")
        if self.monitor not in ("val_accuracy", "val_loss"):
            problems.append(f"monitor must be val_accuracy or val_loss, got {self.monitor!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return checkpoints._plain(asdict(self))


def config_from_profile(profile: Any, **overrides: Any) -> TrainConfig:
    """The recipe of a :class:`resnet_lessons.profiles.Profile`: SGD with Nesterov and a one-cycle schedule
    at the profile's model, epochs, batch size, peak lr, weight decay and label smoothing."""
    values = dict(
        model=profile.model,
        model_options=dict(profile.model_options),
        epochs=profile.epochs,
        batch_size=profile.batch_size,
        lr=profile.lr,
        weight_decay=profile.weight_decay,
        label_smoothing=profile.label_smoothing,
        eval_batch_size=profile.eval_batch_size,
        seed=profile.seed,
        quiet=profile.quiet,
        optimizer="sgd",
        nesterov=True,
        schedule="onecycle",
    )
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"TrainConfig has no field(s) {sorted(unknown)}")
    values.update(overrides)
    return TrainConfig(**values)


# --- the learning-rate schedule ------------------------------------------------------------------


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning rate for optimiser step ``step`` (0-based) of ``total_steps``: a pure function, so a
    resumed run and a plotted curve give exactly the numbers the training used."""
    total = max(1, total_steps)
    t = min(step, total - 1)
    peak = cfg.lr
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "step":
        factor = 1.0
        for milestone in cfg.step_milestones:
            if t >= round(milestone * total):
                factor *= cfg.step_gamma
        return peak * factor
    warmup = round(cfg.warmup_fraction * total)
    start = peak * cfg.start_factor if cfg.schedule == "onecycle" else 0.0
    end = peak * cfg.final_factor
    if t < warmup:  # linear warm-up; the first step already moves (1/warmup of the way)
        return start + (peak - start) * (t + 1) / warmup
    progress = (t - warmup) / max(1, total - 1 - warmup)  # 0 at the peak, 1 at the last step
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_curve(cfg: TrainConfig, total_steps: int) -> list[float]:
    """The learning rate at every step of a run of ``total_steps`` steps (for plots)."""
    return [lr_at(step, total_steps, cfg) for step in range(total_steps)]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of ``cfg``; weight decay skips BatchNorm and bias parameters unless asked for."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 and not cfg.decay_norm_and_bias else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


# --- hooks, results, errors ----------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what was kept."""


class StopTraining(Exception):
    """Raise from a hook to end the run cleanly after the current epoch."""


class Hook:
    """Watch a run. Subclass and override what you need, or pass any callable: it is ``on_epoch_end``."""

    def on_fit_start(self, plan: dict[str, Any]) -> None:  # steps_per_epoch, total_steps, epochs, ...
        pass

    def on_epoch_end(self, row: dict[str, Any]) -> None:  # the history row just recorded
        pass

    def on_fit_end(self, result: "FitResult") -> None:
        pass


class _CallableHook(Hook):
    def __init__(self, function: Callable[[dict[str, Any]], Any]) -> None:
        self.function = function

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        self.function(row)


def _hooks(hooks: Iterable[Any]) -> list[Any]:
    result = []
    for hook in hooks:
        if any(hasattr(hook, name) for name in ("on_fit_start", "on_epoch_end", "on_fit_end")):
            result.append(hook)
        elif callable(hook):
            result.append(_CallableHook(hook))
        else:
            raise TypeError(f"a hook must be callable or have on_epoch_end/on_fit_start/on_fit_end; got {hook!r}")
    return result


def _call(hooks: list[Any], name: str, *args: Any) -> bool:
    """Call ``name`` on every hook that has it; True when one asked to stop."""
    stop = False
    for hook in hooks:
        method = getattr(hook, name, None)
        if method is None:
            continue
        try:
            method(*args)
        except StopTraining:
            stop = True
    return stop


@dataclass
class FitResult:
    """What a run produced. The model itself was trained in place."""

    history: pd.DataFrame  # one row per epoch
    stopped: str  # "completed", "early_stopping", "budget", "hook" or "over_budget"
    best_epoch: int | None  # 1-based epoch with the best validation score (None without a val split)
    best_score: float | None  # that score (cfg.monitor)
    total_steps: int  # optimiser steps planned
    steps: int  # optimiser steps taken
    images_seen: int  # training images processed, all processes together
    seconds: float  # wall-clock time of the fit
    checkpoint: Path | None = None  # the last checkpoint written, if any

    @property
    def final(self) -> dict[str, Any]:
        return self.history.iloc[-1].to_dict() if len(self.history) else {}


# --- the loop -------------------------------------------------------------------------------------


def _autocast(cfg: TrainConfig, device: torch.device) -> tuple[Any, torch.dtype | None]:
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), dtype


def _better(score: float, best: float | None, monitor: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(score)
    return score > best if monitor == "val_accuracy" else score < best


def _loaders(data: Any, cfg: TrainConfig, device: torch.device, channels_last: bool, world: distributed.World,
             sample_weights: Any = None):
    from .data import Augment, DeviceLoader

    if cfg.batch_size % world.world_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({world.world_size})"
        )
    train = data["train"]
    train_loader = DeviceLoader(
        train.images, train.labels, batch_size=cfg.batch_size // world.world_size, mean=data.mean, std=data.std,
        device=device, train=True, augment=Augment(crop_padding=cfg.crop_padding, flip=cfg.flip, cutout=cfg.cutout),
        seed=cfg.seed, channels_last=channels_last, rank=world.rank, world_size=world.world_size,
        sample_weights=sample_weights,
    )
    val_loader = None
    if "val" in data.splits and len(data["val"]):
        val = data["val"]
        val_loader = DeviceLoader(
            val.images, val.labels, batch_size=cfg.eval_batch_size, mean=data.mean, std=data.std, device=device,
            train=False, channels_last=channels_last, rank=world.rank, world_size=world.world_size,
        )
    return train_loader, val_loader


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Any, autocast: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy over ``loader``, summed over all processes."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in loader:
        with autocast():
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.numel()
    sums = distributed.all_reduce_sum(sums).cpu()
    n = max(1.0, float(sums[2]))
    return float(sums[0]) / n, float(sums[1]) / n


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


_TRAJECTORY_FIELDS = {"quiet", "checkpoint_every", "eval_batch_size", "patience", "restore_best", "compile"}


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = cfg.as_dict()
    changed = [k for k, v in saved.items() if k not in _TRAJECTORY_FIELDS and current.get(k) != v]
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in changed)
        raise ValueError(
            f"cannot resume {path}: the recipe changed ({details}); resume with the same settings "
            "or start a new run in another folder"
        )


def fit(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig,
    *,
    device: str | torch.device,
    hooks: Iterable[Any] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    sample_weights: torch.Tensor | None = None,
) -> FitResult:
    """Train ``model`` in place on ``data['train']`` following ``cfg``; evaluate on ``data['val']`` each epoch.

    ``checkpoint_dir``: write ``checkpoint.pt`` there every ``cfg.checkpoint_every`` epochs (rank 0 only).
    ``resume``: continue from that checkpoint when it exists (the result is the same as an uninterrupted run).
    Under ``torchrun`` the model is wrapped in DistributedDataParallel and each process trains on its shard.
    ``loss_fn(logits, labels) -> loss``: the training loss instead of the cross-entropy (e.g. from
    :mod:`resnet_lessons.imbalance`); validation still reports the plain cross-entropy. ``sample_weights``:
    one weight per training image; each epoch then re-samples the split with replacement (``DeviceLoader``).
    Neither is recorded in checkpoints: resume with the same ones.
    """
    if loss_fn is not None and cfg.label_smoothing:
        raise ValueError("loss_fn replaces the cross-entropy, so cfg.label_smoothing would be ignored; set it to 0")
    started = time.perf_counter()
    device = torch.device(device)
    world = distributed.world()
    hooks = _hooks(hooks)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    autocast, amp_dtype = _autocast(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint_path is not None and world.is_main:
        _check_writable(checkpoint_path.parent)
        if checkpoint_path.exists() and not resume:
            raise FileExistsError(
                f"{checkpoint_path} already exists; resume it (resume=True) or choose another checkpoint_dir"
            )

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train_loader, val_loader = _loaders(data, cfg, device, channels_last, world, sample_weights)
    steps_per_epoch = len(train_loader)
    optimizer = make_optimizer(model, cfg)
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    elif isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(device)  # class weights and priors live in buffers

    step, epoch, rows, best_score, best_epoch, best_state = 0, 0, [], None, None, None
    total_steps = None if cfg.budget_seconds else cfg.epochs * steps_per_epoch
    images_seen = 0
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        raw = checkpoints.load_raw(checkpoint_path, map_location=device)
        state = raw.get("train_state") or {}
        if "optimizer" not in state:
            raise checkpoints.CheckpointError(f"{checkpoint_path} holds no training state to resume from")
        _check_resumable(state["config"], cfg, checkpoint_path)
        model.load_state_dict(raw["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, total_steps = state["step"], state["epoch"], state["total_steps"]
        images_seen, rows = state["images_seen"], list(raw["history"])
        best_score, best_epoch, best_state = state["best_score"], state["best_epoch"], state.get("best_model")
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], device)
        started -= float(state.get("seconds", 0.0))  # a budget counts the time already spent

    train_model = distributed.wrap_model(model, device)
    if cfg.compile:
        train_model = torch.compile(train_model)

    def save_checkpoint() -> Path | None:
        if checkpoint_path is None:
            return None
        if world.is_main:
            train_state = {
                "config": cfg.as_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": step,
                "epoch": epoch,
                "total_steps": total_steps,
                "images_seen": images_seen,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "best_model": best_state,
                "rng": _rng_state(device),
                "seconds": time.perf_counter() - started,
            }
            payload = checkpoints.make_checkpoint(
                model, model_name=cfg.model, model_options=cfg.model_options, classes=data.classes,
                mean=data.mean, std=data.std, history=rows, train_state=train_state,
            )
            checkpoints.save(payload, checkpoint_path)
        distributed.barrier()
        return checkpoint_path

    from tqdm.auto import tqdm

    quiet = cfg.quiet or not world.is_main
    planned_epochs = cfg.epochs if total_steps is None else -(-total_steps // steps_per_epoch)
    if _call(hooks, "on_fit_start", _plan(cfg, steps_per_epoch, total_steps, planned_epochs, world)):
        planned_epochs = epoch
    epoch_bar = tqdm(total=planned_epochs, initial=epoch, desc="epochs", unit="epoch", disable=quiet)
    stopped, probe_start = "completed", None
    check_every = 1 if device.type == "cpu" else 25
    last_lr = lr_at(step, total_steps or 1, cfg)
    while epoch < planned_epochs:
        epoch_start = time.perf_counter()
        train_loader.set_epoch(epoch)
        train_model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        bad = torch.zeros((), dtype=torch.bool, device=device)
        step_bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}", unit="step", leave=False, disable=quiet)
        for batch_index, (x, y) in enumerate(train_loader):
            if total_steps is not None and step >= total_steps:
                break
            # A budget run uses a provisional plan (the epochs of cfg) until its step time is known.
            last_lr = lr_at(step, total_steps or cfg.epochs * steps_per_epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = last_lr
            with autocast():
                logits = train_model(x)
                loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            bad |= ~torch.isfinite(loss.detach())
            if (step + 1) % check_every == 0 and bool(distributed.all_reduce_max(bad.float()) > 0):
                _diverged(epoch, batch_index, step, last_lr, checkpoint_path)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            images_seen += y.numel() * world.world_size
            sums[0] += loss.detach().double() * y.numel()
            sums[1] += (logits.detach().argmax(1) == y).sum()
            sums[2] += y.numel()
            step_bar.update()
            if cfg.budget_seconds and total_steps is None:
                now = time.perf_counter()
                if step == 2:
                    probe_start = now
                elif step > 2 and (step == 2 + cfg.budget_probe_steps or (  # ranks must agree: only count steps under DDP
                        not world.distributed and now - probe_start > 0.05 * cfg.budget_seconds)):
                    total_steps = _plan_budget(cfg, started, probe_start, step, steps_per_epoch, val_loader, device)
                    planned_epochs = -(-total_steps // steps_per_epoch)
                    epoch_bar.total = planned_epochs
                    epoch_bar.refresh()
            if cfg.budget_seconds and time.perf_counter() - started > cfg.budget_seconds:
                stopped = "over_budget"  # the machine got slower than measured: stop rather than overrun
                break
        step_bar.close()
        if bool(distributed.all_reduce_max(bad.float()) > 0):
            _diverged(epoch, steps_per_epoch - 1, step, last_lr, checkpoint_path)
        sums = distributed.all_reduce_sum(sums).cpu()
        epoch += 1
        row = {
            "epoch": epoch,
            "step": step,
            "lr": last_lr,
            "train_loss": float(sums[0] / max(1.0, float(sums[2]))),
            "train_accuracy": float(sums[1] / max(1.0, float(sums[2]))),
            "val_loss": float("nan"),
            "val_accuracy": float("nan"),
        }
        if val_loader is not None:
            row["val_loss"], row["val_accuracy"] = _evaluate(train_model, val_loader, autocast, device)
            score = row[cfg.monitor]
            if _better(score, best_score, cfg.monitor):
                best_score, best_epoch = score, epoch
                if cfg.patience is not None and cfg.restore_best:
                    best_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
        row["images_seen"] = images_seen
        row["seconds"] = time.perf_counter() - epoch_start
        row["elapsed"] = time.perf_counter() - started
        rows.append(row)
        epoch_bar.update()
        epoch_bar.set_postfix(
            {k: f"{row[k]:.3f}" for k in ("train_loss", "val_loss", "val_accuracy") if not math.isnan(row[k])}
        )
        if _call(hooks, "on_epoch_end", dict(row)) and stopped == "completed":
            stopped = "hook"
        if cfg.patience is not None and best_epoch is not None and epoch - best_epoch >= cfg.patience:
            stopped = "early_stopping"
        if total_steps is not None and step >= total_steps and cfg.budget_seconds and stopped == "completed":
            stopped = "budget"
        if stopped != "completed" and stopped != "budget":
            planned_epochs = epoch
        if checkpoint_path is not None and (epoch % cfg.checkpoint_every == 0 or epoch >= planned_epochs):
            save_checkpoint()
    epoch_bar.close()

    if cfg.patience is not None and cfg.restore_best and best_state is not None and best_epoch != epoch:
        model.load_state_dict(best_state)
    result = FitResult(
        history=pd.DataFrame(rows, columns=HISTORY_COLUMNS),
        stopped=stopped,
        best_epoch=best_epoch,
        best_score=best_score,
        total_steps=total_steps if total_steps is not None else step,
        steps=step,
        images_seen=images_seen,
        seconds=time.perf_counter() - started,
        checkpoint=checkpoint_path if checkpoint_path is not None and checkpoint_path.exists() else None,
    )
    model.eval()
    _call(hooks, "on_fit_end", result)
    return result


HISTORY_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_seen",
    "seconds", "elapsed",
]


def _plan(cfg: TrainConfig, steps_per_epoch: int, total_steps: int | None, epochs: int, world: Any) -> dict[str, Any]:
    return {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,  # None until a budget run has timed its first steps
        "epochs": epochs,
        "world_size": world.world_size,
        "budget_seconds": cfg.budget_seconds,
    }


def _plan_budget(
    cfg: TrainConfig, started: float, probe_start: float, step: int, steps_per_epoch: int, val_loader: Any,
    device: torch.device,
) -> int:
    """Fix the number of steps so that the fit ends within ``cfg.budget_seconds``.

    Step time comes from the timed steps after the first two (the slowest process counts); each epoch also pays one
    pass over its validation shard, estimated at 1/2 of a training step per image (a forward pass is
    about 1/3 of forward + backward; the rest is margin). 3% of the budget is kept in reserve.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    step_seconds = float(distributed.all_reduce_max(torch.tensor([(now - probe_start) / (step - 2)]))[0])
    remaining = 0.97 * cfg.budget_seconds - (now - started)
    per_image = step_seconds / max(1, cfg.batch_size // distributed.world().world_size)
    per_epoch_extra = 0.5 * per_image * _loader_images(val_loader)
    # steps s with (s / steps_per_epoch + 1) * per_epoch_extra + s * step_seconds <= remaining
    more = (remaining - per_epoch_extra) / (step_seconds + per_epoch_extra / steps_per_epoch)
    return max(step, step + int(more))


def _loader_images(loader: Any) -> int:
    if loader is None:
        return 0
    for name in ("shard_size", "num_images"):
        if hasattr(loader, name):
            return int(getattr(loader, name))
    return len(loader) * getattr(loader, "batch_size", 1)


def _diverged(epoch: int, batch_index: int, step: int, lr: float, checkpoint_path: Path | None) -> None:
    kept = (
        f"the last good checkpoint {checkpoint_path} is kept"
        if checkpoint_path is not None and checkpoint_path.exists()
        else "no checkpoint was written"
    )
    raise TrainingDiverged(
        f"the training loss became NaN or infinite in epoch {epoch + 1} (by batch {batch_index + 1}, step "
        f"{step + 1}) at learning rate {lr:.4g}; {kept}. Try a lower lr, gradient clipping (grad_clip), "
        "or fp32 precision."
    )


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(f"cannot create the output folder {folder}: {error.strerror or error}") from None
    if not folder.is_dir():
        raise NotADirectoryError(f"the output folder {folder} is a file")
    probe = folder / ".write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"cannot write into the output folder {folder}: {error.strerror or error}") from None


__all__ = [
    "CHECKPOINT_NAME",
    "FitResult",
    "Hook",
    "StopTraining",
    "TrainConfig",
    "TrainingDiverged",
    "config_from_profile",
    "fit",
    "lr_at",
    "make_optimizer",
    "replace",
    "schedule_curve",
]
