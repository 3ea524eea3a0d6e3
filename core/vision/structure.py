"""Does a crop look like a QR code structurally? Finder patterns, as zxing's detector checks.

A QR code is the only common 2-D symbol with three *finder patterns*: 7 x 7-module squares
(dark ring, light ring, dark 3 x 3 centre) at three corners of the symbol. Along any line
through a finder's centre — a row, a column, at any rotation — the dark and light runs
measure 1 : 1 : 3 : 1 : 1. zxing's ``FinderPatternFinder`` scans rows for that ratio,
confirms each hit along the column through it, clusters the confirmed centres and looks
for three that sit at the corners of a square (seen in perspective: a parallelogram).
This module does the same with numpy on a binarized crop, so that a box whose payload was
not read can be told from the counter-examples the detector and the crop verifier confuse
with a QR code: Aztec's central bullseye (runs of 1 : 1 : 1 : 1 : 1, one centre), PDF417's
start and stop columns (bars, no square rings), Data Matrix's L-shaped solid edges,
MaxiCode's rings and textures.

:func:`structure_score` returns how many finder patterns form a QR layout in the crop:
3 (three finders at the corners of a plausible square), 2 (two finders of the same module
size a plausible distance apart: a code whose third finder is hidden, bent or blurred), 1
(one finder) or 0. The pipeline uses it only for QR boxes that stay unread (a read code is
Reed-Solomon-checked and needs no structure check), see ``core.vision.verifier``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from core.vision.detections import Detections

# crops are brought to a short side in this range before scanning: small ones are enlarged
# (a version 1 code needs about 2 px per module), large ones shrunk (each row costs time)
MIN_SIDE = 192
MAX_SIDE = 320
SECOND_SIDE = 512  # the second, finer scan (when the first finds no three finders)
# a run of the 1-module kind may differ from the module size by this fraction of it, the
# 3-module centre by 3 times as much (zxing's foundPatternCross uses 0.5)
RUN_TOLERANCE = 0.5
MIN_MODULE_PX = 1.0  # a finder narrower than 7 px is noise at the scan size
MIN_FINDER_MODULES = 12.0  # finder centres of a version 1 code are 14 modules apart
MAX_FINDER_MODULES = 190.0  # version 40: 170
MIN_SUPPORT = 2  # hits a finder needs (a real one is crossed by about 3 modules of rows)
MODULE_RATIO = 1.8  # module sizes of the finders of one code agree within this factor
# an unread box the verifier keeps must reach this level of :func:`box_structure`, or its
# confidence is capped (QRSIGHT_STRUCTURE_CAP; models/README.md *Structure before
# confidence*)
MIN_LEVEL = 2
DEFAULT_CAP = 0.5
# a box with no finder at all is vetoed (QRSIGHT_STRUCTURE_VETO) unless the one-sided search
# finds this level: three finders at the corners of a square. One one-sided finder, or a
# pair, is common in dense Aztec, PDF417 and Data Matrix symbols and in textures; a full
# layout was seen only on codes (training/eval/structure.py, seed 6,100,003)
VETO_RESCUE_LEVEL = 3
# ... and unless the verifier is this sure of it (then it is only capped): small codes
# smeared by motion blur show no finder and are judged >= 0.999; of the other symbols'
# and textures' boxes without a finder none was judged above 0.9935 (seeds 6,100,003 and
# 6,000,001, models/README.md *Structure before confidence*)
VETO_SURE = 0.995
# local-mean binarizations: (block = crop side / this, offset)
BLOCKS = ((4, 2), (8, 2))


@dataclass(frozen=True)
class Finder:
    """A confirmed finder pattern: centre (x, y) in crop pixels, module size, support (how
    many row and column hits it gathered)."""

    x: float
    y: float
    module: float
    support: int


@dataclass(frozen=True)
class _Runs:
    """The runs of every line of a ``(L, N)`` array (0 light, 1 dark, 2 outside the crop):
    ``ids[l, n]`` the run of each pixel, and per run its ``start`` (flat index), ``length``,
    ``value`` and ``line``."""

    ids: np.ndarray
    start: np.ndarray
    length: np.ndarray
    value: np.ndarray
    line: np.ndarray
    width: int


def _runs(lines: np.ndarray) -> _Runs:
    n_lines, width = lines.shape
    change = np.ones(lines.shape, bool)
    change[:, 1:] = lines[:, 1:] != lines[:, :-1]
    flat = change.ravel()
    ids = (np.cumsum(flat, dtype=np.int32) - 1).reshape(lines.shape)
    start = np.flatnonzero(flat)
    length = np.diff(np.append(start, n_lines * width))
    return _Runs(ids, start, length, lines.ravel()[start], start // width, width)


def _pattern(
    runs: _Runs, centre: np.ndarray, one_sided: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """For runs ``centre``: whether each is the dark 3 of a dark-light-dark-light-dark
    1:1:3:1:1 on its line, and the module size that pattern gives. ``one_sided``: one of
    the two outer dark runs may be longer than a module (a finder at the edge of a code
    printed without a quiet zone on a dark ground, whose ring merges with the ground);
    the module size is then the inner 1:3:1's."""
    n = len(runs.length)
    if n < 5:
        return np.zeros(len(centre), bool), np.zeros(len(centre), np.float32)
    g = np.clip(centre, 2, n - 3)
    win = np.stack([runs.length[g + k] for k in (-2, -1, 0, 1, 2)], axis=1).astype(np.float32)
    ok = (
        (centre >= 2)
        & (centre + 2 < n)
        & (runs.line[g - 2] == runs.line[g + 2])
        & (runs.value[g] == 1)
        & (runs.value[g - 1] == 0)
        & (runs.value[g + 1] == 0)
        & (runs.value[g - 2] == 1)
        & (runs.value[g + 2] == 1)
    )
    if one_sided:
        module = win[:, 1:4].sum(axis=1) / 5.0
        tol = RUN_TOLERANCE * module
        near = [np.abs(win[:, k] - module) < tol for k in (0, 4)]
        ok &= (near[0] | near[1]) & (win[:, 0] > module - tol) & (win[:, 4] > module - tol)
        inner: tuple[int, ...] = (1, 3)
    else:
        module = win.sum(axis=1) / 7.0
        tol = RUN_TOLERANCE * module
        inner = (0, 1, 3, 4)
    ok &= (module >= MIN_MODULE_PX) & (np.abs(win[:, 2] - 3 * module) < 3 * tol)
    for k in inner:
        ok &= np.abs(win[:, k] - module) < tol
    return ok, module


