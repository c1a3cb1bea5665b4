"""What each correction buys: from the article's recipe to the book's CPU recipe, one change at a time.

    .venv/bin/python bench/ladder.py [--budget 60] [--seeds 2] [--train-per-class N]
                                     [--data ../shared/data/cifar10-train-jpeg.zip] [--out bench/results/ladder.json]

Every rung keeps the rung before it and adds one correction; every rung is trained by ``train.fit`` with the
same ``budget_seconds`` on the same images (the split of ``bench/time_to_accuracy.py``: 500 validation images
per class carved out of the training split with seed 0, then ``--train-per-class`` training images per class if
given), once per seed (seed s initialises the network and drives the shuffle and augmentation), and is scored
the same way: by ``fit``'s validation pass after its last epoch (eval mode, inside the budget).

0. ``article``: section 5.2 of the article as the book reproduces it (chapter 5's ``article`` and
   ``time_to_accuracy.py``'s): torchvision's ResNet-18 with its ImageNet stem and a 10-way ``fc``, Adam at a
   constant 1e-3, no weight decay, no augmentation, no label smoothing, batch 128, fp32.
1. ``network``: ResNet-9 at half width (Page 2018), a network laid out for 32x32 images, instead.
2. ``augmentation``: random crops (4 pixels of padding) and horizontal flips.
3. ``sgd_onecycle``: SGD with Nesterov momentum, the one-cycle schedule, weight decay on weights only, and the
   batch size and peak lr tuned with them (256, 0.4).
4. ``label_smoothing``: epsilon 0.2.
5. ``bf16``: bf16 autocast and channels_last where the CPU computes bf16 natively (``precision="auto"``): a
   speed feature, not a correction. Where the CPU has no bf16 instructions it changes nothing and is not trained
   again.
6. ``muon``: Muon for the convolution filters (``optim.MuonSGD``), SGD for the rest (issue 18); rung 3 steps
   every parameter with SGD. With a CPU recipe on SGD this rung is rung 5 again and is not trained again.
7. ``flip_tta``: test-time flips (evaluation only): rung 6's models, each image's logits averaged with its
   mirror image's (``metrics.flip_tta``, the book's one rule).

The last trained rung is the ``cpu`` profile's recipe (``common.CPU_RECIPE``), checked when the script starts.
Writes ``bench/results/ladder.json`` (after every rung, so a run cut short keeps what it measured): per rung the
mean, standard deviation, min and max of the validation accuracy over the seeds, every seed's value, the epochs
trained, and hardware, versions and date. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import common
import torch

from resnet_lessons import runtime
from resnet_lessons.data import DataError, DataUnavailable
from resnet_lessons.evaluate import infer
from resnet_lessons.metrics import accuracy_se, flip_tta
from resnet_lessons.models import build_model
from resnet_lessons.train import RunOptions, TrainConfig, fit, replace, resolve_precision

CPU_RECIPE = common.CPU_RECIPE

# The article's recipe as TrainConfig fields (the rest, such as eval_batch_size, are the CPU recipe's and change
# nothing in what is learned). Each rung below restores some of these fields to the CPU recipe's values.
ARTICLE = dict(model="resnet18", model_options={}, optimizer="adam", lr=1e-3, momentum=0.9, nesterov=False,
               schedule="constant", weight_decay=0.0, batch_size=128, crop_padding=0, flip=False,
               label_smoothing=0.0, precision="fp32")


@dataclass(frozen=True)
class Rung:
    id: str
    change: str  # what this rung corrects, in one line
    restores: tuple[str, ...] = ()  # TrainConfig fields set back to the CPU recipe's values
    sets: tuple[tuple[str, Any], ...] = ()  # fields set to a value of their own until a later rung restores them
    tta: bool = False  # evaluation only: flip TTA on the previous rung's models


RUNGS = (
    Rung("article", "the article's recipe, head fixed: ResNet-18 (ImageNet stem), Adam 1e-3, no augmentation"),
    Rung("network", "a 32x32-aware network: half-width ResNet-9 (Page 2018)", ("model", "model_options")),
    Rung("augmentation", "random crop (pad 4) and horizontal flip", ("crop_padding", "flip")),
    Rung("sgd_onecycle", "SGD + Nesterov, one-cycle, weight decay 5e-4 on weights, batch 256, peak lr 0.4",
         ("lr", "momentum", "nesterov", "schedule", "weight_decay", "batch_size"), sets=(("optimizer", "sgd"),)),
    Rung("label_smoothing", "label smoothing 0.2", ("label_smoothing",)),
    Rung("bf16", "bf16 autocast + channels_last where the CPU has bf16 (speed, not a correction)", ("precision",)),
    Rung("muon", "Muon for the convolution filters (orthogonalised steps at a fixed filter norm)", ("optimizer",)),
    Rung("flip_tta", "test-time horizontal flip (evaluation only)", tta=True),
)

NOTES = {
    "head": "The article's code stacks Linear(512, 10) on the 1,000-way output of torchvision's ResNet-18 and "
            "crashes at the first batch (erratum 1; checked by this run, see article_as_written), so it has no "
            "accuracy to measure. Rung 0 therefore already has the head fixed (fc replaced by a 10-way layer), as "
            "bench/time_to_accuracy.py's article recipe does: 'head fixed' buys the difference between a crash "
            "and rung 0, and is not a rung of its own.",
    "evaluation": "Every rung is scored by fit's own validation pass after its last epoch, inside the budget: eval "
                  "mode (the article's missing model.eval(), erratum 9, is fixed on every rung), the rung's "
                  "precision, exact fractions (erratum 11). flip_tta scores the previous rung's models again (after "
                  "the budget), averaging each image's logits with its mirror image's "
                  "(metrics.flip_tta, the book's one rule); val_accuracy_without_flip is the same pass without the "
                  "mirror images.",
    "normalisation": "Every rung standardises with the training split's per-channel mean and std; the article's "
                     "(0.5, 0.5, 0.5) would differ only by a per-channel affine map, which the BatchNorm after "
                     "the first convolution undoes in training mode (chapter 2), so it is not a rung.",
    "loader": "Every rung trains through train.fit and its DeviceLoader (batched augmentation on one uint8 "
              "tensor); bench/time_to_accuracy.py's article recipe uses the torchvision DataLoader with PIL "
              "transforms, so under the same budget rung 0 here sees more images than that one.",
    "budget": "budget_seconds is the whole fit: its probe steps, its training and its per-epoch validation; "
              "fit plans the number of steps from the measured step time, so a faster machine trains more epochs.",
    "spread": "std is the sample standard deviation over seeds (None for one seed); binomial_se is "
              "sqrt(p(1-p)/n) of the mean accuracy over the n validation images.",
}


def rung_configs() -> list[TrainConfig | None]:
    """The recipe of every rung, cumulatively (None for evaluation-only rungs); the last one is the CPU recipe."""
    cfg = replace(CPU_RECIPE, **ARTICLE)
    configs: list[TrainConfig | None] = []
    for rung in RUNGS:
        cfg = replace(cfg, **dict(rung.sets), **{name: getattr(CPU_RECIPE, name) for name in rung.restores})
        configs.append(None if rung.tta else cfg)
    return configs


def differences(a: TrainConfig, b: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(b, f.name) for f in fields(TrainConfig) if getattr(a, f.name) != getattr(b, f.name)}


def check_ladder() -> None:
    """Every article field is restored exactly once, so the last trained rung is the CPU recipe."""
    restored = [name for rung in RUNGS for name in rung.restores]
    assert sorted(restored) == sorted(ARTICLE) and len(set(restored)) == len(restored), restored
    last = [cfg for cfg in rung_configs() if cfg is not None][-1]
    assert not differences(last, CPU_RECIPE), differences(last, CPU_RECIPE)


def article_as_written() -> dict[str, Any]:
    """Run the article's head on a batch of two: the crash that makes a fixed head rung 0."""
    import torchvision

    backbone = torchvision.models.resnet18(weights=None)
    head = torch.nn.Linear(512, 10)
    try:
        head(backbone(torch.zeros(2, 3, 32, 32)))
    except RuntimeError as error:
        return {"crashes": True, "error": str(error).splitlines()[0]}
    return {"crashes": False, "error": None}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of correct predictions, an exact fraction (correct / n in double precision)."""
    return int((logits.argmax(1) == labels).sum()) / max(1, labels.numel())


def effective(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its precision resolved on this CPU (rungs that then coincide are trained once)."""
    return replace(cfg, precision=resolve_precision(cfg.precision, torch.device("cpu")))


