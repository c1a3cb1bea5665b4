"""What each change of the CPU recipe buys: the recipe, and the recipe with each change undone or added, in one run.

    .venv/bin/python bench/recipe_changes.py [--budget 180] [--seeds 1] [--data ../shared/data/cifar10-train-jpeg.zip]
                                             [--changes muon lookahead ...] [--out bench/results/recipe_changes.json]

Every arm trains with ``time_to_accuracy.run_cpu_recipe``: the same images (45,000 for training and 5,000
validation images carved out with seed 0, the split of ``time_to_accuracy.py``), the same budget with
everything counted (the fit and the test-time augmentation of the validation split), once per seed.

* ``recipe``: the ``cpu`` profile's recipe (``common.CPU_RECIPE``), scored with test-time augmentation: the mean of
  the logits of the image and of its 1-pixel shifts both ways, each with its mirror image (6 views).
* ``-tta_shifts`` and ``-tta``: the same models scored with flips only (2 views), and with the image alone.
  Evaluation only: nothing is trained again, and the time of the views left out is not given back to the fit.
* one arm per change tried for issue 18 (:data:`CHANGES`), trained again: ``-name`` is the recipe with a change
  it has undone, ``+name`` the recipe with a change it does not have added. Its ``difference`` from the recipe
  says what the change buys: minus the difference for ``-name``, the difference for ``+name``.

Writes ``bench/results/recipe_changes.json``: per arm every seed's validation accuracy, its mean and spread, the
epochs trained and the difference from the recipe's mean; and hardware, versions and date. Prints a table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import common
from time_to_accuracy import run_cpu_recipe

from resnet_lessons import runtime
from resnet_lessons.train import TrainConfig, replace

CPU_RECIPE = common.CPU_RECIPE
TRANSLATE = 1  # pixels of the shifted test-time views

# The changes tried: (name, what it is, its TrainConfig fields when on, when off). The recipe has a change when
# its fields equal the "on" values.
CHANGES: tuple[tuple[str, str, dict, dict], ...] = (
    ("muon", "Muon for the convolution filters instead of SGD with Nesterov momentum",
     {"optimizer": "muon"}, {"optimizer": "sgd"}),
    ("alternate_flip", "alternating flips instead of random ones", {"alternate_flip": True}, {"alternate_flip": False}),
    ("progressive", "the first half of the steps on 24x24 crops", {"progressive_size": 24}, {"progressive_size": 0}),
    ("lookahead", "Lookahead every 5 steps (airbench94's weight averaging)", {"lookahead_every": 5},
     {"lookahead_every": 0}),
    ("frozen_bn_scale", "BatchNorm scales frozen at 1, only the shifts trained", {"freeze_bn_scale": True},
     {"freeze_bn_scale": False}),
    ("bn_momentum", "BatchNorm statistics with momentum 0.4 (airbench94's) instead of torch's 0.1",
     {"bn_momentum": 0.4}, {"bn_momentum": None}),
    ("dirac_init", "3x3 filters that start as identities where they can (airbench94's Dirac init)",
     {"dirac_init": True}, {"dirac_init": False}),
)


def arms(recipe: TrainConfig, only: Sequence[str] | None = None) -> list[tuple[str, str, TrainConfig]]:
    """The retrained arms: the recipe first, then the recipe with each change (of ``only``, default all) undone
    (``-``) or added (``+``)."""
    out = [("recipe", "the cpu profile's recipe", recipe)]
    for name, change, on, off in CHANGES:
        if only is not None and name not in only:
            continue
        has = all(getattr(recipe, field) == value for field, value in on.items())
        out.append((f"-{name}" if has else f"+{name}", f"{'without' if has else 'with'}: {change}",
                    replace(recipe, **(off if has else on))))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=180.0, metavar="S", help="seconds per run, all counted")
    parser.add_argument("--seeds", type=int, default=1, metavar="N", help="training seeds 0 .. N-1 per arm")
    parser.add_argument("--data", default=str(common.SHARED_ZIP), help="the image source (default: the shared zip)")
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--changes", nargs="+", choices=[name for name, *_ in CHANGES], default=None,
                        help="only these changes (default: all), each beside the recipe")
    parser.add_argument("--out", default=str(common.RESULTS / "recipe_changes.json"))
    args = parser.parse_args(argv)
    if args.budget <= 0 or args.seeds < 1:
        parser.error(f"--budget must be more than 0 and --seeds at least 1, got {args.budget} and {args.seeds}")
    threads = runtime.cpu_threads(args.threads)
    data = common.load_data(args.data, val_per_class=args.val_per_class, seed=0, threads=threads)
    label = common.data_label(data)

    rows: list[dict] = []
    for name, change, recipe in arms(CPU_RECIPE, args.changes):
        runs = [run_cpu_recipe(data, args.budget, seed, recipe=recipe, tta=True, translate=TRANSLATE)
                for seed in range(args.seeds)]
        epochs, seconds = [run["epochs"] for run in runs], [run["seconds"] for run in runs]
        scored = [(name, change, "val_accuracy")]
        if name == "recipe":  # the same models, fewer test-time views
            scored += [("-tta_shifts", "without: the shifted test-time views (flips only, 2 views)",
                        "val_accuracy_flip_only"),
                       ("-tta", "without: test-time augmentation (the image alone)", "val_accuracy_without_tta")]
        for arm, what, key in scored:
            rows.append({"id": arm, "change": what, "values": [run[key] for run in runs], "epochs": epochs,
                         "seconds": seconds})
            print(f"{arm:18s} {common.spread(rows[-1]['values'])['mean']:.4f}", flush=True)
    recipe_mean = common.spread(rows[0]["values"])["mean"]
    for row in rows:
        row.update(common.spread(row["values"]))
        row["difference"] = row["mean"] - recipe_mean  # the arm against the recipe
        row["epochs_mean"] = sum(row["epochs"]) / len(row["epochs"])

    report = {
        "benchmark": "recipe_changes",
        "smoke": args.data == "synthetic",  # a test of the script, not a measurement
        "label": label,
        "data": args.data,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "budget_s": args.budget,
        "seeds": list(range(args.seeds)),
        "tta_translate_px": TRANSLATE,
        "arms": rows,
        "cpu_recipe": CPU_RECIPE.as_dict(),
        **common.record(__file__, argv),
    }
    out = common.write_json(args.out, report)
    common.print_table(rows, [("id", "arm", ""), ("mean", "mean", ".4f"), ("min", "min", ".4f"),
                              ("max", "max", ".4f"), ("difference", "vs recipe", "+.4f"),
                              ("epochs_mean", "epochs", ".2f")])
    print(f"({label}; {args.budget:g} s per run, seeds {report['seeds']}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
