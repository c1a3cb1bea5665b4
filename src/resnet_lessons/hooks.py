"""Hooks: how a chapter, a fine-tuning strategy or the loop itself watches a :func:`resnet_lessons.train.fit` run.

A hook is a :class:`Hook` subclass or any callable (then it is ``on_epoch_end``). Raising :class:`StopTraining`
from one ends the run after the current epoch. Two hooks are built in, and ``fit`` adds them itself from its
:class:`~resnet_lessons.optim.RunOptions`: :class:`EarlyStopping` (``patience``) and :class:`Checkpointing`
(``checkpoint_dir``). Both read and change the :class:`RunState`, the record of where a run is, which is also
what a checkpoint stores to resume it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import distributed

if TYPE_CHECKING:
    from .train import FitResult


class StopTraining(Exception):
    """Raise from a hook to end the run cleanly after the current epoch."""


@dataclass
class RunState:
    """Where a run is: what a checkpoint stores (with the optimiser's, scaler's and RNG states) to resume it."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # epochs finished
    total_steps: int | None = None  # steps planned; None until a budget run has timed its first steps
    planned_epochs: int = 0  # epochs the run will make (a budget's plan, or fewer once something stops it)
    images_seen: int = 0  # training images processed, all processes together
    best_score: float | None = None  # the best validation score so far (RunOptions.monitor)
    best_epoch: int | None = None  # 1-based epoch of that score
    best_model: dict[str, torch.Tensor] | None = None  # its weights, kept only for EarlyStopping(restore_best)
    seconds: float = 0.0  # wall-clock seconds spent before this process resumed the run
    rows: list[dict[str, Any]] = field(default_factory=list)  # the history, one row per epoch
    stopped: str = "completed"  # "completed", "early_stopping", "budget", "hook" or "over_budget"
    last_lr: float = 0.0  # the learning rate of the last step

    def stop(self, reason: str) -> None:
        """End the run after this epoch: no more epochs are planned."""
        self.stopped, self.planned_epochs = reason, self.epoch

    def record_score(self, score: float, maximise: bool) -> bool:
        """Keep ``score`` if it beats the best so far; True when it did (NaN never does)."""
        best = self.best_score
        if best is None or math.isnan(best):
            better = not math.isnan(score)
        else:
            better = score > best if maximise else score < best
        if better:
            self.best_score, self.best_epoch = score, self.epoch
        return better

    def as_dict(self) -> dict[str, Any]:
        """The fields a checkpoint's ``train_state`` keeps (the history is stored beside it)."""
        return {"step": self.step, "epoch": self.epoch, "total_steps": self.total_steps,
                "images_seen": self.images_seen, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_model": self.best_model, "seconds": self.seconds}

    @classmethod
    def from_checkpoint(cls, train_state: dict[str, Any], history: Iterable[dict[str, Any]]) -> RunState:
        return cls(step=train_state["step"], epoch=train_state["epoch"], total_steps=train_state["total_steps"],
                   images_seen=train_state["images_seen"], best_score=train_state["best_score"],
                   best_epoch=train_state["best_epoch"], best_model=train_state.get("best_model"),
                   seconds=float(train_state.get("seconds", 0.0)), rows=list(history))


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


def as_hooks(hooks: Iterable[Any]) -> list[Any]:
    """Each hook as it is when it has a hook method, a callable wrapped as ``on_epoch_end``; else a TypeError."""
    result = []
    for hook in hooks:
        if any(hasattr(hook, name) for name in ("on_fit_start", "on_epoch_end", "on_fit_end")):
            result.append(hook)
        elif callable(hook):
            result.append(_CallableHook(hook))
        else:
            raise TypeError(f"a hook must be callable or have on_epoch_end/on_fit_start/on_fit_end; got {hook!r}")
    return result


def call_hooks(hooks: Iterable[Any], name: str, *args: Any) -> bool:
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


class EarlyStopping(Hook):
    """Stop after ``patience`` epochs without a better validation score (the article's step 6); with
    ``restore_best``, keep the best epoch's weights and end the run with them."""

    def __init__(self, state: RunState, model: nn.Module, patience: int, restore_best: bool = True) -> None:
        self.state, self.model, self.patience, self.restore_best = state, model, patience, restore_best

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        state = self.state
        if self.restore_best and state.best_epoch == state.epoch:
            state.best_model = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
        if state.best_epoch is not None and state.epoch - state.best_epoch >= self.patience:
            state.stop("early_stopping")

    def on_fit_end(self, result: FitResult) -> None:
        state = self.state
        if self.restore_best and state.best_model is not None and state.best_epoch != state.epoch:
            self.model.load_state_dict(state.best_model)


class Checkpointing(Hook):
    """Write the resumable checkpoint every ``every`` epochs and after the last one (rank 0 writes; all wait).
    ``save(path)`` writes it: :func:`resnet_lessons.train.fit` passes one that knows the model and optimiser."""

    def __init__(self, state: RunState, path: Path, every: int, save: Callable[[Path], None]) -> None:
        self.state, self.path, self.every, self._save = state, path, every, save

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        if self.state.epoch % self.every == 0 or self.state.epoch >= self.state.planned_epochs:
            if distributed.world().is_main:
                self._save(self.path)
            distributed.barrier()


__all__ = ["Checkpointing", "EarlyStopping", "Hook", "RunState", "StopTraining", "as_hooks", "call_hooks"]
