"""What capture may open: allowed file roots, URL schemes and hosts, and which files count as images or videos.

Capture reads whatever source it is given with its own privileges, so a source is vetted here before anything is
opened, whether an Ingest call names it or ``SIGHTLINE_CAPTURE_SOURCES`` lists it. Deny by default: with no allowed
roots no file is read, with no allowed schemes or hosts no connection is made. The local stack allows the user's own
folders and loopback/private networks (tooling/localstack.py); a deployment names its own.

- Files: the path is resolved (``..`` and every symlink followed) before it is compared with the allowed roots, so
  neither can lead outside them; /proc, /sys and /dev are refused whatever the roots; only regular files are read;
  images by suffix and size here, by content in sources.py; videos by suffix, size and container signature (FFmpeg
  probes a file by its content, so a playlist or a text file named ``.mp4`` must never reach it).
- Streams: the scheme must be allowed, and the host must be listed by name or resolve only to addresses in allowed
  networks. A plain (non-TLS) stream is then opened at the address that was checked, so a name cannot resolve to one
  address for the check and to another for the connection; a TLS stream cannot be pinned that way (the certificate
  names the host), so its host name itself must be listed. The checked address covers FFmpeg's first connection;
  what FFmpeg may do after it (protocols, redirects, playlists) is bounded by ``ffmpeg_capture_options``.

Credentials in a URL (``rtsp://user:pass@cam``) never leave this module in a message: ``redact`` is what every log
line, error, source id and dead letter shows instead of the URL.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol
from urllib.parse import SplitResult, urlsplit, urlunsplit

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".pgm", ".ppm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts"})
NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https")  # what FFmpeg may be asked to connect with; nothing else
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_TLS_SCHEMES = frozenset({"rtsps", "https"})
_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
_SYSTEM_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))  # kernel and device files: never frames
DEFAULT_MAX_VIDEO_BYTES = 4 * 1024**3  # 4 GiB: larger video files are refused unopened unless configured
VIDEO_HEAD_BYTES = 189  # enough for every container signature below (MPEG-TS needs its second sync byte at 188)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class SourceError(ValueError):
    """The source cannot be opened; the message is safe to show the caller (no credentials)."""


class SourceRefused(SourceError):
    """The source policy does not allow this source: trying again will not help, only a configuration change."""


class SourceUnavailable(SourceError):
    """Allowed, but it cannot be opened now: missing, empty, unresolvable or not answering. Worth retrying."""


class FileTooLarge(SourceRefused):
    """A file over its kind's size limit (found from its stat: nothing of it was read)."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class SourceKind(StrEnum):
    FOLDER = "folder"
    IMAGE = "image"
    VIDEO = "video"
    STREAM = "stream"


@dataclass(frozen=True)
class Source:
    """A vetted source: what to open, and how to name it anywhere it is shown."""

    kind: SourceKind
    target: str  # the resolved path, or the URL (credentials included) pinned to the checked address: never shown
    display: str  # the path, or the URL without credentials or query: for logs, errors and dead letters

    @property
    def live(self) -> bool:
        """A stream paces itself (frames come at the camera's rate); files are paced by capture."""
        return self.kind is SourceKind.STREAM


class PolicySettings(Protocol):
    """The capture settings the policy is built from (capture/settings.py)."""

    allowed_roots: list[Path]
    allowed_schemes: list[str]
    allowed_hosts: list[str]
    max_image_file_bytes: int
    max_video_file_bytes: int


