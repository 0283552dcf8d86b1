"""Fetching images by URL against real HTTP servers in this process: well-behaved ones (aiohttp's
web server) and misbehaving ones (raw asyncio servers that drip, lie or never end)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import io
import os
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from schemas.errors import ErrorCode, JobFailure
from worker.fetch import UrlPolicy, fetch_image, image_session
from worker.runtime.images import ImageLimits, decode_image, read_header

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=10**7, fetch_timeout_s=3.0, read_timeout_s=1.0)
# The test servers listen on 127.0.0.1: a loopback address, so its network must be allowed too.
LOCAL = UrlPolicy.of(["127.0.0.1:*"], ["127.0.0.0/8"])

Respond = Callable[[asyncio.StreamWriter], Awaitable[None]]


def noise_png(side: int = 540) -> bytes:
    """About 0.9 MB at 540 px: random pixels do not compress."""
    pixels = np.random.default_rng(1).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


@contextlib.asynccontextmanager
async def web_server(routes: Mapping[str, Callable[[web.Request], Awaitable[web.StreamResponse]]],
                     host: str = "127.0.0.1") -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    try:
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(respond: Respond) -> AsyncIterator[str]:
    """A server that reads a request's head, then lets `respond` write whatever it likes."""
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await respond(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up: what the misbehaving servers are for
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def head(*headers: str, status: str = "200 OK") -> bytes:
    return "\r\n".join([f"HTTP/1.1 {status}", *headers, "", ""]).encode()


async def fetch(url: str, limits: ImageLimits = LIMITS, policy: UrlPolicy = LOCAL) -> bytes:
    async with image_session(policy) as session:
        return await fetch_image(url, limits, session)


async def refused(url: str, limits: ImageLimits = LIMITS, policy: UrlPolicy = LOCAL) -> JobFailure:
    with pytest.raises(JobFailure) as caught:
        await fetch(url, limits, policy)
    return caught.value


async def test_a_large_image_arrives_whole_in_one_write_or_in_pieces() -> None:
    png = noise_png()
    assert 800_000 < len(png) < LIMITS.max_bytes

    async def whole(_: web.Request) -> web.Response:
        return web.Response(body=png, content_type="image/png")

    async def pieces(writer: asyncio.StreamWriter, chunked: bool) -> None:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(png)}"
        writer.write(head(framing, "Content-Type: image/png"))
        for start in range(0, len(png), 4096):
            piece = png[start:start + 4096]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
            await asyncio.sleep(0.0005)
        writer.write(b"0\r\n\r\n" if chunked else b"")
        await writer.drain()

    async with web_server({"/a.png": whole}) as base:
        assert await fetch(f"{base}/a.png") == png
    for chunked in (False, True):
        async with raw_server(functools.partial(pieces, chunked=chunked)) as base:
            data = await fetch(f"{base}/a.png")
        assert data == png, f"chunked={chunked}: {len(data)} of {len(png)} bytes"
        assert read_header(data, LIMITS).picture.size == (540, 540)


async def test_a_slow_drip_times_out_with_the_total_timeout() -> None:
    async def drip(writer: asyncio.StreamWriter) -> None:
        writer.write(head("Content-Length: 100") + b"\x89PNG")
        for _ in range(96):  # a byte every 0.1 s: each read is quick, the whole is not
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"x")

    limits = ImageLimits(max_bytes=10**6, max_pixels=10**6, fetch_timeout_s=0.6, read_timeout_s=0.5)
    async with raw_server(drip) as base:
        started = time.monotonic()
        error = await refused(f"{base}/drip.png", limits)
    assert error.code is ErrorCode.IMAGE_FETCH_FAILED
    assert "timed out after 0.6 s" in error.message
    assert time.monotonic() - started < 2


async def test_a_stalled_body_times_out_with_the_read_timeout() -> None:
    async def stall(writer: asyncio.StreamWriter) -> None:
        writer.write(head("Content-Length: 1000") + b"\x89PNG")
        await writer.drain()
        await asyncio.sleep(30)

    limits = ImageLimits(max_bytes=10**6, max_pixels=10**6, fetch_timeout_s=20, read_timeout_s=0.3)
    async with raw_server(stall) as base:
        started = time.monotonic()
        error = await refused(f"{base}/stall.png", limits)
    assert error.code is ErrorCode.IMAGE_FETCH_FAILED
    assert "timed out after 0.3 s waiting for data" in error.message
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
async def test_an_endless_body_stops_at_the_byte_limit(framing: str) -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        chunked = framing == "chunked"
        writer.write(head("Transfer-Encoding: chunked" if chunked else "Connection: close"))
        piece = b"\x89PNG\r\n\x1a\n" + b"x" * 8184
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()

    limits = ImageLimits(max_bytes=300_000, max_pixels=10**6, fetch_timeout_s=5, read_timeout_s=2)
    async with raw_server(endless) as base:
        started = time.monotonic()
        error = await refused(f"{base}/endless.png", limits)
    assert error.code is ErrorCode.IMAGE_TOO_LARGE, error.message
    assert time.monotonic() - started < 2


