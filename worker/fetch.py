"""Fetching a job's image by URL: only from where the operator allows, within the byte limit.

A worker sits inside the operator's network, so a URL from a producer must not reach what only
the worker can reach (its own `/metrics`, a cloud metadata service, an internal API). Hence:

- http(s) URLs only to hosts matching `HOTSWAP_IMAGE_URL_HOSTS` (none by default: off);
- never to a loopback, link-local, private, unspecified, multicast or reserved address unless it
  is in `HOTSWAP_IMAGE_URL_NETWORKS`. The check is made on the address connected to: the
  session's resolver drops refused addresses from what it hands aiohttp (no DNS-rebinding gap
  between a check and the connect), and IP-literal hosts, which aiohttp does not resolve, are
  checked here;
- redirects followed one hop at a time (at most `MAX_REDIRECTS`), each hop checked again;
- `file://` only inside `HOTSWAP_IMAGE_FILE_ROOTS`.

The body is read to its end, never past the byte limit (decompressed size, when the server
compresses), within a total time and a time per read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from schemas.errors import ErrorCode, JobFailure
from schemas.urls import parse_image_url, shorten
from worker.runtime.images import ImageLimits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Redirect hops followed at most (each one checked against the policy like the first URL).
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = 0  # a host pattern's port `*`
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

_SHOWN = 200  # characters of a URL or an error a message quotes
_REFUSED = ErrorCode.IMAGE_URL_REFUSED
_FAILED = ErrorCode.IMAGE_FETCH_FAILED


@dataclass(frozen=True)
class HostPattern:
    """`name`, `*.suffix` (any name below it), `*` (any name), or an IP address (`[v6]`), each
    with an optional `:port` or `:*`; without one, only the scheme's default port (80, 443)."""

    name: str  # lower case, no trailing dot; "" for an address
    address: IPAddress | None
    port: int | None  # None: the scheme's default; ANY_PORT: any

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        host, port = _split_port(text.strip().lower())
        if ":" in host or _looks_numeric(host):
            address = _address_or_none(host)  # only in its standard form, as URLs must write it
            if address is None:
                raise ValueError(f"bad host pattern {text!r}: {host!r} is not an IP address")
            return cls("", address, port)
        name = host.removesuffix(".")
        checked = name.removeprefix("*.") if name != "*" else "example"
        try:
            parse_image_url(f"http://{checked}/")
        except ValueError as exc:
            raise ValueError(f"bad host pattern {text!r}: {exc}") from None
        return cls(name, None, port)

    def matches(self, host: str, port: int, default_port: int) -> bool:
        if not (port == default_port if self.port is None else self.port in (ANY_PORT, port)):
            return False
        literal = _address_or_none(host)
        if literal is not None or self.address is not None:  # addresses only where listed as such
            return literal == self.address
        name = host.lower().removesuffix(".")
        if self.name == "*":
            return True
        if self.name.startswith("*."):
            return name.endswith(self.name[1:])
        return name == self.name


def _split_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host pattern {text!r}")
        return host, _port(rest[1:], text) if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _port(port, text)
    return text, None  # a name, or an IPv6 address without brackets (and so without a port)


def _port(text: str, pattern: str) -> int:
    if text == "*":
        return ANY_PORT
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"bad port in host pattern {pattern!r}")
    return int(text)


def _looks_numeric(host: str) -> bool:
    return host.replace(".", "").isdigit()


def _address_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class UrlPolicy:
    """Where http(s) image URLs may be fetched from; the default allows nothing."""

    hosts: tuple[HostPattern, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, hosts: Iterable[str], networks: Iterable[str | IPNetwork] = ()) -> UrlPolicy:
        return cls(
            tuple(HostPattern.parse(h) for h in hosts),
            tuple(n if not isinstance(n, str) else ipaddress.ip_network(n) for n in networks),
        )

    def refusal(self, url: URL) -> str | None:
        """Why this URL may not be fetched, or None when it may (its name's addresses are
        checked when they are resolved)."""
        if url.scheme not in _DEFAULT_PORTS:
            return f"{url.scheme} URLs are not fetched from here"
        if not self.hosts:
            return "no image URL host is allowed (HOTSWAP_IMAGE_URL_HOSTS is empty)"
        host, port = url.raw_host or "", url.port or 0
        if not any(p.matches(host, port, _DEFAULT_PORTS[url.scheme]) for p in self.hosts):
            return f"{url.scheme}://{url.raw_authority} is not in HOTSWAP_IMAGE_URL_HOSTS"
        literal = _address_or_none(host)
        if literal is not None:
            return self.address_refusal(literal)
        return None

    def address_refusal(self, address: IPAddress) -> str | None:
        """Why connecting to this address is refused, or None when it is allowed."""
        destinations = _destinations(address)
        if any(a in network for network in self.networks for a in {address, *destinations}):
            return None
        for destination in destinations:
            kind = _special_kind(destination)
            if kind is not None:
                return f"address {destination} is {kind} (not in HOTSWAP_IMAGE_URL_NETWORKS)"
        return None


