"""Camera URLs: which source a ``camera://``, ``http(s)://`` or ``rtsp://`` URL names, and our options.

:func:`parse_camera_url` validates a URL and returns a :class:`CameraSource`; the URL
forms and options are described in :mod:`instruments.transports.camera` (which
re-exports both names).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

from instruments.errors import InvalidURLError
from instruments.transports.base import URLOptions, split_url


@dataclass(frozen=True)
class CameraSource:
    """A parsed camera URL: what to open and how."""

    kind: str  # device | file | http | rtsp
    target: int | str  # device index, file path, or the URL handed to the camera/library
    display: str  # the URL with any password replaced by ***
    timeout: float
    width: int = 0
    height: int = 0
    fps: float = 0.0
    fourcc: str | None = None
    loop: bool = False
    backend: str = "auto"  # http: auto | mjpeg | ffmpeg


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def parse_camera_url(url: str) -> CameraSource:
    """Validate ``url`` and split it into the source and our options (see the module docstring)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "camera":
        return _parse_camera_scheme(url)
    if scheme in ("http", "https", "rtsp"):
        return _parse_network(url, scheme)
    raise InvalidURLError(url, "a camera URL starts with camera://, http://, https:// or rtsp://")


def _size_options(opts: URLOptions, prefix: str) -> tuple[int, int]:
    width = opts.int(prefix + "width", 0)
    height = opts.int(prefix + "height", 0)
    for name, value in ((prefix + "width", width), (prefix + "height", height)):
        if value < 0 or value > 16384:
            raise InvalidURLError(opts.url, f"option {name}={value} must be between 1 and 16384")
    return width, height


def _timeout_option(opts: URLOptions, name: str) -> float:
    timeout = opts.float(name, 5.0)
    if timeout <= 0:
        raise InvalidURLError(opts.url, f"option {name} must be > 0 seconds")
    return timeout


def _parse_camera_scheme(url: str) -> CameraSource:
    _, _, raw_opts = split_url(url)
    parts = urlsplit(url)
    opts = URLOptions(url, raw_opts)
    timeout = _timeout_option(opts, "timeout")
    width, height = _size_options(opts, "")
    path = unquote(parts.path)
    if parts.netloc and path not in ("", "/"):
        raise InvalidURLError(
            url, "use camera://INDEX for a device or camera:///absolute/path for a file"
        )
    if parts.netloc:
        try:
            index = int(parts.netloc)
        except ValueError:
            raise InvalidURLError(
                url,
                f"device index {parts.netloc!r} is not an integer (a file is camera:///path/to/file)",
            ) from None
        if index < 0:
            raise InvalidURLError(url, "device index must be >= 0")
        fps = opts.float("fps", 0.0)
        fourcc = opts.optional_str("fourcc")
        if fourcc is not None and len(fourcc) != 4:
            raise InvalidURLError(url, f"option fourcc={fourcc!r} must be 4 characters, e.g. MJPG")
        opts.finish()
        return CameraSource("device", index, url, timeout, width, height, fps, fourcc)
    if not path or path == "/":
        raise InvalidURLError(url, "no device index and no file path")
    for device_only in ("fps", "fourcc"):
        if opts.optional_str(device_only) is not None:
            raise InvalidURLError(
                url, f"option {device_only} applies to camera devices (camera://INDEX) only"
            )
    loop = opts.bool("loop", False)
    opts.finish()
    return CameraSource("file", path, url, timeout, width, height, loop=loop)


def _parse_network(url: str, scheme: str) -> CameraSource:
    parts = urlsplit(url)
    if not parts.hostname:
        raise InvalidURLError(url, "no host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise InvalidURLError(url, f"bad port: {exc}") from None
    ours: dict[str, str] = {}
    keep: list[str] = []
    for segment in parts.query.split("&") if parts.query else []:
        key = unquote_plus(segment.partition("=")[0])
        if key.startswith("lb_"):
            if key in ours:
                raise InvalidURLError(url, f"option {key!r} given twice")
            ours[key] = unquote_plus(segment.partition("=")[2])
        else:
            keep.append(segment)
    target = urlunsplit(parts._replace(query="&".join(keep)))
    opts = URLOptions(url, ours)
    timeout = _timeout_option(opts, "lb_timeout")
    width, height = _size_options(opts, "lb_")
    backend = "ffmpeg"
    if scheme in ("http", "https"):
        backend = opts.choice("lb_backend", "auto", ("auto", "mjpeg", "ffmpeg"))
    for device_only in ("lb_fps", "lb_fourcc", "lb_loop"):
        if device_only in ours:
            raise InvalidURLError(
                url, f"option {device_only} does not apply to {scheme}:// sources"
            )
    opts.finish()
    kind = "rtsp" if scheme == "rtsp" else "http"
    return CameraSource(kind, target, redact(url), timeout, width, height, backend=backend)


__all__ = ["CameraSource", "parse_camera_url", "redact"]