@dataclass(frozen=True)
class HostRules:
    """Allowed hosts: exact names, ``*.suffix`` names, and IP networks (a single address is a /32 or /128)."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".cams.example" for "*.cams.example"
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> HostRules:
        names, suffixes, networks = set(), [], []
        for entry in entries:
            rule = parse_host_entry(entry)
            if isinstance(rule, ipaddress.IPv4Network | ipaddress.IPv6Network):
                networks.append(rule)
            elif rule.startswith("."):
                suffixes.append(rule)
            else:
                names.add(rule)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.names or self.suffixes or self.networks)

    def names_host(self, host: str) -> bool:
        return host in self.names or any(host.endswith(suffix) for suffix in self.suffixes)

    def contains(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


def parse_host_entry(entry: str) -> Network | str:
    """One allowed-hosts entry: an IP network (``10.0.0.0/8``, ``10.1.2.3``) or a lower-case host name (``cam-1``,
    ``*.cams.example`` as ``.cams.example``). Raises ValueError naming the entry when it is neither."""
    text = entry.strip().lower()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    name = text.removeprefix("*.")
    labels = name.split(".")
    if not name or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"allowed host {entry!r} is neither an IP network (CIDR) nor a host name (or *.suffix)")
    return f".{name}" if text.startswith("*.") else name


@dataclass(frozen=True)
class SourcePolicy:
    """The allow-list every source is checked against. The default instance allows nothing."""

    roots: tuple[Path, ...] = ()  # resolved
    schemes: frozenset[str] = frozenset()
    hosts: HostRules = HostRules()
    max_image_bytes: int = 20 * 1024 * 1024
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES  # 0: no limit

    @classmethod
    def from_settings(cls, settings: PolicySettings, max_image_bytes: int | None = None) -> SourcePolicy:
        """The policy of the settings; ``max_image_bytes`` lowers the image limit (to what fits in one event)."""
        image_limit = settings.max_image_file_bytes
        if max_image_bytes is not None:
            image_limit = min(image_limit, max_image_bytes)
        return cls(
            roots=tuple(Path(root).expanduser().resolve() for root in settings.allowed_roots),
            schemes=frozenset(scheme.lower() for scheme in settings.allowed_schemes),
            hosts=HostRules.parse(settings.allowed_hosts),
            max_image_bytes=image_limit,
            max_video_bytes=settings.max_video_file_bytes,
        )

    @classmethod
    def local_files(cls) -> SourcePolicy:
        """Any image or video file its user can read, no network: for a CLI reading its own user's files
        (``sightline gate``), where the caller and the reader are the same person."""
        return cls(roots=(Path("/"),))

    # Vetting a source ----------------------------------------------------------------------------------------------

    def vet(self, uri: str) -> Source:
        """The source ``uri`` names, checked against the policy. Raises SourceRefused or SourceUnavailable."""
        if "\x00" in uri:  # no path or URL has one; the operating system refuses it with a ValueError, not an OSError
            raise SourceRefused("source names a NUL character: not a file or URL")
        if "://" in uri:
            return self._vet_url(uri)
        return self._vet_path(uri)

    def _vet_path(self, uri: str) -> Source:
        path = self.resolve_path(Path(uri).expanduser())
        try:
            info = path.stat()
        except FileNotFoundError:
            raise SourceUnavailable(f"source {uri!r} does not exist") from None
        except OSError as exc:
            raise SourceUnavailable(f"source {uri!r} cannot be read: {exc.strerror}") from None
        if stat.S_ISDIR(info.st_mode):
            return Source(SourceKind.FOLDER, str(path), uri)
        kind = self.file_kind(path)
        if kind is None:
            raise SourceRefused(
                f"source {uri!r} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a "
                f"video file ({', '.join(sorted(VIDEO_SUFFIXES))})"
            )
        self.check_file(path, info, kind, uri)
        return Source(kind, str(path), uri)

    def resolve_path(self, path: Path) -> Path:
        """The real path (``..`` and symlinks followed), if it is inside an allowed root and not a system tree."""
        if not self.roots:
            raise SourceRefused(
                "file sources are not allowed here: list the folders capture may read in "
                "SIGHTLINE_CAPTURE_ALLOWED_ROOTS"
            )
        real = Path(os.path.realpath(path))  # follows every symlink, also of a path that does not exist (yet)
        if any(real.is_relative_to(tree) for tree in _SYSTEM_TREES):
            raise SourceRefused(f"source {str(path)!r} is a system file, never a frame source")
        if not any(real.is_relative_to(root) for root in self.roots):
            # The real path is not echoed: where a symlink leads is none of the caller's business.
            raise SourceRefused(
                f"source {str(path)!r} is outside the folders capture may read (SIGHTLINE_CAPTURE_ALLOWED_ROOTS)"
            )
        return real

    @staticmethod
    def file_kind(path: Path) -> SourceKind | None:
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return SourceKind.IMAGE
        if suffix in VIDEO_SUFFIXES:
            return SourceKind.VIDEO
        return None

    def check_file(self, path: Path, info: os.stat_result, kind: SourceKind, name: str) -> None:
        """Refuse what is not a regular, non-empty file within the size limit of its kind (from its stat: unread)."""
        if not stat.S_ISREG(info.st_mode):
            raise SourceRefused(f"source {name!r} is not a regular file")
        if info.st_size == 0:
            raise SourceRefused(f"source {name!r} is empty")
        limit = self.max_image_bytes if kind is SourceKind.IMAGE else self.max_video_bytes
        if limit and info.st_size > limit:
            setting = "MAX_IMAGE_FILE_BYTES" if kind is SourceKind.IMAGE else "MAX_VIDEO_FILE_BYTES"
            raise FileTooLarge(
                f"source {name!r} is {info.st_size} bytes; the limit is {limit} (SIGHTLINE_CAPTURE_{setting})",
                info.st_size,
            )

    def _vet_url(self, uri: str) -> Source:
        display = redact(uri)
        parts = _split(uri, display)
        scheme = parts.scheme.lower()
        if scheme not in self.schemes:
            allowed = ", ".join(sorted(self.schemes)) or "none"
            raise SourceRefused(
                f"source {display!r}: scheme {scheme!r} is not allowed (allowed: {allowed}; "
                "SIGHTLINE_CAPTURE_ALLOWED_SCHEMES)"
            )
        host, port = _host_port(parts, scheme, display)
        if not self.hosts:
            raise SourceRefused(f"source {display!r}: no network hosts are allowed (SIGHTLINE_CAPTURE_ALLOWED_HOSTS)")
        if self.hosts.names_host(host):
            return Source(SourceKind.STREAM, uri, display)  # listed by name: the operator trusts that name's DNS
        literal = _ip_literal(host)
        if literal is None and scheme in _TLS_SCHEMES:
            raise SourceRefused(
                f"source {display!r}: a {scheme} host must be listed by name in "
                "SIGHTLINE_CAPTURE_ALLOWED_HOSTS (a TLS stream cannot be pinned to a checked address)"
            )
        addresses = [literal] if literal is not None else _resolve(host, port, display)
        for address in addresses:
            if not self.hosts.contains(address):
                where = f"address {address}" if literal is not None else f"{host} resolves to {address}, which"
                raise SourceRefused(
                    f"source {display!r}: {where} is not in an allowed network (SIGHTLINE_CAPTURE_ALLOWED_HOSTS)"
                )
        target = uri if literal is not None else _pinned(parts, addresses[0])
        return Source(SourceKind.STREAM, target, display)


# What FFmpeg may do once it opens a source (OPENCV_FFMPEG_CAPTURE_OPTIONS, set by sources.py around the open; OpenCV
# passes them to avformat_open_input). The checked address covers FFmpeg's first connection only; these bound what
# follows: which protocols it may open (an RTSP camera cannot hand it file: or http: URLs), no HTTP redirect (one
# could lead anywhere), and only demuxers of self-contained media (no HLS/DASH playlist, whose segments may be on
# any host; no concat or image-sequence demuxer). What they do not bound: an RTSP server's redirect (FFmpeg follows
# it to any rtsp host, with no option to refuse) and where a server tells FFmpeg to exchange RTP over UDP.
FILE_DEMUXERS = "mov,matroska,avi,mpeg,mpegvideo,mpegts"  # exactly the containers looks_like_video admits
HTTP_DEMUXERS = f"{FILE_DEMUXERS},mpjpeg,mjpeg"  # plus MJPEG cameras (multipart/x-mixed-replace or bare JPEGs)
_FFMPEG_OPTIONS: dict[str, dict[str, str]] = {
    "file": {"protocol_whitelist": "file", "format_whitelist": FILE_DEMUXERS},
    # OpenCV asks for RTSP over TCP when it is given no options; asked again here, as these replace its default.
    "rtsp": {"protocol_whitelist": "rtsp,rtp,udp,tcp", "rtsp_flags": "prefer_tcp"},
    "rtsps": {"protocol_whitelist": "rtsp,rtsps,tls,tcp", "rtsp_flags": "prefer_tcp"},  # FFmpeg: rtsps is TCP only
    "http": {"protocol_whitelist": "http,tcp", "max_redirects": "0", "format_whitelist": HTTP_DEMUXERS},
    "https": {"protocol_whitelist": "https,tls,tcp", "max_redirects": "0", "format_whitelist": HTTP_DEMUXERS},
}


def ffmpeg_capture_options(source: Source) -> str:
    """The OPENCV_FFMPEG_CAPTURE_OPTIONS (``key;value|key;value``) a vetted video file or stream is opened with."""
    if source.kind is SourceKind.VIDEO:
        scheme = "file"
    elif source.kind is SourceKind.STREAM:
        scheme = urlsplit(source.target).scheme.lower()
    else:
        raise ValueError(f"a {source.kind} source is not opened by FFmpeg")
    return "|".join(f"{key};{value}" for key, value in _FFMPEG_OPTIONS[scheme].items())


def looks_like_video(head: bytes) -> bool:
    """True when the first bytes are those of a video container FFmpeg reads without following references."""
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # MP4, MOV, M4V (ISO/QuickTime atoms)
        or (head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"))  # AVI
        or head[:4] == b"\x1a\x45\xdf\xa3"  # Matroska, WebM (EBML)
        or head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")  # MPEG program / elementary stream
        or (len(head) > 188 and head[0] == head[188] == 0x47)  # MPEG transport stream: two sync bytes
    )


def redact(uri: str) -> str:
    """The URI as it may be shown: no user, password or query (they carry credentials); paths unchanged."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return f"{uri.split('://', 1)[0][:16]}://<unparseable>"
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    if parts.username is not None or parts.password is not None:
        netloc = f"***@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _split(uri: str, display: str) -> SplitResult:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018  (parsing the port is what raises for a malformed one)
    except ValueError:
        raise SourceRefused(f"source {display!r} is not a valid URL") from None
    return parts


def _host_port(parts: SplitResult, scheme: str, display: str) -> tuple[str, int]:
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise SourceRefused(f"source {display!r} names no host")
    return host, parts.port or _DEFAULT_PORTS[scheme]


def _ip_literal(host: str) -> Address | None:
    try:
        return _unmapped(ipaddress.ip_address(host))
    except ValueError:
        return None


def _unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _resolve(host: str, port: int, display: str) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise SourceUnavailable(f"source {display!r}: cannot resolve {host}: {exc}") from None
    # The scope of a link-local IPv6 address ("fe80::1%eth0") is not part of the address.
    return list(dict.fromkeys(_unmapped(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos))


def _pinned(parts: SplitResult, address: Address) -> str:
    """The URL with its host replaced by the checked address (user, password, port, path and query kept)."""
    userinfo = parts.netloc.rpartition("@")[0]
    host = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{userinfo}@{host}" if "@" in parts.netloc else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
