"""QR payload reading with zxing-cpp on images the tests draw (segno), boxes as a detector gives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import zxingcpp

from core.vision import payload
from core.vision.detections import Detections
from core.vision.payload import drop_duplicate_reads, read_payloads, read_whole
from tests.unit.qr_factory import CodeSpec, PlacedCode, qr_bgr, scene

URL = "https://example.com/qrsight?id=42"
BoxMaker = Callable[[list[PlacedCode]], list[np.ndarray]]


def detections(boxes: Sequence[np.ndarray]) -> Detections:
    n = len(boxes)
    return Detections(
        xyxy=np.array(boxes, np.float32).reshape(n, 4),
        confidence=np.linspace(0.9, 0.5, n).astype(np.float32),
        class_id=np.zeros(n, np.int64),
    )


def padded(code: PlacedCode, frac: float = 0.05) -> np.ndarray:
    """The code's bounding box grown a little, as a detector draws it."""
    box = code.xyxy
    pad = frac * (box[2] - box[0])
    return box + np.array([-pad, -pad, pad, pad], np.float32)


def each_code(codes: list[PlacedCode]) -> list[np.ndarray]:
    return [padded(c) for c in codes]


def reversed_codes(codes: list[PlacedCode]) -> list[np.ndarray]:
    return [padded(c) for c in reversed(codes)]


def code_and_empty_box(codes: list[PlacedCode]) -> list[np.ndarray]:
    return [padded(codes[0]), np.array([500, 350, 600, 450], np.float32)]


def left_part_of_code(codes: list[PlacedCode]) -> list[np.ndarray]:
    """Only the left 60% of the code: its crop cannot be read, its centre is inside."""
    x1, y1, x2, y2 = codes[0].xyxy
    return [np.array([x1, y1, x1 + 0.6 * (x2 - x1), y2], np.float32)]


@dataclass(frozen=True)
class Scene:
    name: str
    specs: list[CodeSpec]
    boxes: BoxMaker = each_code
    # expected text per box: an index into the drawn codes, or None for "no code"
    expect: tuple[int | None, ...] = (0,)


SCENES = [
    Scene("upright", [CodeSpec(URL, (320, 240), module_px=4)]),
    Scene("rotated 30 degrees", [CodeSpec(URL, (320, 240), module_px=4, angle=30)]),
    Scene("rotated 90 degrees", [CodeSpec(URL, (320, 240), module_px=4, angle=90)]),
    Scene("small, 2 px per module", [CodeSpec(URL, (320, 240), module_px=2)]),
    Scene("small and rotated", [CodeSpec("qrsight", (100, 380), module_px=2.2, angle=15)]),
    Scene("micro QR", [CodeSpec("12345", (320, 240), module_px=5, micro=True)]),
    Scene("binary payload", [CodeSpec(bytes(range(256)), (320, 240), module_px=3)]),
    Scene("unicode payload", [CodeSpec("Grüße, 日本 ✓", (320, 240), module_px=4)]),
    Scene(
        "three codes, boxes in another order",
        [
            CodeSpec("first", (110, 120), module_px=4),
            CodeSpec("second", (330, 300), module_px=3, angle=-20),
            CodeSpec("third", (540, 130), module_px=3.5, angle=45),
        ],
        boxes=reversed_codes,
        expect=(2, 1, 0),
    ),
    Scene(
        "a box with no code",
        [CodeSpec(URL, (180, 160), module_px=4)],
        boxes=code_and_empty_box,
        expect=(0, None),
    ),
    Scene(
        "only the whole-image read finds it",
        [CodeSpec(URL, (320, 240), module_px=4)],
        boxes=left_part_of_code,
    ),
]


@pytest.mark.parametrize("case", SCENES, ids=lambda s: s.name)
def test_read_payloads(case: Scene) -> None:
    image, codes = scene(case.specs)
    given = detections(case.boxes(codes))
    got = read_payloads(image, given)
    assert len(got) == len(given)
    assert np.array_equal(got.xyxy, given.xyxy)
    assert np.array_equal(got.confidence, given.confidence)
    assert got.text is not None and got.corners is not None
    for want, text, corners in zip(case.expect, got.text, got.corners, strict=True):
        if want is None:
            assert text is None
            assert corners is None
            continue
        code = codes[want]
        assert text == code.text
        assert corners is not None
        # the code's own top-left first, clockwise, within about one module
        tolerance = max(3.0, 1.5 * max(s.module_px for s in case.specs))
        assert np.abs(corners - code.corners).max() < tolerance


def test_unreadable_everywhere_stays_a_detection() -> None:
    image, _ = scene([])
    given = detections([np.array([100, 100, 300, 300], np.float32)])
    got = read_payloads(image, given)
    assert len(got) == 1
    assert got.text == [None]
    assert got.corners == [None]


def test_no_detections() -> None:
    image, _ = scene([CodeSpec(URL, (320, 240))])
    assert len(read_payloads(image, Detections.empty())) == 0