def _centre_along(runs: _Runs, g: np.ndarray) -> np.ndarray:
    """Position along its line of the middle of run ``g``."""
    return (runs.start[g] % runs.width + runs.length[g] / 2.0).astype(np.float32)


def finders(binary: np.ndarray, one_sided: bool = False) -> list[Finder]:
    """Finder patterns of a binarized crop (dark True): each dark run that is the centre of
    a 1:1:3:1:1 along its row, confirmed along its column and its diagonal through the
    same point at a compatible scale (zxing's cross-checks), clustered, most supported
    first. ``one_sided``: see :func:`_pattern`."""
    h, w = binary.shape
    dark = binary.astype(np.uint8)
    rows = _runs(dark)
    centre = np.flatnonzero(rows.value == 1)
    ok, hm = _pattern(rows, centre, one_sided)
    centre, hm = centre[ok], hm[ok]
    if len(centre) == 0:
        return []
    y = rows.line[centre]
    x = np.clip(_centre_along(rows, centre).astype(np.int64), 0, w - 1)
    cols = _runs(np.ascontiguousarray(dark.T))
    gv = cols.ids[x, y]
    ok, vm = _pattern(cols, gv, one_sided)
    ok &= (vm < 1.6 * hm) & (hm < 1.6 * vm)
    yc = _centre_along(cols, gv)
    ok &= np.abs(yc - y) <= hm
    x, y, hm, vm, yc = x[ok], y[ok], hm[ok], vm[ok], yc[ok]
    if len(x) == 0:
        return []
    yi = np.clip(yc.astype(np.int64), 0, h - 1)
    radius = int(np.ceil(6 * max(float(hm.max()), float(vm.max()))))
    diag = _runs(_diagonal_lines(dark, x, yi, radius))
    ok, dm = _pattern(diag, diag.ids[:, radius], one_sided)
    m = (hm + vm) / 2
    ok &= (dm > 0.35 * m) & (dm < 1.6 * m)
    if not ok.any():
        return []
    return _cluster(x[ok].astype(np.float32), yc[ok], m[ok])