async def test_a_content_length_shorter_than_the_body_cuts_the_image() -> None:
    image = jpeg()
    declared = len(image) // 2

    async def short(writer: asyncio.StreamWriter) -> None:
        writer.write(head(f"Content-Length: {declared}") + image[:declared])
        await writer.drain()
        await asyncio.sleep(0.1)  # the rest after the declared body is read: it is never part of it
        writer.write(image[declared:])
        await writer.drain()

    async with raw_server(short) as base:
        data = await fetch(f"{base}/short.jpg")
    assert data == image[:declared]  # what the headers declared, and no more
    with pytest.raises(JobFailure) as caught:
        decode_image(data, LIMITS)
    assert caught.value.code is ErrorCode.TRUNCATED_IMAGE


@pytest.mark.parametrize("then", ["close", "hold"])
async def test_a_content_length_longer_than_the_body_fails(then: str) -> None:
    image = jpeg()

    async def long(writer: asyncio.StreamWriter) -> None:
        writer.write(head(f"Content-Length: {len(image) + 1000}") + image)
        await writer.drain()
        if then == "hold":
            await asyncio.sleep(30)

    limits = ImageLimits(max_bytes=10**6, max_pixels=10**6, fetch_timeout_s=5, read_timeout_s=0.3)
    async with raw_server(long) as base:
        error = await refused(f"{base}/long.jpg", limits)
    assert error.code is ErrorCode.IMAGE_FETCH_FAILED, error.message
    if then == "hold":
        assert "timed out after 0.3 s" in error.message


async def test_a_content_length_over_the_limit_is_refused_before_the_body() -> None:
    async def huge(writer: asyncio.StreamWriter) -> None:
        writer.write(head(f"Content-Length: {LIMITS.max_bytes + 1}"))
        await writer.drain()
        await asyncio.sleep(30)  # no body: reading it would time out instead

    async with raw_server(huge) as base:
        started = time.monotonic()
        error = await refused(f"{base}/huge.png")
    assert error.code is ErrorCode.IMAGE_TOO_LARGE, error.message
    assert str(LIMITS.max_bytes + 1) in error.message
    assert time.monotonic() - started < LIMITS.read_timeout_s


async def test_gzip_bodies_are_decompressed_and_their_decompressed_size_counts() -> None:
    png = noise_png(200)

    async def compressed(_: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(png), headers={"Content-Encoding": "gzip"})

    async with web_server({"/a.png": compressed}) as base:
        assert await fetch(f"{base}/a.png") == png


