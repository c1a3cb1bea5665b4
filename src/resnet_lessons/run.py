"""One run of :func:`resnet_lessons.train.fit`, set up: loaders, optimiser, precision, the checkpoint it resumes
from, the budget clock and the built-in hooks, gathered in a :class:`Run` that the loop works with; and how a run
shows its progress (bars where someone watches, one plain line per epoch in a log)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoints, distributed, runtime
from ._files import check_writable
from .budget import BudgetClock
from .data import Augment, DataSplits, DeviceLoader, normalise
from .hooks import Checkpointing, EarlyStopping, Hook, RunState
from .models import whiten_first_conv
from .optim import Lookahead, RunOptions, TrainConfig, crop_work, make_optimizer
from .runtime import resolve_precision

CHECKPOINT_NAME = "checkpoint.pt"  # the resumable checkpoint that fit writes into checkpoint_dir


@dataclass
class Run:
    """What one fit works with, built once by :func:`_prepare`; ``state`` is where it is."""

    model: nn.Module  # the caller's network, trained in place
    train_model: nn.Module  # the same, wrapped for DDP and torch.compile when asked
    cfg: TrainConfig
    options: RunOptions
    device: torch.device
    world: distributed.World
    optimizer: torch.optim.Optimizer
    lookahead: Lookahead | None  # the slow weights, when cfg.lookahead_every asks for them
    scaler: torch.amp.GradScaler | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autocast: Callable[[], Any]
    train_loader: DeviceLoader
    val_loader: DeviceLoader | None
    state: RunState
    started: float  # time.perf_counter() at the start, less the seconds a resumed run had spent
    checkpoint_path: Path | None
    clock: BudgetClock | None
    bars: bool  # draw progress bars (a terminal or a notebook); else one plain line per epoch unless quiet

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def prepare(model: nn.Module, data: DataSplits, cfg: TrainConfig, options: RunOptions, device: torch.device,
             checkpoint_dir: str | Path | None, resume: bool,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
             sample_weights: torch.Tensor | None, param_groups: Iterable[Mapping[str, Any]] | None) -> Run:
    """Loaders, optimiser, precision, the checkpoint to resume from, the budget clock: everything but the loop."""
    if loss_fn is not None and cfg.label_smoothing:
        raise ValueError("loss_fn replaces the cross-entropy, so cfg.label_smoothing would be ignored; set it to 0")
    started = time.perf_counter()
    world = distributed.world()
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last
    if channels_last is None:  # NHWC: tensor cores want it; on a CPU it pays with bf16 (oneDNN's fast kernels)
        channels_last = device.type == "cuda" or precision == "bf16"
    train_loader, val_loader = loaders(data, cfg, options, device, channels_last, world, sample_weights)
    if len(train_loader) == 0:
        raise ValueError(
            f"the training split has {len(data['train'])} images, fewer than one batch (batch_size "
            f"{cfg.batch_size}), so not one step could be taken; lower batch_size or add training images"
        )
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint_path is not None and world.is_main:
        check_writable(checkpoint_path.parent)
        if checkpoint_path.exists() and not resume:
            raise FileExistsError(
                f"{checkpoint_path} already exists; resume it (resume=True) or choose another checkpoint_dir"
            )
    if cfg.dirac_init:
        _dirac_init(model)
    if cfg.whiten:
        _whiten(model, data, cfg.seed)
    _set_batchnorm(model, cfg)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, param_groups)
    lookahead = Lookahead(model, cfg.lookahead_every) if cfg.lookahead_every else None
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    elif isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(device)  # class weights and priors live in buffers
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = RunState(total_steps=None if cfg.budget_seconds else cfg.epochs * len(train_loader))
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = resume_state(checkpoint_path, model, optimizer, scaler, cfg, device, lookahead)
        started -= state.seconds  # a budget counts the time already spent
    train_model = distributed.wrap_model(model, device)
    if options.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]  # a compiled Module is still one
    clock = None
    if cfg.budget_seconds:
        height, width = train_loader.images.shape[2:]
        work = partial(crop_work, cfg=cfg, height=height, width=width) if cfg.progressive_size else None
        clock = BudgetClock(cfg.budget_seconds, cfg.budget_probe_steps, cfg.batch_size, started, len(train_loader),
                            _loader_images(val_loader), device, work=work,
                            provisional_total=cfg.epochs * len(train_loader))
    return Run(model=model, train_model=train_model, cfg=cfg, options=options, device=device, world=world,
               optimizer=optimizer, lookahead=lookahead, scaler=scaler, loss_fn=loss_fn,
               autocast=partial(runtime.autocast, precision, device), train_loader=train_loader,
               val_loader=val_loader, state=state, started=started, checkpoint_path=checkpoint_path, clock=clock,
               bars=not options.quiet and world.is_main and _progress_bars())


def _set_batchnorm(model: nn.Module, cfg: TrainConfig) -> None:
    """``cfg.freeze_bn_scale``: every BatchNorm keeps its scale (1 unless the caller set it) and its shift trains.
    ``cfg.bn_momentum``: every BatchNorm's running statistics take that weight of each new batch."""
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if cfg.freeze_bn_scale and module.weight is not None:
            module.weight.requires_grad_(False)
        if cfg.bn_momentum is not None:
            module.momentum = cfg.bn_momentum


