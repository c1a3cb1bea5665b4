"""``train`` (from scratch, also under torchrun) and ``finetune`` (from pretrained weights): both train
with the one training loop and write the same run folder (:mod:`.runs`)."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import (
    CommandError,
    add_data,
    add_device,
    add_force,
    add_length,
    add_out_folder,
    add_profile,
    add_seed,
    add_skip_bad,
    load_data,
    per_class,
    positive,
    train_settings,
    whole,
)
from .runs import (
    FINETUNE_FILES,
    TRAIN_FILES,
    check_resume_data,
    check_run_folder,
    hold,
    out_folder,
    train_metrics,
    write_run,
)

if TYPE_CHECKING:
    from ..distributed import World
    from ..profiles import Profile
    from .common import Commands


# --- train ---------------------------------------------------------------------------------------


def add_train(commands: Commands) -> None:
    p = commands.add_parser(
        "train",
        help="train a network from scratch (the profile's recipe unless told otherwise)",
        description="Train from scratch with the one training loop (SGD + Nesterov, one-cycle). Writes "
        "OUT/model.pt, OUT/history.csv and OUT/metrics.json, and OUT/checkpoint.pt after every epoch "
        "(resume it with --resume). Under torchrun each process trains on its shard; rank 0 writes. A run holds OUT "
        "with an OS lock (a second run there stops at once) and replaces an earlier run's files only with --force.",
    )
    add_data(p)
    add_out_folder(p)
    p.add_argument("--model", metavar="NAME", help="a model name (see resnet_lessons.models); default: the profile's")
    add_length(p)
    add_seed(p, "splits, initialisation and shuffling")
    add_profile(p)
    p.add_argument("--train-per-class", type=per_class, metavar="N|all",
                   help="training images kept per class (default: all of them, in every profile)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (it must be there)")
    add_force(p, "an earlier run's files in OUT")
    add_skip_bad(p)
    add_device(p)
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .. import distributed

    profile, source = train_settings(args)
    out = out_folder(args.out, resume=args.resume)
    world = distributed.setup(args.device)
    try:
        with ExitStack() as stack:
            if world.is_main:  # under torchrun rank 0 holds the folder and writes; the others only train
                hold(stack, out, TRAIN_FILES)
                check_run_folder(out, TRAIN_FILES, resume=args.resume, force=args.force)
            _train(args, profile, source, out, world)
        distributed.barrier()
    finally:
        distributed.cleanup()
    return 0


def _train(args: argparse.Namespace, profile: Profile, source: str, out: Path, world: World) -> None:
    """Train and write the run into ``out`` (which the caller holds)."""
    from .. import runtime
    from ..models import build_model
    from ..optim import config_from_profile, options_from_profile
    from ..train import fit

    seed = profile.seed if args.seed is None else args.seed
    model_name = args.model or profile.model
    overrides: dict[str, Any] = {"seed": seed}
    if model_name != profile.model:  # another model: the profile's model options are not its options
        overrides.update(model=model_name, model_options={})
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.budget_seconds is not None:
        overrides["budget_seconds"] = args.budget_seconds
    cfg = config_from_profile(profile, **overrides)
    if world.device.type == "cpu" and not world.distributed:
        runtime.cpu_threads()
    data = load_data(source, profile.data_sizes(), seed, skip_bad=args.skip_bad)
    if args.resume and world.is_main:
        check_resume_data(out, data.classes)
    runtime.seed_everything(seed)
    try:
        model = build_model(model_name, num_classes=len(data.classes), **cfg.model_options)
    except (KeyError, ValueError, TypeError) as error:
        raise CommandError(str(error).strip("'\"")) from None
    if world.is_main:
        kept = "" if profile.train_per_class is None else f": {profile.train_per_class} per class"
        print(f"training {model_name} on {source} ({len(data.train):,} images{kept}, {profile.name} profile) on "
              f"{runtime.describe_device(world.device)} x{world.world_size}", file=sys.stderr)
    result = fit(model, data, cfg, device=world.device, options=options_from_profile(profile), checkpoint_dir=out,
                 resume=args.resume)
    if world.is_main:
        metrics = train_metrics(result, data, cfg, profile, source, world_size=world.world_size, device=world.device)
        write_run(out, model, data, result, cfg, metrics, source=source, profile=profile, seed=seed)


# --- finetune ------------------------------------------------------------------------------------


def add_finetune(commands: Commands) -> None:
    from ..finetune import STRATEGIES

    p = commands.add_parser(
        "finetune",
        help="fine-tune pretrained weights (ImageNet's, or a file) on a data source",
        description="Load pretrained weights (torchvision's ImageNet weights through the weights API, or a local "
        "file: a resnet-lessons model.pt or a torchvision .pth state dict), replace the head for the data's "
        "classes, freeze what the strategy freezes and train with the one training loop. Writes OUT/model.pt, "
        "OUT/history.csv and OUT/metrics.json, as train does; evaluate and predict read the model.pt.",
    )
    p.add_argument("--weights", required=True, metavar="imagenet|PATH",
                   help="'imagenet' (torchvision's default ImageNet weights; 'imagenet:IMAGENET1K_V1' names a "
                   "version), or a path to a model.pt or a torchvision state dict")
    add_data(p)
    add_out_folder(p)
    p.add_argument("--model", metavar="NAME", help="the architecture (default: resnet18 for imagenet, else the file's)")
    p.add_argument("--strategy", choices=STRATEGIES, default="full",
                   help="linear: train the head only (backbone and BatchNorm statistics frozen); full: train "
                   "everything; discriminative: lower learning rates for lower stages; gradual: unfreeze one "
                   "stage per epoch from the top (default: full)")
    p.add_argument("--image-size", type=whole(1), metavar="N", help="resize the images to N x N (default: 160 for "
                   "ImageNet weights with their 7x7 stem, which shrink a 32x32 image to 1x1 by the last stage; "
                   "else the data's own 32)")
    p.add_argument("--stem", choices=("imagenet", "cifar"), help="swap the weights' stem: 'cifar' puts a fresh "
                   "3x3 stem without max-pool on ImageNet weights (default: keep the weights' stem)")
    p.add_argument("--new-head", action="store_true", help="replace the head of a resnet-lessons checkpoint "
                   "trained on other classes (torchvision weights always get a new head)")
    add_length(p)
    p.add_argument("--lr", type=positive, metavar="LR", help="peak learning rate of the head (default: by strategy)")
    add_seed(p, "splits, the new head and shuffling")
    add_profile(p)
    p.add_argument("--hub-dir", metavar="DIR", help="torch hub folder for ImageNet weights (default: "
                   "torch.hub.get_dir(); the weights file lives in its checkpoints/ folder)")
    add_force(p, "an earlier run's files in OUT")
    add_skip_bad(p)
    add_device(p)
    p.set_defaults(handler=run_finetune)


def _weights_error(weights: str, error: Exception) -> CommandError:
    """A weights file that is unsafe gets the refusal every command gives; other failures their own text."""
    from ..checkpoints import unsafe_pickle_refusal

    cause = error.__cause__
    refusal = unsafe_pickle_refusal(Path(weights).expanduser(), cause) if cause is not None else None
    return CommandError(str(refusal or error))


def run_finetune(args: argparse.Namespace) -> int:
    profile, source = train_settings(args)
    out = out_folder(args.out)
    with ExitStack() as stack:
        hold(stack, out, FINETUNE_FILES)
        check_run_folder(out, FINETUNE_FILES, resume=None, force=args.force)
        _finetune(args, profile, source, out)
    return 0


def _finetune(args: argparse.Namespace, profile: Profile, source: str, out: Path) -> None:
    """Fine-tune and write the run into ``out`` (which the caller holds)."""
    from .. import finetune, runtime
    from ..optim import options_from_profile
    from ..weights import WeightsError, WeightsUnavailable, load_weights

    try:
        device = runtime.pick_device(args.device)
        if device.type == "cpu":
            runtime.cpu_threads()
        model_name = args.model or ("resnet18" if args.weights.startswith("imagenet") else None)
        weights = load_weights(args.weights, model_name or "", hub_dir=args.hub_dir, progress=True)
        model_name = model_name or weights.model_name
        if not model_name:
            raise CommandError(f"cannot tell which architecture {args.weights} holds; name it with --model")
        stem = args.stem or weights.model_options.get("stem")
        size = args.image_size or (160 if weights.classes is None and stem == "imagenet" else 32)
        seed = profile.seed if args.seed is None else args.seed
        data = load_data(source, profile.data_sizes(), seed, image_size=size, skip_bad=args.skip_bad)
        runtime.seed_everything(seed)
        ready = finetune.pretrained_model(model_name, len(data.classes), weights, stem=args.stem,
                                          new_head=True if args.new_head else None, classes=data.classes)
    except (WeightsError, WeightsUnavailable, RuntimeError, ValueError) as error:
        raise _weights_error(args.weights, error) from None
    data = finetune.with_normalisation(data, ready.mean, ready.std)
    overrides: dict[str, Any] = {"model": model_name, "model_options": ready.model_options, "seed": seed}
    for name in ("epochs", "budget_seconds", "lr"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = finetune.finetune_config(profile, args.strategy, image_size=size, **overrides)
    if len(data.train) < cfg.batch_size:  # few labels: one batch of all of them (fit refuses less than a batch)
        cfg = replace(cfg, batch_size=len(data.train))
    print(f"fine-tuning {model_name} from {weights.source} ({args.strategy}) on {source} at {size}x{size} "
          f"({len(data.train):,} images) on {runtime.describe_device(device)}", file=sys.stderr)
    result = finetune.finetune(ready.model, data, cfg, strategy=args.strategy, device=device,
                               new_modules=ready.new_modules, options=options_from_profile(profile))
    metrics = train_metrics(result, data, cfg, profile, source, world_size=1, device=device)
    metrics["finetune"] = {"weights": weights.source, "strategy": args.strategy, "image_size": size,
                           "new_modules": list(ready.new_modules), "lr": cfg.lr}
    write_run(out, ready.model, data, result, cfg, metrics, source=source, profile=profile, seed=seed)
