"""Export (ONNX, TorchScript) against PyTorch, the model card, quantisation, pruning, the drift check, and the
``export`` command. The references: PyTorch's own outputs, onnxruntime and torch.jit run directly, hand counts."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from resnet_lessons import checkpoints, cli, compress, export, monitor
from resnet_lessons.data import channel_stats, make_synthetic, normalise
from resnet_lessons.evaluate import evaluate
from resnet_lessons.models import build_model

CLASSES = tuple(f"class{i}" for i in range(10))


@pytest.fixture(scope="module")
def images():
    """Synthetic images (the smoke profile's stand-in): 40 per class, uint8 [400, 3, 32, 32], and labels."""
    data = make_synthetic(40, image_size=32, seed=1)
    return data.images, data.labels


@pytest.fixture(scope="module")
def stats(images):
    return channel_stats(images[0])


@pytest.fixture(scope="module")
def model(images, stats):
    """resnet8 with BatchNorm statistics from real images (not the 0/1 of a fresh network)."""
    torch.manual_seed(0)
    net = build_model("resnet8", num_classes=10)
    net.train()
    with torch.no_grad():
        for start in range(0, 400, 100):
            net(normalise(images[0][start : start + 100], *stats))
    return net.eval()


@pytest.fixture(scope="module")
def card(stats):
    return export.ModelCard(model_name="resnet8", classes=CLASSES, mean=stats[0], std=stats[1], input_size=(3, 32, 32))


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, model, card, images):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export.export_model(model, path, format="onnx", card=card, images=images[0][:64])


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory, model, stats):
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    payload = checkpoints.make_checkpoint(model, model_name="resnet8", model_options={}, classes=CLASSES,
                                          mean=stats[0], std=stats[1], extra={"data": {"image_size": 32}})
    return checkpoints.save(payload, path)


def _reference(model, images, stats):
    with torch.no_grad():
        return model(normalise(images, *stats))


# --- export -------------------------------------------------------------------------------------------