def _destinations(address: IPAddress) -> list[IPAddress]:
    """Where packets to this address end up: an IPv4-mapped or NAT64 address at its IPv4
    address; a 6to4 or Teredo address at itself and at the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv4Address):
        return [address]
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)]
    found: list[IPAddress] = [address]
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.append(address.teredo[1])
    return found


def _special_kind(address: IPAddress) -> str | None:
    kinds = (  # the most telling first: Python counts 0.0.0.0/8 and 240.0.0.0/4 as private too
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("not globally routable", not address.is_global),  # e.g. 100.64.0.0/10 (carrier NAT)
    )
    return next((kind for kind, hit in kinds if hit), None)


class AddressRefused(OSError):
    """From the resolver: aiohttp wraps it in a `ClientConnectorError` (`.os_error`)."""


class PolicyResolver(AbstractResolver):
    """Resolves names as aiohttp's threaded resolver does, minus the addresses the policy
    refuses: aiohttp connects only to what it gets from here."""

    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        refusals = [self._refusal(result["host"]) for result in results]
        allowed = [result for result, refusal in zip(results, refusals, strict=True) if refusal is None]
        if not allowed:
            raise AddressRefused(f"{host}: {'; '.join(r for r in refusals if r) or 'no address'}")
        return allowed

    def _refusal(self, host: str) -> str | None:
        address = _address_or_none(host)
        return f"unusable address {host!r}" if address is None else self._policy.address_refusal(address)

    async def close(self) -> None:
        await self._inner.close()


class PolicyConnector(aiohttp.TCPConnector):
    """A TCP connector that connects only to addresses the policy allows."""

    def __init__(self, policy: UrlPolicy) -> None:
        super().__init__(resolver=PolicyResolver(policy))
        self.policy = policy


def image_session(policy: UrlPolicy) -> aiohttp.ClientSession:
    """The worker's one session for image URLs (call with the event loop running)."""
    # No proxy from the environment (the address connected to would be the proxy's, unchecked);
    # no cookies (one producer's image server must not set what another's job sends).
    return aiohttp.ClientSession(
        connector=PolicyConnector(policy), trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
    )


async def fetch_image(url: str, limits: ImageLimits, session: aiohttp.ClientSession) -> bytes:
    """The bytes an image URL names. Raises `JobFailure`, and nothing else, whatever the URL."""
    shown = shorten(url, _SHOWN)
    try:
        target = parse_image_url(url)
    except ValueError as exc:
        raise JobFailure(_REFUSED, f"cannot fetch {shown}: {_why(exc)}") from exc
    if target.scheme == "file":
        return await asyncio.to_thread(_read_allowed_file, Path(target.path), limits)
    connector = session.connector
    if not isinstance(connector, PolicyConnector):  # fail closed: no address check, no fetch
        raise JobFailure(_REFUSED, "this HTTP session does not check addresses; nothing is fetched")
    try:
        async with asyncio.timeout(limits.fetch_timeout_s):
            return await _follow(target, shown, limits, session, connector.policy)
    except TimeoutError as exc:
        raise JobFailure(_FAILED, f"GET {shown} timed out after {limits.fetch_timeout_s:g} s") from exc


async def _follow(
    url: URL, shown: str, limits: ImageLimits, session: aiohttp.ClientSession, policy: UrlPolicy
) -> bytes:
    """GET, following redirects ourselves so that every hop meets the policy."""
    for hop in range(MAX_REDIRECTS + 1):
        refusal = policy.refusal(url)
        if refusal is not None:
            where = f"{shown} redirects to {shorten(str(url), _SHOWN)}, refused" if hop else f"{shown} refused"
            raise JobFailure(_REFUSED, f"{where}: {refusal}")
        got = await _get(url, limits, session)
        if isinstance(got, bytes):
            return got
        url = got
    raise JobFailure(_FAILED, f"GET {shown}: more than {MAX_REDIRECTS} redirects")


