"""A lean HTTP/1.1 client for the gateway's provider calls: one pool of keep-alive connections per
provider, each an asyncio protocol over `httptools`' C parser (the parser uvicorn serves with).

Why not `httpx2` on this path: its pool checks every idle connection's socket on each request and its
layers (client, transport, pool, connection, h11) cost about half of the API's CPU per proxied call.
This does only what the gateway needs: a POST of a prebuilt body to a fixed origin, the answer read
whole (`request`) or as it arrives (`stream`), `Content-Length` or chunked, TLS for https. Proxies
from the environment are not read: `proxy_configured` tells the adapter to use `httpx2` then.

Errors are `ConnectionFailed` (nothing usable came back: refused, reset, closed early) and
`TimeoutError`; the adapter maps both to retryable provider errors.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools

# the response body held in memory of a stream before reading from the socket pauses
_STREAM_HIGH_WATER = 1 << 20
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


class ConnectionFailed(ConnectionError):
    """The provider's connection broke or closed before a whole answer."""


def proxy_configured() -> bool:
    """Whether the environment names an HTTP proxy (which `httpx2` honours and this client does not)."""
    return any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_VARIABLES)


class Response:
    """An answer: status, headers (names lower-cased), and its body once read (`content`)."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes = b"") -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.reusable = False  # the last answer was read whole and the server keeps the connection
        self.headers: dict[str, str] = {}
        self._head: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None  # the answer's deadline
        self._done: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._streaming = False
        self._paused = False
        self._complete = False
        self._received = False  # any byte of the current answer

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionFailed(f"malformed HTTP answer: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.lost = True
        self.reusable = False
        delimited = "content-length" not in self.headers and "chunked" not in self.headers.get("transfer-encoding", "")
        if exc is None and delimited and not self._complete and self._head is not None and self._head.done():
            self.on_message_complete()  # an answer delimited by the connection's end
            self.reusable = False
        if not self._complete:
            self._fail(ConnectionFailed(f"connection closed by the provider{f': {exc}' if exc else ''}"))

    # --- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:  # called once per whole header line
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        if self._streaming:
            self._disarm()  # from here on, the stream's reader times each piece
        if self._head is not None and not self._head.done():
            self._head.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        self._wake()
        if self._streaming and self._buffered > _STREAM_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True

    def on_message_complete(self) -> None:
        self._disarm()
        self._complete = True
        self.reusable = self.parser.should_keep_alive()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        self._wake()

    # --- the caller's side ------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        for future in (self._head, self._done, self._waiter):
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()  # marked as seen: only one of them is awaited (awaiting it still raises)

    def _expire(self) -> None:
        self._timer = None
        self._fail(TimeoutError("the provider did not answer in time"))
        self.close()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def start(self, request: bytes, streaming: bool, timeout: float) -> asyncio.Future[int]:
        """Send `request`; its answer must be whole (a stream: its head) within `timeout` seconds, else
        the futures fail with TimeoutError and the connection closes. (A timer of the connection's
        own: `asyncio.timeout` costs several system calls per use on Python 3.11.)"""
        loop = self._loop
        assert loop is not None
        self.headers = {}
        self._chunks.clear()
        self._buffered = 0
        self._complete = self._received = False
        self.reusable = False
        self._streaming = streaming
        self._head = loop.create_future()
        self._done = loop.create_future()
        assert self.transport is not None
        self._timer = loop.call_later(timeout, self._expire)
        self.transport.write(request)
        return self._head

    def body(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return out

    async def wait_done(self) -> None:
        assert self._done is not None
        await self._done

    async def next_chunk(self, timeout: float) -> bytes | None:
        """The next piece of the body as it arrives, within `timeout` seconds (else TimeoutError); None
        at its end."""
        while not self._chunks:
            if self._complete:
                return None
            if self.lost:
                raise ConnectionFailed("connection closed by the provider mid-answer")
            assert self._loop is not None
            self._waiter = self._loop.create_future()
            self._timer = self._loop.call_later(timeout, self._expire)
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._disarm()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= _STREAM_HIGH_WATER // 2 and self.transport is not None:
            self.transport.resume_reading()
            self._paused = False
        return chunk

    @property
    def received(self) -> bool:
        return self._received

    def close(self) -> None:
        self._disarm()
        self.reusable = False
        if self.transport is not None and not self.lost:
            self.transport.close()


class Stream:
    """An answer being read: status and headers now, the body with `lines()` (SSE lines) or `chunks()`."""

    def __init__(self, pool: Http1Pool, connection: _Connection, status_code: int, timeout: float) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status_code = status_code
        self.headers = connection.headers
        self._timeout = timeout

    async def chunks(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        while True:
            chunk = await connection.next_chunk(self._timeout)  # between two pieces, like a read timeout
            if chunk is None:
                await self.aclose()
                return
            yield chunk

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines as they arrive, without their line ends (`\\n`, `\\r\\n` or `\\r`)."""
        pending = b""
        async for chunk in self.chunks():
            pending += chunk
            if b"\r" in pending:
                if pending.endswith(b"\r"):  # maybe the first half of a CRLF: wait for the next piece
                    continue
                pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.rstrip(b"\r").replace(b"\r", b"\n").decode("utf-8", "replace")

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection)
            self._pool.slots.release()


