"""One msgpack message on a libp2p stream: a 4-byte big-endian length, then the message, refused over a limit
before it is read (the small request/answer protocols served from a DHT process: dial-back, seats)."""

from __future__ import annotations

import asyncio

import msgpack


async def read_message(reader: asyncio.StreamReader, limit: int, what: str) -> object:
    """The next message; ValueError naming `what` when it declares more than `limit` bytes or does not decode."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > limit:
        raise ValueError(f"a {size}-byte {what} message (at most {limit})")
    try:
        return msgpack.unpackb(await reader.readexactly(size))
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ValueError(f"a {what} message that does not decode ({e})") from None


async def write_message(writer: asyncio.StreamWriter, obj: object) -> None:
    data = msgpack.packb(obj)
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()