def _diagonal_lines(dark: np.ndarray, x: np.ndarray, y: np.ndarray, radius: int) -> np.ndarray:
    """The down-right diagonal through each point (x, y), ``radius`` steps either side, as
    ``(K, 2 radius + 1)`` lines; pixels outside the crop are 2 (they end every run)."""
    h, w = dark.shape
    t = np.arange(-radius, radius + 1)[None, :]
    xs, ys = x[:, None] + t, y[:, None] + t
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    out = np.full(xs.shape, 2, np.uint8)
    out[inside] = dark[ys[inside], xs[inside]]
    return out


def _cluster(px: np.ndarray, py: np.ndarray, pm: np.ndarray) -> list[Finder]:
    """Greedy clustering of confirmed centres: points within 2 modules of a cluster's first
    point join it (a finder's 3-module centre spreads its hits over about that)."""
    left = np.ones(len(px), bool)
    found: list[Finder] = []
    order = np.argsort(pm)[::-1]
    for i in order:
        if not left[i]:
            continue
        member = left & (np.hypot(px - px[i], py - py[i]) <= 2.0 * pm[i])
        left &= ~member
        found.append(
            Finder(
                float(px[member].mean()),
                float(py[member].mean()),
                float(np.median(pm[member])),
                int(member.sum()),
            )
        )
    found.sort(key=lambda f: -f.support)
    return [f for f in found if f.support >= MIN_SUPPORT]


def _pair_ok(a: Finder, b: Finder) -> bool:
    """Two finders of one code: module sizes agree, 12-190 modules apart."""
    if max(a.module, b.module) > MODULE_RATIO * min(a.module, b.module):
        return False
    d = float(np.hypot(a.x - b.x, a.y - b.y)) / ((a.module + b.module) / 2)
    return MIN_FINDER_MODULES <= d <= MAX_FINDER_MODULES


def _corner_ok(a: Finder, corner: Finder, c: Finder) -> bool:
    """``corner`` is the top-left finder of a square seen in (mild) perspective: the two
    legs from it agree in length within 1.6x and meet at 60-120 degrees."""
    u = np.array([a.x - corner.x, a.y - corner.y])
    v = np.array([c.x - corner.x, c.y - corner.y])
    lu, lv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if min(lu, lv) <= 0 or max(lu, lv) > 1.6 * min(lu, lv):
        return False
    cos = float(u @ v) / (lu * lv)
    return abs(cos) <= 0.5


