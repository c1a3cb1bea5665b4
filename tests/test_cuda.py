"""The fast checks that need a GPU: each compares the GPU's result with the CPU's on the same input.

Skipped without CUDA. ``bench/gpu_check.sh`` runs them on a GPU machine; ``RESNET_LESSONS_TEST_DEVICE=cpu``
runs them on the CPU (that is how the script's own test checks them end to end).
"""

import os

import pytest
import torch
from tiny import tiny_data

from resnet_lessons import checkpoints, evaluate, train
from resnet_lessons.data import DeviceLoader
from resnet_lessons.models import build_model

DEVICE = os.environ.get("RESNET_LESSONS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (set RESNET_LESSONS_TEST_DEVICE to force one)")


def test_the_device_loader_gives_the_same_augmented_batches_as_on_the_cpu():
    data = tiny_data(size=16)
    make = lambda device: DeviceLoader(data.train.images, data.train.labels, batch_size=16, mean=data.mean,  # noqa: E731
                                       std=data.std, device=device, train=True, seed=3)
    for (x_cpu, y_cpu), (x_dev, y_dev) in zip(make("cpu"), make(DEVICE)):
        assert x_dev.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(x_dev.cpu(), x_cpu)
        assert torch.equal(y_dev.cpu(), y_cpu)


def test_inference_on_the_device_matches_the_cpu():
    data = tiny_data(size=16)
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, width=0.5)
    on_cpu = evaluate.infer(model, data.val.images, mean=data.mean, std=data.std, device="cpu")
    on_device = evaluate.infer(model, data.val.images, mean=data.mean, std=data.std, device=DEVICE)
    torch.testing.assert_close(on_device, on_cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_a_budgeted_fit_on_the_device_learns_ends_in_time_and_saves_a_cpu_loadable_checkpoint(tmp_path, precision):
    data = tiny_data(per_class=24, size=16)
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, width=0.5)
    cfg = train.TrainConfig(model="resnet8", model_options={"width": 0.5}, batch_size=16, lr=0.1,
                            budget_seconds=8.0, precision=precision)
    result = train.fit(model, data, cfg, device=DEVICE, checkpoint_dir=tmp_path)
    assert result.seconds <= cfg.budget_seconds and result.epochs_trained >= 1
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never changes the weights
    restored = checkpoints.load(result.checkpoint).build_model("cpu")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value.cpu())


def test_flip_tta_on_the_device_matches_the_cpu():
    data = tiny_data(size=16)
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, width=0.5).eval()
    scores = [evaluate.flip_tta_accuracy(model, data.val.images, data.val.labels, mean=data.mean, std=data.std,
                                      device=device, batch_size=64, channels_last=False, precision="fp32")
              for device in ("cpu", DEVICE)]
    assert scores[0] == pytest.approx(scores[1], abs=1 / len(data.val))