class Http1Pool:
    """Keep-alive connections to one origin (`base_url`'s scheme, host and port); requests name paths
    under its path. At most `max_connections` calls at once (a call waits for a free slot, within its
    timeout); up to `max_idle` idle connections are kept."""

    def __init__(self, base_url: str, headers: Iterable[tuple[str, str]], timeout: float, *,
                 max_connections: int = 256, max_idle: int = 64) -> None:
        parsed = urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parsed.hostname
        self._tls = parsed.scheme == "https"
        self._port = parsed.port or (443 if self._tls else 80)
        self._prefix = parsed.path.rstrip("/") + "/"
        default_port = self._port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        authority = host if default_port else f"{host}:{self._port}"
        self._fixed = "".join(f"{name}: {value}\r\n" for name, value in (("Host", authority), *headers))
        self._timeout = timeout
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self._tls else None
        self._closed = False
        self.slots = asyncio.Semaphore(max_connections)  # held by each call, a stream until it is closed

    def _head(self, path: str, length: int, extra: Iterable[tuple[str, str]]) -> bytes:
        lines = "".join(f"{name}: {value}\r\n" for name, value in extra)
        return (f"POST {self._prefix}{path} HTTP/1.1\r\n{self._fixed}{lines}Content-Length: {length}\r\n\r\n"
                ).encode("latin-1")

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                _, protocol = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._tls else None)
        except OSError as exc:
            raise ConnectionFailed(f"could not connect to {self._host}:{self._port}: {exc}") from exc
        return protocol

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.lost and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    def release(self, connection: _Connection) -> None:
        if connection.reusable and not connection.lost and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()

    async def _send(self, path: str, body: bytes, extra: Iterable[tuple[str, str]], streaming: bool
                    ) -> tuple[_Connection, int]:
        """A connection whose answer's head has arrived. A reused connection the server closed before
        answering a byte (its keep-alive ran out) is replaced once by a new one."""
        request = self._head(path, len(body), extra) + body
        for _ in range(2):
            connection = self._take_idle()
            reused = connection is not None
            if connection is None:
                connection = await self._connect()
            head = connection.start(request, streaming, self._timeout)
            try:
                status = await head
            except ConnectionFailed:
                connection.close()
                if reused and not connection.received:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            return connection, status
        raise ConnectionFailed("the provider closed two connections in a row")  # pragma: no cover

    async def _take_slot(self) -> None:
        if self.slots.locked():  # all taken: wait for one, within the timeout
            async with asyncio.timeout(self._timeout):
                await self.slots.acquire()
        else:
            await self.slots.acquire()

    async def request(self, path: str, body: bytes, extra: Iterable[tuple[str, str]] = ()) -> Response:
        """POST `body` to `path`; the whole answer, within the timeout (each of: a free slot, a new
        connection, the answer)."""
        await self._take_slot()
        try:
            connection, status = await self._send(path, body, extra, streaming=False)
            try:
                await connection.wait_done()
            except BaseException:
                connection.close()
                raise
            response = Response(status, connection.headers, connection.body())
            self.release(connection)
        finally:
            self.slots.release()
        return response

    async def stream(self, path: str, body: bytes, extra: Iterable[tuple[str, str]] = ()) -> Stream:
        """POST `body` to `path`; returns once the answer's head arrived (the body is read from the
        `Stream`, which the caller closes; each piece within the timeout)."""
        await self._take_slot()
        try:
            connection, status = await self._send(path, body, extra, streaming=True)
        except BaseException:
            self.slots.release()
            raise
        return Stream(self, connection, status, self._timeout)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