async def test_a_gzip_bomb_stops_at_the_limit() -> None:
    # Endless: one megabyte of zeros compressed, repeated (a full flush makes each block alike).
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = compressor.compress(bytes(1_000_000)) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(1_000_000)) + compressor.flush(zlib.Z_FULL_FLUSH)

    async def bomb(writer: asyncio.StreamWriter) -> None:
        writer.write(head("Content-Encoding: gzip", "Transfer-Encoding: chunked"))
        for piece in [first, *[block] * 100_000]:  # 100 GB once decompressed
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()

    tracemalloc.start()
    try:
        async with raw_server(bomb) as base:
            error = await refused(f"{base}/bomb.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.code is ErrorCode.IMAGE_TOO_LARGE, error.message
    # aiohttp reads up to 64 kB at a time, 64 MB once decompressed here: it must inflate in pieces.
    assert peak < 8 * LIMITS.max_bytes, f"{peak} bytes held at once"


async def test_http_status_and_connection_failures_are_fetch_failures() -> None:
    async with web_server({}) as base:
        missing = await refused(f"{base}/missing.png")
    assert missing.code is ErrorCode.IMAGE_FETCH_FAILED and "HTTP 404" in missing.message
    nothing = await refused("http://127.0.0.1:1/nothing-listens")
    assert nothing.code is ErrorCode.IMAGE_FETCH_FAILED


async def test_redirects_are_followed_a_few_times_each_hop_checked() -> None:
    png = noise_png(64)
    others = 0

    async def image(_: web.Request) -> web.Response:
        return web.Response(body=png)

    async def other(_: web.Request) -> web.Response:
        nonlocal others
        others += 1
        return web.Response(body=png)

    async def chain(request: web.Request) -> web.Response:
        left = int(request.match_info.get("left", "0"))
        raise web.HTTPFound("/a.png" if left <= 1 else f"/chain/{left - 1}")

    async with web_server({"/a.png": other}, host="127.0.0.2") as elsewhere:
        redirects = {
            "/off-hosts": f"{elsewhere}/a.png",  # loopback, so a network the policy allows
            "/to-file": "file:///etc/hostname",
            "/unusable": "http://[::1/a.png",
        }

        async def redirect(request: web.Request) -> web.Response:
            return web.Response(status=307, headers={"Location": redirects[request.path]})

        async def no_location(_: web.Request) -> web.Response:
            return web.Response(status=302)

        routes = {"/a.png": image, "/chain/{left}": chain, "/no-location": no_location}
        routes.update(dict.fromkeys(redirects, redirect))
        async with web_server(routes) as base:
            assert await fetch(f"{base}/chain/3") == png  # three hops
            too_many = await refused(f"{base}/chain/4")
            off_hosts, to_file, unusable = [await refused(base + path) for path in redirects]
            no_location_error = await refused(f"{base}/no-location")
        assert await fetch(f"{elsewhere}/a.png", policy=UrlPolicy.of(["127.0.0.2:*"], ["127.0.0.0/8"])) == png
    assert too_many.code is ErrorCode.IMAGE_FETCH_FAILED and "redirects" in too_many.message
    assert no_location_error.code is ErrorCode.IMAGE_FETCH_FAILED
    for error in (off_hosts, to_file, unusable):
        assert error.code is ErrorCode.IMAGE_URL_REFUSED, error.message
    assert "127.0.0.2" in off_hosts.message and others == 1  # only the direct fetch got there


async def test_only_allowed_hosts_and_networks_are_fetched_from() -> None:
    png = noise_png(64)
    hits = 0

    async def image(_: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(body=png)

    async with web_server({"/a.png": image}) as base:
        port = base.rsplit(":", 1)[1]
        by_name = base.replace("127.0.0.1", "localhost")
        refusals = {
            "nothing allowed (the default)": (base, UrlPolicy()),
            "loopback literal, network not allowed": (base, UrlPolicy.of(["127.0.0.1:*"])),
            "a name resolving to loopback": (by_name, UrlPolicy.of(["localhost:*"])),
            "another port only": (base, UrlPolicy.of(["127.0.0.1:1"], ["127.0.0.0/8"])),
            "default port only": (base, UrlPolicy.of(["127.0.0.1"], ["127.0.0.0/8"])),
            "a name pattern, not the address": (base, UrlPolicy.of(["localhost:*", "*"], ["127.0.0.0/8"])),
            "another network allowed": (base, UrlPolicy.of(["127.0.0.1:*"], ["10.0.0.0/8"])),
        }
        for why, (url, policy) in refusals.items():
            error = await refused(f"{url}/a.png", policy=policy)
            assert error.code is ErrorCode.IMAGE_URL_REFUSED, f"{why}: {error.message}"
        assert hits == 0
        assert await fetch(f"{by_name}/a.png", policy=UrlPolicy.of(["LocalHost:*"], ["127.0.0.0/8"])) == png
        assert await fetch(f"{base}/a.png", policy=UrlPolicy.of([f"127.0.0.1:{port}"], ["127.0.0.1/32"])) == png
        async with aiohttp.ClientSession() as unchecked:  # a session that does not check addresses
            with pytest.raises(JobFailure) as caught:
                await fetch_image(f"{base}/a.png", LIMITS, unchecked)
        assert caught.value.code is ErrorCode.IMAGE_URL_REFUSED
    assert hits == 2


async def test_file_urls_only_from_allowed_roots(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    image = jpeg()
    (allowed / "a.jpg").write_bytes(image)
    (tmp_path / "secret.jpg").write_bytes(image)
    (allowed / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    os.mkfifo(allowed / "fifo.jpg")
    limits = ImageLimits(max_bytes=10**6, max_pixels=10**6, file_roots=(allowed,))
    assert await fetch(f"file://{allowed}/a.jpg", limits) == image
    assert await fetch(f"file://localhost{allowed}/a.jpg", limits) == image
    for url in (f"file://{tmp_path}/secret.jpg", f"file://{allowed}/../secret.jpg", f"file://{allowed}/link.jpg"):
        assert (await refused(url, limits)).code is ErrorCode.IMAGE_URL_REFUSED, url
    no_roots = await refused(f"file://{allowed}/a.jpg", ImageLimits(max_bytes=10**6, max_pixels=10**6))
    assert no_roots.code is ErrorCode.IMAGE_URL_REFUSED
    for name in ("none.jpg", "fifo.jpg"):  # inside the roots, but nothing to read
        assert (await refused(f"file://{allowed}/{name}", limits)).code is ErrorCode.IMAGE_FETCH_FAILED, name
    small = ImageLimits(max_bytes=100, max_pixels=10**6, file_roots=(allowed,))
    assert (await refused(f"file://{allowed}/a.jpg", small)).code is ErrorCode.IMAGE_TOO_LARGE