@torch.no_grad()
def _dirac_init(model: nn.Module) -> None:
    """``cfg.dirac_init``: in every 3x3 convolution, filter ``i`` of the first ``in_channels`` becomes the
    identity on input channel ``i`` (``nn.init.dirac_``); the other filters keep their initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.groups == 1:
            nn.init.dirac_(module.weight[:module.in_channels])


WHITEN_IMAGES = 1000  # training images whose 3x3 patches (900 each) set the whitening filters


def _whiten(model: nn.Module, data: DataSplits, seed: int) -> None:
    """``cfg.whiten``: conv1 from the patch covariance of a seeded sample of the training split (every process
    draws the same sample, so under DDP every copy starts the same)."""
    train = data["train"]
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:WHITEN_IMAGES]
    whiten_first_conv(model, normalise(train.images[rows], data.mean, data.std))


def loaders(data: DataSplits, cfg: TrainConfig, options: RunOptions, device: torch.device, channels_last: bool,
             world: distributed.World, sample_weights: torch.Tensor | None) -> tuple[DeviceLoader, DeviceLoader | None]:
    if cfg.batch_size % world.world_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({world.world_size})"
        )
    train = data["train"]
    train_loader = DeviceLoader(
        train.images, train.labels, batch_size=cfg.batch_size // world.world_size, mean=data.mean, std=data.std,
        device=device, train=True, augment=Augment(crop_padding=cfg.crop_padding, flip=cfg.flip, cutout=cfg.cutout,
                                                      alternate_flip=cfg.alternate_flip),
        seed=cfg.seed, channels_last=channels_last, rank=world.rank, world_size=world.world_size,
        sample_weights=sample_weights,
    )
    val_loader = None
    if "val" in data.splits and len(data["val"]):
        val = data["val"]
        val_loader = DeviceLoader(
            val.images, val.labels, batch_size=options.eval_batch_size, mean=data.mean, std=data.std, device=device,
            train=False, channels_last=channels_last, rank=world.rank, world_size=world.world_size,
        )
    return train_loader, val_loader


def builtin_hooks(run: Run) -> list[Hook]:
    """Early stopping, when the options ask for it (more built-in hooks would join it here)."""
    if run.options.patience is None:
        return []
    return [EarlyStopping(run.state, run.model, run.options.patience, run.options.restore_best)]


def checkpoint_hook(run: Run, data: DataSplits) -> Checkpointing | None:
    """The hook that writes the resumable checkpoint, when fit has a checkpoint_dir."""
    if run.checkpoint_path is None:
        return None

    def save(path: Path) -> None:
        train_state = {"config": run.cfg.as_dict(), "optimizer": run.optimizer.state_dict(),
                       "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                       "lookahead": run.lookahead.state_dict() if run.lookahead is not None else None,
                       **run.state.as_dict(), "rng": checkpoints.rng_state(run.device),
                       "seconds": time.perf_counter() - run.started}
        payload = checkpoints.make_checkpoint(
            run.model, model_name=run.cfg.model, model_options=run.cfg.model_options, classes=data.classes,
            mean=data.mean, std=data.std, history=run.state.rows, train_state=train_state,
        )
        checkpoints.save(payload, path)

    return Checkpointing(run.state, run.checkpoint_path, run.options.checkpoint_every, save)


def resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
            cfg: TrainConfig, device: torch.device, lookahead: Lookahead | None = None) -> RunState:
    """The run state to continue from; the checkpoint's weights, optimiser, scaler, slow weights and RNG states
    are loaded."""
    train_state, history = checkpoints.load_training(path, model, optimizer, scaler, cfg.as_dict(), device,
                                                     defaults=TrainConfig().as_dict())
    if lookahead is not None:  # the recipe check above has made sure the checkpoint's run had them too
        lookahead.load_state_dict(train_state["lookahead"])
    return RunState.from_checkpoint(train_state, history)


def _loader_images(loader: DeviceLoader | None) -> int:
    """Images one validation pass reads on this process (0 without a validation split)."""
    return 0 if loader is None else int(loader.shard_size)


def _progress_bars() -> bool:
    """Progress bars only where someone watches them: a terminal or a notebook (not a log file)."""
    if getattr(sys.stderr, "isatty", lambda: False)():
        return True
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"  # Jupyter's kernel; tqdm.auto draws a widget there


def print_epoch(row: Mapping[str, Any], planned_epochs: int) -> None:
    """One plain line per epoch on stderr, for logs: ``epoch 3/10: train_loss 1.234, ... (12.3 s)``."""
    shown = ", ".join(f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss", "val_accuracy") if not math.isnan(row[k]))
    print(f"epoch {row['epoch']}/{planned_epochs}: {shown} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)


__all__ = ["CHECKPOINT_NAME", "Run", "builtin_hooks", "checkpoint_hook", "prepare", "print_epoch"]
