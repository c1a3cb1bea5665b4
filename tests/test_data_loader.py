"""DeviceLoader against a straightforward per-image reference, shuffles, last batches and DDP shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from resnet_lessons.data import Augment, DeviceLoader, ImageSet, normalise, torchvision_loader

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def images_labels(n: int = 50, size: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return images, torch.arange(n, dtype=torch.int64) % 5


def reference(image: torch.Tensor, dy: int, dx: int, flip: bool, cy: int, cx: int, aug: Augment) -> np.ndarray:
    """One image, one draw, the slow and obvious way: pad, crop, flip, normalise, cut out."""
    p = aug.crop_padding
    hwc = image.permute(1, 2, 0).numpy()
    padded = np.pad(hwc, ((p, p), (p, p), (0, 0)), mode="reflect")
    h, w = hwc.shape[:2]
    crop = padded[dy : dy + h, dx : dx + w]
    if flip:
        crop = crop[:, ::-1]
    x = (crop.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)
    if aug.cutout:
        y0, x0 = cy - aug.cutout // 2, cx - aug.cutout // 2
        x[max(0, y0) : max(0, y0 + aug.cutout), max(0, x0) : max(0, x0 + aug.cutout)] = 0
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("aug", [Augment(), Augment(crop_padding=2, flip=False), Augment(cutout=5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_match_the_per_image_reference(aug, channels_last):
    images, labels = images_labels()
    loader = DeviceLoader(images, labels, batch_size=16, mean=MEAN, std=STD, train=True, augment=aug,
                          seed=3, channels_last=channels_last)
    plan = list(loader.plan())
    batches = list(loader)
    assert len(batches) == len(plan) == len(loader) == 3  # 50 // 16, the partial batch dropped
    for (rows, d), (x, y) in zip(plan, batches):
        assert x.dtype == torch.float32 and x.shape == (16, 3, 12, 12)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(y, labels[rows])
        for b, row in enumerate(rows.tolist()):
            expect = reference(images[row], int(d.dy[b]), int(d.dx[b]), bool(d.flip[b]), int(d.cy[b]),
                               int(d.cx[b]), aug)
            np.testing.assert_allclose(x[b].numpy(), expect, atol=1e-5)
    flips = torch.cat([d.flip for _, d in plan])
    assert flips.any() and not flips.all() if aug.flip else not flips.any()


def test_crop_and_flip_agree_with_torchvision():
    images, labels = images_labels(n=8)
    aug = Augment(crop_padding=4)
    loader = DeviceLoader(images, labels, batch_size=8, mean=(0, 0, 0), std=(1 / 255,) * 3, train=True,
                          augment=aug)
    (rows, d), = loader.plan()
    x, _ = loader.batch(rows, d)
    for b, row in enumerate(rows.tolist()):
        pil = TF.pad(Image.fromarray(images[row].permute(1, 2, 0).numpy()), 4, padding_mode="reflect")
        pil = TF.crop(pil, int(d.dy[b]), int(d.dx[b]), 12, 12)
        if d.flip[b]:
            pil = TF.hflip(pil)
        assert torch.equal(x[b].round().to(torch.uint8), TF.pil_to_tensor(pil))


def test_eval_is_in_order_unaugmented_and_equals_the_torchvision_path():
    images, labels = images_labels(n=21)
    fast = DeviceLoader(images, labels, batch_size=8, mean=MEAN, std=STD, train=False)
    assert len(fast) == 3  # the last partial batch is kept when evaluating
    slow = torchvision_loader(ImageSet(images, labels, tuple("abcde")), 8, MEAN, STD, train=False)
    xs, ys = zip(*fast)
    assert [len(y) for y in ys] == [8, 8, 5]
    assert torch.equal(torch.cat(ys), labels)
    for (x, y), (x2, y2) in zip(zip(xs, ys), slow):
        torch.testing.assert_close(x, x2, atol=1e-5, rtol=0)
        assert torch.equal(y, y2)


def test_the_loader_normalises_exactly_as_data_normalise_does():
    images, labels = images_labels(n=10)
    (x, _), = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=False)
    assert torch.equal(x, normalise(images, MEAN, STD))  # one multiply-add, from one place


def test_torchvision_train_path_makes_normalised_batches():
    images, _ = images_labels(n=40)
    labels = torch.arange(40)  # unique labels tell which image each output came from
    classes = tuple(str(i) for i in range(40))
    loader = torchvision_loader(ImageSet(images, labels, classes), 16, MEAN, STD, train=True,
                                augment=Augment(cutout=4))
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (16, 3, 12, 12)
    plain = torchvision_loader(ImageSet(images, labels, classes), 40, MEAN, STD, train=True,
                               augment=Augment(crop_padding=0, flip=False))
    (x, y), = plain
    assert sorted(y.tolist()) != y.tolist()  # shuffled
    (expect, _), = DeviceLoader(images, labels, batch_size=40, mean=MEAN, std=STD, train=False)
    torch.testing.assert_close(x, expect[y], atol=1e-5, rtol=0)


def test_shuffle_is_seeded_per_epoch():
    images, labels = images_labels()
    def rows_of(loader):
        return torch.cat([rows for rows, _ in loader.plan()])
    a = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=1)
    b = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=1)
    assert torch.equal(rows_of(a), rows_of(b))
    first = rows_of(a)
    list(a)  # iterating moves on one epoch
    assert not torch.equal(rows_of(a), first)
    a.set_epoch(0)
    assert torch.equal(rows_of(a), first)
    c = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=2)
    assert not torch.equal(rows_of(c), first)
    assert sorted(first.tolist()) == list(range(50))


@pytest.mark.parametrize("drop_last, steps, last", [(None, 3, 16), (False, 4, 2), (True, 3, 16)])
def test_last_partial_batch(drop_last, steps, last):
    images, labels = images_labels()
    loader = DeviceLoader(images, labels, batch_size=16, mean=MEAN, std=STD, train=True, drop_last=drop_last)
    sizes = [len(y) for _, y in loader]
    assert len(loader) == len(sizes) == steps and sizes[-1] == last


@pytest.mark.parametrize("train", [True, False])
def test_ddp_shards_are_disjoint_and_equal_in_steps(train):
    images, labels = images_labels(n=50)
    world = 3
    loaders = [DeviceLoader(images, labels, batch_size=4, mean=MEAN, std=STD, train=train, seed=5,
                            rank=r, world_size=world) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(2)
    shards = [torch.cat([rows for rows, _ in loader.plan()]).tolist() for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1
    assert len({len(s) for s in shards}) == 1
    if train:  # 50 // 3 = 16 each, disjoint, two left out this epoch
        assert all(len(s) == 16 for s in shards)
        assert len(set().union(*map(set, shards))) == 48
    else:  # every image seen; 50 -> 3 x 17 by wrapping one around
        assert set().union(*map(set, shards)) == set(range(50))
        assert sum(map(len, shards)) == 51
    assert sum(len(y) for _, y in loaders[1]) == len(shards[1]) - (len(shards[1]) % 4 if train else 0)


def test_bad_arguments():
    images, labels = images_labels()
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.float(), labels, batch_size=4, mean=MEAN, std=STD, train=True)
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(images, labels, batch_size=4, mean=MEAN, std=STD, train=True, rank=2, world_size=2)


def test_alternate_flip_shows_each_image_the_other_way_every_epoch():
    images, labels = images_labels()

    def flips_by_image(loader, epoch):
        loader.set_epoch(epoch)
        flips = torch.empty(len(images), dtype=torch.bool)
        for rows, draws in loader.plan():
            flips[rows] = draws.flip
        return flips

    loader = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=3,
                          augment=Augment(alternate_flip=True))
    epochs = [flips_by_image(loader, e) for e in range(4)]
    assert 0.2 < epochs[0].float().mean() < 0.8  # the first epoch's sides are random
    for before, after in zip(epochs, epochs[1:]):
        assert torch.equal(after, ~before)  # then every image turns over
    random_flips = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=3)
    assert not torch.equal(flips_by_image(random_flips, 1), ~flips_by_image(random_flips, 0))
    no_flips = DeviceLoader(images, labels, batch_size=10, mean=MEAN, std=STD, train=True, seed=3,
                            augment=Augment(flip=False, alternate_flip=True))
    assert not flips_by_image(no_flips, 1).any()


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_random_window_is_a_dense_slice_of_the_batch(channels_last):
    from resnet_lessons.data import random_window

    x = torch.randn(4, 3, 12, 10)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    tops_lefts = set()
    for seed in range(20):
        window = random_window(x, 8, torch.Generator().manual_seed(seed))
        assert window.shape == (4, 3, 8, 8)
        assert window.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        found = [(t, c) for t in range(5) for c in range(3) if torch.equal(window, x[..., t : t + 8, c : c + 8])]
        assert len(found) == 1
        tops_lefts.add(found[0])
    assert len(tops_lefts) > 5  # the place is random
    assert random_window(x, 20, torch.Generator()).shape == x.shape  # larger than the image: all of it
