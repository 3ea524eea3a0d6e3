"""JPEG decoding on the GPU with NVIDIA nvImageCodec, batched, with the CPU path as fallback.

On an H200 a worker spent 4 ms of CPU decoding each JPEG against 0.3 ms of model time
(``bench/README.md``, *GPU*). nvImageCodec (``nvidia-nvimgcodec-cu12`` / ``-cu13``, with
the ``nvidia-nvjpeg`` libraries) decodes a whole batch in one call on the GPU's JPEG
engines or CUDA cores. What goes to it, and what does not:

- Every image is checked first exactly as the CPU path checks it
  (:func:`core.vision.images.check_decodable`: type by magic bytes, byte/side/pixel limits from
  the header, JPEG scan count, end-of-image marker). Anything refused there, and anything
  that is not a plain JPEG decoded at full size — PNG, WebP, BMP, a CMYK/YCCK JPEG, a
  large JPEG the CPU decodes reduced (``QRSIGHT_REDUCED_DECODE``) — is left to
  the CPU path (``None`` in :meth:`GpuDecoder.decode_many`), which raises the very same
  error or decodes it the same way as without a GPU.
- An image nvImageCodec cannot decode comes back ``None`` from it, and also takes the CPU
  path; a batch whose whole call fails takes it too, and after
  :data:`MAX_BATCH_FAILURES` such batches in a row the GPU decoder is switched off for the
  process (a warning says why).
- The decoded pixels (BGR, stored orientation) are copied to host memory — payload
  reading and the crop verifier read them there — checked against the header's size and
  given the EXIF orientation by :func:`core.vision.images.finish_pixels`, as on the CPU.

JPEG decoders differ in their last bit (IDCT, chroma upsampling): the pixels may differ
from OpenCV's by a grey level or two; ``:fancy_upsampling=1`` makes nvJPEG upsample chroma
as libjpeg does. :func:`make_gpu_decoder` picks the decoder from ``QRSIGHT_IMAGE_DECODER``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from core.runtime.errors import ConfigError, QrsightError
from core.runtime.settings import Settings, env_name
from core.vision.images import Header, ImageLimits, check_decodable, finish_pixels, jpeg_scale

logger = logging.getLogger(__name__)

MAX_BATCH_FAILURES = 3  # whole-batch failures in a row before the GPU decoder is turned off
DECODER_OPTIONS = ":fancy_upsampling=1"  # chroma upsampled as libjpeg does


@dataclass(frozen=True)
class Decoded:
    """One image decoded on the GPU: its pixels (host, BGR, oriented) and its share of the
    batch's decode time."""

    pixels: np.ndarray
    decode_ms: float
    started: float  # perf_counter() at the batch's start


def import_nvimgcodec() -> ModuleType:
    """``nvidia.nvimgcodec``; ImportError when the package is not installed."""
    from nvidia import nvimgcodec

    return nvimgcodec