def test_read_whole_finds_every_code_with_corners() -> None:
    specs = [CodeSpec("left", (150, 240), 4), CodeSpec("right", (480, 240), 4, angle=90)]
    image, codes = scene(specs)
    found = sorted(read_whole(image), key=lambda tc: float(tc[1][:, 0].mean()))
    assert [text for text, _ in found] == ["left", "right"]
    for (_, corners), code in zip(found, codes, strict=True):
        assert corners.shape == (4, 2)
        assert np.abs(corners - code.corners).max() < 6


@pytest.mark.parametrize(
    "spec",
    [
        CodeSpec(URL, (320, 240), module_px=1.3),
        CodeSpec(URL, (200, 300), module_px=1.1, angle=20),
        CodeSpec("qrsight", (420, 160), module_px=1.2, angle=20),
    ],
    ids=["1.3 px per module", "1.1 px per module, 20 degrees", "short payload, 1.2 px"],
)
def test_upscaled_crop_reads_what_the_whole_image_misses(spec: CodeSpec) -> None:
    image, codes = scene([spec])
    assert read_whole(image) == []  # too small for zxing-cpp at native resolution
    got = read_payloads(image, detections([padded(codes[0])]))
    assert got.text == [codes[0].text]
    assert got.corners is not None and got.corners[0] is not None
    assert np.abs(got.corners[0] - codes[0].corners).max() < 2.5


# --- one detection per physical code --------------------------------------------------
SQUARE = np.array([[0, 0], [40, 0], [40, 40], [0, 40]], np.float32)


@pytest.mark.parametrize(
    ("reads", "kept"),
    [
        # (text, corner offset) per box, most confident first → indices kept
        ([("A", 0), ("A", 3)], [0]),  # one code read by two boxes: the confident box stays
        ([("A", 0), ("A", 100)], [0, 1]),  # same payload, two codes far apart: both stay
        ([("A", 0), ("B", 0)], [0, 1]),  # different payloads
        ([("A", 0), (None, 0), (None, 2)], [0, 1, 2]),  # unread boxes are never merged
        ([("A", 0), ("B", 50), ("A", 2), ("B", 51)], [0, 1]),
    ],
)
def test_drop_duplicate_reads(reads: list[tuple[str | None, float]], kept: list[int]) -> None:
    n = len(reads)
    dets = Detections(
        xyxy=np.tile(np.float32([0, 0, 40, 40]), (n, 1)),
        confidence=np.linspace(0.9, 0.5, n).astype(np.float32),
        class_id=np.zeros(n, np.int64),
        text=[t for t, _ in reads],
        corners=[None if t is None else SQUARE + off for t, off in reads],
    )
    out = drop_duplicate_reads(dets)
    assert np.allclose(out.confidence, dets.confidence[kept])
    assert out.text == [reads[i][0] for i in kept]


def test_an_unread_box_half_over_a_read_code_goes_but_a_nested_one_stays() -> None:
    """A misplaced second box on a read code (half on it, half beside it) is no code of
    its own; a box inside the read code (a code nested in it) or holding it stays."""
    boxes = np.float32(
        [
            [0, 0, 40, 40],  # the read code
            [20, 0, 60, 40],  # half over it: dropped
            [10, 10, 22, 22],  # inside it: stays
            [-30, -30, 70, 70],  # holding it: stays
            [100, 0, 140, 40],  # beside it: stays
        ]
    )
    dets = Detections(
        xyxy=boxes,
        confidence=np.linspace(0.9, 0.5, 5).astype(np.float32),
        class_id=np.zeros(5, np.int64),
        text=["A", None, None, None, None],
        corners=[SQUARE, None, None, None, None],
    )
    out = drop_duplicate_reads(dets)
    assert out.xyxy.tolist() == boxes[[0, 2, 3, 4]].tolist()


# --- codes the detector missed ---------------------------------------------------------
@pytest.mark.parametrize("boxes", [[], [0]], ids=["no-box", "one-of-two-boxed"])
def test_whole_image_codes_the_detector_missed_are_added_once(boxes: list[int]) -> None:
    specs = [CodeSpec("boxed", (150, 240), 4), CodeSpec("missed", (480, 240), 4, angle=20)]
    image, codes = scene(specs)
    given = detections([padded(codes[i]) for i in boxes])
    assert len(read_payloads(image, given)) == len(boxes)  # off by default: boxes only
    got = read_payloads(image, given, add_missed_as=3)
    added = len(got) - len(boxes)
    missed = [c for i, c in enumerate(codes) if i not in boxes]
    assert added == len(missed)
    assert got.text is not None and got.corners is not None
    for code, box, conf, cid, text in zip(
        missed,
        got.xyxy[len(boxes) :],
        got.confidence[len(boxes) :],
        got.class_id[len(boxes) :],
        got.text[len(boxes) :],
        strict=True,
    ):
        assert text == code.text
        assert conf == 1.0 and cid == 3
        assert np.abs(box - code.xyxy).max() < 6  # the bounding box of the code's corners


