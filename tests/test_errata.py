"""One guard per erratum of the article (book/appendix_errata.ipynb): each fix stays fixed."""

import ast
import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision

from resnet_lessons.data import IMAGENET_MEAN, IMAGENET_STD, load
from resnet_lessons.evaluate import infer, metrics_from_logits
from resnet_lessons.finetune import replace_head
from resnet_lessons.gradients import check_block_gradient
from resnet_lessons.models import BasicBlock, build_model, shape_trace
from resnet_lessons.train import TrainConfig, fit
from resnet_lessons.weights import imagenet_weights, load_weights_file

ROOT = Path(__file__).resolve().parents[1]


def _markdown(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


# 1
def test_head_replaces_the_1000_way_layer():
    backbone = torchvision.models.resnet18(weights=None)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        torch.nn.Linear(512, 10)(backbone(torch.zeros(2, 3, 32, 32)))  # the article's model
    replace_head(backbone, num_classes=10)
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("resnet18", num_classes=10).fc.out_features == 10


# 2
def test_no_library_code_uses_pretrained_true():
    offenders = [
        p.name
        for p in (ROOT / "src").rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.keyword) and node.arg == "pretrained"
    ]
    assert offenders == []


def test_imagenet_weights_come_from_the_weights_api():
    weights = imagenet_weights("resnet18")
    assert isinstance(weights, torchvision.models.ResNet18_Weights)


# 3
def test_pretrained_models_use_imagenet_statistics(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    weights = load_weights_file(path)
    assert tuple(weights.mean) == tuple(IMAGENET_MEAN) and tuple(weights.std) == tuple(IMAGENET_STD)
    assert tuple(imagenet_weights("resnet18").transforms().mean) == pytest.approx(IMAGENET_MEAN)


# 4
def test_cifar_stem_keeps_4x4_in_the_last_stage():
    def last_stage(stem: str) -> str:
        trace = shape_trace(build_model("resnet18", stem=stem), (1, 3, 32, 32)).set_index("stage")
        return trace.loc["layer4", "size"]

    assert last_stage("imagenet") == "1x1" and last_stage("cifar") == "4x4"


# 5
def test_basic_block_has_two_convolutions():
    block = BasicBlock(16, 16)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in block.modules()) == 2


# 7
def test_validation_split_is_stratified_and_disjoint():
    data = load("synthetic", val_per_class=7, synthetic_per_class=30, seed=1)
    assert set(data.val.counts().values()) == {7}
    train_images = {tuple(img.flatten()[:64].tolist()) for img in data.train.images}
    assert not any(tuple(img.flatten()[:64].tolist()) in train_images for img in data.val.images)


def _tiny_data():
    return load("synthetic", val_per_class=5, synthetic_per_class=20, seed=0)


# 8
def test_fit_records_every_epoch():
    data = _tiny_data()
    cfg = TrainConfig(model="resnet8", epochs=2, batch_size=50)
    result = fit(build_model("resnet8"), data, cfg, device=torch.device("cpu"))
    assert list(result.history["epoch"]) == [1, 2]
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "seconds"} <= set(result.history.columns)


# 9
def test_infer_does_not_depend_on_batch_mates():
    torch.manual_seed(0)
    model = build_model("resnet8").train()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    kwargs = dict(mean=(0.5,) * 3, std=(0.25,) * 3)
    alone = infer(model, images[:4], **kwargs)
    with_others = infer(model, images, **kwargs)[:4]
    torch.testing.assert_close(alone, with_others)
    assert model.training  # the mode is restored


# 10
def test_fit_moves_the_model_to_the_device():
    model = build_model("resnet8")
    device = torch.device("cpu")
    with mock.patch.object(model, "to", wraps=model.to) as moved:
        fit(model, _tiny_data(), TrainConfig(model="resnet8", epochs=1, batch_size=50), device=device)
    assert any(call.args and call.args[0] == device for call in moved.call_args_list)


# 11
def test_accuracy_is_not_truncated():
    labels = torch.arange(8) % 2
    logits = torch.nn.functional.one_hot(labels, 2).float()
    logits[0] = logits[0].flip(0)  # one mistake in eight
    assert metrics_from_logits(logits, labels, ["a", "b"]).accuracy == 0.875


# 12
def test_cifar10_is_cited_correctly():
    bib = (ROOT / "references.bib").read_text()
    assert "Learning Multiple Layers of Features from Tiny Images" in bib
    assert "large-scale labeled dataset" not in bib.lower()
    assert "{cite}`krizhevsky2009learning`" in _markdown(ROOT / "book" / "02_data.ipynb")


# 13
def test_the_book_does_not_list_generation_as_an_application():
    text = _markdown(ROOT / "book" / "09_applications.ipynb").lower()
    assert re.search(r"cannot[^.]{0,20}generate images", text)
    assert re.search(r"generative adversarial network|diffusion model", text)


# 14
def test_book_states_no_unmeasured_accuracy():
    """The article's "about 90%" is only ever quoted as the article's; the evaluation chapter glues its own."""
    for notebook in sorted((ROOT / "book").glob("[0-9]*.ipynb")):
        for paragraph in _markdown(notebook).split("\n\n"):
            for claim in re.finditer(r"(.)(about|around|roughly|~)\s?90\s?%", paragraph):
                quoted = claim.group(1) in "\"'“*"
                assert quoted or "article" in paragraph, f"{notebook.name}: {paragraph}"
    evaluation = _markdown(ROOT / "book" / "07_evaluation.ipynb")
    assert re.search(r"\{glue:text\}`[a-z_]*acc", evaluation)


# 15
def test_block_gradient_has_the_identity_term():
    torch.manual_seed(0)
    block = BasicBlock(8, 8).eval()
    result = check_block_gradient(block, torch.randn(2, 8, 8, 8))
    assert result["max error: y = F(x) + x"] < 1e-5
    assert result["norm: dL/dx (autograd)"] > 0


# 16
def test_a_block_can_widen_and_stride():
    from resnet_lessons.models import make_shortcut

    x = torch.zeros(2, 16, 8, 8)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)  # the article's block: stride 1, no shortcut
    with pytest.raises(RuntimeError, match="must match"):
        conv(x).add_(x)
    block = BasicBlock(16, 32, stride=2, downsample=make_shortcut(16, 32, 2, "B"))
    assert block(x).shape == (2, 32, 4, 4)
    assert build_model("resnet20").layer2[0](torch.zeros(1, 16, 32, 32)).shape == (1, 32, 16, 16)


# 17
def test_no_convolution_of_the_library_has_a_bias():
    from resnet_lessons.models import MODELS

    with_bias = [f"{name}.{module_name}" for name in MODELS
                 for module_name, module in build_model(name).named_modules()
                 if isinstance(module, torch.nn.Conv2d) and module.bias is not None]
    assert with_bias == []
