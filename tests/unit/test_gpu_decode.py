"""GPU JPEG decoding (core/vision/gpu_decode.py): which decoder is chosen, what goes to it, and
that everything it does not decode takes the CPU path with today's checks and errors.

The selection and fallback logic runs against a stand-in for ``nvidia.nvimgcodec`` that
decodes with OpenCV and fails where a test tells it to; the real nvImageCodec (a dev
dependency) runs on its own CPU backend, which needs no GPU, so the calls this code makes
into it are checked too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from core.runtime.errors import ConfigError
from core.runtime.settings import Settings, load_settings
from core.vision import gpu_decode
from core.vision.gpu_decode import MAX_BATCH_FAILURES, GpuDecoder, make_gpu_decoder
from core.vision.images import ImageLimits, decode
from core.vision.pipeline import ImageJob, Pipeline
from tests.unit.test_images import jpeg_cut_in_scan, jpeg_with_exif, pattern
from tests.unit.test_pipeline import qr_image

LIMITS = ImageLimits(max_bytes=10 * 1024 * 1024, max_side=8192, max_pixels=40_000_000)
REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.jpg"))


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


class FakeNvImageCodec:
    """What core.vision.gpu_decode uses of ``nvidia.nvimgcodec``, decoding with OpenCV.

    ``refuse``: payloads it returns None for (as nvImageCodec does per image);
    ``fail_batches``: how many decode calls raise; ``calls``: batch sizes seen;
    ``shape``: force every decoded image to this shape (a broken decoder)."""

    CPU_ONLY, HW_GPU_ONLY, GPU_ONLY, HYBRID_CPU_GPU = "cpu", "hw", "gpu", "hybrid"
    NVIMGCODEC_DEVICE_CPU_ONLY = -99999
    ColorSpec = SimpleNamespace(SRGB="srgb")
    SampleFormat = SimpleNamespace(I_BGR="i_bgr")

    def __init__(self) -> None:
        self.refuse: set[bytes] = set()
        self.fail_batches = 0
        self.calls: list[int] = []
        self.decoders: list[dict[str, Any]] = []
        self.shape: tuple[int, ...] | None = None
        self.cmyk: set[bytes] = set()

    def Backend(self, kind: str) -> str:  # noqa: N802 (the real API's name)
        return kind

    def DecodeParams(self, **kwargs: Any) -> dict[str, Any]:  # noqa: N802
        want = {"apply_exif_orientation": False, "color_spec": "srgb", "sample_format": "i_bgr"}
        assert kwargs == want
        return kwargs

    def CodeStream(self, data: bytes) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(data=data, num_channels=4 if data in self.cmyk else 3)

    def Decoder(self, **kwargs: Any) -> FakeNvImageCodec:  # noqa: N802
        self.decoders.append(kwargs)
        return self

    def decode(self, streams: list[SimpleNamespace], params: dict[str, Any]) -> list[Any]:
        self.calls.append(len(streams))
        if self.fail_batches:
            self.fail_batches -= 1
            raise RuntimeError("nvJPEG failure: stand-in")
        out: list[Any] = []
        for stream in streams:
            data = stream.data
            if data in self.refuse:
                out.append(None)
                continue
            flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
            if self.shape is not None:
                pixels = np.zeros(self.shape, np.uint8)
            out.append(SimpleNamespace(cpu=lambda p=pixels: p))
        return out


@pytest.fixture
def nv() -> FakeNvImageCodec:
    return FakeNvImageCodec()


def decoder(nv: FakeNvImageCodec, keep_side: int = 0) -> GpuDecoder:
    return GpuDecoder(LIMITS, keep_side, device_id=1, module=nv)  # type: ignore[arg-type]


# --- choosing the decoder ----------------------------------------------------------------


def ok_factory(*args: Any, **kwargs: Any) -> str:
    return f"nvimgcodec cpu_only={kwargs['cpu_only']} device={kwargs['device_id']}"


def missing_factory(*args: Any, **kwargs: Any) -> str:
    raise ImportError("No module named 'nvidia.nvimgcodec'")


def broken_factory(*args: Any, **kwargs: Any) -> str:
    raise RuntimeError("Failed to load nvjpeg library")


@pytest.mark.parametrize(
    ("choice", "on_gpu", "factory", "expected"),
    [
        ("auto", True, ok_factory, "nvimgcodec cpu_only=False device=2"),
        ("auto", False, ok_factory, None),  # no GPU detector: the CPU decodes
        ("auto", True, missing_factory, None),  # not installed
        ("auto", True, broken_factory, None),  # installed, nvJPEG or CUDA missing
        ("cpu", True, ok_factory, None),
        ("cpu", False, ok_factory, None),
        ("nvimgcodec", True, ok_factory, "nvimgcodec cpu_only=False device=2"),
        ("nvimgcodec", False, ok_factory, "nvimgcodec cpu_only=True device=2"),
        ("nvimgcodec", True, missing_factory, ConfigError),
        ("nvimgcodec", True, broken_factory, ConfigError),
    ],
)
def test_the_setting_and_what_loads_choose_the_decoder(
    choice: str, on_gpu: bool, factory: Any, expected: Any
) -> None:
    settings = load_settings({"QRSIGHT_IMAGE_DECODER": choice})
    if expected is ConfigError:
        with pytest.raises(ConfigError, match="QRSIGHT_IMAGE_DECODER"):
            make_gpu_decoder(settings, on_gpu=on_gpu, keep_side=832, device_id=2, factory=factory)
        return
    chosen = make_gpu_decoder(settings, on_gpu=on_gpu, keep_side=832, device_id=2, factory=factory)
    assert chosen == expected


def test_an_unknown_decoder_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="QRSIGHT_IMAGE_DECODER"):
        load_settings({"QRSIGHT_IMAGE_DECODER": "dali"})


def test_the_gpu_decoder_is_built_for_the_gpu(nv: FakeNvImageCodec) -> None:
    decoder(nv)
    (made,) = nv.decoders
    assert made["device_id"] == 1
    assert made["backends"][0] == "hw", "the JPEG engines first"
    assert "fancy_upsampling=1" in made["options"]


# --- what goes to the GPU, what stays on the CPU -------------------------------------------


def test_only_plain_jpegs_that_pass_intake_go_to_the_gpu(nv: FakeNvImageCodec) -> None:
    small = pattern(96, 128)
    datas = {
        "jpeg": jpeg(small),
        "png": png(small),
        "large jpeg": jpeg(pattern(1024, 1536)),  # reduced on the CPU (keep_side 500)
        "truncated jpeg": jpeg_cut_in_scan(),
        "junk": b"not an image at all",
        "empty": b"",
        "over the side limit": jpeg(pattern(16, 9000)),
    }
    out = decoder(nv, keep_side=500).decode_many(list(datas.values()))
    taken = {name for name, got in zip(datas, out, strict=True) if got is not None}
    assert taken == {"jpeg"}
    assert nv.calls == [1], "one batched call with the one JPEG it takes"


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_gpu_pixels_equal_the_cpu_decode_with_orientation(
    nv: FakeNvImageCodec, orientation: int
) -> None:
    data = jpeg_with_exif(pattern(48, 64), orientation)
    (got,) = decoder(nv).decode_many([data])
    assert got is not None
    np.testing.assert_array_equal(got.pixels, decode(data, LIMITS))
    assert got.pixels.flags.c_contiguous


def test_images_the_gpu_refuses_take_the_cpu_path(nv: FakeNvImageCodec) -> None:
    a, b = jpeg(pattern(64, 64)), jpeg(pattern(64, 96))
    nv.refuse.add(b)
    out = decoder(nv).decode_many([a, b])
    assert out[0] is not None and out[1] is None


def test_cmyk_jpegs_are_not_sent_to_the_gpu(nv: FakeNvImageCodec) -> None:
    a, b = jpeg(pattern(64, 64)), jpeg(pattern(64, 96))
    nv.cmyk.add(b)
    out = decoder(nv).decode_many([a, b])
    assert out[0] is not None and out[1] is None
    assert nv.calls == [1]


def test_wrong_sized_gpu_pixels_take_the_cpu_path(nv: FakeNvImageCodec) -> None:
    nv.shape = (10, 10, 3)
    assert decoder(nv).decode_many([jpeg(pattern(64, 64))]) == [None]


def test_failed_batches_fall_back_then_turn_the_gpu_decoder_off(
    nv: FakeNvImageCodec, caplog: pytest.LogCaptureFixture
) -> None:
    gpu = decoder(nv)
    data = [jpeg(pattern(64, 64))] * 3
    nv.fail_batches = 1
    assert gpu.decode_many(data) == [None] * 3
    assert all(d is not None for d in gpu.decode_many(data)), "one failure is forgiven"
    nv.fail_batches = MAX_BATCH_FAILURES
    with caplog.at_level(logging.WARNING, logger="core.vision.gpu_decode"):
        for _ in range(MAX_BATCH_FAILURES):
            assert gpu.decode_many(data) == [None] * 3
    assert not gpu.enabled
    calls = len(nv.calls)
    assert gpu.decode_many(data) == [None] * 3
    assert len(nv.calls) == calls, "switched off: nothing more is sent to it"
    assert "QRSIGHT_IMAGE_DECODER=cpu" in caplog.text


# --- through the pipeline ----------------------------------------------------------------


def records_without_timings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("timings", "created_at")} for r in records]


@pytest.fixture
def pipeline_settings() -> Settings:
    return load_settings({}, max_image_side=4000, verifier_path=None)


def test_pipeline_answers_are_the_cpu_answers(
    monkeypatch: pytest.MonkeyPatch, nv: FakeNvImageCodec, pipeline_settings: Settings
) -> None:
    qr = jpeg(qr_image(), 95)
    refused = jpeg(pattern(200, 300))
    nv.refuse.add(refused)
    jobs = [
        ImageJob("qr", qr),
        ImageJob("png", png(qr_image())),
        ImageJob("cut", jpeg_cut_in_scan()),
        ImageJob("junk", b"GIF89a not really"),
        ImageJob("refused", refused),
        ImageJob("big", jpeg(pattern(3000, 2000))),
        *(ImageJob(p.stem, p.read_bytes()) for p in SAMPLES),
    ]
    with Pipeline(pipeline_settings) as cpu:
        want = cpu.run(jobs)
    monkeypatch.setattr(gpu_decode, "import_nvimgcodec", lambda: nv)
    forced = pipeline_settings.model_copy(update={"image_decoder": "nvimgcodec"})
    with Pipeline(forced) as gpu:
        assert gpu._gpu_decoder is not None
        got = gpu.run(jobs)
    assert records_without_timings(got) == records_without_timings(want)
    assert [r["status"] for r in got][:4] == ["OK", "OK", "ERROR", "ERROR"]
    assert nv.calls == [2 + len(SAMPLES)], "qr, refused and the samples in one batch"


# --- the real nvImageCodec, on its CPU backend ---------------------------------------------


def test_real_nvimgcodec_decodes_like_opencv_on_its_cpu_backend() -> None:
    real = GpuDecoder(LIMITS, 0, cpu_only=True)
    datas = [p.read_bytes() for p in SAMPLES]
    cut = jpeg_cut_in_scan()
    shuffled = [*datas[:1], cut, *datas[1:]]
    out = real.decode_many(shuffled)
    assert out[1] is None, "refused by the intake checks"
    for data, got in zip(datas, out[:1] + out[2:], strict=True):
        assert got is not None
        want = decode(data, LIMITS)
        assert got.pixels.shape == want.shape
        diff = np.abs(got.pixels.astype(np.int16) - want)
        assert diff.max() <= 2, "libjpeg-turbo on both sides"


def test_payloads_read_in_a_thread_pool_give_the_same_records(
    pipeline_settings: Settings,
) -> None:
    jobs = [ImageJob(p.stem, p.read_bytes()) for p in SAMPLES] * 2
    with Pipeline(pipeline_settings) as one:
        assert one._post_pool is None, "a CPU worker reads payloads in its own thread"
        want = one.run(jobs)
    threaded = pipeline_settings.model_copy(update={"post_threads": 3})
    with Pipeline(threaded) as pool:
        assert pool._post_pool is not None
        got = pool.run(jobs)
    assert records_without_timings(got) == records_without_timings(want)
    assert sum(len(r["detections"]) for r in got) > 0