def _timing_ok(binary: np.ndarray, corner: Finder, end: Finder, other: Finder) -> bool:
    """The timing pattern along the leg ``corner`` → ``end``: modules alternating dark and
    light one module wide between the two finders, 3 modules inside the line of their
    centres (towards ``other``, the third finder). Tried at 2.6, 3 and 3.4 modules, since
    the module size of a finder is an estimate."""
    h, w = binary.shape
    a = np.array([corner.x, corner.y])
    leg = np.array([end.x, end.y]) - a
    side = np.array([other.x, other.y]) - a
    length = float(np.linalg.norm(leg))
    u, v = leg / length, side / max(float(np.linalg.norm(side)), 1e-6)
    m = (corner.module + end.module) / 2
    expected = length / m - 9.0  # timing modules between the two finders' separators
    if expected < 3:
        return False
    s = np.arange(4.5 * m, length - 4.5 * m, max(m / 4, 0.5))
    for offset in (2.6, 3.0, 3.4):
        pts = a + s[:, None] * u + offset * m * v
        xi = np.clip(np.round(pts[:, 0]).astype(np.int64), 0, w - 1)
        yi = np.clip(np.round(pts[:, 1]).astype(np.int64), 0, h - 1)
        line = binary[yi, xi]
        edges = np.flatnonzero(line[1:] != line[:-1])
        runs = np.diff(np.concatenate(([0], edges + 1, [len(line)])))[1:-1]  # whole runs
        if len(runs) < max(2, 0.6 * expected - 2) or len(runs) > 1.5 * expected + 2:
            continue
        px = runs * (s[1] - s[0]) if len(s) > 1 else runs
        if np.mean(np.abs(px - m) < 0.6 * m) >= 0.7:
            return True
    return False


def layout(binary: np.ndarray, found: list[Finder], min_span: float = 0.0) -> int:
    """How many finder patterns of ``found`` form a QR layout, with the timing pattern as a
    fourth level: 4 (a corner finder with two legs and a timing pattern along one), 3 (the
    three finders without it), 2 (a plausible pair), 1 (one finder) or 0. Finder pairs
    closer than ``min_span`` px do not count (the code's finders lie near the box's
    corners; a small pattern in a big box is not it)."""
    top = found[:8]
    pairs = {
        (i, j)
        for i in range(len(top))
        for j in range(i + 1, len(top))
        if _pair_ok(top[i], top[j])
        and np.hypot(top[i].x - top[j].x, top[i].y - top[j].y) >= min_span
    }
    if not pairs:
        return min(len(top), 1)
    best = 2
    for corner in range(len(top)):
        legs = [j for i, j in pairs if i == corner] + [i for i, j in pairs if j == corner]
        for k, a in enumerate(legs):
            for c in legs[k + 1 :]:
                if (min(a, c), max(a, c)) not in pairs or not _corner_ok(
                    top[a], top[corner], top[c]
                ):
                    continue
                best = 3
                f, p, q = top[corner], top[a], top[c]
                if _timing_ok(binary, f, p, q) or _timing_ok(binary, f, q, p):
                    return 4
    return best


