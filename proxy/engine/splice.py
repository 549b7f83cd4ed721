"""Raw byte relay for passthrough tunnels, with backpressure in both directions."""

from __future__ import annotations

import asyncio
import contextlib

_CHUNK = 256 * 1024


async def splice(
    loop: asyncio.AbstractEventLoop,
    client: asyncio.Transport,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Relay between a client transport (paused by the caller) and an upstream stream pair."""
    reader, writer = await _wrap_transport(loop, client)

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(_CHUNK):
                dst.write(chunk)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if dst.can_write_eof():
                    dst.write_eof()

    await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
    for w in (writer, up_writer):
        w.close()


async def _wrap_transport(
    loop: asyncio.AbstractEventLoop, transport: asyncio.Transport
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Give an existing transport the streams API by swapping in a StreamReaderProtocol."""
    reader = asyncio.StreamReader(limit=_CHUNK, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    transport.resume_reading()
    return reader, writer
