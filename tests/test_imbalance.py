"""Class imbalance: long-tail counts and effective numbers by hand, losses against torch's cross-entropy,
metrics against scikit-learn, class-balanced re-sampling in DeviceLoader, and fit's loss/sampler hooks."""

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, recall_score
from tiny import tiny_data

from resnet_lessons import imbalance, metrics, runtime
from resnet_lessons.data import DataSplits, DeviceLoader, channel_stats, make_synthetic, stratified_split
from resnet_lessons.models import build_model
from resnet_lessons.train import TrainConfig, fit


def logits_labels(n=64, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)


# --- long tail -------------------------------------------------------------------------------------


def test_long_tail_counts_are_the_cifar10_lt_and_cifar100_lt_benchmarks():
    # n_i = int(5000 * 100 ** (-i / 9)): 5000 * 0.01 ** (1/9) = 2997.2..., and so on (Cao et al. 2019)
    assert imbalance.long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(imbalance.long_tail_counts(5000, 10, 100)) == 12406  # CIFAR-10-LT, ratio 100
    assert sum(imbalance.long_tail_counts(500, 100, 100)) == 10847  # CIFAR-100-LT, ratio 100
    assert imbalance.long_tail_counts(200, 10, 10) == [200, 154, 119, 92, 71, 55, 43, 33, 25, 20]
    assert imbalance.long_tail_counts(7, 3, 1) == [7, 7, 7]


@pytest.mark.parametrize("args, message", [((100, 1, 10), "2 classes"), ((100, 10, 0.5), "at least 1"),
                                           ((0, 10, 10), "n_max"), ((5, 10, 100), "rarest")])
def test_long_tail_counts_reject_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        imbalance.long_tail_counts(*args)


def test_long_tail_indices_keep_the_counts_in_the_given_order_and_are_seeded():
    labels = torch.arange(4).repeat_interleave(10)  # 10 images per class
    index = imbalance.long_tail_indices(labels, ratio=8, order=[2, 0, 3, 1], seed=3)
    counts = torch.bincount(labels[index], minlength=4).tolist()
    assert counts == [5, 1, 10, 2]  # head 10, then int(10 / 2) = 5, int(10 / 4) = 2, int(10 / 8) = 1
    assert torch.equal(index, index.sort().values) and index.unique().numel() == index.numel()
    assert torch.equal(index, imbalance.long_tail_indices(labels, ratio=8, order=[2, 0, 3, 1], seed=3))
    assert not torch.equal(index, imbalance.long_tail_indices(labels, ratio=8, order=[2, 0, 3, 1], seed=4))
    with pytest.raises(ValueError, match="asks for 20"):
        imbalance.long_tail_indices(labels, ratio=8, n_max=20)
    with pytest.raises(ValueError, match="each of the 4 classes"):
        imbalance.long_tail_indices(labels, ratio=8, order=[0, 1, 2])


def test_long_tail_splits_change_only_the_training_split_and_its_statistics():
    images = make_synthetic(12, image_size=16, seed=0)
    rest, held = stratified_split(images.labels, 2, 0)
    mean, std = channel_stats(images.subset(rest).images)
    data = DataSplits("synthetic", {"train": images.subset(rest), "val": images.subset(held)}, mean, std)
    tail = imbalance.long_tail_splits(data, ratio=10)
    assert list(tail["train"].counts().values()) == imbalance.long_tail_counts(10, 10, 10)
    assert tail["val"] is data["val"]
    assert (tail.mean, tail.std) == channel_stats(tail["train"].images)
    assert "imbalance ratio 10" in tail.notes[-1]


# --- re-sampling -------------------------------------------------------------------------------------


def test_class_balanced_weights_give_each_class_the_same_total():
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 1)
    weights = imbalance.class_balanced_weights(labels)
    per_class = torch.zeros(3, dtype=torch.float64).index_add_(0, labels, weights)
    assert torch.allclose(per_class, torch.full((3,), 1 / 3, dtype=torch.float64))
    root = imbalance.class_balanced_weights(labels, power=0.5)  # square-root sampling: shares 8**0.5 : 4**0.5 : 1
    shares = torch.zeros(3, dtype=torch.float64).index_add_(0, labels, root)
    assert torch.allclose(shares, torch.tensor([8**0.5, 2.0, 1.0], dtype=torch.float64) / (8**0.5 + 3))
    assert torch.allclose(imbalance.class_balanced_weights(labels, power=0),
                          torch.full((13,), 1 / 13, dtype=torch.float64))


