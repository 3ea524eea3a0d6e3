"""CI smoke test of the training pipeline: a few steps of a tiny model, export, ORT run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

# needs torch: the `train` extra, which CI installs (pip install -e '.[dev,train]')
from training import train
from training.synth import (
    BASE,
    FINETUNE,
    NEG_FAMILIES,
    Mix,
    _dot_pattern,
    _lattice_bg,
    _qr_matrix,
    family_sample,
    make_sample,
)


def test_synthetic_samples_are_reproducible_and_boxed() -> None:
    a = make_sample(7, 3, 160)
    b = make_sample(7, 3, 160)
    assert a.image.shape == (160, 160, 3)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.boxes, b.boxes)
    boxes = np.concatenate([make_sample(7, i, 160).boxes for i in range(12)])
    assert len(boxes) > 0, "12 samples without a single QR code"
    assert (boxes[:, 2] > boxes[:, 0]).all()
    assert (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all()
    assert (boxes <= 160).all()


def test_recipe_covers_qr_versions_1_to_40() -> None:
    rng = np.random.default_rng(11)
    sides = [_qr_matrix(rng).shape[0] for _ in range(150)]
    versions = {(side - 17) // 4 for side in sides}
    assert min(versions) <= 3
    assert max(versions) >= 33, f"no dense code in 150 draws: {sorted(versions)}"
    assert max(versions) <= 40


def test_dot_patterns_are_not_readable_as_codes() -> None:
    import zxingcpp

    rng = np.random.default_rng(5)
    for _ in range(20):
        dots = _dot_pattern(rng)
        img = np.kron(1 - dots, np.ones((3, 3), np.uint8)) * 255
        assert set(np.unique(dots)) <= {0, 1}
        assert not zxingcpp.read_barcodes(np.pad(img, 12, constant_values=255))


def test_negative_family_images_show_their_family_and_never_a_qr_code() -> None:
    import zxingcpp

    read: dict[str, set[str]] = {}
    for family in NEG_FAMILIES:
        for i in range(3):
            img = family_sample(4, i, 256, family)
            assert img.shape == (256, 256, 3)
            formats = {c.format.name for c in zxingcpp.read_barcodes(img)}
            assert "QRCode" not in formats, (family, i)
            read.setdefault(family, set()).update(formats)
    # the symbols are real: zxing-cpp reads the 2-D ones it wrote in some of the images
    assert "DataMatrix" in read["DataMatrix"] or "Aztec" in read["Aztec"], read


def test_lattice_backgrounds_are_not_readable_as_codes() -> None:
    import zxingcpp

    rng = np.random.default_rng(8)
    for _ in range(10):
        img = _lattice_bg(rng, 200, 240)
        assert img.shape == (200, 240, 3) and img.dtype == np.uint8
        assert img.std() > 10, "a lattice background came out flat"
        assert not zxingcpp.read_barcodes(img)


def test_finetune_steps_show_codes_larger_than_the_main_canvas() -> None:
    data = train.SynthDataset(3, batch=2, steps=1, ft_steps=12, imgsz=128, ft_sizes=[128, 192])
    assert len(data) == 26
    assert data[0][0].shape == (128, 128, 3)  # main phase
    sizes = {data[i][0].shape[0] for i in range(2, 26)}
    assert sizes == {128, 192}
    # one batch, one size: items 2k and 2k+1 share step k
    assert data[4][0].shape == data[5][0].shape
    big = [
        b
        for i in range(2, 26)
        if data[i][0].shape[0] == 192
        for b in data[i][1]
        if max(b[2] - b[0], b[3] - b[1]) > 128
    ]
    assert big, "no code larger than the 128 px main canvas in the 192 px fine-tune steps"


def test_finetune_mix_has_more_closeups_than_the_main_recipe() -> None:
    def closeups(mix: Mix) -> int:
        n = 0
        for i in range(300):
            boxes = make_sample(21, i, 160, mix).boxes
            n += int(any(b[2] - b[0] > 0.85 * 160 for b in boxes))
        return n

    assert closeups(FINETUNE) > closeups(BASE)


def test_hard_regions_mark_the_negative_symbols_and_lattice_frames() -> None:
    import zxingcpp

    symbols = frames = 0
    for i in range(60):
        s = make_sample(5, i, 192, FINETUNE)
        assert s.hard.shape[1:] == (4,) and s.hard.dtype == np.float32
        image = s.image.copy()
        for x1, y1, x2, y2 in s.boxes.round().astype(int):  # a code may sit on a big symbol
            image[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2] = 128
        for x1, y1, x2, y2 in s.hard.round().astype(int):
            if min(x1, y1) == 0 and abs(x1 + x2 - 192) <= 1 and abs(y1 + y2 - 192) <= 1:
                frames += 1  # a lattice background: the whole (letterboxed) canvas
            else:
                symbols += 1
            crop = image[max(y1, 0) : y2, max(x1, 0) : x2]
            found = zxingcpp.read_barcodes(crop, formats=zxingcpp.BarcodeFormat.QRCode)
            assert not found, f"sample {i}: a hard-negative region reads as a QR code"
    assert symbols >= 10 and frames >= 3, (symbols, frames)


def test_false_positives_on_hard_regions_weigh_more_in_the_class_loss() -> None:
    import torch

    from training.loss import detection_loss
    from training.model import anchor_points

    points, strides = anchor_points(128)
    code = torch.tensor([[8.0, 8.0, 48.0, 48.0]])
    hard = torch.tensor([[64.0, 64.0, 120.0, 120.0]])
    boxes = torch.zeros(1, len(points), 4)
    boxes[0, :, :2], boxes[0, :, 2:] = points - 20, points + 20
    on_hard = int(((points - 92).abs().sum(1)).argmin())
    elsewhere = int(((points - torch.tensor([100.0, 20.0])).abs().sum(1)).argmin())

    def cost_of_fp(fp: int, weight: float) -> float:
        """What one confident false positive at point ``fp`` adds to the class loss."""
        logits = torch.full((1, len(points), 1), -8.0)
        without = detection_loss(
            boxes, logits, [code], points, strides, hard=[hard], hard_weight=weight
        )[1]["cls"]
        logits[0, fp, 0] = 2.0
        with_fp = detection_loss(
            boxes, logits, [code], points, strides, hard=[hard], hard_weight=weight
        )[1]["cls"]
        return with_fp - without

    assert cost_of_fp(on_hard, 1.0) > 0
    assert abs(cost_of_fp(on_hard, 4.0) / cost_of_fp(on_hard, 1.0) - 4.0) < 0.01
    assert abs(cost_of_fp(elsewhere, 4.0) / cost_of_fp(elsewhere, 1.0) - 1.0) < 0.01


def test_smoke_training_exports_a_yolov8_layout_onnx(tmp_path: Path) -> None:
    import onnxruntime as ort

    assert train.main(["--smoke", "--out", str(tmp_path)]) == 0
    path = tmp_path / train.MODEL_NAME
    assert path.stat().st_size > 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.name == "images"
    assert not isinstance(inp.shape[0], int), "batch axis must be dynamic"
    out = sess.run(None, {"images": np.random.rand(2, 3, 128, 128).astype(np.float32)})[0]
    n = (128 // 8) ** 2 + (128 // 16) ** 2 + (128 // 32) ** 2
    assert out.shape == (2, 5, n)
    scores = out[:, 4]
    assert ((scores >= 0) & (scores <= 1)).all()
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["names"] == "{0: 'qr'}"
    assert meta["task"] == "detect"
    assert json.loads(meta["imgsz"]) == [128, 128]
    assert meta["stride"] == "32"
    history = json.loads((tmp_path / "history.json").read_text())
    # 6 main steps, then 2 fine-tune steps; each phase keeps its best checkpoint
    assert [(h["step"], h["phase"]) for h in history] == [(6, 1), (8, 2)]
    assert (tmp_path / "best-main.pt").is_file()
    # the crop verifier is trained on this detector's boxes and names it
    from core.vision.verifier import Verifier, file_sha256
    from training import verify

    verifier = Verifier(tmp_path / verify.MODEL_NAME)
    assert verifier.detector_sha256 == file_sha256(path)
    assert verifier.size == verify.SIZE and 0 < verifier.threshold < 1
    image = np.full((240, 320, 3), 255, np.uint8)
    scores = verifier.scores(image, np.array([[10, 10, 90, 90], [100, 50, 300, 230]]))
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def test_grown_context_blocks_start_small_learn_and_export() -> None:
    import torch

    from training.export import check_export, export_onnx
    from training.model import ModelConfig, QRDet

    torch.manual_seed(0)
    model = QRDet(ModelConfig.tiny()).eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        _, logits = model(x)
    new = model.grow()
    assert new and model.cfg.context and model.grow() == []
    with torch.no_grad():
        _, grown_logits = model(x)
    change = float((grown_logits - logits).abs().max())
    assert 0 < change < 0.5  # a small perturbation of the trained function
    model.train()
    boxes, grown_logits = model(x)
    (boxes.mean() + grown_logits.mean()).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in new)
    rebuilt = QRDet(ModelConfig(**model.cfg.__dict__))
    rebuilt.load_state_dict(model.state_dict())  # a grown checkpoint loads from its cfg
    # the dilated depthwise conv survives BatchNorm folding: ONNX Runtime matches torch
    path = export_onnx(model.eval(), Path(tempfile.mkdtemp()) / "grown.onnx", 128, check=False)
    assert check_export(model, path, 128) < 1e-3


def test_context_fine_tune_grows_the_model_and_resumes(tmp_path: Path) -> None:
    import torch

    smoke = ["--smoke", "--finetune-context", "--no-verifier", "--out", str(tmp_path)]
    assert train.main(smoke) == 0
    assert not (tmp_path / "qrsight-qrverify-v2.onnx").exists()  # --no-verifier
    ck = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert ck["cfg"]["context"] and ck["step"] == 8
    assert len(ck["opt"]["param_groups"]) == 4  # base decay/no-decay, then the blocks'
    assert any(k.startswith("ctx3.") for k in ck["ema"])
    best_main = torch.load(tmp_path / "best-main.pt", map_location="cpu", weights_only=False)
    assert not best_main["cfg"].get("context")
    # a run stopped inside the fine-tune resumes into the grown model and its 4 groups
    ck["step"] = 7
    torch.save(ck, tmp_path / "stopped.pt")
    resume = ["--resume", str(tmp_path / "stopped.pt")]
    assert train.main([*smoke, *resume]) == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history][-1] == 8
    assert torch.load(tmp_path / "last.pt", weights_only=False)["cfg"]["context"]


def test_scoring_counts_found_codes_false_positives_and_picks_a_threshold() -> None:
    from training.evaluate import best_operating_point, image_metrics, score_predictions

    def logit(p: float) -> float:
        return float(np.log(p / (1 - p)))

    code = np.array([[10, 10, 50, 50]], np.float32)
    none = np.zeros((0, 4), np.float32)
    val = [(np.zeros((64, 64, 3), np.uint8), code), (np.zeros((64, 64, 3), np.uint8), none)]
    # image 1: the code at 0.9, a near-copy at 0.8 (NMS drops it); image 2: a box at 0.32
    preds = [
        (
            np.array([[10, 10, 50, 50], [11, 11, 50, 50]], np.float32),
            np.array([logit(0.9), logit(0.8)]),
        ),
        (np.array([[0, 0, 20, 20]], np.float32), np.array([logit(0.32)])),
    ]
    low = score_predictions(preds, val, conf=0.25)
    assert low == {"box_recall": 1.0, "image_recall": 1.0, "fp_images": 1.0, "precision": 0.5}
    high = score_predictions(preds, val, conf=0.5)
    assert high["fp_images"] == 0.0 and high["precision"] == 1.0
    score, bias, m = best_operating_point(preds, val)
    assert m["conf"] == 0.35 and score == pytest.approx(1.1)
    # the bias moves the chosen threshold to the detector's default 0.25
    assert 1 / (1 + np.exp(-(logit(m["conf"]) + bias))) == pytest.approx(0.25)
    final = [(preds[0][0][:1], np.array([0.9])), (preds[1][0], np.array([0.32]))]
    assert image_metrics(final, [code, none], 0.5) == {
        "image_recall": 1.0,
        "fp_images": 0.0,
        "precision": 1.0,
    }


def test_the_training_steps_do_not_import_the_training_script() -> None:
    import subprocess
    import sys

    code = (
        "import sys, training.select, training.verify, training.compare; "
        "sys.exit('training.train' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_texture_close_ups_are_reproducible_textured_and_hold_no_code() -> None:
    import zxingcpp

    from training.textures import KINDS, closeup, texture

    for k, kind in enumerate(KINDS):
        rng = np.random.default_rng([3, k])
        img = closeup(rng, texture(rng, kind, 240, 320))
        again_rng = np.random.default_rng([3, k])
        again = closeup(again_rng, texture(again_rng, kind, 240, 320))
        assert img.shape == (240, 320, 3) and img.dtype == np.uint8
        assert np.array_equal(img, again), kind
        assert img.std() > 3, f"{kind} came out flat"
        assert not zxingcpp.read_barcodes(img, formats=zxingcpp.BarcodeFormat.QRCode), kind


def test_family_scenes_show_their_situation() -> None:
    """Positives: one code inside the frame, its payload known (and read in a clean case);
    negatives: no QR code, a hard region (the frame of a texture, a symbol's label)."""
    import zxingcpp

    from training.families import ALL_POSITIVE, FAMILIES, NEGATIVE, SYMBOLS, scene

    assert set(FAMILIES) == set(ALL_POSITIVE) | set(NEGATIVE)
    with pytest.raises(ValueError, match="unknown family"):
        scene(1, 0, "no-such-family")
    small = (256, 384)
    for family in FAMILIES:
        s = scene(9, 0, family, small)
        h, w = s.image.shape[:2]
        assert max(h, w) <= 384 and s.image.dtype == np.uint8
        assert np.array_equal(s.image, scene(9, 0, family, small).image), family
        qr = zxingcpp.read_barcodes(s.image, formats=zxingcpp.BarcodeFormat.QRCode)
        if family in NEGATIVE:
            assert len(s.boxes) == 0 and len(s.hard) == 1 and not qr, family
            continue
        codes = 2 if family == "nested" else 1  # a small code inside a larger one
        assert len(s.boxes) == codes and len(s.texts) == codes, family
        for x1, y1, x2, y2 in s.boxes:
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, family  # inside the frame
        if family == "plain":
            assert [r.text for r in qr] == s.texts
    formats = set()
    for family in SYMBOLS:
        for i in range(4):
            img = scene(9, i, family).image
            formats |= {r.format.name for r in zxingcpp.read_barcodes(img)}
    assert formats & {"PDF417", "Aztec", "DataMatrix", "MaxiCode"}, formats  # real symbols


def test_round_two_families_hold_what_they_name() -> None:
    """Filled symbols are readable symbols of their format; a shipping label carries
    PDF417 (and, in ``label-qr``, the QR code whose payload is the scene's); surfaces are
    no code."""
    import zxingcpp

    from training.families import DENSE, FILLED, LABEL_WITH_QR, LABEL_WITHOUT_QR, SURFACES, scene

    for family in FILLED + DENSE:
        fmt = family.split("-", 1)[1]
        found = set()
        for i in range(8):
            found |= {r.format.name for r in zxingcpp.read_barcodes(scene(11, i, family).image)}
        assert fmt in found, (family, found)
    with_qr = scene(11, 0, LABEL_WITH_QR)
    codes = zxingcpp.read_barcodes(with_qr.image)
    names = {r.format.name for r in codes}
    assert "PDF417" in names and "QRCode" in names, names
    assert [r.text for r in codes if r.format.name == "QRCode"] == with_qr.texts
    without = zxingcpp.read_barcodes(scene(11, 0, LABEL_WITHOUT_QR).image)
    assert "QRCode" not in {r.format.name for r in without}
    for family in SURFACES:
        assert not zxingcpp.read_barcodes(scene(11, 0, family, (256, 384)).image), family


def test_the_calibration_fit_recovers_known_coefficients() -> None:
    from training.verify import fit_logistic

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2))
    want = np.array([1.5, -0.7, 0.4])
    p = 1 / (1 + np.exp(-(x @ want[:2] + want[2])))
    y = (rng.random(4000) < p).astype(np.float64)
    got = fit_logistic(x, y)
    assert np.allclose(got, want, atol=0.15), got
