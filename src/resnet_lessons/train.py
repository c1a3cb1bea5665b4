"""The one training loop: :func:`fit` trains any model on any :class:`DataSplits` with a :class:`TrainConfig`.

What the weights become is decided by the recipe, a :class:`TrainConfig` (read it top to bottom in
:mod:`resnet_lessons.optim`); how the run is watched, stopped and kept by its :class:`RunOptions`. The loop is
plain: for each epoch (:func:`_train_epoch`), for each batch, set the learning rate from the schedule and take
one :func:`train_step` (forward, loss, backward, clip, update; with ``cfg.lookahead_every``, a pull of the
weights to their slow average, :class:`resnet_lessons.optim.Lookahead`); then (:func:`_end_epoch`) evaluate on the
validation split, record a history row, call the hooks (early stopping among them, :mod:`resnet_lessons.hooks`),
write a checkpoint. Its parts are set up by :mod:`resnet_lessons.run`. Three things make it trustworthy:

* the schedule is a pure function of the step (:func:`resnet_lessons.optim.lr_at`), so resuming a run is exact;
* a ``budget_seconds`` run times its first steps, then fixes the number of steps so it ends in time, and
  corrects that number after every epoch with the measured cost of its steps and of its validation pass
  (:mod:`resnet_lessons.budget`);
* a NaN or infinite loss stops the run with a message, and the last good checkpoint is kept.

The loop knows nothing of notebooks or plots: chapters watch it through hooks.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace  # replace: derive a config, train.replace(cfg, lr=0.1)
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .data import DataSplits, DeviceLoader, random_window
from .hooks import Hook, RunState, StopTraining, as_hooks, call_hooks
from .optim import (
    RunOptions,
    TrainConfig,
    config_from_profile,
    lr_at,
    make_optimizer,
    options_from_profile,
    schedule_curve,
    size_at,
)
from .run import CHECKPOINT_NAME, Run, builtin_hooks, checkpoint_hook, prepare, print_epoch
from .runtime import resolve_precision  # re-exported: what cfg.precision="auto" becomes on a device

# --- results and errors --------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what was kept."""


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


