"""The clock of a time-budgeted run: how many optimiser steps fit in ``budget_seconds``.

A ``budget_seconds`` run of :func:`resnet_lessons.train.fit` cannot know its schedule in advance, because the
schedule is a function of the total number of steps (:func:`resnet_lessons.optim.lr_at`). So
:class:`BudgetClock` times the first steps (after two warm-up steps), fixes the total (:func:`plan_steps`),
corrects it after every epoch with the measured cost of the steps and of the validation pass, and says when a
machine that slowed down leaves no room for another step (:func:`past_deadline`). Under DDP the slowest
process's times count and rank 0's plan is everyone's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import torch

from . import distributed

RESERVE = 0.03  # share of the budget kept back: the last checkpoint, the result, a noisy machine
WARMUP_STEPS = 2  # untimed steps first: allocator and kernel selection make them slow
# (first, end, total) -> what steps first .. end-1 of a run of `total` steps cost, in full steps
Work = Callable[[int, int, int], float]


class BudgetClock:
    """Times the steps of a budget run and plans their number; see the module docstring."""

    def __init__(self, budget_seconds: float, probe_steps: int, batch_size: int, started: float,
                 steps_per_epoch: int, val_images: int, device: torch.device,
                 work: Work | None = None, provisional_total: int = 1) -> None:
        self.budget_seconds, self.probe_steps, self.batch_size = budget_seconds, probe_steps, batch_size
        self.started, self.steps_per_epoch, self.val_images, self.device = started, steps_per_epoch, val_images, device
        self.work = work  # None: every step costs the same (else progressive resizing: optim.crop_work)
        self.total = provisional_total  # the total the steps of the current window were scheduled with
        self.since = 0.0  # start of the timing window: after the warm-up steps, then after each plan
        self.planned_at: int | None = None  # the step of the last plan
        self.step_seconds = self.eval_seconds = 0.0  # the costs the last plan used (a full step); 0: no plan yet

    def probe(self, step: int) -> int | None:
        """Call after each step until it returns the planned total number of steps."""
        now = time.perf_counter()
        if step == WARMUP_STEPS:
            self.since = now
        elif step > WARMUP_STEPS and (step == WARMUP_STEPS + self.probe_steps or (  # ranks must agree: count under DDP
                not distributed.world().distributed and now - self.since > 0.05 * self.budget_seconds)):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step_seconds = self._slowest((time.perf_counter() - self.since) / self._work(WARMUP_STEPS, step))
            per_image = step_seconds / max(1, self.batch_size // distributed.world().world_size)
            # A guess until an epoch is timed: a forward pass is ~1/3 of forward + backward; 1/2 leaves a margin.
            return self._plan(step, step_seconds, 0.5 * per_image * self.val_images)
        return None

    def replan(self, step: int, train_end: float) -> int:
        """At an epoch's end (after validation): plan again from the steps since the last plan (the probe's
        first steps run slower; a busy machine can slow down) and the validation pass just made. Checkpoints
        and hooks fall in the next window, so they count as part of the steps."""
        assert self.planned_at is not None, "replan before the first plan"
        step_seconds = self._slowest((train_end - self.since) / max(1e-9, self._work(self.planned_at, step)))
        return self._plan(step, step_seconds, self._slowest(time.perf_counter() - train_end))

    def past_deadline(self, step_start: float) -> bool:
        return past_deadline(self.budget_seconds, self.started, step_start, self.step_seconds, self.eval_seconds)

    def _work(self, first: int, end: int, total: int | None = None) -> float:
        """Steps ``first .. end-1`` of a run of ``total`` steps (default: the current plan's) in full steps."""
        if self.work is None:
            return float(end - first)
        return self.work(first, end, self.total if total is None else total)

    def _plan(self, step: int, step_seconds: float, eval_seconds: float) -> int:
        self.step_seconds, self.eval_seconds = step_seconds, eval_seconds
        work = None if self.work is None else (lambda total: self._work(step, total, total))
        self.total = plan_steps(self.budget_seconds, self.started, step, self.steps_per_epoch, step_seconds,
                                eval_seconds, work)
        self.since, self.planned_at = time.perf_counter(), step
        return self.total

    @staticmethod
    def _slowest(seconds: float) -> float:
        return float(distributed.all_reduce_max(torch.tensor([seconds]))[0])


def plan_steps(budget_seconds: float, started: float, step: int, steps_per_epoch: int, step_seconds: float,
               eval_seconds: float, work: Callable[[int], float] | None = None) -> int:
    """The total number of steps that ends the fit within ``budget_seconds`` of ``started``.

    ``step_seconds``: one training step; ``eval_seconds``: the validation pass that ends each epoch (guessed
    by the first plan, measured by the next). ``work(total)``: what the steps from ``step`` to a total of
    ``total`` cost, in full steps (default ``total - step``: all alike; progressive resizing makes early steps
    cheaper). :data:`RESERVE` of the budget is kept back.
    """
    remaining = (1 - RESERVE) * budget_seconds - (time.perf_counter() - started)
    # steps s with (s / steps_per_epoch + 1) * eval_seconds + s * step_seconds <= remaining
    more = (remaining - eval_seconds) / (step_seconds + eval_seconds / steps_per_epoch)
    planned = max(step, step + int(more))
    if work is not None:  # the same inequality with work(total) full steps; a cheap step costs more than 0
        low, high = step, step + 64 * max(1, int(more))  # cheaper steps: more of them fit (a crop of 1/8 the side)
        while low < high:  # the largest total whose cost fits (the cost grows with the total)
            middle = (low + high + 1) // 2
            fits = ((middle - step) / steps_per_epoch + 1) * eval_seconds + work(middle) * step_seconds <= remaining
            low, high = (middle, high) if fits else (low, middle - 1)
        planned = low
    return cast(int, distributed.broadcast_object(planned))  # rank 0's clock decides for all


def past_deadline(budget: float, started: float, step_start: float, step_seconds: float, eval_seconds: float) -> bool:
    """Whether a budget run must stop now: the machine got slower than planned, and one more step and the last
    validation pass (at the slowdown the step just taken showed) would no longer fit. Single process only:
    under DDP one process stopping alone would leave the others waiting; there the planned steps bound the run."""
    now = time.perf_counter()
    slowdown = max(1.0, (now - step_start) / step_seconds) if step_seconds else 1.0
    return now - started + (step_seconds + eval_seconds) * slowdown > budget


__all__ = ["RESERVE", "BudgetClock", "Work", "past_deadline", "plan_steps"]