def test_onnx_matches_pytorch_when_run_by_onnxruntime(onnx_file, model, images, stats):
    import onnxruntime as ort

    assert onnx_file.comparison.ok and onnx_file.comparison.agreement == 1.0
    session = ort.InferenceSession(str(onnx_file.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (images[0][:1], images[0][100:137]):  # the batch dimension is dynamic
        x = normalise(batch, *stats)
        got = session.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, _reference(model, batch, stats).numpy(), atol=1e-4, rtol=1e-4)


def test_torchscript_matches_pytorch_when_loaded_without_the_library_code(tmp_path, model, card, images, stats):
    result = export.export_model(model, tmp_path / "model.pt", format="torchscript", card=card, images=images[0][:64])
    assert result.comparison.ok and result.comparison.max_abs_diff < 1e-5
    loaded = torch.jit.load(str(result.path))
    for batch in (images[0][:1], images[0][200:250]):
        with torch.no_grad():
            got = loaded(normalise(batch, *stats))
        torch.testing.assert_close(got, _reference(model, batch, stats), atol=1e-5, rtol=1e-5)


def test_exported_model_predicts_from_uint8_images_with_its_card(onnx_file, model, images, stats):
    exported = export.load_exported(onnx_file.path)
    logits = exported.predict(images[0][:50], batch_size=16)
    torch.testing.assert_close(logits, _reference(model, images[0][:50], stats), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, 3, 32, 32\]"):
        exported.predict(images[0][:2, :, :16, :16])


def test_card_round_trips_through_the_sidecar_and_inside_the_file(tmp_path, onnx_file, card):
    import onnx

    assert onnx_file.sidecar == export.sidecar_path(onnx_file.path) == onnx_file.path.with_name("model.onnx.json")
    saved = export.read_card(onnx_file.path)
    assert saved == export.ModelCard(**{**card.__dict__, "export_format": "onnx"})
    raw = json.loads(onnx_file.sidecar.read_text())
    assert raw["classes"] == list(CLASSES) and raw["input_size"] == [3, 32, 32] and raw["model_name"] == "resnet8"
    assert raw["mean"] == pytest.approx(card.mean) and raw["library_version"]
    props = {p.key: p.value for p in onnx.load(str(onnx_file.path)).metadata_props}
    assert json.loads(props["classes"]) == list(CLASSES)
    # without the sidecar the copy inside the file is used
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(onnx_file.path.read_bytes())
    assert export.read_card(alone) == saved
    written = export.write_card(tmp_path / "x.onnx", card)
    assert export.ModelCard.from_json(written.read_text()) == card


def test_torchscript_carries_its_card_inside(tmp_path, model, card, images):
    result = export.export_model(model, tmp_path / "m.pt", format="torchscript", card=card, images=images[0][:8])
    result.sidecar.unlink()
    assert export.read_card(result.path).classes == CLASSES


def test_card_text_is_its_dict_as_json(tmp_path, card):
    written = export.write_card(tmp_path / "m.pt", card)
    assert written.read_text() == json.dumps(card.as_dict(), indent=2) + "\n"
    assert card.as_dict()["classes"] == CLASSES and card.as_dict()["format"] == "resnet-lessons-export"


def test_bad_cards_are_named(tmp_path):
    (tmp_path / "m.onnx.json").write_text("{not json")
    with pytest.raises(export.ExportError, match="not valid JSON"):
        export.read_card(tmp_path / "m.onnx")
    (tmp_path / "m.onnx.json").write_text(json.dumps({"classes": []}))
    with pytest.raises(export.ExportError, match="not a resnet-lessons model card"):
        export.read_card(tmp_path / "m.onnx")
    with pytest.raises(export.ExportError, match="does not exist"):
        export.load_exported(tmp_path / "missing.onnx")


def test_a_failed_verification_leaves_the_old_file_and_no_debris(tmp_path, model, card, images):
    target = tmp_path / "model.pt"
    target.write_bytes(b"the user's file")
    with pytest.raises(export.ExportError, match="does not reproduce"):
        export.export_model(model, target, format="torchscript", card=card, images=images[0][:8], tolerance=-1.0)
    assert target.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_export_rejects_bad_arguments(tmp_path, model, card, images):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export.export_model(model, tmp_path / "m", format="tflite", card=card, images=images[0][:4])
    with pytest.raises(export.ExportError, match="is a folder"):
        export.export_model(model, tmp_path, format="torchscript", card=card, images=images[0][:4])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(export.ExportError, match="cannot create the folder"):
        export.export_model(model, blocker / "m.pt", format="torchscript", card=card, images=images[0][:4])


# --- smaller models -------------------------------------------------------------------------------------


def test_static_int8_quantisation_runs_shrinks_and_stays_close(model, images, stats):
    quantised = compress.quantize_static(model, images[0][:128], mean=stats[0], std=stats[1], batches=2)
    kinds = {type(m).__module__ for m in quantised.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") or k.startswith("torch.ao.nn.intrinsic.quantized") for k in kinds)
    x = normalise(images[0][200:300], *stats)
    with torch.no_grad():
        expected, got = model(x), quantised(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    assert compress.serialized_size(quantised)[0] < 0.5 * compress.serialized_size(model)[0]
    assert torch.equal(_reference(model, images[0][:4], stats), _reference(model, images[0][:4], stats))  # untouched


def test_resnet9_the_cpu_profile_network_exports_and_quantises(tmp_path, images, stats):
    torch.manual_seed(0)
    net = build_model("resnet9", width=0.25).train()
    with torch.no_grad():
        for start in range(0, 400, 100):
            net(normalise(images[0][start : start + 100], *stats))  # real BatchNorm statistics
    net.eval()
    card = export.ModelCard(model_name="resnet9", classes=CLASSES, mean=stats[0], std=stats[1], input_size=(3, 32, 32))
    for fmt in ("onnx", "torchscript"):
        result = export.export_model(net, tmp_path / f"m.{fmt}", format=fmt, card=card, images=images[0][:32])
        assert result.comparison.ok and result.path.exists()  # export_model raises when the file does not match
    quantised = compress.quantize_static(net, images[0][:128], mean=stats[0], std=stats[1], batches=2)
    x = normalise(images[0][200:300], *stats)
    with torch.no_grad():
        expected, got = net(x), quantised(x)
    assert (got - expected).abs().max() < 0.15 * expected.abs().max()


def test_quantisation_runs_the_network_input_check_and_leaves_the_model_alone(model, images, stats):
    with pytest.raises(ValueError, match="image of 2x2 is too small for resnet8"):
        compress.quantize_static(model, images[0][:64, :, :2, :2], mean=stats[0], std=stats[1], batches=1)
    assert "check_input" not in vars(model) and type(model).__name__ == "ResNet"


def test_latency_is_positive_and_restores_threads_and_mode(model, images, stats):
    threads, statistics = torch.get_num_threads(), model.bn1.running_mean.clone()
    model.train()
    try:
        assert compress.latency_ms(model, normalise(images[0][:1], *stats), repeats=3, threads=1) > 0
        assert model.training and torch.get_num_threads() == threads
        assert torch.equal(model.bn1.running_mean, statistics)  # timed in eval mode: BatchNorm untouched
    finally:
        model.eval()


def test_dynamic_quantisation_replaces_only_the_linear_layer(model, images, stats):
    quantised = compress.quantize_dynamic(model)
    assert type(quantised.fc).__name__ == "Linear" and "dynamic" in type(quantised.fc).__module__
    assert isinstance(quantised.conv1, nn.Conv2d)
    with torch.no_grad():
        got = quantised(normalise(images[0][:20], *stats))
    torch.testing.assert_close(got, _reference(model, images[0][:20], stats), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("amount", [0.3, 0.8])
def test_global_pruning_reaches_the_asked_sparsity_with_the_smallest_weights(model, amount):
    pruned = compress.prune_global(model, amount)
    weights = torch.cat([m.weight.detach().flatten() for m, _ in compress.prunable_parameters(model)])
    k = round(amount * weights.numel())
    assert compress.sparsity(pruned) == pytest.approx(k / weights.numel())
    # hand check: the zeros are the k weights of smallest magnitude over all layers together
    kept = torch.cat([m.weight.detach().flatten() for m, _ in compress.prunable_parameters(pruned)])
    threshold = weights.abs().kthvalue(k).values
    assert bool((weights.abs()[kept != 0] >= threshold).all()) and int((kept == 0).sum()) == k
    # permanent: plain parameters, no masks or hooks; the original is untouched
    assert not any(name.endswith(("_orig", "_mask")) for name in pruned.state_dict())
    assert all(not m._forward_pre_hooks for m in pruned.modules())
    assert compress.sparsity(model) == 0.0
    with pytest.raises(ValueError, match="amount must be in"):
        compress.prune_global(model, 1.0)


def test_compare_variants_measures_each_variant(model, images, stats):
    variants = {"fp32": model, "pruned": compress.prune_global(model, 0.5)}
    table = compress.compare_variants(variants, images[0][:100], images[1][:100], mean=stats[0], std=stats[1],
                                      latency_repeats=3)
    assert list(table.index) == ["fp32", "pruned"]
    assert {"accuracy", "agrees with fp32", "size_kB", "zipped_kB", "sparsity", "latency_ms"} <= set(table.columns)
    reference = evaluate(model, images[0][:100], images[1][:100], classes=CLASSES, mean=stats[0], std=stats[1])
    assert table.loc["fp32", "accuracy"] == pytest.approx(reference.accuracy)
    assert table.loc["fp32", "agrees with fp32"] == 1.0
    assert table.loc["pruned", "sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert table.loc["pruned", "zipped_kB"] < table.loc["fp32", "zipped_kB"]  # zeros compress; dense size does not
    assert (table["latency_ms"] > 0).all()


# --- drift ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drift_data():
    train = make_synthetic(100, image_size=32, seed=2).images
    fresh = make_synthetic(30, image_size=32, seed=3).images  # new images of the same distribution
    return monitor.DriftReference.fit(train), fresh


def test_image_features_match_a_numpy_hand_calculation(images):
    batch = images[0][:5]
    array = batch.numpy().astype(np.float64) / 255
    expected = np.concatenate([array.mean(axis=(2, 3)), array.std(axis=(2, 3))], axis=1)
    np.testing.assert_allclose(monitor.image_features(batch).numpy(), expected, atol=1e-12)
    assert monitor.psi(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])) == 0.0


def test_same_distribution_is_not_flagged(drift_data):
    reference, fresh = drift_data
    for start in range(0, 300, 60):
        report = reference.check(fresh[start : start + 60])
        assert not report.drifted, report.summary()
    assert not reference.check(fresh).drifted


@pytest.mark.parametrize("kind", ["brightness", "contrast", "colour", "noise", "blur"])
def test_shifted_images_are_flagged(drift_data, kind):
    reference, fresh = drift_data
    report = reference.check(monitor.shift_images(fresh[:100], kind))
    assert report.drifted, report.summary()
    assert report.score > report.threshold == pytest.approx(max(5 / 10, 0.05))


def test_a_flip_changes_no_statistic_so_it_passes(drift_data):
    reference, fresh = drift_data
    assert not reference.check(monitor.shift_images(fresh, "flip")).drifted


def test_drift_reference_round_trips_as_json(drift_data):
    reference, fresh = drift_data
    again = monitor.DriftReference.from_dict(json.loads(json.dumps(reference.as_dict())))
    assert again == reference
    assert again.check(fresh).score == reference.check(fresh).score
    with pytest.raises(ValueError, match="unknown shift 'rain'"):
        monitor.shift_images(fresh, "rain")


def test_drift_report_as_dict_is_one_table_row(drift_data):
    reference, fresh = drift_data
    row = reference.check(fresh[:60]).as_dict()
    assert list(row) == ["images", "score", "threshold", "drifted", "worst feature", "brightness PSI"]
    assert row["images"] == 60 and row["drifted"] is False


# --- the command line -----------------------------------------------------------------------------------


def test_cli_exports_torchscript_and_verifies_on_real_images(tmp_path, checkpoint_file, capsys):
    out = tmp_path / "deploy" / "model.pt"
    code = cli.main(["export", str(checkpoint_file), "--format", "torchscript", "--out", str(out),
                     "--data", "synthetic", "--verify-images", "50"])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists() and export.sidecar_path(out).exists()
    assert str(out) in printed and "50 synthetic val images" in printed
    assert export.read_card(out).classes == CLASSES


def test_cli_exports_onnx_and_keeps_an_existing_file_when_verification_fails(tmp_path, checkpoint_file, capsys):
    out = tmp_path / "model.onnx"
    code = cli.main(["export", str(checkpoint_file), "--format", "onnx", "--out", str(out), "--verify-images", "8"])
    assert code == 0
    assert "random images" in capsys.readouterr().out
    before = out.read_bytes()
    code = cli.main(["export", str(checkpoint_file), "--format", "onnx", "--out", str(out), "--tolerance", "1e-30",
                     "--force"])
    error = capsys.readouterr().err
    assert code == 1 and "does not reproduce" in error and len(error.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_cli_missing_checkpoint_is_one_line_and_exit_1(tmp_path, capsys):
    code = cli.main(["export", str(tmp_path / "nope.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    error = capsys.readouterr().err
    assert code == 1 and "does not exist" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_cli_unknown_format_is_a_usage_error(tmp_path, checkpoint_file, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["export", str(checkpoint_file), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert stop.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


def test_cli_formats_match_the_library():
    action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["export"]._actions
                  if a.dest == "format")
    assert tuple(action.choices) == export.FORMATS


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_cli_unwritable_output_is_one_line_and_exit_1(tmp_path, checkpoint_file, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "model.pt" if where == "under_a_file" else tmp_path
    code = cli.main(["export", str(checkpoint_file), "--format", "torchscript", "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 1 and len(error.strip().splitlines()) == 1
    assert ("cannot create the folder" in error) if where == "under_a_file" else ("is a folder" in error)


def test_a_channels_last_model_fresh_from_a_bf16_fit_can_be_pruned_and_keeps_its_predictions():
    from resnet_lessons import compress

    model = build_model("resnet8", width=0.5).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    model.to(memory_format=torch.channels_last)  # what train.fit leaves with bf16 on a CPU
    pruned = compress.prune_global(model, 0.5)
    assert compress.sparsity(pruned) > 0.4
    torch.testing.assert_close(compress.prune_global(model, 0.0)(x), expected, rtol=1e-4, atol=1e-5)