# --- harder reads of boxes the standard reads missed -----------------------------------
def blurred_code() -> tuple[np.ndarray, PlacedCode]:
    """A code defocused so much that the standard reads miss it (sigma 2.8, 5 px modules)."""
    import cv2

    image, codes = scene([CodeSpec("https://example.org/blurred?id=7", (320, 240), 5, angle=10)])
    return cv2.GaussianBlur(image, (0, 0), 2.8), codes[0]


def test_harder_reads_read_what_the_standard_reads_miss_and_only_where_asked() -> None:
    from core.vision.payload import CANDIDATE_ATTEMPTS, read_harder

    image, code = blurred_code()
    given = detections([padded(code), np.array([20, 20, 120, 120], np.float32)])
    standard = read_payloads(image, given)
    assert standard.text == [None, None]
    sharpen = [CANDIDATE_ATTEMPTS["sharpen"]]
    assert read_harder(image, standard, [1], sharpen).text == [None, None]  # not asked
    got = read_harder(image, standard, [0, 1], sharpen)
    assert got.text == [code.text, None]
    assert got.corners is not None and got.corners[0] is not None
    assert np.abs(got.corners[0] - code.corners).max() < 6  # in image pixels
    assert np.array_equal(got.confidence, given.confidence)
    assert read_harder(image, standard, [0], []).text == [None, None]  # no attempts


def test_the_shipped_harder_reads_are_measured_candidates_that_read_it() -> None:
    from core.vision.payload import CANDIDATE_ATTEMPTS, HARD_ATTEMPTS, read_harder

    assert HARD_ATTEMPTS and all(CANDIDATE_ATTEMPTS[a.name] is a for a in HARD_ATTEMPTS)
    image, code = blurred_code()
    standard = read_payloads(image, detections([padded(code)]))
    assert read_harder(image, standard, [0], HARD_ATTEMPTS).text == [code.text]


def test_a_code_nested_in_another_is_read_and_added_beside_it() -> None:
    """A small code printed over the middle of a larger one (error correction H): the
    larger code's box reads the larger code (the small one blanked out), and the small
    one, inside that box, is added as a code of its own."""
    import cv2
    import segno

    outer = segno.make_qr("outer code payload 0123456789", error="H", version=8)
    inner = segno.make_qr("inner", error="M")
    big = np.kron(np.array([list(r) for r in outer.matrix], np.uint8), np.ones((2, 2), np.uint8))
    small = np.pad(np.array([list(r) for r in inner.matrix], np.uint8), 1)
    at = (big.shape[0] - small.shape[0]) // 2
    big[at : at + small.shape[0], at : at + small.shape[0]] = small
    grid = np.pad(big, 8)
    gray = np.where(np.kron(grid, np.ones((3, 3), np.uint8)) > 0, 20, 235).astype(np.uint8)
    image = cv2.cvtColor(
        cv2.copyMakeBorder(gray, 40, 40, 40, 40, cv2.BORDER_CONSTANT, value=235), cv2.COLOR_GRAY2BGR
    )
    side = big.shape[0] * 3
    box = np.float32([40 + 24, 40 + 24, 40 + 24 + side, 40 + 24 + side])
    dets = Detections(
        xyxy=box[None],
        confidence=np.float32([0.9]),
        class_id=np.zeros(1, np.int64),
        text=[None],
        corners=[None],
    )
    got = read_payloads(image, dets, add_missed_as=0)
    assert got.text is not None
    assert got.text[0] == "outer code payload 0123456789"
    assert sorted(t for t in got.text if t is not None) == [
        "inner",
        "outer code payload 0123456789",
    ]


BENT = "straighten me please, a bent label"


@pytest.mark.parametrize("amplitude", [0.06, 0.1])
def test_straightening_reads_a_code_bent_like_a_label_on_a_bottle(amplitude: float) -> None:
    """A code whose rows bend by a half sine wave (6-10 % of its height) is not read as it
    is; the outline straightening (a candidate attempt, measured in models/README.md)
    gives it back, either way round."""
    flat = cv2.cvtColor(qr_bgr(BENT, module_px=8, border=6), cv2.COLOR_BGR2GRAY)
    flat = cv2.copyMakeBorder(flat, 60, 60, 60, 60, cv2.BORDER_CONSTANT, value=255)
    h, w = flat.shape
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    bent = cv2.remap(flat, xs, ys + amplitude * h * np.sin(xs * np.pi / w), cv2.INTER_LINEAR,
                     borderValue=255)  # fmt: skip
    assert zxingcpp.read_barcodes(bent) == []
    assert [c.text for c in zxingcpp.read_barcodes(payload._straighten(bent))] == [BENT]
    turned = np.ascontiguousarray(bent.T)
    assert [c.text for c in zxingcpp.read_barcodes(payload._straighten_columns(turned))] == [BENT]
