"""The capture source policy on real paths (tmp_path, /proc, /dev, FIFOs) and real name resolution (loopback only):
what is refused, what is allowed and how it is opened, and that credentials never appear in what is shown."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from sightline.capture.settings import CaptureSettings
from sightline.capture.source_policy import (
    DEFAULT_MAX_VIDEO_BYTES,
    HostRules,
    Source,
    SourceKind,
    SourcePolicy,
    SourceRefused,
    SourceUnavailable,
    ffmpeg_capture_options,
    looks_like_video,
    parse_host_entry,
    redact,
)
from sightline.tooling.localstack import local_capture_policy

SECRET = "s3cr3t-pw"
JPEG = b"\xff\xd8\xff\xe0" + bytes(60)


def policy(*roots: Path, schemes: tuple[str, ...] = (), hosts: tuple[str, ...] = (), **limits: int) -> SourcePolicy:
    return SourcePolicy(
        roots=tuple(r.resolve() for r in roots), schemes=frozenset(schemes), hosts=HostRules.parse(hosts), **limits
    )


# --- files -------------------------------------------------------------------------------------------------------


def test_by_default_no_file_is_opened_and_the_refusal_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(JPEG)
    with pytest.raises(SourceRefused, match="SIGHTLINE_CAPTURE_ALLOWED_ROOTS"):
        SourcePolicy().vet(str(tmp_path / "a.jpg"))
    settings = CaptureSettings()
    assert (settings.allowed_roots, settings.allowed_schemes, settings.allowed_hosts) == ([], [], [])


def test_paths_are_resolved_before_the_root_check_so_dots_and_symlinks_cannot_escape(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (outside / "key.jpg").write_bytes(JPEG)
    (root / "inside.jpg").write_bytes(JPEG)
    (root / "link.jpg").symlink_to(outside / "key.jpg")
    (root / "folder").symlink_to(outside, target_is_directory=True)
    allowed = policy(root)
    for escape in (
        f"{root}/../outside/key.jpg",
        str(root / "link.jpg"),
        str(root / "folder"),
        str(root / "folder" / "key.jpg"),
        str(outside / "key.jpg"),
    ):
        with pytest.raises(SourceRefused, match="outside the folders"):
            allowed.vet(escape)
    (root / "sub").mkdir()
    assert allowed.vet(f"{root}/sub/../inside.jpg").target == allowed.vet(str(root / "inside.jpg")).target
    with pytest.raises(SourceRefused, match="outside the folders"):  # a symlink first, then "..": from where it leads
        allowed.vet(f"{root}/folder/../root/../outside/key.jpg")
    (outside / "back.jpg").symlink_to(root / "inside.jpg")  # a link from elsewhere into the root is its target
    assert policy(root).vet(str(outside / "back.jpg")).target == str((root / "inside.jpg").resolve())


def test_existence_is_only_told_inside_the_roots(tmp_path: Path) -> None:
    allowed = policy(tmp_path / "root")
    with pytest.raises(SourceRefused):
        allowed.vet(str(tmp_path / "elsewhere" / "missing.jpg"))  # no oracle for what exists outside
    with pytest.raises(SourceUnavailable, match="does not exist"):
        allowed.vet(str(tmp_path / "root" / "missing.jpg"))


def test_system_files_devices_and_fifos_are_never_sources_even_under_the_root_folder(tmp_path: Path) -> None:
    everything = policy(Path("/"))
    for path in ("/proc/self/environ", "/proc/self/cmdline", "/proc/1/environ", "/dev/zero", "/sys/kernel"):
        with pytest.raises(SourceRefused, match="system file"):
            everything.vet(path)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    vetting = threading.Thread(target=lambda: pytest.raises(SourceRefused, everything.vet, str(fifo)), daemon=True)
    vetting.start()
    vetting.join(5)
    assert not vetting.is_alive(), "vetting a FIFO blocked: it was opened"
    with pytest.raises(SourceRefused, match="not a regular file"):
        everything.vet(str(fifo))


def test_only_image_and_video_files_are_sources(tmp_path: Path) -> None:
    allowed = policy(tmp_path)
    for name, kind in (
        ("a.JPG", SourceKind.IMAGE),
        ("b.webp", SourceKind.IMAGE),
        ("c.mkv", SourceKind.VIDEO),
        ("d.mp4", SourceKind.VIDEO),
    ):
        (tmp_path / name).write_bytes(JPEG)
        assert allowed.vet(str(tmp_path / name)).kind is kind
    for name in ("creds.txt", "server.key", "tokens.yaml", "noext"):
        (tmp_path / name).write_text(SECRET)
        with pytest.raises(SourceRefused, match="neither an image") as refused:
            allowed.vet(str(tmp_path / name))
        assert SECRET not in str(refused.value)
    (tmp_path / "empty.jpg").touch()
    with pytest.raises(SourceRefused, match="empty"):
        allowed.vet(str(tmp_path / "empty.jpg"))
    assert allowed.vet(str(tmp_path)).kind is SourceKind.FOLDER


def test_sizes_are_checked_from_the_stat_per_kind(tmp_path: Path) -> None:
    image, video = tmp_path / "big.png", tmp_path / "big.mp4"
    for path in (image, video):
        with path.open("wb") as file:
            file.truncate(10 * 1024**3)  # sparse: only a read would cost anything
    limited = policy(tmp_path, max_image_bytes=1000, max_video_bytes=2000)
    with pytest.raises(SourceRefused, match="SIGHTLINE_CAPTURE_MAX_IMAGE_FILE_BYTES"):
        limited.vet(str(image))
    with pytest.raises(SourceRefused, match="SIGHTLINE_CAPTURE_MAX_VIDEO_FILE_BYTES"):
        limited.vet(str(video))
    assert policy(tmp_path, max_video_bytes=0).vet(str(video)).kind is SourceKind.VIDEO  # 0: no video limit
    # Shipped with a limit: a 10 GiB video is refused by the default settings, unopened.
    assert CaptureSettings().max_video_file_bytes == DEFAULT_MAX_VIDEO_BYTES == 4 * 1024**3
    defaults = SourcePolicy.from_settings(CaptureSettings(allowed_roots=[tmp_path]))
    with pytest.raises(SourceRefused, match="limit is 4294967296"):
        defaults.vet(str(video))


def test_video_containers_are_recognised_by_their_first_bytes() -> None:
    assert looks_like_video(b"\x00\x00\x00\x20ftypisom" + bytes(200))
    assert looks_like_video(b"RIFF\x00\x00\x00\x00AVI LIST")
    assert looks_like_video(b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81")
    assert looks_like_video(b"\x00\x00\x01\xba" + bytes(20))
    assert looks_like_video((b"\x47" + bytes(187)) * 2)
    for fake in (
        b"#EXTM3U\n#EXT-X-VERSION:3\n",
        b"ffconcat version 1.0\nfile '/etc/passwd'\n",
        b"GET / HTTP/1.1",
        b"\x47not a transport stream",
        b"",
    ):
        assert not looks_like_video(fake)


# --- network sources -----------------------------------------------------------------------------------------------


def test_by_default_no_network_source_is_opened(tmp_path: Path) -> None:
    for uri in (f"rtsp://admin:{SECRET}@127.0.0.1/stream", "http://127.0.0.1/cam.mjpg", "file:///etc/passwd"):
        with pytest.raises(SourceRefused, match="SIGHTLINE_CAPTURE_ALLOWED_SCHEMES") as refused:
            SourcePolicy().vet(uri)
        assert SECRET not in str(refused.value)
    with pytest.raises(SourceRefused, match="no network hosts are allowed"):
        policy(schemes=("rtsp",)).vet(f"rtsp://admin:{SECRET}@10.1.2.3/x")


def test_a_host_must_be_inside_an_allowed_network_and_the_refusal_keeps_credentials_out() -> None:
    loopback = policy(schemes=("rtsp", "http", "rtsps"), hosts=("127.0.0.0/8",))
    for uri in (
        f"rtsp://user:{SECRET}@10.1.2.3/x",
        f"rtsp://user:{SECRET}@[::ffff:10.1.2.3]/x",
        f"http://169.254.169.254/latest/meta-data/?token={SECRET}",
        f"rtsp://user:{SECRET}@[::1]/x",
    ):
        with pytest.raises(SourceRefused, match="not in an allowed network") as refused:
            loopback.vet(uri)
        assert SECRET not in str(refused.value) and "user" not in str(refused.value)
    with pytest.raises(SourceRefused, match="listed by name"):
        loopback.vet(f"rtsps://user:{SECRET}@localhost/x")  # TLS: the checked address cannot be pinned
    assert loopback.vet("rtsps://127.0.0.1/x").target == "rtsps://127.0.0.1/x"  # an address needs no pinning


def test_a_name_is_resolved_checked_and_pinned_to_the_address_that_was_checked() -> None:
    loopback = policy(schemes=("rtsp",), hosts=("127.0.0.1", "::1"))
    source = loopback.vet(f"rtsp://admin:{SECRET}@localhost:8554/live?ch=1")
    assert source.kind is SourceKind.STREAM and source.live
    assert source.target in (
        f"rtsp://admin:{SECRET}@127.0.0.1:8554/live?ch=1",
        f"rtsp://admin:{SECRET}@[::1]:8554/live?ch=1",
    )
    assert source.display == "rtsp://***@localhost:8554/live?***"
    named = policy(schemes=("rtsps",), hosts=("localhost", "*.cams.example"))
    assert named.vet("rtsps://localhost/x").target == "rtsps://localhost/x"  # listed by name: opened by name
    assert named.vet("rtsps://gate-3.cams.example/x").target == "rtsps://gate-3.cams.example/x"  # not resolved


def test_an_unresolvable_host_is_unavailable_not_refused() -> None:
    with pytest.raises(SourceUnavailable, match="cannot resolve"):
        policy(schemes=("rtsp",), hosts=("10.0.0.0/8",)).vet(f"rtsp://admin:{SECRET}@no-such-camera.invalid/x")


def test_redaction_and_host_entries() -> None:
    assert redact(f"rtsp://admin:{SECRET}@cam-1:554/s?auth={SECRET}") == "rtsp://***@cam-1:554/s?***"
    assert redact(f"rtsp://{SECRET}@[fe80::1]/s") == "rtsp://***@[fe80::1]/s"
    assert SECRET not in redact(f"rtsp://admin:{SECRET}@cam-1:99999/s") and "unparseable" in redact("rtsp://[x/s")
    assert redact("/data/cams/gate 3") == "/data/cams/gate 3"
    assert str(parse_host_entry("10.1.2.3")) == "10.1.2.3/32" and parse_host_entry("*.Cams.Example") == ".cams.example"
    for bad in ("bad host", "-cam", "*.", "", "cam/x"):
        with pytest.raises(ValueError):
            parse_host_entry(bad)


def test_settings_refuse_what_the_policy_cannot_mean() -> None:
    for bad in ({"allowed_hosts": ["not a host"]}, {"allowed_schemes": ["file"]}, {"allowed_roots": ["frames"]}):
        with pytest.raises(ValueError):
            CaptureSettings(**bad)


def test_the_local_stack_allows_the_callers_folders_and_private_networks_only(tmp_path: Path) -> None:
    env = local_capture_policy([tmp_path])
    settings = {key.removeprefix("SIGHTLINE_CAPTURE_").lower(): json.loads(value) for key, value in env.items()}
    local = SourcePolicy.from_settings(CaptureSettings(**settings))
    (tmp_path / "a.jpg").write_bytes(JPEG)
    assert local.vet(str(tmp_path / "a.jpg")).kind is SourceKind.IMAGE
    assert local.vet("rtsp://192.168.1.20/stream").kind is SourceKind.STREAM
    assert settings["allowed_schemes"] == ["rtsp", "rtsps"]  # no http(s): a web server can serve FFmpeg anything
    for refused in (
        "/etc/hostname",
        "rtsp://169.254.169.254/x",
        "http://8.8.8.8/x",
        "http://192.168.1.20/x",
        "https://127.0.0.1/x",
    ):
        with pytest.raises(SourceRefused):
            local.vet(refused)
    assert "/" not in settings["allowed_roots"]
    assert "/" not in json.loads(local_capture_policy()["SIGHTLINE_CAPTURE_ALLOWED_ROOTS"])


def test_ffmpeg_is_bounded_per_scheme_after_its_first_connection() -> None:
    def options(kind: SourceKind, target: str) -> dict[str, str]:
        text = ffmpeg_capture_options(Source(kind, target, target))
        pairs = [pair.split(";") for pair in text.split("|")]
        assert all(len(pair) == 2 for pair in pairs), text  # OpenCV's format: key;value|key;value
        return dict(pairs)

    containers = "mov,matroska,avi,mpeg,mpegvideo,mpegts"
    assert options(SourceKind.VIDEO, "/data/clip.mp4") == {"protocol_whitelist": "file", "format_whitelist": containers}
    assert options(SourceKind.STREAM, "rtsp://u:p@10.0.0.5/s") == {
        "protocol_whitelist": "rtsp,rtp,udp,tcp",
        "rtsp_flags": "prefer_tcp",
    }
    assert options(SourceKind.STREAM, "RTSPS://cam/s") == {
        "protocol_whitelist": "rtsp,rtsps,tls,tcp",
        "rtsp_flags": "prefer_tcp",
    }
    for scheme, protocols in (("http", "http,tcp"), ("https", "https,tls,tcp")):
        http = options(SourceKind.STREAM, f"{scheme}://10.0.0.5/video")
        assert http["protocol_whitelist"] == protocols and http["max_redirects"] == "0"
        demuxers = http["format_whitelist"].split(",")
        assert demuxers[:6] == containers.split(",") and not {"hls", "dash", "concat", "image2"} & set(demuxers)
    with pytest.raises(ValueError):
        ffmpeg_capture_options(Source(SourceKind.FOLDER, "/data", "/data"))
