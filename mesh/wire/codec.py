"""Encoding and decoding of message bodies.

JSON is the default; msgpack is chosen per message with the ``Content-Type`` header.
Decoders are built once per message class and reused.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec

from mesh.wire.errors import DecodeError
from mesh.wire.messages import Message

JSON: Final = "application/json"
MSGPACK: Final = "application/msgpack"
CONTENT_TYPES: Final = (JSON, MSGPACK)

T = TypeVar("T")


class Codec:
    """Turns messages into bytes and back, for both content types."""

    def __init__(self) -> None:
        self._json_enc = msgspec.json.Encoder()
        self._msgpack_enc = msgspec.msgpack.Encoder()
        self._json_dec: dict[type[Any], msgspec.json.Decoder[Any]] = {}
        self._msgpack_dec: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}

    def encode(self, msg: Message, content_type: str = JSON) -> bytes:
        if content_type == JSON:
            return self._json_enc.encode(msg)
        if content_type == MSGPACK:
            return self._msgpack_enc.encode(msg)
        raise DecodeError("decode", _unsupported(content_type))

    def decode(self, data: bytes, cls: type[T], content_type: str = JSON) -> T:
        try:
            if content_type == JSON:
                dec = self._json_dec.get(cls)
                if dec is None:
                    dec = self._json_dec[cls] = msgspec.json.Decoder(cls)
                return dec.decode(data)  # type: ignore[no-any-return]
            if content_type == MSGPACK:
                mdec = self._msgpack_dec.get(cls)
                if mdec is None:
                    mdec = self._msgpack_dec[cls] = msgspec.msgpack.Decoder(cls)
                return mdec.decode(data)  # type: ignore[no-any-return]
        except msgspec.ValidationError as exc:
            raise DecodeError("validation", f"does not match {_name(cls)}: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise DecodeError("decode", f"{content_type} body does not decode: {exc}") from exc
        except RecursionError:
            raise DecodeError("decode", f"{content_type} body is nested too deeply to decode") from None
        raise DecodeError("decode", _unsupported(content_type))


def _name(cls: type[Any]) -> str:
    mtype = getattr(cls, "__mesh_type__", None)
    return str(mtype) if mtype is not None else cls.__qualname__


def _unsupported(content_type: str) -> str:
    return f"unsupported Content-Type {content_type!r}; use one of {', '.join(CONTENT_TYPES)}"


default_codec = Codec()
"""The process-wide codec; decoders are cached on it."""