# --- one step ------------------------------------------------------------------------------------


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], autocast: Callable[[], Any],
    scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None,
    before_update: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step: forward under ``autocast``, loss in float32, backward (scaled for fp16), clip,
    update. ``before_update(loss)`` runs between the backward pass and the update (``fit`` stops a NaN loss
    there, before it reaches the weights). Returns the detached loss and logits. ``speed.measure_throughput``
    times this same step."""
    with autocast():
        logits = model(x)
        loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if before_update is not None:
        before_update(loss)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach(), logits.detach()


# --- the loop -------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: TrainConfig,
    *,
    device: str | torch.device,
    options: RunOptions | None = None,
    hooks: Iterable[Any] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    sample_weights: torch.Tensor | None = None,
    param_groups: Iterable[Mapping[str, Any]] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``data['train']`` following the recipe ``cfg``; evaluate on ``data['val']``
    each epoch. ``options``: how the run is watched, stopped and kept (:class:`~resnet_lessons.optim.RunOptions`).

    ``checkpoint_dir``: write ``checkpoint.pt`` there every ``options.checkpoint_every`` epochs (rank 0 only).
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
    run = prepare(model, data, cfg, options or RunOptions(), torch.device(device), checkpoint_dir, resume,
                   loss_fn, sample_weights, param_groups)
    state = run.state
    builtin = builtin_hooks(run)
    watchers = [*builtin, *as_hooks(hooks)]  # early stopping first: it decides before a hook's stop is counted
    state.planned_epochs = cfg.epochs if state.total_steps is None else _epochs(state.total_steps, run)
    if call_hooks(watchers, "on_fit_start", _plan(run)):
        state.planned_epochs = state.epoch
    epoch_bar = tqdm(total=state.planned_epochs, initial=state.epoch, desc="epochs", unit="epoch",
                     disable=not run.bars)
    saver = checkpoint_hook(run, data)
    state.last_lr = lr_at(state.step, state.total_steps or 1, cfg)
    while state.epoch < state.planned_epochs:
        row, epoch_start, train_end = _train_epoch(run, epoch_bar)
        _end_epoch(run, row, epoch_start, train_end, watchers, epoch_bar)
        if saver is not None:
            saver.on_epoch_end(row)
    epoch_bar.close()
    result = FitResult(
        history=pd.DataFrame(state.rows, columns=HISTORY_COLUMNS), stopped=state.stopped,
        best_epoch=state.best_epoch, best_score=state.best_score,
        total_steps=state.total_steps if state.total_steps is not None else state.step, steps=state.step,
        images_seen=state.images_seen, seconds=time.perf_counter() - run.started,
        checkpoint=run.checkpoint_path if run.checkpoint_path is not None and run.checkpoint_path.exists() else None,
        steps_per_epoch=run.steps_per_epoch,
    )
    call_hooks(builtin, "on_fit_end", result)  # early stopping restores the best weights before anyone looks
    model.eval()
    if result.short_budget:
        warnings.warn(result.short_budget, stacklevel=2)
    call_hooks(watchers[len(builtin):], "on_fit_end", result)
    return result


def _train_epoch(run: Run, epoch_bar: Any) -> tuple[dict[str, Any], float, float]:
    """One pass over the training split (or up to the planned total of steps): the epoch's row so far, when the
    epoch started and when its training ended (``time.perf_counter()``)."""
    state, cfg, device = run.state, run.cfg, run.device
    epoch_start = time.perf_counter()
    run.train_loader.set_epoch(state.epoch)
    run.train_model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    bad = torch.zeros((), dtype=torch.bool, device=device)
    check_every = 1 if device.type == "cpu" else 25  # reading `bad` waits for the device: not every GPU step
    step_bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {state.epoch + 1}", unit="step", leave=False,
                    disable=not run.bars)

    def check_finite(loss: torch.Tensor) -> None:
        nonlocal bad
        bad = bad | ~torch.isfinite(loss.detach())
        if (state.step + 1) % check_every == 0 and bool(distributed.all_reduce_max(bad.float()) > 0):
            _diverged(state, state.step - first_step, run.checkpoint_path)

    first_step = state.step
    for x, y in run.train_loader:
        if state.total_steps is not None and state.step >= state.total_steps:
            break
        step_start = time.perf_counter()
        # A budget run uses a provisional plan (the epochs of cfg) until its step time is known.
        planned = state.total_steps or cfg.epochs * run.steps_per_epoch
        state.last_lr = lr_at(state.step, planned, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = state.last_lr * group.get("lr_scale", 1.0)
        side = size_at(state.step, planned, cfg)
        if side is not None:  # progressive resizing: one random window of the batch, the same for every image
            x = random_window(x, side, torch.Generator().manual_seed(hash((cfg.seed, state.step)) & (2**63 - 1)))
        loss, logits = train_step(run.train_model, x, y, optimizer=run.optimizer, loss_fn=run.loss_fn,
                                  autocast=run.autocast, scaler=run.scaler, grad_clip=cfg.grad_clip,
                                  before_update=check_finite)
        state.step += 1
        if run.lookahead is not None:
            run.lookahead.step(state.step, planned)
        state.images_seen += y.numel() * run.world.world_size
        sums[0] += loss.double() * y.numel()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.numel()
        step_bar.update()
        if run.clock is not None and state.total_steps is None:
            state.total_steps = run.clock.probe(state.step)  # None until the first steps are timed
            if state.total_steps is not None:
                state.planned_epochs = epoch_bar.total = _epochs(state.total_steps, run)
                epoch_bar.refresh()
        if run.clock is not None and not run.world.distributed and run.clock.past_deadline(step_start):
            state.stopped = "over_budget"
            break
    step_bar.close()
    if bool(distributed.all_reduce_max(bad.float()) > 0):
        _diverged(state, run.steps_per_epoch - 1, run.checkpoint_path)
    if run.lookahead is not None and (
            state.stopped == "over_budget" or state.total_steps is not None and state.step >= state.total_steps):
        run.lookahead.finish()  # the last epoch is validated (and kept) on the slow weights
    sums = distributed.all_reduce_sum(sums).cpu()
    count = max(1.0, float(sums[2]))
    row = {"epoch": state.epoch + 1, "step": state.step, "lr": state.last_lr,
           "train_loss": float(sums[0]) / count, "train_accuracy": float(sums[1]) / count,
           "val_loss": float("nan"), "val_accuracy": float("nan")}
    return row, epoch_start, time.perf_counter()


def _end_epoch(run: Run, row: dict[str, Any], epoch_start: float, train_end: float, watchers: list[Any],
               epoch_bar: Any) -> None:
    """Validate, plan a budget run again, record the row, call the hooks, and decide whether the run goes on."""
    state, options = run.state, run.options
    state.epoch += 1
    if run.val_loader is not None:
        row["val_loss"], row["val_accuracy"] = _evaluate(run.train_model, run.val_loader, run.autocast, run.device)
        state.record_score(row[options.monitor], maximise=options.monitor == "val_accuracy")
    clock, total = run.clock, state.total_steps
    if (clock is not None and clock.planned_at is not None and total is not None
            and clock.planned_at < state.step < total and state.stopped == "completed"):
        state.total_steps = clock.replan(state.step, train_end)
        state.planned_epochs = epoch_bar.total = _epochs(state.total_steps, run)
    row["images_seen"] = state.images_seen
    row["seconds"] = time.perf_counter() - epoch_start
    row["elapsed"] = time.perf_counter() - run.started
    state.rows.append(row)
    epoch_bar.update()
    shown = ("train_loss", "val_loss", "val_accuracy")
    epoch_bar.set_postfix({k: f"{row[k]:.3f}" for k in shown if not math.isnan(row[k])})
    if not options.quiet and not run.bars and run.world.is_main:
        print_epoch(row, state.planned_epochs)
    if call_hooks(watchers, "on_epoch_end", dict(row)) and state.stopped == "completed":
        state.stopped = "hook"
    if state.stopped == "completed" and run.cfg.budget_seconds and state.total_steps is not None and (
            state.step >= state.total_steps):
        state.stopped = "budget"
    if state.stopped not in ("completed", "budget"):
        state.planned_epochs = state.epoch


def _epochs(total_steps: int, run: Run) -> int:
    return -(-total_steps // run.steps_per_epoch)


def _plan(run: Run) -> dict[str, Any]:
    """What ``on_fit_start`` hooks are told."""
    return {
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.state.total_steps,  # None until a budget run has timed its first steps
        "epochs": run.state.planned_epochs,
        "world_size": run.world.world_size,
        "budget_seconds": run.cfg.budget_seconds,
    }


HISTORY_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_seen",
    "seconds", "elapsed",
]


# --- validation, messages, progress ------------------------------------------------------------------


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DeviceLoader, autocast: Callable[[], Any],
              device: torch.device) -> tuple[float, float]:
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


def _diverged(state: RunState, batch_index: int, checkpoint_path: Path | None) -> None:
    kept = (
        f"the last good checkpoint {checkpoint_path} is kept"
        if checkpoint_path is not None and checkpoint_path.exists()
        else "no checkpoint was written"
    )
    raise TrainingDiverged(
        f"the training loss became NaN or infinite in epoch {state.epoch + 1} (by batch {batch_index + 1}, step "
        f"{state.step + 1}) at learning rate {state.last_lr:.4g}; {kept}. Try a lower lr, gradient clipping "
        "(grad_clip), or fp32 precision."
    )


__all__ = [
    "CHECKPOINT_NAME",
    "FitResult",
    "Hook",
    "RunOptions",
    "RunState",
    "StopTraining",
    "TrainConfig",
    "TrainingDiverged",
    "config_from_profile",
    "fit",
    "lr_at",
    "make_optimizer",
    "options_from_profile",
    "replace",
    "resolve_precision",
    "schedule_curve",
    "train_step",
]