async def _get(url: URL, limits: ImageLimits, session: aiohttp.ClientSession) -> bytes | URL:
    """One request: the body, or the URL it redirects to."""
    shown = shorten(str(url), _SHOWN)
    per_read = limits.read_timeout_s
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=per_read, sock_read=per_read)
    try:
        async with session.get(url, allow_redirects=False, timeout=timeout) as response:
            if response.status in _REDIRECTS:
                return _redirect_target(url, response)
            if response.status != 200:
                raise JobFailure(_FAILED, f"GET {shown} answered HTTP {response.status}")
            return await _read_body(response, shown, limits)
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, AddressRefused):
            raise JobFailure(_REFUSED, f"GET {shown} refused: {_why(exc.os_error)}") from exc
        raise JobFailure(_FAILED, f"GET {shown} failed: {_why(exc)}") from exc
    except aiohttp.ServerTimeoutError as exc:  # before the total: one connect or one read
        doing = "connecting" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "waiting for data"
        raise JobFailure(_FAILED, f"GET {shown} timed out after {per_read:g} s {doing}") from exc
    except aiohttp.InvalidURL as exc:  # a ValueError too: before the generic one below
        raise JobFailure(_REFUSED, f"cannot fetch {shown}: {_why(exc)}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise JobFailure(_FAILED, f"GET {shown} failed: {type(exc).__name__}: {_why(exc)}") from exc
    except ValueError as exc:  # a URL the checks let through but the HTTP stack cannot use
        raise JobFailure(_REFUSED, f"cannot fetch {shown}: {_why(exc)}") from exc


def _redirect_target(url: URL, response: aiohttp.ClientResponse) -> URL:
    shown = shorten(str(url), _SHOWN)
    location = response.headers.get(hdrs.LOCATION)
    if not location:
        raise JobFailure(_FAILED, f"GET {shown} answered HTTP {response.status} without a Location")
    try:
        return parse_image_url(str(url.join(URL(location))))  # relative to the URL that answered
    except ValueError as exc:
        raise JobFailure(_REFUSED, f"GET {shown} redirects to an unusable URL: {_why(exc)}") from exc


async def _read_body(response: aiohttp.ClientResponse, shown: str, limits: ImageLimits) -> bytes:
    """The whole body, or `image_too_large` as soon as it is over the limit."""
    declared = response.content_length
    encoded = response.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() != "identity"
    # Compressed, the declared length is not the image's: the decompressed bytes are counted.
    if declared is not None and declared > limits.max_bytes and not encoded:
        raise JobFailure(
            ErrorCode.IMAGE_TOO_LARGE, f"{shown} is {declared} bytes; the limit is {limits.max_bytes}"
        )
    data = bytearray()
    # Each chunk is what has arrived (aiohttp inflates compressed bodies a bounded piece at a
    # time): memory stays within the limit plus one chunk, even for a gzip bomb.
    async for chunk in response.content.iter_any():
        data += chunk
        if len(data) > limits.max_bytes:
            raise JobFailure(
                ErrorCode.IMAGE_TOO_LARGE, f"{shown} is over the {limits.max_bytes}-byte limit"
            )
    return bytes(data)


def _read_allowed_file(path: Path, limits: ImageLimits) -> bytes:
    if not limits.file_roots:
        raise JobFailure(_REFUSED, "file:// image URLs are off (HOTSWAP_IMAGE_FILE_ROOTS is empty)")
    try:
        resolved = path.resolve()
        inside = any(resolved.is_relative_to(root.resolve()) for root in limits.file_roots)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
        raise JobFailure(_FAILED, f"cannot read {path}: {exc}") from exc
    if not inside:
        raise JobFailure(_REFUSED, f"{path} is outside the directories images may come from")
    try:
        # A FIFO or a device inside a root would block or never end: regular files only.
        if not stat.S_ISREG(resolved.stat().st_mode):
            raise JobFailure(_FAILED, f"cannot read {path}: not a regular file")
        with resolved.open("rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as exc:
        raise JobFailure(_FAILED, f"cannot read {path}: {exc}") from exc
    if len(data) > limits.max_bytes:
        raise JobFailure(ErrorCode.IMAGE_TOO_LARGE, f"{path} is over the {limits.max_bytes}-byte limit")
    return data


def _why(exc: BaseException) -> str:
    # aiohttp quotes what it could not parse, a whole body at times: results and logs get a line.
    return shorten(" ".join(str(exc).split()) or type(exc).__name__, _SHOWN)
