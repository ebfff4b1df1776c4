"""A scripted MQTT v5 "broker" on 127.0.0.1 for the cases a real broker will not produce.

It speaks just enough of the protocol for one subscriber: CONNACK, SUBACK, UNSUBACK, PINGRESP;
it records the CONNECT, the PUBACKs and the PINGREQs, and closes a connection that is silent for
one and a half keepalive periods, as a broker must. What it sends after the SUBACK is up to the
test (``on_subscribed``). Its packets are written out byte by byte here, not with ingest.mqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, *, mid: int) -> bytes:
    """A QoS 1 PUBLISH without properties."""
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + mid.to_bytes(2, "big") + b"\x00" + payload
    return b"\x32" + varint(len(body)) + body


@dataclass
class Session:
    """One client connection as the fake broker saw it."""

    writer: asyncio.StreamWriter
    connect: bytes = b""
    keepalive: int = 0
    properties: dict[int, int] = field(default_factory=dict)
    pubacks: list[int] = field(default_factory=list)
    pingreqs: int = 0
    answer_pings: bool = True
    timed_out: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, data: bytes) -> None:
        self.writer.write(data)


def _connect_properties(body: bytes) -> tuple[int, dict[int, int]]:
    """(keepalive, the four-byte and two-byte properties) of a CONNECT body."""
    at = 2 + int.from_bytes(body[0:2], "big")  # protocol name
    at += 2  # level, flags
    keepalive = int.from_bytes(body[at : at + 2], "big")
    at += 2
    length = shift = 0
    while True:
        byte = body[at]
        at += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    end, found = at + length, {}
    sizes = {0x11: 4, 0x21: 2, 0x27: 4, 0x22: 2, 0x17: 1, 0x19: 1}
    while at < end:
        ident = body[at]
        size = sizes[ident]
        found[ident] = int.from_bytes(body[at + 1 : at + 1 + size], "big")
        at += 1 + size
    return keepalive, found


class FakeBroker:
    """``async with FakeBroker(on_subscribed=...) as broker``; ``broker.url`` to connect to."""

    def __init__(
        self, *, on_subscribed: Callable[[Session], Coroutine[Any, Any, None]] | None = None
    ):
        self.on_subscribed = on_subscribed
        self.sessions: list[Session] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for session in self.sessions:
            session.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _read(self, reader: asyncio.StreamReader, session: Session) -> tuple[int, bytes]:
        first = (await reader.readexactly(1))[0]
        length = shift = 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, await reader.readexactly(length)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(writer)
        self.sessions.append(session)
        try:
            while True:
                timeout = session.keepalive * 1.5 if session.keepalive else None
                try:
                    async with asyncio.timeout(timeout):
                        first, body = await self._read(reader, session)
                except TimeoutError:
                    session.timed_out = True
                    return
                kind = first & 0xF0
                if kind == 0x10:  # CONNECT
                    session.connect = body
                    session.keepalive, session.properties = _connect_properties(body)
                    session.send(b"\x20\x03\x00\x00\x00")
                elif kind == 0x80:  # SUBSCRIBE: grant QoS 1
                    session.send(b"\x90\x04" + body[0:2] + b"\x00\x01")
                    if self.on_subscribed is not None:
                        task = asyncio.create_task(self.on_subscribed(session))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                elif kind == 0xA0:  # UNSUBSCRIBE: "no subscription existed"
                    session.send(b"\xb0\x04" + body[0:2] + b"\x00\x11")
                elif kind == 0x40:  # PUBACK
                    session.pubacks.append(int.from_bytes(body[0:2], "big"))
                elif kind == 0xC0:  # PINGREQ
                    session.pingreqs += 1
                    if session.answer_pings:
                        session.send(b"\xd0\x00")
                elif kind == 0xE0:  # DISCONNECT
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            session.closed.set()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
