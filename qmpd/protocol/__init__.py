"""Sans-I/O QMP wire layer: input framing, output encoding, session logic."""

from qmpd.protocol.encode import encode
from qmpd.protocol.framing import FramingError, JsonStreamParser

__all__ = ["FramingError", "JsonStreamParser", "encode"]
