"""Which image URLs a worker could fetch at all: the syntax, before any policy.

A job whose URL fails here is malformed (`invalid_job`); the worker's fetcher runs the same check
again, so that no URL string whatsoever can make it raise anything but a clean rejection. Whether
a well-formed URL may be fetched (allowed hosts, addresses, file roots) is the worker's policy,
not part of the wire contract.
"""

from __future__ import annotations

import ipaddress
import re

from yarl import URL

SCHEMES = frozenset({"http", "https", "file"})

# One DNS label; underscores appear in real host names, so they are let through.
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_MAX_NAME = 253  # RFC 1035, without the trailing dot
# C0 controls and DEL: urllib (and so yarl) silently drops tabs and newlines, which would make
# the URL checked differ from the URL written.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_image_url(url: str) -> URL:
    """The URL, parsed, when a worker could fetch it; otherwise `ValueError` saying why not."""
    if _CONTROL.search(url):
        raise ValueError("the URL contains control characters")
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:  # yarl raises both, and UnicodeError (a ValueError)
        raise ValueError(f"not a valid URL: {exc}") from exc
    if parsed.scheme not in SCHEMES:
        raise ValueError("only http, https and file URLs are fetched")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise ValueError("credentials in image URLs are not supported")
    if parsed.scheme == "file":
        _check_file(parsed)
    else:
        _check_authority(url)
        _check_host(parsed.raw_host or "")
        if parsed.port is None or not 1 <= parsed.port <= 65535:
            raise ValueError(f"port {parsed.port} is out of range")
    return parsed


def _check_file(parsed: URL) -> None:
    if parsed.raw_host not in (None, "", "localhost"):
        raise ValueError("a file URL names no host (file:///path)")
    if not parsed.path.startswith("/"):
        raise ValueError("a file URL's path is absolute")
    if "\x00" in parsed.path:
        raise ValueError("a file URL's path contains a NUL byte")


def _check_authority(url: str) -> None:
    # yarl maps non-ASCII hosts through IDNA and NFKC ("ｅxample.com" becomes "example.com"):
    # host patterns would then match a name the producer never wrote. Hosts are ASCII here.
    authority = re.split(r"[/?#]", url.split("://", 1)[1], maxsplit=1)[0]
    if not authority.isascii():
        raise ValueError("the host is not ASCII: write it in its IDNA form (xn--…)")


def _check_host(host: str) -> None:
    """An IP address in its standard form, or a DNS name the resolver will accept."""
    if not host:
        raise ValueError("the URL has no host")
    if "%" in host:
        raise ValueError("IPv6 zone identifiers are not supported")
    if ":" in host:  # yarl has already parsed the brackets: an IPv6 address
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"host {shorten(host)!r} is not an IPv6 address: {exc}") from None
        return
    name = host.lower().removesuffix(".")
    labels = name.split(".")
    if len(name) > _MAX_NAME or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"host {shorten(host)!r} is not a valid host name")
    if labels[-1].isdigit():
        # An IPv4 address, or a legacy numeric form of one ("127.1", "2130706433"), which the
        # resolver would turn into an address no host pattern names: only the standard form.
        try:
            ipaddress.IPv4Address(host)  # no trailing dot either: "127.0.0.1." is no name
        except ValueError:
            raise ValueError(f"host {shorten(host)!r} is neither a host name nor an IPv4 address") from None


def shorten(text: str, limit: int = 80) -> str:
    """`text`, cut to `limit` characters with an ellipsis: URLs in messages and logs stay a line."""
    return text if len(text) <= limit else text[:limit] + "…"
