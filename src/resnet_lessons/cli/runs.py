"""The run folder of ``train`` and ``finetune`` (--out) and what they write into it.

The promises (README, "What the command line promises"): an earlier run's files are replaced only with
``--force``; one run per folder at a time (an OS lock); every file is written atomically and never through
a symbolic link; a run that fails before writing anything leaves no empty folder behind.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import CommandError, load_checkpoint

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..data import DataSplits
    from ..optim import TrainConfig
    from ..profiles import Profile
    from ..train import FitResult

TRAIN_FILES = ("model.pt", "checkpoint.pt", "history.csv", "metrics.json")  # what train writes into --out
FINETUNE_FILES = ("model.pt", "history.csv", "metrics.json")


def out_folder(arg: str, *, resume: bool = False) -> Path:
    """The --out folder, checked before anything is created: not a file, and there when resuming."""
    out = Path(arg).expanduser()
    if os.path.lexists(out) and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    if resume and not out.exists():
        raise CommandError(f"nothing to resume: {out} does not exist; run without --resume to start a new run")
    return out


def hold(stack: ExitStack, out: Path, names: Sequence[str]) -> None:
    """Create ``out`` if needed and hold its lock until ``stack`` closes (removing the folder again if the
    run fails before writing anything); a second run on the same folder stops here, naming the first.
    Temporaries of ``names`` that a killed run left are removed."""
    from .._files import FolderInUse, run_folder

    try:
        stack.enter_context(run_folder(out, names))
    except (FolderInUse, OSError) as error:
        raise CommandError(str(error)) from None


def check_run_folder(out: Path, names: Sequence[str], *, resume: bool | None, force: bool) -> None:
    """Under the folder's lock: refuse to overwrite an earlier run's files (``names``) without --force, and
    to resume without a checkpoint. ``resume=None``: the command cannot resume (finetune)."""
    from ..train import CHECKPOINT_NAME

    present = [name for name in names if os.path.lexists(out / name)]
    if resume:
        if CHECKPOINT_NAME not in present:
            held = f"it holds {', '.join(present)}" if present else "it holds no run"
            replace_it = " (and --force to replace it)" if present else ""
            raise CommandError(f"nothing to resume in {out}: there is no {CHECKPOINT_NAME} ({held}); run "
                               f"without --resume to start a new run{replace_it}")
        if "model.pt" in present and not force:
            raise CommandError(f"{out} holds a finished run (model.pt); resuming would replace it: pass --force "
                               "as well to do so, or choose another --out")
        return
    if present and not force:
        unfinished = resume is not None and CHECKPOINT_NAME in present and "model.pt" not in present
        advice = "--resume to continue it, " if unfinished else ""
        raise CommandError(f"{out} already holds {', '.join(present)}; pass {advice}--force to replace it, "
                           "or choose another --out")
    if CHECKPOINT_NAME in present and resume is not None:  # --force: the new run must not resume the old one
        (out / CHECKPOINT_NAME).unlink()


def check_resume_data(out: Path, classes: Sequence[str]) -> None:
    """Resuming needs the data the run was trained on: the same classes, in the same order."""
    from ..checkpoints import ClassMismatch
    from ..train import CHECKPOINT_NAME

    saved = load_checkpoint(out / CHECKPOINT_NAME)
    where = f"cannot resume {saved.path}"
    if len(saved.classes) != len(classes):
        raise CommandError(f"{where}: this run was trained on {len(saved.classes)} classes, the data has "
                           f"{len(classes)} ({list(saved.classes)} vs {list(classes)}); resume with the same "
                           "data, or start a new run in another folder")
    try:
        saved.check_classes(classes, what="the data")
    except ClassMismatch as error:
        raise CommandError(f"{where}: {error}") from None


def _no_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value  # JSON has no NaN


def train_metrics(result: FitResult, data: DataSplits, cfg: TrainConfig, profile: Profile, source: str, *,
                  world_size: int, device: torch.device) -> dict[str, Any]:
    """OUT/metrics.json of a finished run: its last epoch, how it ended and where it ran."""
    import torch

    from .. import __version__

    last = result.final
    return {
        "val_accuracy": _no_nan(last.get("val_accuracy")),
        "val_loss": _no_nan(last.get("val_loss")),
        "train_loss": _no_nan(last.get("train_loss")),
        "best_epoch": result.best_epoch,
        "epochs": int(last.get("epoch", 0)),
        "steps": result.steps,
        "images_seen": result.images_seen,
        "seconds": result.seconds,
        "stopped": result.stopped,
        "model": cfg.model,
        "model_options": cfg.model_options,
        "profile": profile.name,
        "data": source,
        "notes": list(data.notes),
        "world_size": world_size,
        "device": str(device),
        "library_version": __version__,
        "torch_version": str(torch.__version__),
    }


def write_run(out: Path, model: nn.Module, data: DataSplits, result: FitResult, cfg: TrainConfig,
              metrics: dict[str, Any], *, source: str, profile: Profile, seed: int) -> None:
    """OUT/model.pt (the model with how its data was loaded, its recipe and metrics), OUT/history.csv and
    OUT/metrics.json of a finished train or finetune run; evaluate, predict and export read the model.pt."""
    from .. import checkpoints
    from .._files import atomic_write

    loaded = {"source": source, **profile.data_sizes(), "seed": seed, "image_size": data.train.image_size[0]}
    extra = {"data": loaded, "train_config": cfg.as_dict(), "metrics": metrics}
    payload = checkpoints.make_checkpoint(model, model_name=cfg.model, model_options=cfg.model_options,
                                          classes=data.classes, mean=data.mean, std=data.std,
                                          history=result.history, extra=extra)
    checkpoints.save(payload, out / "model.pt")
    atomic_write(out / "history.csv", result.history.to_csv(index=False))
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    accuracy = "n/a" if metrics["val_accuracy"] is None else f"{metrics['val_accuracy']:.4f}"
    print(f"val accuracy {accuracy} after {metrics['epochs']} epochs ({metrics['stopped']}, "
          f"{metrics['seconds']:.0f} s); wrote {out / 'model.pt'}", file=sys.stderr)