def test_loader_with_class_balanced_weights_draws_the_classes_near_uniformly():
    labels = torch.tensor([c for c, n in enumerate(imbalance.long_tail_counts(400, 5, 40)) for _ in range(n)])
    images = torch.zeros(labels.numel(), 3, 8, 8, dtype=torch.uint8)
    loader = DeviceLoader(images, labels, batch_size=100, mean=(0, 0, 0), std=(1, 1, 1), train=True,
                          sample_weights=imbalance.class_balanced_weights(labels), seed=1)
    drawn = torch.cat([y for _ in range(20) for _, y in loader])  # 20 epochs
    shares = torch.bincount(drawn, minlength=5).double() / drawn.numel()
    assert labels.numel() == 400 + 159 + 63 + 25 + 10  # 400 / 40 ** (1/4) = 159.05
    assert (shares - 0.2).abs().max() < 0.02, shares  # +-0.02 is more than 4 standard errors here
    plain = torch.cat([y for _, y in DeviceLoader(images, labels, batch_size=100, mean=(0, 0, 0), std=(1, 1, 1),
                                                    train=True)])
    assert torch.bincount(plain, minlength=5)[0] > 0.5 * plain.numel()  # without weights the head dominates


def test_weighted_loader_is_seeded_draws_with_replacement_and_follows_zero_weights():
    labels = torch.arange(20) % 4
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 8, 8).contiguous()
    weights = (labels != 3).double()  # class 3 never drawn

    def rows(seed, epoch):
        loader = DeviceLoader(images, labels, batch_size=5, mean=(0, 0, 0), std=(1 / 255,) * 3, train=True,
                              augment=no_augment(), sample_weights=weights, seed=seed)
        loader.set_epoch(epoch)
        return torch.cat([r for r, _ in loader.plan()])

    assert torch.equal(rows(0, 0), rows(0, 0))
    assert not torch.equal(rows(0, 0), rows(0, 1))
    assert not bool((labels[rows(0, 0)] == 3).any())
    assert rows(0, 0).numel() == 20 and rows(0, 0).unique().numel() < 20  # with replacement
    # the batch really holds the drawn images
    loader = DeviceLoader(images, labels, batch_size=20, mean=(0, 0, 0), std=(1 / 255,) * 3, train=True,
                          augment=no_augment(), sample_weights=weights)
    (r, draws), = loader.plan()
    x, y = loader.batch(r, draws)
    assert torch.equal(x[:, 0, 0, 0].round().long(), r) and torch.equal(y, labels[r])


def no_augment():
    from resnet_lessons.data import Augment

    return Augment(crop_padding=0, flip=False)


@pytest.mark.parametrize("weights, train, message", [
    (torch.ones(7), True, "shape"), (-torch.ones(8), True, "non-negative"), (torch.zeros(8), True, "not all zero"),
    (torch.full((8,), math.nan), True, "finite"), (torch.ones(8), False, "train=False"),
])
def test_loader_rejects_bad_sample_weights(weights, train, message):
    with pytest.raises(ValueError, match=message):
        DeviceLoader(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64), batch_size=4,
                     mean=(0, 0, 0), std=(1, 1, 1), train=train, sample_weights=weights)


# --- re-weighting and losses ----------------------------------------------------------------------


def test_effective_number_and_class_weights_by_hand():
    # beta = 0.9: E_1 = 1, E_2 = 1 + 0.9 = 1.9, E_3 = 1 + 0.9 + 0.81 = 2.71
    assert torch.allclose(imbalance.effective_number([1, 2, 3], 0.9), torch.tensor([1, 1.9, 2.71], dtype=torch.float64))
    raw = torch.tensor([1 / 1, 1 / 1.9, 1 / 2.71])
    assert torch.allclose(imbalance.class_weights([1, 2, 3], "effective", beta=0.9), raw * 3 / raw.sum())
    assert torch.allclose(imbalance.class_weights([1, 2, 4], "inverse"), torch.tensor([1, 0.5, 0.25]) * 3 / 1.75)
    assert torch.allclose(imbalance.class_weights([5, 50, 500], "effective", beta=0.0), torch.ones(3))
    near_inverse = imbalance.class_weights([5, 50, 500], "effective", beta=1 - 1e-9)
    assert torch.allclose(near_inverse, imbalance.class_weights([5, 50, 500], "inverse"), rtol=1e-4)
    with pytest.raises(ValueError, match="beta"):
        imbalance.effective_number([1, 2], 1.0)
    with pytest.raises(ValueError, match="at least one image"):
        imbalance.class_weights([3, 0], "inverse")
    with pytest.raises(ValueError, match="scheme"):
        imbalance.class_weights([3, 1], "sqrt")


