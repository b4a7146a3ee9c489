"""Bounds on what comes from outside: `procure.bounds` (JSON depth and size, text length) and
`procure.httpbounds` (one overall deadline and a capped answer on every outbound call), the
latter against real loopback servers that drip, bloat, compress and nest their answers.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from procure.bounds import (
    MAX_JSON_DEPTH,
    MAX_TEXT_CHARS,
    UnsafeInput,
    check_json,
    clip,
    json_depth,
    loads,
)
from procure.httpbounds import AnswerRejected, DeadlineExceeded, bounded_client

# --- procure.bounds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        ("", 0),
        ("1", 0),
        ('"[[[["', 0),
        ("[]", 1),
        ("{}", 1),
        ("[[1, [2]], {}]", 3),
        ('{"a": {"b": [1]}}', 3),
        ('["[[[[[", "]]]]"]', 1),  # brackets inside strings do not count
        ('{"k": "}}}{{{{"}', 1),
        (r'["a \" [[[[ \\", [[]]]', 3),  # an escaped quote does not end the string
        ('["{\\"x\\": [[["]', 1),
        ("[" * 1000 + "]" * 1000, 1000),
    ],
)
def test_json_depth(raw: str, depth: int) -> None:
    assert json_depth(raw) == depth
    assert json_depth(raw.encode()) == depth


def test_json_depth_is_finite_on_anything() -> None:
    assert json_depth(b"[" * 1_000_000) == 1_000_000
    assert json_depth(b"]" * 10) <= 0
    assert json_depth('"unterminated [[[') >= 0
    assert json_depth(bytes(range(256)) * 100) >= 0


def test_loads_parses_ordinary_json() -> None:
    assert loads(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    assert loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_loads_refuses_nan_and_infinity(constant: str) -> None:
    assert json.loads(f'{{"amount": {constant}}}')  # what the standard parser lets through
    with pytest.raises(UnsafeInput, match="not JSON"):
        loads(f'{{"amount": {constant}}}')


def test_loads_refuses_too_deep_too_large_and_not_json() -> None:
    too_deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(UnsafeInput, match="nested 65 levels"):
        loads(too_deep)
    with pytest.raises(UnsafeInput, match="more than the 10 allowed"):
        loads(b'"0123456789"', max_bytes=10)
    with pytest.raises(UnsafeInput, match="not JSON"):
        loads(b"{'single': 'quotes'}")
    with pytest.raises(UnsafeInput):
        check_json(b"[[[]]]", max_depth=2)
    check_json(b"[[]]", max_depth=2)


def test_loads_survives_what_once_overflowed_the_c_stack() -> None:
    import procure.payments.chain  # noqa: F401 - the EVM libraries raise the recursion limit

    assert sys.getrecursionlimit() >= 10_000  # so the parser's own guard would not trip
    for raw in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(UnsafeInput, match="nested"):
            loads(raw)


def test_clip() -> None:
    assert clip("short") == "short"
    assert clip("x" * MAX_TEXT_CHARS) == "x" * MAX_TEXT_CHARS
    cut = clip("y" * 10_000_000)
    assert len(cut) <= MAX_TEXT_CHARS
    assert cut.startswith("y" * 100)
    assert cut.endswith(f"[{10_000_000 - (MAX_TEXT_CHARS - 40):,} characters cut]")
    assert len(clip("z" * 500, 100)) <= 100


# --- procure.httpbounds, against real loopback servers -------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def loopback(handler: Handler) -> AsyncIterator[str]:
    """A raw TCP server on 127.0.0.1 that answers every connection with `handler`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")  # the request head (our requests have no body)
            await handler(reader, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        # Connections left dripping are closed with the server; don't wait on their handlers.


def _head(status: int = 200, **headers: str | int) -> bytes:
    lines = [f"HTTP/1.1 {status} OK"] + [
        f"{name.replace('_', '-')}: {value}" for name, value in headers.items()
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(body: bytes, **headers: str | int) -> Handler:
    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_head(content_length=len(body), connection="close", **headers) + body)

    return handler


async def _get(url: str, *, deadline_s: float = 5, max_bytes: int = 1 << 20) -> httpx.Response:
    async with bounded_client(deadline_s=deadline_s, max_bytes=max_bytes) as http:
        return await http.get(url)


def test_an_ordinary_answer_passes() -> None:
    async def go() -> None:
        body = json.dumps({"status": "running", "logs": ["a", "b"]}).encode()
        async with loopback(_answer(body, content_type="application/json")) as url:
            response = await _get(url)
        assert response.status_code == 200 and response.json()["logs"] == ["a", "b"]
        small = gzip.compress(body)
        async with loopback(
            _answer(small, content_type="application/json", content_encoding="gzip")
        ) as url:
            response = await _get(url)
        assert response.json()["status"] == "running"

    asyncio.run(go())


def test_a_dripping_answer_fails_within_the_deadline() -> None:
    """One byte a second resets httpx's per-read timeout forever; the overall deadline holds."""

    async def drip_body(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_head(content_length=100, content_type="application/json"))
        for _ in range(100):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(1)

    async def drip_head(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for byte in _head(content_length=2):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1)

    async def go() -> None:
        for handler in (drip_body, drip_head):
            async with loopback(handler) as url:
                started = time.monotonic()
                with pytest.raises(DeadlineExceeded, match=r"within 1\.5s"):
                    await _get(url, deadline_s=1.5)
                assert time.monotonic() - started < 3.0
                # ... and it is an httpx timeout, so callers treat it as one.
                assert issubclass(DeadlineExceeded, httpx.TimeoutException)

    asyncio.run(go())


def test_a_server_that_never_answers_fails_within_the_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()  # waits for a close that never comes from our side

    async def go() -> None:
        async with loopback(silent) as url:
            started = time.monotonic()
            with pytest.raises(httpx.TimeoutException):
                await _get(url, deadline_s=1.0)
            assert time.monotonic() - started < 2.5

    asyncio.run(go())


def test_a_connection_closed_while_idle_is_retried_for_reads_only() -> None:
    """A server that closes a kept-alive connection when the next request comes (its idle
    timeout ran out as we reused it): a GET is sent again on a new connection and answered; a
    POST, which the server may have acted on, is not resent and fails."""
    requests: list[bytes] = []

    async def once_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        requests.append(b"head")
        writer.write(_head(content_length=2, content_type="application/json") + b"{}")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request on this connection...
        requests.append(b"dropped")  # ... is read, then the connection closed unanswered

    async def go() -> None:
        async with loopback(once_per_connection) as url, bounded_client(deadline_s=5) as http:
            assert (await http.get(url)).status_code == 200
            assert (await http.get(url)).status_code == 200  # dropped once, then resent
            assert requests == [b"head", b"dropped", b"head"]
            with pytest.raises(httpx.HTTPError):
                await http.post(url, content=b"")  # its connection drops it: not resent
            assert requests == [b"head", b"dropped", b"head", b"dropped"]

    asyncio.run(go())


def test_an_answer_over_max_bytes_is_refused() -> None:
    big = b'{"log": "' + b"x" * 200_000 + b'"}'

    async def chunked(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_head(transfer_encoding="chunked", content_type="application/json"))
        for _ in range(1000):  # 64 MB if read to the end: never buffered past the cap
            writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    async def go() -> None:
        async with loopback(_answer(big, content_type="application/json")) as url:
            with pytest.raises(AnswerRejected, match="more than the 100,000 allowed"):
                await _get(url, max_bytes=100_000)
            assert (await _get(url, max_bytes=300_000)).status_code == 200
        async with loopback(chunked) as url:
            started = time.monotonic()
            with pytest.raises(AnswerRejected, match="more than the 100,000 bytes allowed"):
                await _get(url, max_bytes=100_000)
            assert time.monotonic() - started < 3

    asyncio.run(go())


def test_a_gzip_bomb_is_refused() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB in about 64 KB
    assert len(bomb) < 100_000

    async def go() -> None:
        for encoding in ("gzip", "GZIP"):
            async with loopback(
                _answer(bomb, content_type="application/json", content_encoding=encoding)
            ) as url:
                with pytest.raises(AnswerRejected, match="decompresses past the 1,048,576"):
                    await _get(url, max_bytes=1 << 20)
        async with loopback(_answer(b"\x00\x01", content_encoding="br")) as url:
            with pytest.raises(AnswerRejected, match="content-encoding 'br'"):
                await _get(url)
        async with loopback(_answer(b"not gzip at all", content_encoding="gzip")) as url:
            with pytest.raises(AnswerRejected, match="bad gzip data"):
                await _get(url)

    asyncio.run(go())


def test_a_deep_json_answer_is_refused() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    header = base64.b64encode(b'{"x402Version": 2, "accepts": ' + b"[" * 1000 + b"]" * 1000 + b"}")

    async def go() -> None:
        # Declared as JSON, or looking like it under another content type: both checked.
        for content_type in ("application/json", "text/plain"):
            async with loopback(_answer(deep, content_type=content_type)) as url:
                with pytest.raises(AnswerRejected, match="nested 100,000 levels"):
                    await _get(url)
        async with loopback(
            _answer(b"{}", content_type="application/json", payment_required=header.decode())
        ) as url:
            with pytest.raises(AnswerRejected, match="nested"):
                await _get(url)
        shallow = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
        async with loopback(_answer(shallow, content_type="application/json")) as url:
            assert (await _get(url)).status_code == 200

    asyncio.run(go())
