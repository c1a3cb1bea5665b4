"""The one training loop: :func:`fit` trains any model on any :class:`DataSplits` with a :class:`TrainConfig`.

Everything a run needs is in the config (read it top to bottom in :mod:`resnet_lessons.optim`: it is the
recipe; ``TrainConfig`` and ``config_from_profile`` are importable from here too). The loop is
plain: for each epoch, for each batch, set the learning rate from the schedule, forward, loss,
backward, clip, step; then evaluate on the validation split, record a history row, call the hooks,
maybe stop early, write a checkpoint. Three things make it trustworthy:

* the schedule is a pure function of the step (:func:`resnet_lessons.optim.lr_at`), so resuming a run is exact;
* a ``budget_seconds`` run times its first steps, then fixes the number of steps so it ends in time, and
  corrects that number after every epoch with the measured cost of its steps and of its validation pass;
* a NaN or infinite loss stops the run with a message, and the last good checkpoint is kept.

The loop knows nothing of notebooks or plots: chapters watch it through hooks.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace  # replace: derive a config, train.replace(cfg, lr=0.1)
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints, distributed, runtime
from .optim import TrainConfig, config_from_profile, lr_at, make_optimizer, schedule_curve
from .runtime import resolve_precision  # re-exported: what cfg.precision="auto" becomes on a device

CHECKPOINT_NAME = "checkpoint.pt"  # the resumable checkpoint that fit writes into checkpoint_dir


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

    def on_fit_end(self, result: FitResult) -> None:
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
    steps_per_epoch: int = 0  # optimiser steps in one pass over the training split

    @property
    def final(self) -> dict[str, Any]:
        return self.history.iloc[-1].to_dict() if len(self.history) else {}

    @property
    def epochs_trained(self) -> float:
        """Passes over the training split, fractional: below 1 when a budget ended the first epoch."""
        return self.steps / self.steps_per_epoch if self.steps_per_epoch else float(len(self.history))

    @property
    def short_budget(self) -> str | None:
        """What to tell the reader when a time budget ended the run inside its first epoch, else None."""
        if self.stopped not in ("budget", "over_budget") or self.epochs_trained >= 1:
            return None
        return (f"the time budget allowed {self.steps} of the {self.steps_per_epoch} steps of one epoch: this model "
                f"saw {self.epochs_trained:.0%} of the training split once, so it is barely trained")


# --- the loop -------------------------------------------------------------------------------------


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
    param_groups: Iterable[Mapping[str, Any]] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``data['train']`` following ``cfg``; evaluate on ``data['val']`` each epoch.

    ``checkpoint_dir``: write ``checkpoint.pt`` there every ``cfg.checkpoint_every`` epochs (rank 0 only).
    ``resume``: continue from that checkpoint when it exists (the result is the same as an uninterrupted run).
    Under ``torchrun`` the model is wrapped in DistributedDataParallel and each process trains on its shard.
    ``loss_fn(logits, labels) -> loss``: the training loss instead of the cross-entropy (e.g. from
    :mod:`resnet_lessons.imbalance`); validation still reports the plain cross-entropy. ``sample_weights``:
    one weight per training image; each epoch then re-samples the split with replacement (``DeviceLoader``).
    ``param_groups``: the optimiser's groups instead of the default two (weight decay on weights only), each a
    dict with ``params``, optional ``lr_scale`` (each step the group gets ``lr_scale`` times the scheduled lr) and
    optional ``weight_decay`` (default ``cfg.weight_decay``); used as they are, frozen parameters included, so a
    hook can unfreeze them later (:func:`resnet_lessons.optim.make_optimizer`).
    None of these is recorded in checkpoints: resume with the same ones.
    """
    if loss_fn is not None and cfg.label_smoothing:
        raise ValueError("loss_fn replaces the cross-entropy, so cfg.label_smoothing would be ignored; set it to 0")
    started = time.perf_counter()
    device = torch.device(device)
    world = distributed.world()
    hooks = _hooks(hooks)
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last
    if channels_last is None:  # NHWC: tensor cores want it; on a CPU it pays with bf16 (oneDNN's fast kernels)
        channels_last = device.type == "cuda" or precision == "bf16"
    train_loader, val_loader = _loaders(data, cfg, device, channels_last, world, sample_weights)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training split has {len(data['train'])} images, fewer than one batch (batch_size "
            f"{cfg.batch_size}), so not one step could be taken; lower batch_size or add training images"
        )
    autocast = partial(runtime.autocast, precision, device)  # a fresh context per use
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint_path is not None and world.is_main:
        check_writable(checkpoint_path.parent)
        if checkpoint_path.exists() and not resume:
            raise FileExistsError(
                f"{checkpoint_path} already exists; resume it (resume=True) or choose another checkpoint_dir"
            )

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, param_groups)
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
    bars = not quiet and _progress_bars()  # else (a log file) one plain line per epoch
    planned_epochs = cfg.epochs if total_steps is None else -(-total_steps // steps_per_epoch)
    if _call(hooks, "on_fit_start", _plan(cfg, steps_per_epoch, total_steps, planned_epochs, world)):
        planned_epochs = epoch
    epoch_bar = tqdm(total=planned_epochs, initial=epoch, desc="epochs", unit="epoch", disable=not bars)
    stopped = "completed"
    clock = None if not cfg.budget_seconds else _BudgetClock(cfg, started, steps_per_epoch,
                                                             _loader_images(val_loader), device)
    check_every = 1 if device.type == "cpu" else 25
    last_lr = lr_at(step, total_steps or 1, cfg)
    while epoch < planned_epochs:
        epoch_start = time.perf_counter()
        train_loader.set_epoch(epoch)
        train_model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        bad = torch.zeros((), dtype=torch.bool, device=device)
        step_bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}", unit="step", leave=False, disable=not bars)
        for batch_index, (x, y) in enumerate(train_loader):
            if total_steps is not None and step >= total_steps:
                break
            step_start = time.perf_counter()
            # A budget run uses a provisional plan (the epochs of cfg) until its step time is known.
            last_lr = lr_at(step, total_steps or cfg.epochs * steps_per_epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = last_lr * group.get("lr_scale", 1.0)
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
            if clock is not None and total_steps is None:
                total_steps = clock.probe(step)  # None until the first steps are timed
                if total_steps is not None:
                    planned_epochs = epoch_bar.total = -(-total_steps // steps_per_epoch)
                    epoch_bar.refresh()
            if clock is not None and not world.distributed and clock.past_deadline(step_start):
                stopped = "over_budget"
                break
        step_bar.close()
        if bool(distributed.all_reduce_max(bad.float()) > 0):  # reading it waits for the device: timing is honest
            _diverged(epoch, steps_per_epoch - 1, step, last_lr, checkpoint_path)
        train_end = time.perf_counter()
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
        if clock is not None and clock.planned_at is not None and clock.planned_at < step < total_steps and (
                stopped == "completed"):
            total_steps = clock.replan(step, train_end)
            planned_epochs = epoch_bar.total = -(-total_steps // steps_per_epoch)
        row["images_seen"] = images_seen
        row["seconds"] = time.perf_counter() - epoch_start
        row["elapsed"] = time.perf_counter() - started
        rows.append(row)
        epoch_bar.update()
        epoch_bar.set_postfix(
            {k: f"{row[k]:.3f}" for k in ("train_loss", "val_loss", "val_accuracy") if not math.isnan(row[k])}
        )
        if not quiet and not bars:
            _print_epoch(row, planned_epochs)
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
        steps_per_epoch=steps_per_epoch,
    )
    model.eval()
    if result.short_budget:
        warnings.warn(result.short_budget, stacklevel=2)
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


class _BudgetClock:
    """The clock of a ``budget_seconds`` run: it times the steps, plans how many fit, plans again after each
    epoch, and says when the deadline is near. Under DDP the slowest process's times count and rank 0's plan
    is everyone's."""

    def __init__(self, cfg: TrainConfig, started: float, steps_per_epoch: int, val_images: int,
                 device: torch.device) -> None:
        self.cfg, self.started, self.steps_per_epoch, self.device = cfg, started, steps_per_epoch, device
        self.val_images = val_images
        self.since = 0.0  # start of the timing window: after step 2 (warm-up), then after each plan
        self.planned_at: int | None = None  # the step of the last plan
        self.step_seconds = self.eval_seconds = 0.0  # the costs the last plan used; 0: no plan yet

    def probe(self, step: int) -> int | None:
        """Call after each step until it returns the planned total number of steps."""
        now = time.perf_counter()
        if step == 2:
            self.since = now
        elif step > 2 and (step == 2 + self.cfg.budget_probe_steps or (  # ranks must agree: only count under DDP
                not distributed.world().distributed and now - self.since > 0.05 * self.cfg.budget_seconds)):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step_seconds = self._slowest((time.perf_counter() - self.since) / (step - 2))
            per_image = step_seconds / max(1, self.cfg.batch_size // distributed.world().world_size)
            # A guess until an epoch is timed: a forward pass is ~1/3 of forward + backward; 1/2 leaves a margin.
            return self._plan(step, step_seconds, 0.5 * per_image * self.val_images)
        return None

    def replan(self, step: int, train_end: float) -> int:
        """At an epoch's end (after validation): plan again from the steps since the last plan (the probe's
        first steps run slower; a busy machine can slow down) and the validation pass just made. Checkpoints
        and hooks fall in the next window, so they count as part of the steps."""
        step_seconds = self._slowest((train_end - self.since) / max(1, step - self.planned_at))
        return self._plan(step, step_seconds, self._slowest(time.perf_counter() - train_end))

    def past_deadline(self, step_start: float) -> bool:
        return _past_deadline(self.cfg.budget_seconds, self.started, step_start, self.step_seconds, self.eval_seconds)

    def _plan(self, step: int, step_seconds: float, eval_seconds: float) -> int:
        self.step_seconds, self.eval_seconds = step_seconds, eval_seconds
        total = _plan_budget(self.cfg, self.started, step, self.steps_per_epoch, step_seconds, eval_seconds)
        self.since, self.planned_at = time.perf_counter(), step
        return total

    @staticmethod
    def _slowest(seconds: float) -> float:
        return float(distributed.all_reduce_max(torch.tensor([seconds]))[0])


def _plan_budget(
    cfg: TrainConfig, started: float, step: int, steps_per_epoch: int, step_seconds: float, eval_seconds: float,
) -> int:
    """Fix the number of steps so that the fit ends within ``cfg.budget_seconds``.

    ``step_seconds``: one training step; ``eval_seconds``: the validation pass that ends each epoch (guessed
    by the first plan, measured by the next: :class:`_BudgetClock`). 3% of the budget is kept in reserve.
    """
    remaining = 0.97 * cfg.budget_seconds - (time.perf_counter() - started)
    # steps s with (s / steps_per_epoch + 1) * eval_seconds + s * step_seconds <= remaining
    more = (remaining - eval_seconds) / (step_seconds + eval_seconds / steps_per_epoch)
    return int(distributed.broadcast_object(max(step, step + int(more))))  # rank 0's clock decides for all


def _past_deadline(budget: float, started: float, step_start: float, step_seconds: float, eval_seconds: float) -> bool:
    """Whether a budget run must stop now: the machine got slower than planned, and one more step and the last
    validation pass (at the slowdown the step just taken showed) would no longer fit. Single process only:
    under DDP one process stopping alone would leave the others waiting; there the planned steps bound the run."""
    now = time.perf_counter()
    slowdown = max(1.0, (now - step_start) / step_seconds) if step_seconds else 1.0
    return now - started + (step_seconds + eval_seconds) * slowdown > budget


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


def _progress_bars() -> bool:
    """Progress bars only where someone watches them: a terminal or a notebook (not a log file)."""
    if getattr(sys.stderr, "isatty", lambda: False)():
        return True
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"  # Jupyter's kernel; tqdm.auto draws a widget there


def _print_epoch(row: Mapping[str, Any], planned_epochs: int) -> None:
    """One plain line per epoch on stderr, for logs: ``epoch 3/10: train_loss 1.234, ... (12.3 s)``."""
    shown = ", ".join(f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss", "val_accuracy") if not math.isnan(row[k]))
    print(f"epoch {row['epoch']}/{planned_epochs}: {shown} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and make sure files can be written into it; else an ``OSError`` naming it.
    The probe is a fresh temporary file, so a link planted in the folder is never written through."""
    from ._files import check_writable as check

    check(folder)


__all__ = [
    "CHECKPOINT_NAME",
    "FitResult",
    "Hook",
    "StopTraining",
    "TrainConfig",
    "TrainingDiverged",
    "check_writable",
    "config_from_profile",
    "fit",
    "lr_at",
    "make_optimizer",
    "replace",
    "resolve_precision",
    "schedule_curve",
]