def test_weighted_cross_entropy_is_torchs_weighted_mean():
    logits, labels = logits_labels()
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    loss = imbalance.WeightedCrossEntropy(weight)(logits, labels)
    per_image = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(loss, (weight[labels] * per_image).sum() / weight[labels].sum())
    assert torch.allclose(imbalance.WeightedCrossEntropy(torch.ones(5))(logits, labels),
                          F.cross_entropy(logits, labels))


def test_focal_loss_with_gamma_0_is_the_cross_entropy_and_matches_a_hand_calculation():
    logits, labels = logits_labels()
    assert torch.allclose(imbalance.FocalLoss(gamma=0)(logits, labels), F.cross_entropy(logits, labels))
    # one image, logits (0, ln 3): p = (1/4, 3/4); label 1, gamma 2: -(1/4)^2 ln(3/4)
    one = torch.tensor([[0.0, math.log(3)]])
    assert math.isclose(imbalance.FocalLoss(2)(one, torch.tensor([1])).item(), -(0.25**2) * math.log(0.75),
                        rel_tol=1e-6)
    alpha = torch.tensor([2.0, 0.5])
    assert math.isclose(imbalance.FocalLoss(2, alpha)(one, torch.tensor([0])).item(),
                        -2.0 * 0.75**2 * math.log(0.25), rel_tol=1e-6)
    # focusing: a larger gamma lowers the loss of well-classified images far more than of badly classified ones
    easy, hard = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    y = torch.tensor([0])
    assert imbalance.FocalLoss(2)(easy, y) / F.cross_entropy(easy, y) < 0.01
    assert imbalance.FocalLoss(2)(hard, y) / F.cross_entropy(hard, y) > 0.9


def test_logit_adjusted_loss_reduces_to_the_cross_entropy_and_adds_the_log_prior():
    logits, labels = logits_labels()
    prior = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    assert torch.allclose(imbalance.LogitAdjustedLoss(prior, tau=0)(logits, labels), F.cross_entropy(logits, labels))
    assert torch.allclose(imbalance.LogitAdjustedLoss(torch.ones(5), tau=1)(logits, labels),
                          F.cross_entropy(logits, labels))  # a uniform prior adds the same number to every logit
    assert torch.allclose(imbalance.LogitAdjustedLoss(prior * 8, tau=2)(logits, labels),
                          F.cross_entropy(logits + 2 * prior.log(), labels), atol=1e-6)  # the prior is normalised
    with pytest.raises(ValueError, match="positive"):
        imbalance.LogitAdjustedLoss([0.5, 0.0])


def test_post_hoc_adjustment_subtracts_the_log_prior():
    logits = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    prior = torch.tensor([0.9, 0.1])
    adjusted = imbalance.adjust_logits(logits, prior)
    assert torch.allclose(adjusted, logits - torch.log(prior))
    assert adjusted.argmax(1).tolist() == [1, 1]  # the rare class wins where the plain logits were close
    assert torch.allclose(imbalance.adjust_logits(logits, prior, tau=0), logits)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        imbalance.adjust_logits(torch.zeros(3, 4), prior)


def test_make_loss_by_name():
    counts = [100, 10, 1]
    assert isinstance(imbalance.make_loss("ce", counts), torch.nn.CrossEntropyLoss)
    w = imbalance.make_loss("inverse", counts).weight
    assert torch.allclose(w, imbalance.class_weights(counts, "inverse"))
    assert imbalance.make_loss("focal", counts, gamma=1.5).gamma == 1.5
    la = imbalance.make_loss("logit_adjusted", counts)
    assert torch.allclose(la.log_prior.exp(), torch.tensor(counts) / 111.0)
    with pytest.raises(ValueError, match="unknown loss"):
        imbalance.make_loss("ldam", counts)


# --- metrics ---------------------------------------------------------------------------------------


