"""The JPEG checks before decoding, made cheaper: the scan count is the same count as
``bytes.count`` (a scan bomb is still refused), the end-of-image check the same answer as
``bytes.find``."""

from __future__ import annotations

import numpy as np
import pytest

from core.runtime.errors import CorruptImageError
from core.runtime.settings import load_settings
from core.vision.images import ImageLimits, probe
from core.vision.images.decoding import has_eoi
from core.vision.images.probing import count_sos
from tests.poison_corpus import _many_scans

SOS = b"\xff\xda"
EOI = b"\xff\xd9"


@pytest.mark.parametrize(
    ("data", "start"),
    [
        (b"", 0),
        (b"\xff", 0),
        (SOS, 0),
        (SOS, 1),
        (b"\xff\xff\xda\xda" + SOS + SOS, 0),
        (b"\x00" * 10 + SOS, 5),
        (b"\xff" * 50 + b"\xda", 3),
        (SOS * 3, 2),
        (SOS, 5),
    ],
)
def test_the_scan_count_is_the_count_of_the_marker(data: bytes, start: int) -> None:
    assert count_sos(data, start) == data.count(SOS, start)


def test_the_scan_count_on_entropy_like_bytes() -> None:
    """Random bytes rich in FF, as entropy-coded data with its stuffing is."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        data = rng.choice([0x00, 0xDA, 0xFF, 0x12], size=5000, p=[0.3, 0.2, 0.3, 0.2])
        raw = data.astype(np.uint8).tobytes()
        start = int(rng.integers(0, 100))
        assert count_sos(raw, start) == raw.count(SOS, start)


def test_a_jpeg_with_too_many_scans_is_still_refused() -> None:
    limits = ImageLimits.from_settings(load_settings({}))
    with pytest.raises(CorruptImageError, match="scans"):
        probe(_many_scans(10_000), limits)
    probe(_many_scans(5), limits)  # a few scans pass


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"\x00" * 10 + EOI, 0),
        (b"\x00" * 10 + EOI, 10),
        (b"\x00" * 10 + EOI, 11),  # the marker starts before the scan data
        (b"\x00" * 5 + EOI + b"\x00" * 5, 2),  # trailing bytes after the marker
        (b"\x00" * 5 + EOI + b"\x00" * 5, 6),
        (b"\x00" * 10, 0),
        (EOI, 0),
        (b"", 0),
    ],
)
def test_the_end_of_image_check_is_the_search_for_the_marker(data: bytes, offset: int) -> None:
    assert has_eoi(data, offset) == (data.find(EOI, offset) >= 0)
