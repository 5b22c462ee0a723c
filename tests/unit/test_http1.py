"""The gateway's lean HTTP/1.1 client (`tierbatch.providers.http1`) against a real local server: a small
asyncio server started by each test, answering from a script, over real TCP connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tierbatch.providers.http1 import ConnectionFailed, Http1Pool

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # the request (head + body) -> keep alive?


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


async def _serve(handler: Handler) -> tuple[asyncio.Server, list[bytes], list[int]]:
    """A server answering each request with `handler`; returns it, the requests seen and the number of
    connections accepted (one element per connection)."""
    requests: list[bytes] = []
    connections: list[int] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                request = await _read_request(reader)
                requests.append(request)
                if not await handler(request, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    return server, requests, connections


def _url(server: asyncio.Server, path: str = "/v1") -> str:
    port = server.sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


async def _json_answer(request: bytes, writer: asyncio.StreamWriter) -> bool:
    body = b'{"ok":true}'
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Seen: a\r\nX-Seen: b\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    return True


def test_posts_the_body_with_its_headers_and_reads_the_answer_on_one_kept_connection() -> None:
    async def run() -> None:
        server, requests, connections = await _serve(_json_answer)
        pool = Http1Pool(_url(server), (("Authorization", "Bearer k"),), timeout=5)
        try:
            first = await pool.request("chat/completions", b'{"x":1}', (("Accept", "application/json"),))
            second = await pool.request("chat/completions", b'{"x":2}')
        finally:
            await pool.aclose()
            server.close()
        assert (first.status_code, first.content, second.content) == (200, b'{"ok":true}', b'{"ok":true}')
        assert first.headers["content-type"] == "application/json"
        assert first.headers["x-seen"] == "a, b"
        assert len(connections) == 1  # kept alive
        head = requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[0] == b"POST /v1/chat/completions HTTP/1.1"
        assert b"Authorization: Bearer k" in head and b"Accept: application/json" in head
        assert requests[0].endswith(b'\r\n\r\n{"x":1}') and requests[1].endswith(b'\r\n\r\n{"x":2}')

    asyncio.run(run())


def test_a_chunked_stream_arrives_line_by_line_as_sent() -> None:
    async def run() -> None:
        go_on = asyncio.Event()

        async def chunked(request: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"data: one\n\n", b"data: t", b"wo\r\n\r\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                if piece == b"data: one\n\n":
                    await go_on.wait()  # the client has the first event before the rest is sent
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True

        server, _, connections = await _serve(chunked)
        pool = Http1Pool(_url(server), (), timeout=5)
        try:
            stream = await pool.stream("chat/completions", b"{}")
            lines = []
            async for line in stream.lines():
                lines.append(line)
                if line == "data: one":
                    go_on.set()
            again = await pool.request("chat/completions", b"{}")  # the connection went back to the pool
        finally:
            await pool.aclose()
            server.close()
        assert stream.status_code == 200
        assert lines == ["data: one", "", "data: two", ""]
        assert again.status_code == 200
        assert len(connections) == 1

    asyncio.run(run())


def test_a_kept_connection_the_server_closed_while_idle_is_replaced_without_an_error() -> None:
    async def run() -> None:
        async def once(request: bytes, writer: asyncio.StreamWriter) -> bool:
            await _json_answer(request, writer)
            return False  # then close, as a server's keep-alive timeout does

        server, requests, connections = await _serve(once)
        pool = Http1Pool(_url(server), (), timeout=5)
        try:
            await pool.request("a", b"1")
            await asyncio.sleep(0.05)  # the close reaches the client
            second = await pool.request("a", b"2")
        finally:
            await pool.aclose()
            server.close()
        assert second.status_code == 200
        assert len(requests) == 2 and len(connections) == 2

    asyncio.run(run())


def test_an_error_status_is_an_answer_not_an_exception() -> None:
    async def run() -> None:
        async def limited(request: bytes, writer: asyncio.StreamWriter) -> bool:
            body = b'{"error":{"message":"slow down"}}'
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
            return True

        server, _, _ = await _serve(limited)
        pool = Http1Pool(_url(server), (), timeout=5)
        try:
            answer = await pool.request("a", b"{}")
        finally:
            await pool.aclose()
            server.close()
        assert (answer.status_code, answer.headers["retry-after"]) == (429, "3")
        assert b"slow down" in answer.content

    asyncio.run(run())


def test_a_refused_connection_and_an_answer_cut_short_are_connection_failures() -> None:
    async def run() -> None:
        server, _, _ = await _serve(_json_answer)
        url = _url(server)
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectionFailed):
            await Http1Pool(url, (), timeout=5).request("a", b"{}")

        async def cut(request: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\":")
            await writer.drain()
            return False

        server, _, _ = await _serve(cut)
        pool = Http1Pool(_url(server), (), timeout=5)
        try:
            with pytest.raises(ConnectionFailed):
                await pool.request("a", b"{}")
        finally:
            await pool.aclose()
            server.close()

    asyncio.run(run())


def test_a_silent_server_times_out() -> None:
    async def run() -> None:
        async def silent(request: bytes, writer: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(5)
            return False

        server, _, _ = await _serve(silent)
        pool = Http1Pool(_url(server), (), timeout=0.2)
        try:
            with pytest.raises(TimeoutError):
                await pool.request("a", b"{}")
        finally:
            await pool.aclose()
            server.close()

    asyncio.run(run())


def test_calls_beyond_the_connection_limit_wait_for_a_free_one() -> None:
    async def run() -> None:
        open_now = [0]
        most = [0]

        async def slow(request: bytes, writer: asyncio.StreamWriter) -> bool:
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
            await asyncio.sleep(0.05)
            open_now[0] -= 1
            return await _json_answer(request, writer)

        server, requests, _ = await _serve(slow)
        pool = Http1Pool(_url(server), (), timeout=5, max_connections=2)
        try:
            answers = await asyncio.gather(*(pool.request("a", b"{}") for _ in range(6)))
            stream = await pool.stream("a", b"{}")  # a stream holds its slot until it is closed
            await stream.read()
            await stream.aclose()
            after = await pool.request("a", b"{}")
        finally:
            await pool.aclose()
            server.close()
        assert [a.status_code for a in answers] == [200] * 6 and after.status_code == 200
        assert most[0] == 2 and len(requests) == 8

    asyncio.run(run())


def test_a_stream_that_stalls_between_pieces_times_out() -> None:
    async def run() -> None:
        async def stalls(request: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"%x\r\n%s\r\n" % (len(b"data: one\n\n"), b"data: one\n\n"))
            await writer.drain()
            await asyncio.sleep(5)
            return False

        server, _, _ = await _serve(stalls)
        pool = Http1Pool(_url(server), (), timeout=0.3)
        lines: list[str] = []
        try:
            stream = await pool.stream("a", b"{}")
            with pytest.raises(TimeoutError):
                async for line in stream.lines():
                    lines.append(line)
            await stream.aclose()
        finally:
            await pool.aclose()
            server.close()
        assert lines == ["data: one", ""]

    asyncio.run(run())