def test_recall_and_balanced_accuracy_match_scikit_learn():
    logits, labels = logits_labels(n=200, c=4, seed=1)
    labels = torch.where(torch.arange(200) < 120, torch.zeros_like(labels), labels)  # class 0 dominates
    preds = logits.argmax(1)
    assert torch.allclose(metrics.per_class_recall(logits, labels, 4),
                          torch.tensor(recall_score(labels, preds, average=None), dtype=torch.float64))
    assert math.isclose(metrics.balanced_accuracy(logits, labels), balanced_accuracy_score(labels, preds))
    assert math.isclose(metrics.balanced_accuracy(preds, labels, 4), balanced_accuracy_score(labels, preds))
    # a class absent from the labels is left out, as scikit-learn does
    few = torch.tensor([0, 0, 1, 1])
    assert math.isclose(metrics.balanced_accuracy(torch.tensor([0, 1, 1, 1]), few, 3), 0.75)
    assert math.isnan(metrics.per_class_recall(torch.tensor([0, 1, 1, 1]), few, 3)[2])


def test_recall_table_sorts_by_training_count_and_summarises_head_and_tail():
    labels = torch.arange(6).repeat(5)
    perfect = F.one_hot(labels, 6).float()
    always_0 = F.one_hot(torch.zeros_like(labels), 6).float()
    table = imbalance.recall_table({"perfect": perfect, "always 0": always_0}, labels, list("abcdef"),
                                   train_counts=[50, 1, 20, 10, 5, 2])
    assert list(table.index[:6]) == ["a", "c", "d", "e", "f", "b"]
    assert table.loc["balanced accuracy", "perfect"] == 1.0
    assert math.isclose(table.loc["balanced accuracy", "always 0"], 1 / 6)
    assert math.isclose(table.loc["head (most frequent third)", "always 0"], 0.5)
    assert table.loc["tail (rarest third)", "always 0"] == 0.0
    assert table.loc["tail (rarest third)", "train images"] == 3


# --- the training loop's hooks for a loss and a sampler ---------------------------------------------


class Recorder(torch.nn.Module):
    """A loss that remembers the labels it saw (and is the plain cross-entropy)."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.register_buffer("scale", torch.ones(()))

    def forward(self, logits, labels):
        self.seen.append(labels.clone())
        return F.cross_entropy(logits, labels) * self.scale


CFG = TrainConfig(model="resnet8", model_options={"width": 0.25}, epochs=2, batch_size=10, lr=0.1,
                  label_smoothing=0.0)


def test_fit_trains_with_the_given_loss_and_sample_weights():
    data = tiny_data()
    labels = data["train"].labels
    recorder = Recorder()
    runtime.seed_everything(0)
    result = fit(build_model("resnet8", width=0.25), data, CFG, device="cpu", loss_fn=recorder,
                 sample_weights=(labels < 2).double())
    seen = torch.cat(recorder.seen)
    assert len(recorder.seen) == result.steps == 2 * (len(labels) // 10)
    assert set(seen.tolist()) <= {0, 1}  # only the classes with weight were drawn
    assert result.history["val_loss"].notna().all()


def test_fit_with_the_default_loss_is_unchanged_by_the_new_arguments():
    data = tiny_data()
    runtime.seed_everything(0)
    a = build_model("resnet8", width=0.25)
    runtime.seed_everything(0)
    b = build_model("resnet8", width=0.25)
    ha = fit(a, data, CFG, device="cpu").history
    hb = fit(b, data, CFG, device="cpu", loss_fn=torch.nn.CrossEntropyLoss()).history
    assert torch.allclose(torch.tensor(ha["train_loss"].values), torch.tensor(hb["train_loss"].values))


def test_fit_refuses_a_loss_together_with_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        fit(build_model("resnet8", width=0.25), tiny_data(), TrainConfig(label_smoothing=0.1),
            device="cpu", loss_fn=imbalance.FocalLoss())


def test_recall_by_class_plots_the_class_rows_in_table_order():
    from resnet_lessons import plots

    labels = torch.arange(3).repeat(4)
    table = imbalance.recall_table({"perfect": F.one_hot(labels, 3).float()}, labels, ["x", "y", "z"], [5, 50, 20])
    fig = plots.recall_by_class(table)
    ax = next(a for a in fig.axes if a.get_lines())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["y", "z", "x"]
    assert list(ax.get_lines()[0].get_ydata()) == [1.0, 1.0, 1.0]
