"""The wire contract of qrsight: Avro schemas, topic and header names, the codec."""

from schemas.codec import Codec, RegistryError, WireFormatError, load_schema

__all__ = ["Codec", "RegistryError", "WireFormatError", "load_schema"]
