"""The image URL policy on its own: host patterns, ports, addresses, the filtering resolver, and
URL strings no parser accepts (the fetches against live servers are in test_fetch.py)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
from yarl import URL

from schemas.errors import ErrorCode, JobFailure
from worker.config import WorkerSettings
from worker.fetch import AddressRefused, PolicyResolver, UrlPolicy, fetch_image, image_session
from worker.runtime.images import ImageLimits

LIMITS = ImageLimits(max_bytes=10**6, max_pixels=10**6, fetch_timeout_s=2, read_timeout_s=1, file_roots=(Path("/"),))


def allows(patterns: list[str], url: str, networks: tuple[str, ...] = ()) -> bool:
    return UrlPolicy.of(patterns, networks).refusal(URL(url)) is None


@pytest.mark.parametrize(
    ("pattern", "url", "allowed"),
    [
        ("images.example.com", "http://images.example.com/a.png", True),
        ("Images.Example.COM", "https://IMAGES.example.com/a.png", True),  # case-insensitive
        ("images.example.com", "http://images.example.com./a.png", True),  # the same name, rooted
        ("images.example.com", "http://example.com/a.png", False),
        ("images.example.com", "http://images.example.com.evil.org/a.png", False),
        ("*.example.com", "http://a.example.com/a.png", True),
        ("*.example.com", "http://a.b.example.com/a.png", True),
        ("*.example.com", "http://example.com/a.png", False),  # list the apex itself as well
        ("*.example.com", "http://badexample.com/a.png", False),
        ("*", "http://anything.org/a.png", True),
        ("*", "http://8.8.8.8/a.png", False),  # IP literals only where listed
        ("8.8.8.8", "http://8.8.8.8/a.png", True),
        ("8.8.8.8", "http://8.8.4.4/a.png", False),
        ("[2606:4700::1111]", "http://[2606:4700:0::1111]/a.png", True),
        ("2606:4700::1111", "http://[2606:4700::1111]/a.png", True),
        # Ports: none in the pattern means the scheme's default only.
        ("cdn.example", "http://cdn.example:80/a.png", True),
        ("cdn.example", "https://cdn.example/a.png", True),
        ("cdn.example", "http://cdn.example:8080/a.png", False),
        ("cdn.example", "http://cdn.example:443/a.png", False),
        ("cdn.example:8080", "http://cdn.example:8080/a.png", True),
        ("cdn.example:8080", "http://cdn.example/a.png", False),
        ("cdn.example:*", "http://cdn.example:8080/a.png", True),
        ("[2606:4700::1111]:8443", "https://[2606:4700::1111]:8443/a.png", True),
        ("[2606:4700::1111]:8443", "https://[2606:4700::1111]/a.png", False),
        ("cdn.example", "ftp://cdn.example/a.png", False),
    ],
)
def test_host_patterns(pattern: str, url: str, allowed: bool) -> None:
    assert allows([pattern], url) is allowed


def test_nothing_is_allowed_by_default_and_several_patterns_combine() -> None:
    assert UrlPolicy().refusal(URL("http://images.example.com/a.png")) is not None
    assert allows(["a.example", "b.example:8080"], "http://b.example:8080/x")
    assert not allows(["a.example", "b.example:8080"], "http://c.example/x")


@pytest.mark.parametrize(
    "pattern", ["a.*.com", "*.*.com", "ex ample.com", "h:0", "h:99999", "h:x", "127.1", "[::1", "[::1]x", "::g", ""]
)
def test_bad_host_patterns_are_refused_when_the_worker_starts(pattern: str) -> None:
    with pytest.raises(ValueError):
        UrlPolicy.of([pattern])


@pytest.mark.parametrize(
    ("address", "refused_as"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata services
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not globally routable"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_special_addresses_are_refused(address: str, refused_as: str | None) -> None:
    refusal = UrlPolicy().address_refusal(ipaddress.ip_address(address))
    assert (refusal is None) if refused_as is None else (refusal is not None and refused_as in refusal), refusal


def test_listed_networks_are_allowed_and_only_they() -> None:
    policy = UrlPolicy.of([], ["10.0.0.0/8", "fd00::/8"])
    assert policy.address_refusal(ipaddress.ip_address("10.9.8.7")) is None
    assert policy.address_refusal(ipaddress.ip_address("::ffff:10.9.8.7")) is None
    assert policy.address_refusal(ipaddress.ip_address("fd12::1")) is None
    assert policy.address_refusal(ipaddress.ip_address("192.168.1.1")) is not None
    assert policy.address_refusal(ipaddress.ip_address("127.0.0.1")) is not None


async def test_the_resolver_hands_aiohttp_only_allowed_addresses() -> None:
    # `localhost` resolves to 127.0.0.1 here (and often to ::1 as well).
    allowing = PolicyResolver(UrlPolicy.of([], ["127.0.0.0/8"]))
    results = await allowing.resolve("localhost", 80, socket.AF_UNSPEC)
    assert results and all(ipaddress.ip_address(r["host"]).version == 4 for r in results)
    with pytest.raises(AddressRefused, match="loopback"):
        await PolicyResolver(UrlPolicy()).resolve("localhost", 80, socket.AF_UNSPEC)
    only_v6 = PolicyResolver(UrlPolicy.of([], ["::1/128"]))
    try:
        v6 = await only_v6.resolve("localhost", 80, socket.AF_UNSPEC)
    except AddressRefused:
        v6 = []  # no ::1 for localhost on this machine: 127.0.0.1 was dropped
    assert all(r["host"] == "::1" for r in v6)
    for resolver in (allowing, only_v6):
        await resolver.close()


UNPARSEABLE = [
    "http://[::1",
    "http://[::1]x/",
    "http://" + "a" * 300 + "/a.png",
    "http://" + "a." * 130 + "com/a.png",  # over 253 characters
    "file:///tmp/a\x00b.png",
    "file:///tmp/a%00b.png",
    "http://bücher.example/a.png",
    "http://ｅxample.com/a.png",  # fullwidth: NFKC would make it example.com
    "http://\u200bexample.com/",
    "http://user:pass@example.com/a.png",
    "http://user@example.com/a.png",
    "http://example.com:99999/a.png",
    "http://example.com:0/a.png",
    "http://example.com:-1/a.png",
    "http://example.com:port/a.png",
    "http://127.1/a.png",
    "http://2130706433/a.png",
    "http://127.0.0.1./a.png",
    "http://[fe80::1%25eth0]/a.png",
    "http://exa mple.com/a.png",
    "http://example.com\n/a.png",
    "http:///a.png",
    "file://server/share/a.png",
    "ftp://example.com/a.png",
    "javascript:alert(1)",
    "not a url",
    "",
    "http://\udcff.example/",  # a lone surrogate: not even encodable
]


@pytest.mark.parametrize("url", UNPARSEABLE)
async def test_urls_no_parser_accepts_are_clean_rejections(url: str) -> None:
    # Allowing everything: whatever stops these is the URL itself, not the policy.
    async with image_session(UrlPolicy.of(["*"], ["0.0.0.0/0", "::/0"])) as session:
        with pytest.raises(JobFailure) as caught:
            await fetch_image(url, LIMITS, session)
    assert caught.value.code is ErrorCode.IMAGE_URL_REFUSED
    assert len(caught.value.message) < 400


def test_settings_take_comma_separated_hosts_and_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_IMAGE_URL_HOSTS", "images.example.com, *.cdn.example:8443 ,")
    monkeypatch.setenv("HOTSWAP_IMAGE_URL_NETWORKS", "10.0.0.0/8,fd00::/8")
    settings = WorkerSettings()
    assert settings.image_url_hosts == ["images.example.com", "*.cdn.example:8443"]
    policy = UrlPolicy.of(settings.image_url_hosts, settings.image_url_networks)
    assert policy.refusal(URL("https://a.cdn.example:8443/x.png")) is None
    assert policy.networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    monkeypatch.setenv("HOTSWAP_IMAGE_URL_NETWORKS", "10.0.0.1/8")  # host bits set: a typo, refused
    with pytest.raises(ValueError):
        WorkerSettings()
    monkeypatch.delenv("HOTSWAP_IMAGE_URL_HOSTS")
    monkeypatch.delenv("HOTSWAP_IMAGE_URL_NETWORKS")
    assert WorkerSettings().image_url_hosts == [] and WorkerSettings().image_url_networks == []