class GpuDecoder:
    """Batched JPEG decoding with nvImageCodec on CUDA device ``device_id``.

    ``cpu_only`` runs nvImageCodec's own CPU backend instead (no GPU needed): it exercises
    this code path on machines without a GPU (tests, dry runs), nothing else.
    """

    name = "nvimgcodec"

    def __init__(
        self,
        limits: ImageLimits,
        keep_side: int,
        *,
        device_id: int = 0,
        cpu_only: bool = False,
        module: ModuleType | None = None,
    ) -> None:
        self.limits = limits
        self.keep_side = keep_side
        self.cpu_only = cpu_only
        self._nv = module if module is not None else import_nvimgcodec()
        nv = self._nv
        if cpu_only:
            self._decoder = nv.Decoder(
                device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.CPU_ONLY)]
            )
        else:
            kinds = (nv.HW_GPU_ONLY, nv.GPU_ONLY, nv.HYBRID_CPU_GPU)  # JPEG engines first
            backends = [nv.Backend(kind) for kind in kinds]
            self._decoder = nv.Decoder(
                device_id=device_id, backends=backends, options=DECODER_OPTIONS
            )
        self._params = nv.DecodeParams(
            apply_exif_orientation=False,  # finish_pixels applies the probed orientation
            color_spec=nv.ColorSpec.SRGB,
            sample_format=nv.SampleFormat.I_BGR,
        )
        self.failures = 0
        self.enabled = True

    def wants(self, data: bytes) -> Header | None:
        """The header of an image this decoder takes (a plain JPEG the CPU would decode at
        full size, passing every intake check), else None (the CPU path's)."""
        try:
            header = check_decodable(data, self.limits)
        except (QrsightError, ValueError):
            return None  # refused: the CPU path raises the same error
        if header.format != "jpeg" or jpeg_scale(header.info(), self.keep_side) != 1:
            return None
        return header

    def decode_many(self, datas: Sequence[bytes]) -> list[Decoded | None]:
        """One entry per image: decoded here, or None for the CPU path to decode."""
        out: list[Decoded | None] = [None] * len(datas)
        if not self.enabled:
            return out
        start = time.perf_counter()
        headers = [self.wants(d) for d in datas]
        picked = [i for i, h in enumerate(headers) if h is not None]
        if not picked:
            return out
        images = self._decode([datas[i] for i in picked])
        share = (time.perf_counter() - start) * 1000.0 / len(picked)
        for i, image in zip(picked, images, strict=True):
            header = headers[i]
            assert header is not None
            pixels = self._host_pixels(image, header)
            if pixels is not None:
                out[i] = Decoded(pixels, share, start)
        return out

    def _decode(self, datas: Sequence[bytes]) -> list[Any]:
        """nvImageCodec's images, None where it fails or for a JPEG that is neither grey nor
        YCbCr (CMYK, YCCK: OpenCV's conversion is the reference, so the CPU decodes them)."""
        nv = self._nv
        try:
            streams = [nv.CodeStream(d) for d in datas]
            plain = [i for i, cs in enumerate(streams) if cs.num_channels in (1, 3)]
            decoded = self._decoder.decode([streams[i] for i in plain], params=self._params)
            decoded = list(decoded) if plain else []
        except Exception as exc:  # nvImageCodec raises RuntimeError and its own types
            self._failed(exc, len(datas))
            return [None] * len(datas)
        self.failures = 0
        if len(decoded) != len(plain):
            logger.warning("nvimgcodec returned %d images for %d", len(decoded), len(plain))
            return [None] * len(datas)
        images: list[Any] = [None] * len(datas)
        for i, image in zip(plain, decoded, strict=True):
            images[i] = image
        return images

    def _host_pixels(self, image: Any, header: Header) -> np.ndarray | None:
        """Host BGR pixels of one decoded image, oriented; None when unusable (the CPU
        path then decodes it and reports any error the usual way)."""
        if image is None:
            return None
        try:
            pixels = np.asarray(image.cpu() if not self.cpu_only else image)
            if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
                return None
            return finish_pixels(pixels, header)
        except Exception:  # a size mismatch or a failed copy: let the CPU path decide
            logger.debug("nvimgcodec image unusable, decoding on the CPU", exc_info=True)
            return None

    def _failed(self, exc: Exception, count: int) -> None:
        self.failures += 1
        logger.warning(
            "nvimgcodec failed on a batch, decoding it on the CPU images=%d failures=%d error=%s",
            count,
            self.failures,
            exc,
        )
        if self.failures >= MAX_BATCH_FAILURES:
            self.enabled = False
            logger.error(
                "GPU JPEG decoding off after %d failed batches in a row; every image is "
                "decoded on the CPU (set %s=cpu to skip it)",
                self.failures,
                env_name("image_decoder"),
            )


def make_gpu_decoder(
    settings: Settings,
    *,
    on_gpu: bool,
    keep_side: int,
    device_id: int = 0,
    factory: Callable[..., GpuDecoder] = GpuDecoder,
) -> GpuDecoder | None:
    """The decoder ``QRSIGHT_IMAGE_DECODER`` asks for, or None for the CPU path.

    - ``cpu``: None.
    - ``auto``: nvImageCodec on ``device_id`` when the detector runs on a GPU
      (``on_gpu``) and it loads; else None, with a log line saying why.
    - ``nvimgcodec``: nvImageCodec, or a :class:`ConfigError` naming the setting when it
      does not load; without a GPU detector it runs on nvImageCodec's CPU backend (to
      check the path; slower than OpenCV).
    """
    choice = settings.image_decoder
    limits = ImageLimits.from_settings(settings)
    if choice == "cpu" or (choice == "auto" and not on_gpu):
        return None
    try:
        decoder = factory(limits, keep_side, device_id=device_id, cpu_only=not on_gpu)
    except Exception as exc:  # ImportError (not installed) or a CUDA/nvJPEG load failure
        if choice == "nvimgcodec":
            raise ConfigError(
                f"{env_name('image_decoder')}=nvimgcodec but nvImageCodec cannot be used: "
                f"{exc} (install it with `pip install 'qrsight[gpu]'`, or set "
                f"{env_name('image_decoder')}=auto or cpu)"
            ) from exc
        logger.info("JPEG decoding on the CPU: nvImageCodec not usable (%s)", exc)
        return None
    logger.info(
        "JPEG decoding with nvImageCodec device=%s",
        "cpu-backend" if not on_gpu else device_id,
    )
    return decoder