def train_rung(cfg: TrainConfig, data: Any, budget: float, seed: int, tta: bool) -> tuple[dict[str, Any], Any]:
    """Train one seed of one rung. Returns the run's record and, with ``tta``, the logits of the validation images
    and of their mirror images (in the rung's precision, eval mode), else None."""
    runtime.seed_everything(seed)
    model = build_model(cfg.model, num_classes=len(data.classes), **cfg.model_options)
    result = fit(model, data, replace(cfg, budget_seconds=budget, seed=seed), device="cpu",
                 options=RunOptions(quiet=True))
    output = None
    if tta:
        val, cpu = data.val, torch.device("cpu")
        with runtime.autocast(cfg.precision, cpu):
            output = tuple(infer(model, images, mean=data.mean, std=data.std, batch_size=cfg.eval_batch_size)
                           for images in (val.images, val.images.flip(-1)))
    run = {
        "seed": seed,
        # fit's validation pass after its last epoch: eval mode, the rung's precision, correct / n in float64
        "val_accuracy": float(result.history["val_accuracy"].iloc[-1]),
        "epochs": result.steps / max(1, len(data.train) // cfg.batch_size),
        "steps": int(result.steps),
        "images_seen": int(result.images_seen),
        "seconds": float(result.seconds),
        "stopped": result.stopped,
    }
    return run, output


def summarise(rung: Rung, index: int, runs: list[dict[str, Any]], n_val: int, previous: dict | None,
              cfg: TrainConfig | None, trained: bool, prior: TrainConfig | None) -> dict[str, Any]:
    values = common.spread([r["val_accuracy"] for r in runs])
    epochs = [r["epochs"] for r in runs]
    mean = values["mean"]
    return {
        "rung": index,
        "id": rung.id,
        "change": rung.change,
        "config_changes": (differences(prior, cfg) if prior is not None and cfg is not None
                           else ({k: getattr(cfg, k) for k in ARTICLE} if cfg is not None else {})),
        "precision": resolve_precision(cfg.precision, torch.device("cpu")) if cfg is not None else None,
        "trained": trained,
        **values,  # mean, std, min, max, values
        "binomial_se": accuracy_se(mean, n_val) if mean is not None and n_val else None,
        "gain": round(mean - previous["mean"], 12) + 0.0 if previous is not None else None,  # + 0.0: no "-0.0000"
        "epochs": epochs,
        "epochs_mean": sum(epochs) / len(epochs) if epochs else None,
        "runs": runs,
    }


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.budget <= 0:
        parser.error(f"--budget must be more than 0 seconds, got {args.budget:g}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.train_per_class is not None and args.train_per_class < 1:
        parser.error(f"--train-per-class must be at least 1, got {args.train_per_class}")
    if args.val_per_class < 1:
        parser.error(f"--val-per-class must be at least 1 (the rungs are scored on it), got {args.val_per_class}")
    if args.data not in ("synthetic", "cifar10") and not Path(args.data).expanduser().exists():
        parser.error(f"--data {args.data}: no such file or folder (give an image folder or zip, or 'synthetic')")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, metavar="S",
                        help="seconds of train.fit per rung and seed")
    parser.add_argument("--seeds", type=int, default=2, metavar="N", help="seeds 0..N-1 per rung (default 2)")
    parser.add_argument("--train-per-class", type=int, default=None, metavar="N",
                        help="training images kept per class (default: all, 4,500 on the shared zip)")
    parser.add_argument("--val-per-class", type=int, default=500, metavar="N")
    parser.add_argument("--data", default=str(common.SHARED_ZIP), help="image source (default: the shared JPEG zip)")
    parser.add_argument("--synthetic-per-class", type=int, default=2000, metavar="N",
                        help="images per class when --data synthetic (the tests use few)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", default=str(common.RESULTS / "ladder.json"))
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    check_ladder()

    threads = runtime.cpu_threads(args.threads)
    try:
        data = common.load_data(args.data, val_per_class=args.val_per_class, seed=0, threads=threads,
                                train_per_class=args.train_per_class, synthetic_per_class=args.synthetic_per_class)
    except (DataError, DataUnavailable) as error:
        print(f"ladder.py: error: {error}", file=sys.stderr)
        return 1
    configs = rung_configs()
    largest = max(cfg.batch_size for cfg in configs if cfg is not None)
    if len(data.train) < largest:
        parser.error(f"the training split has {len(data.train)} images, fewer than one batch of {largest}: "
                     f"raise --train-per-class (or --synthetic-per-class)")

    load_average_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    seeds = list(range(args.seeds))
    label = common.data_label(data)
    report: dict[str, Any] = {
        "benchmark": "ladder",
        "smoke": args.data == "synthetic",  # a test of the script, not a measurement
        "label": label,
        "data": args.data,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "train_per_class": args.train_per_class,
        "val_per_class": args.val_per_class,
        "split_seed": 0,
        "budget_s": args.budget,
        "seeds": seeds,
        "device": "cpu",
        "notes": NOTES,
        "article_as_written": article_as_written(),
        "cpu_recipe": CPU_RECIPE.as_dict(),
        "last_rung_is_cpu_recipe": True,  # check_ladder() above
        "rungs": [],
        "complete": False,
        **common.record(__file__, argv),
    }
    print(f"{len(RUNGS)} rungs x {len(seeds)} seeds, {args.budget:g} s each ({label})", file=sys.stderr, flush=True)

    started = time.perf_counter()
    previous_cfg: TrainConfig | None = None
    previous: dict[str, Any] | None = None
    outputs: list[Any] = []  # the last trained rung's (logits, flipped logits) per seed
    last_cfg = [cfg for cfg in configs if cfg is not None][-1]
    for index, (rung, cfg) in enumerate(zip(RUNGS, configs)):
        if rung.tta:  # evaluation only: the previous rung's models, each image averaged with its mirror image
            labels = data.val.labels
            runs = [{**run, "val_accuracy": accuracy(flip_tta(logits, flipped), labels),
                     "val_accuracy_without_flip": accuracy(logits, labels)}
                    for run, (logits, flipped) in zip(previous["runs"], outputs)]
            row = summarise(rung, index, runs, len(data.val), previous, None, False, None)
        elif previous_cfg is not None and effective(cfg) == effective(previous_cfg):
            # e.g. precision="auto" on a CPU without bf16: the same recipe as the previous rung, not trained again
            row = summarise(rung, index, previous["runs"], len(data.val), previous, cfg, False, previous_cfg)
            row["note"] = "identical to the previous rung on this machine, so its runs are reused"
        else:
            final = effective(cfg) == effective(last_cfg)  # the models the flip_tta rung scores again
            runs, outputs = [], []
            for seed in seeds:
                run, output = train_rung(cfg, data, args.budget, seed, tta=final)
                runs.append(run)
                outputs.append(output)
                print(f"  {rung.id:16s} seed {seed}: val accuracy {run['val_accuracy']:.4f} "
                      f"({run['epochs']:.2f} epochs, {run['seconds']:.0f} s)", file=sys.stderr, flush=True)
            row = summarise(rung, index, runs, len(data.val), previous, cfg, True, previous_cfg)
        report["rungs"].append(row)
        report["elapsed_s"] = time.perf_counter() - started
        common.write_json(args.out, report)
        previous = row
        if cfg is not None:
            previous_cfg = cfg

    report["complete"] = True
    report["hardware"].update(common.cpu_load(threads, load_average_start))
    out = common.write_json(args.out, report)
    print(f"\nWhat each correction buys: validation accuracy after {args.budget:g} s of training per rung, "
          f"{len(seeds)} seed(s), {len(data.train):,} training images ({label})")
    common.print_table(report["rungs"], [
        ("rung", "#", "d"), ("id", "rung", ""), ("mean", "mean", ".4f"), ("std", "std", ".4f"),
        ("min", "min", ".4f"), ("max", "max", ".4f"), ("gain", "gain", "+.4f"), ("epochs_mean", "epochs", ".2f"),
        ("precision", "precision", ""),
    ])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
