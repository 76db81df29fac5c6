"""Camera driver over a frame source (PROTOCOLS.md "Camera", DESIGN.md "Vision").

Pure NumPy: the image work that needs OpenCV lives in the transport (decoding)
and in vision (measurements); this module never imports cv2.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, cast

import numpy as np

from instruments.declare import READ, Param, declare
from instruments.driver import Channel, Driver
from instruments.errors import LinkLostError
from instruments.transports.base import Transport

log = logging.getLogger(__name__)


class FrameLike(Protocol):
    """What a frame offers (``instruments.transports.camera.Frame`` provides it)."""

    @property
    def image(self) -> np.ndarray: ...  # BGR uint8, (height, width, 3)

    @property
    def timestamp(self) -> float: ...  # time.monotonic() at arrival

    @property
    def seq(self) -> int: ...

    @property
    def digest(self) -> bytes: ...  # equal digests = bit-identical frames

    @property
    def repeats(self) -> int: ...

    @property
    def meta(self) -> Mapping[str, str]: ...

    @property
    def encoded(self) -> bytes | None: ...  # the JPEG as received (HTTP sources), else None


class FrameSource(Protocol):
    """What the driver needs from its transport (``CameraTransport`` provides it).

    Declared structurally so this module never imports the camera transport
    (and through it cv2): the import-linter contracts forbid that.
    """

    url: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def grab(self, timeout: float | None = None) -> FrameLike: ...

    async def latest(self, timeout: float | None = None) -> FrameLike: ...


class Camera(Driver):
    """A camera: fresh frames on demand, plus cheap health numbers.

    Protocol: whatever the transport reads (OpenCV device or file, MJPEG over
    HTTP as ``multipart/x-mixed-replace`` with one ``image/jpeg`` part per
    frame, RTSP). The transport keeps only the newest frame; ``capture()``
    returns a frame newer than the previous capture, waiting up to
    ``timeout`` s (``TransportTimeout`` naming the URL if the stream stalls).
    A dropped stream (``LinkLostError``) is reconnected once inside
    ``capture()`` (reading a frame is idempotent); a camera that stays away
    raises (``TransportOpenError`` naming the URL).

    ``open()`` opens the transport and waits for a first frame (proves the
    camera delivers, gives the resolution for ``describe()``).

    ``read()`` captures a fresh frame and returns ``width``, ``height`` (px),
    ``seq``, ``age_s`` (s since the frame arrived), ``mean_b``/``mean_g``/
    ``mean_r`` (mean pixel value per channel, 0-255), ``brightness`` (their
    mean), ``identical_frames`` (consecutive captures bit-identical to their
    predecessor) and ``frozen`` (``identical_frames >= frozen_after``: a live
    camera's sensor noise makes every real frame differ, so N identical
    captures in a row mean the camera or its encoder is stuck).

    ``channels``: read-only quantities only. A camera has nothing settable
    here (exposure, gain, focus are not exposed), and no actuator:
    ``safe_state()`` does nothing, is idempotent and works after any fault.
    """

    kind: ClassVar[str] = "camera"

    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float = 5.0,
        name: str | None = None,
        frozen_after: int = 3,
    ) -> None:
        if not (
            callable(getattr(transport, "grab", None))
            and callable(getattr(transport, "latest", None))
        ):
            raise TypeError(
                f"Camera needs a frame source transport (camera://, http(s)://, rtsp://), "
                f"got {type(transport).__name__} for {transport.url}"
            )
        if not timeout > 0:
            raise ValueError(f"timeout {timeout!r} must be > 0 s")
        if frozen_after < 1:
            raise ValueError(f"frozen_after {frozen_after!r} must be >= 1")
        super().__init__(transport, name=name)
        self.source = cast(FrameSource, transport)
        self.timeout = float(timeout)
        self.frozen_after = int(frozen_after)
        self._last: FrameLike | None = None
        self._identical = 0
        self._resolution: tuple[int, int] | None = None

    # ------------------------------------------------------------------ basics
    @property
    def channels(self) -> Mapping[str, Channel]:
        """Read-only: nothing on a camera is settable through this driver."""
        return {
            "mean_b": Channel(
                "mean_b", "DN", minimum=0, maximum=255, settable=False, doc="mean blue pixel value"
            ),
            "mean_g": Channel(
                "mean_g", "DN", minimum=0, maximum=255, settable=False, doc="mean green pixel value"
            ),
            "mean_r": Channel(
                "mean_r", "DN", minimum=0, maximum=255, settable=False, doc="mean red pixel value"
            ),
            "age_s": Channel(
                "age_s", "s", minimum=0, settable=False, doc="age of the captured frame"
            ),
            "frozen": Channel(
                "frozen", "", kind="bool", settable=False, doc="N identical captures in a row"
            ),
            "width": Channel(
                "width", "px", kind="int", minimum=1, settable=False, doc="frame width"
            ),
            "height": Channel(
                "height", "px", kind="int", minimum=1, settable=False, doc="frame height"
            ),
            "seq": Channel(
                "seq", "", kind="int", minimum=0, settable=False, doc="the frame's sequence number"
            ),
            "brightness": Channel(
                "brightness",
                "DN",
                minimum=0,
                maximum=255,
                settable=False,
                doc="mean of mean_b, mean_g and mean_r",
            ),
            "identical_frames": Channel(
                "identical_frames",
                "",
                kind="int",
                minimum=0,
                settable=False,
                doc="captures in a row identical to the one before (frozen at frozen_after)",
            ),
        }

    @property
    def resolution(self) -> tuple[int, int] | None:
        """(width, height) in px of the last frame seen, or None before the first."""
        return self._resolution

    @property
    def frozen(self) -> bool:
        return self._identical >= self.frozen_after

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["resolution"] = list(self._resolution) if self._resolution else None
        out["frozen_after"] = self.frozen_after
        describe_source = getattr(self.transport, "describe", None)
        if callable(describe_source):
            out["source"] = describe_source()
        return out

    async def open(self) -> None:
        """Open the transport and wait for a first frame; on failure the transport is closed again."""
        try:
            await self.transport.open()
            frame = await self.source.latest(self.timeout)
        except BaseException:
            await self.transport.close()
            raise
        self._resolution = (int(frame.image.shape[1]), int(frame.image.shape[0]))

    # ---------------------------------------------------------------- frames
    @declare(READ, timeout=Param(float, "s", above=0, optional=True, doc="wait at most"))
    async def capture(self, timeout: float | None = None) -> FrameLike:
        """A fresh frame (received after this call); reconnects once after a dropped stream."""
        wait_s = self.timeout if timeout is None else float(timeout)
        try:
            frame = await self.source.grab(wait_s)
        except LinkLostError as exc:
            log.warning("%s: %s; reconnecting", self.name, exc)
            frame = await self.source.grab(wait_s)
        last = self._last
        if last is not None and frame.digest and frame.digest == last.digest:
            self._identical += 1
        else:
            self._identical = 0
        self._last = frame
        self._resolution = (int(frame.image.shape[1]), int(frame.image.shape[0]))
        return frame

    async def read(self) -> dict[str, Any]:
        """Capture a fresh frame and return cheap numbers about it (see the class docstring)."""
        frame = await self.capture()
        image = frame.image
        h, w = int(image.shape[0]), int(image.shape[1])
        # Row sums first: ~0.1 ms for 640x480 (a direct uint8 mean over (H*W, 3) is ~3 ms).
        sums = image.sum(axis=0, dtype=np.uint32).sum(axis=0, dtype=np.uint64)
        mean = [float(v) / (h * w) for v in sums]
        return {
            "width": w,
            "height": h,
            "seq": frame.seq,
            "age_s": max(0.0, time.monotonic() - frame.timestamp),
            "mean_b": mean[0],
            "mean_g": mean[1],
            "mean_r": mean[2],
            "brightness": sum(mean) / 3.0,
            "identical_frames": self._identical,
            "frozen": self.frozen,
        }

    async def safe_state(self) -> None:
        """Nothing to make safe: a camera has no actuator. Idempotent, never fails."""
