"""Helpers of the API unit tests (no tests here): images with known headers, offline apps."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import cv2
import numpy as np
from flask import Flask

from api import create_app
from api.replies import ReplyClient
from core.runtime.settings import Settings, load_settings


def api_settings(**overrides: Any) -> Settings:
    """Settings for an app that never talks to Kafka (nothing listens on port 9)."""
    values: dict[str, Any] = {"kafka_bootstrap": "127.0.0.1:9", "rate_limit": ""}
    values.update(overrides)
    return load_settings({}, **values)


def offline_app(settings: Settings) -> Flask:
    """The app with a reply client that is never started: /detect validates, then 503s."""
    return create_app(settings, reply_client=ReplyClient(settings, 0))


def png(width: int = 64, height: int = 48) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((height, width, 3), 255, np.uint8))
    assert ok
    return buf.tobytes()


def jpeg(width: int = 64, height: int = 48) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((height, width, 3), 200, np.uint8))
    assert ok
    return buf.tobytes()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims ``width`` x ``height`` (a decompression bomb header)."""
    data = bytearray(png())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)
