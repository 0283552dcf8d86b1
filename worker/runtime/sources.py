"""Where artifacts may come from (`HOTSWAP_ARTIFACT_SOURCES`): one policy, checked on every URI fetched.

A string prefix test is not a location check: `file:///srv/models/../etc/model.pt`, its `%2e%2e`
spelling, `/srv/models-evil` beside `/srv/models`, a symlink inside the source pointing out of it,
or a redirect to another host all start with an allowed prefix. So a URI is decoded and
normalised first, then compared part by part:

- scheme, host and port exactly (default ports filled in), no user info, no query, no fragment;
- the path on segment boundaries (`/srv/models` allows `/srv/models/x`, not `/srv/models-evil/x`);
- `file://` paths resolved (`..` and symlinks) on both sides before the comparison, and read
  through the resolved path only;
- http(s) paths refused when a decoded segment is `.` or `..`, when a separator is percent-encoded
  (`%2f`, `%5c`: servers disagree on whether it separates), or when a segment is empty; what is
  fetched is the URL re-encoded from the checked segments, so the server gets what was checked.

Malformed input (NUL or other control bytes, bad percent-encoding, bytes that are not UTF-8, an
unparseable URI or port) is refused with a reason, as `SourceRefused`: never another exception.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes, urlsplit

from worker.runtime.repository import RepositoryError

SCHEMES = ("file", "http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
# RFC 3986 pchar minus what quote() keeps anyway: a checked segment goes back on the wire as itself.
_SEGMENT_SAFE = "!$&'()*+,;=:@"


class SourceRefused(RepositoryError):
    """A URI that is malformed or outside every allowed artifact source."""


@dataclass(frozen=True)
class Location:
    """A decoded, normalised URI: what the policy compares and what is fetched."""

    scheme: str
    host: str  # lower case; "" for file
    port: int | None  # the default port when none is written; None for file
    segments: tuple[str, ...]  # decoded path segments

    @property
    def url(self) -> str:
        """The canonical URI, each segment percent-encoded again."""
        path = "/" + "/".join(quote(segment, safe=_SEGMENT_SAFE) for segment in self.segments)
        if self.scheme == "file":
            return f"file://{path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{host}{port}{path}"

    @property
    def path(self) -> Path:
        return Path("/", *self.segments)

    def within(self, source: Location) -> bool:
        head = self.segments[: len(source.segments)]
        return (self.scheme, self.host, self.port, head) == (source.scheme, source.host, source.port, source.segments)

    def beside(self, relative: str) -> Location:
        """The location of `relative` (a/b/c) in this one's directory: a manifest beside its artifact."""
        return replace(self, segments=self.segments[:-1] + tuple(relative.split("/")))


def parse(uri: str, *, directory: bool = False) -> Location:
    """Decode and normalise `uri`; raises SourceRefused with the reason. `directory`: a trailing `/`
    is allowed (a source prefix). `file://` paths are normalised here and resolved by the policy."""
    if not isinstance(uri, str) or not uri:
        raise SourceRefused("an artifact URI must be a non-empty string")
    if _CONTROL.search(uri):
        raise SourceRefused(f"{uri!r} holds a control character, a NUL byte or a raw space")
    if _BAD_PERCENT.search(uri):
        raise SourceRefused(f"{uri!r} has bad percent-encoding")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise SourceRefused(f"{uri!r} is not a parseable URI: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise SourceRefused(f"{uri!r}: artifacts come by {', '.join(SCHEMES)} only")
    if "?" in uri or "#" in uri:
        raise SourceRefused(f"{uri!r}: artifact URIs take no query or fragment")
    if "@" in parts.netloc:
        raise SourceRefused(f"{uri!r}: artifact URIs carry no user info")
    text = _decoded(uri, parts.path)
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or port is not None:
            raise SourceRefused(f"{uri!r}: a file URI names no host (file:///path)")
        if not text.startswith("/"):
            raise SourceRefused(f"{uri!r}: a file URI needs an absolute path")
        return Location("file", "", None, Path(os.path.normpath(text)).parts[1:])
    if not parts.hostname or not parts.hostname.isascii():
        raise SourceRefused(f"{uri!r} names no host, or one that is not ASCII (use its IDNA form)")
    return Location(scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme],
                    _http_segments(uri, parts.path, text, directory))


def _decoded(uri: str, raw_path: str) -> str:
    try:
        text = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise SourceRefused(f"{uri!r}: the decoded path is not UTF-8") from None
    if "\x00" in text:
        raise SourceRefused(f"{uri!r}: the decoded path holds a NUL byte")
    return text


def _http_segments(uri: str, raw_path: str, text: str, directory: bool) -> tuple[str, ...]:
    if _ENCODED_SEPARATOR.search(raw_path):
        raise SourceRefused(f"{uri!r}: an encoded '/' or '\\' in the path")
    if text and not text.startswith("/"):
        raise SourceRefused(f"{uri!r}: the path must be absolute")
    segments = text.split("/")[1:]
    if directory and segments and segments[-1] == "":
        segments.pop()
    for segment in segments:
        if segment in ("", ".", "..") or "\\" in segment:
            raise SourceRefused(f"{uri!r}: '.', '..', empty segments or '\\' in the path")
    return tuple(segments)


class SourcePolicy:
    """The allowed artifact sources; `check` every URI before fetching it."""

    def __init__(self, sources: Sequence[str]) -> None:
        try:
            self.sources = tuple(_resolved(parse(source, directory=True)) for source in sources)
        except SourceRefused as exc:
            raise ValueError(f"invalid artifact source: {exc}") from None

    def check(self, uri: str) -> Location:
        """The location to fetch `uri` from (resolved, for file); raises SourceRefused."""
        location = _resolved(parse(uri))
        if not any(location.within(source) for source in self.sources):
            allowed = ", ".join(s.url for s in self.sources) or "none configured"
            raise SourceRefused(f"{uri} is not under an allowed artifact source (HOTSWAP_ARTIFACT_SOURCES: {allowed})")
        return location


def _resolved(location: Location) -> Location:
    # Symlinks and `..` resolved on the real file system: a link inside a source that points out of
    # it lands outside, and is refused. Reads then go through the resolved path, not the link.
    if location.scheme != "file":
        return location
    return replace(location, segments=Path(os.path.realpath(location.path)).parts[1:])
