"""Loopback networking: free ports, plain HTTP GETs, and a proxy that closes connections late."""

from __future__ import annotations

import asyncio
import contextlib
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of a GET on localhost, or (0, b'') when nothing listens."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return 0, b""
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    except (OSError, TimeoutError):
        return 0, b""
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split()
    return (int(parts[1]) if len(parts) > 1 else 0), body


class SlowCloseProxy:
    """A TCP proxy to PostgreSQL that passes bytes both ways at once, but a close only late.

    Like a load balancer or a pooler in front of the database: when the server ends a session
    on its own, its last message (a FATAL error) reaches the client at once and the close
    `hold_s` seconds later. A close the client asked for (a Terminate message) is not held.
    """

    _TERMINATE = b"X\x00\x00\x00\x04"  # the frontend's Terminate message

    def __init__(self, *, target_port: int, hold_s: float) -> None:
        self.target_port = target_port
        self.hold_s = hold_s
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SlowCloseProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        asked = asyncio.Event()  # the client sent Terminate or closed its side

        async def to_server() -> None:
            try:
                while data := await reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()
                    if data.endswith(self._TERMINATE):
                        asked.set()
            finally:
                asked.set()
                up_writer.close()

        async def to_client() -> None:
            try:
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                with contextlib.suppress(TimeoutError):  # the scenario: a slow close
                    await asyncio.wait_for(asked.wait(), timeout=self.hold_s)
            finally:
                writer.close()

        await asyncio.gather(to_server(), to_client(), return_exceptions=True)
