"""What each change of the CPU recipe buys: the recipe, and the recipe without each of its changes, in one run.

    .venv/bin/python bench/recipe_changes.py [--budget 180] [--seeds 1] [--data ../shared/data/cifar10-train-jpeg.zip]
                                             [--out bench/results/recipe_changes.json]

Every arm trains with ``time_to_accuracy.run_cpu_recipe``: the same images (45,000 for training and 5,000
validation images carved out with seed 0, the split of ``time_to_accuracy.py``), the same budget with
everything counted (the fit and the test-time augmentation of the validation split), once per seed.

* ``recipe``: the ``cpu`` profile's recipe (``common.CPU_RECIPE``), scored with test-time augmentation: the mean of
  the logits of the image and of its 1-pixel shifts both ways, each with its mirror image (6 views).
* ``no_translate_tta`` and ``no_tta``: the same models scored with flips only (2 views), and with the image alone.
  Evaluation only: nothing is trained again, and the time of the views left out is not given back to the fit.
* one arm per change of the recipe, trained again without it (:data:`CHANGES`): the recipe with that one
  ``TrainConfig`` field set back to the value of the recipe before issue 18 (SGD with Nesterov momentum, random
  flips, every step on whole images, the first layer learnt).

Writes ``bench/results/recipe_changes.json``: per arm every seed's validation accuracy, its mean and spread, the
epochs trained and the difference from the recipe's mean; and hardware, versions and date. Prints a table.
"""

from __future__ import annotations

import argparse

import common
from time_to_accuracy import run_cpu_recipe

from resnet_lessons import runtime
from resnet_lessons.train import TrainConfig, replace

CPU_RECIPE = common.CPU_RECIPE
TRANSLATE = 1  # pixels of the shifted test-time views

# One arm per change: (id, what the change is, the TrainConfig fields that undo it). An arm whose change the
# recipe does not have (its fields already at those values) is left out.
CHANGES: tuple[tuple[str, str, dict], ...] = (
    ("sgd", "SGD with Nesterov momentum for the convolution filters too, instead of Muon",
     {"optimizer": "sgd"}),
    ("no_alternate_flip", "random flips instead of alternating ones", {"alternate_flip": False}),
    ("no_progressive", "every step on whole 32x32 images", {"progressive_size": 0}),
    ("no_whiten", "the first convolution learnt instead of whitening", {"whiten": False}),
)


def arms(recipe: TrainConfig) -> list[tuple[str, str, TrainConfig]]:
    """The retrained arms: the recipe first, then the recipe without each change it has."""
    out = [("recipe", "the cpu profile's recipe", recipe)]
    for name, change, undo in CHANGES:
        if any(getattr(recipe, field) != value for field, value in undo.items()):
            out.append((name, change, replace(recipe, **undo)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=180.0, metavar="S", help="seconds per run, all counted")
    parser.add_argument("--seeds", type=int, default=1, metavar="N", help="training seeds 0 .. N-1 per arm")
    parser.add_argument("--data", default=str(common.SHARED_ZIP), help="the image source (default: the shared zip)")
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", default=str(common.RESULTS / "recipe_changes.json"))
    args = parser.parse_args(argv)
    if args.budget <= 0 or args.seeds < 1:
        parser.error(f"--budget must be more than 0 and --seeds at least 1, got {args.budget} and {args.seeds}")
    threads = runtime.cpu_threads(args.threads)
    data = common.load_data(args.data, val_per_class=args.val_per_class, seed=0, threads=threads)
    label = common.data_label(data)

    rows: list[dict] = []
    for name, change, recipe in arms(CPU_RECIPE):
        runs = [run_cpu_recipe(data, args.budget, seed, recipe=recipe, tta=True, translate=TRANSLATE)
                for seed in range(args.seeds)]
        epochs, seconds = [run["epochs"] for run in runs], [run["seconds"] for run in runs]
        scored = [(name, change, "val_accuracy")]
        if name == "recipe":  # the same models, fewer test-time views
            scored += [("no_translate_tta", "test-time flips only (2 views), not the shifts", "val_accuracy_flip_only"),
                       ("no_tta", "no test-time augmentation (the image alone)", "val_accuracy_without_tta")]
        for arm, what, key in scored:
            rows.append({"id": arm, "change": what, "values": [run[key] for run in runs], "epochs": epochs,
                         "seconds": seconds})
            print(f"{arm:18s} {common.spread(rows[-1]['values'])['mean']:.4f}", flush=True)
    recipe_mean = common.spread(rows[0]["values"])["mean"]
    for row in rows:
        row.update(common.spread(row["values"]))
        row["difference"] = row["mean"] - recipe_mean  # negative: the change buys that much
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
    common.print_table(rows, [("arm", "id", "s"), ("mean", "mean", ".4f"), ("min", "min", ".4f"),
                              ("max", "max", ".4f"), ("vs recipe", "difference", "+.4f"),
                              ("epochs", "epochs_mean", ".2f")])
    print(f"({label}; {args.budget:g} s per run, seeds {report['seeds']}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