def _binaries(gray: np.ndarray, local: bool = True) -> list[np.ndarray]:
    """Dark-True binarizations of the crop: Otsu's threshold of the crop's centre (the
    code's own grey levels, not the page's: a blurred code is a grey patch on white) in
    both polarities (light-on-dark codes), and local means over about a quarter and an
    eighth of the crop (uneven light; low contrast)."""
    h, w = gray.shape[:2]
    inner = gray[h // 5 : h - h // 5, w // 5 : w - w // 5]
    level, _ = cv2.threshold(inner, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = gray <= level
    out = [dark, ~dark]
    for div, c in BLOCKS if local else ():
        block = max(3, (min(h, w) // div) | 1)
        mean = cv2.adaptiveThreshold(
            gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, block, c
        )
        out.append(mean == 0)
    return out


def _resized(gray: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return gray
    size = (max(8, round(gray.shape[1] * factor)), max(8, round(gray.shape[0] * factor)))
    interp = cv2.INTER_LINEAR if factor > 1 else cv2.INTER_AREA
    return cv2.resize(gray, size, interpolation=interp)


def structure_score(
    gray: np.ndarray, box_side: float | None = None, one_sided: bool = False
) -> int:
    """0-4: how many finder patterns of one QR code the grey crop shows (see the module's
    docstring). ``box_side``: the detector box's longer side in the crop's pixels (finder
    pairs must span at least a third of it); default the crop's short side / 1.3.

    The crop is scanned with its short side in [MIN_SIDE, MAX_SIDE], then, if that shows
    no three finders, at twice the size up to SECOND_SIDE (a dense or small code's
    modules are 1-2 px at the first size) with Otsu's threshold alone (the local means
    added nothing there on the synthetic hard codes, at twice the cost). ``one_sided``:
    finders may have one outer ring merged with a dark ground (:func:`_pattern`)."""
    short = min(gray.shape[:2])
    first = MIN_SIDE / short if short < MIN_SIDE else min(1.0, MAX_SIDE / short)
    best = 0
    for factor in (first, max(first, min(2 * first, SECOND_SIDE / short))):
        scaled = _resized(gray, factor)
        side = (short / 1.3 if box_side is None else box_side) * factor
        for binary in _binaries(scaled, local=factor == first):
            best = max(best, layout(binary, finders(binary, one_sided), min_span=side / 3))
            if best == 4:
                return best
        if best >= 3:
            break
    return best


def box_structure(
    gray: np.ndarray, box: np.ndarray, margin: float = 0.15, one_sided: bool = False
) -> int:
    """:func:`structure_score` of the ``box`` (xyxy) of a grey image, cut with ``margin``
    of its longer side around it; where that leaves the image, the crop is filled with a
    light grey (a code cut by the frame has its finders there, with no quiet zone)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1, 4.0)
    pad = margin * side
    h, w = gray.shape[:2]
    a, b = int(x1 - pad), int(y1 - pad)
    c, d = int(np.ceil(x2 + pad)), int(np.ceil(y2 + pad))
    ia, ib, ic, id_ = max(a, 0), max(b, 0), min(c, w), min(d, h)
    if ic - ia < 8 or id_ - ib < 8:
        return 0
    inside = gray[ib:id_, ia:ic]
    if (ia, ib, ic, id_) != (a, b, c, d):
        light = int(np.percentile(inside, 95))
        inside = cv2.copyMakeBorder(
            inside, ib - b, d - id_, ia - a, c - ic, cv2.BORDER_CONSTANT, value=light
        )
    return structure_score(inside, box_side=side, one_sided=one_sided)


def cap_unstructured(
    gray: np.ndarray,
    dets: Detections,
    judged: np.ndarray,
    qr_id: int | None,
    *,
    threshold: float,
    cap: float = DEFAULT_CAP,
    min_level: int = MIN_LEVEL,
    veto: bool = False,
) -> np.ndarray:
    """``judged`` (the verifier's ``P(code)`` per detection, NaN for other classes) with
    each unread QR box at ``threshold`` or above whose crop in ``gray`` (the boxes' image)
    reaches no ``min_level`` of :func:`box_structure` capped at ``cap``: a confident box
    with no finder pattern may be another symbol or a texture rather than a code nobody
    could read, so it is not reported as a sure one (a cap below ``threshold`` drops it).
    With ``veto``, a box judged below :data:`VETO_SURE` whose crop shows no finder
    pattern at all, and no QR layout (:data:`VETO_RESCUE_LEVEL`) even when finders may
    merge with a dark ground on one side (``one_sided``: a code printed without a quiet
    zone), is set to 0 (dropped).
    Only those boxes are scanned (read boxes and boxes the verifier drops cost nothing)."""
    if qr_id is None or len(dets) == 0:
        return judged
    assert dets.text is not None
    out = judged.copy()
    for i, (c, t, p) in enumerate(zip(dets.class_id, dets.text, judged, strict=True)):
        if c != qr_id or t is not None or not p >= threshold:
            continue
        level = box_structure(gray, dets.xyxy[i])
        if level >= min_level:
            continue
        out[i] = min(float(p), cap)
        if (
            veto
            and level == 0
            and p < VETO_SURE
            and box_structure(gray, dets.xyxy[i], one_sided=True) < VETO_RESCUE_LEVEL
        ):
            out[i] = 0.0
    return out
