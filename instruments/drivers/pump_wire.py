"""The NE-1000 syringe pump protocol's wire format (PROTOCOLS.md "Syringe pumps"): replies
(:func:`parse_reply`, strict, with the error and alarm codes), the 4-digit number format
(:func:`format_number`, :func:`encode_quantity`) and the device units.

:mod:`instruments.drivers.syringe_pump` is the driver that speaks it.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn, Protocol

from instruments.declare import Param
from instruments.errors import ProtocolError

STX = b"\x02"
ETX = b"\x03"

ERROR_CODES: dict[str, str] = {
    "?": "unrecognised command",
    "?NA": "not applicable now",
    "?OOR": "out of range",
    "?COM": "invalid packet",
    "?IGN": "ignored",
}
ALARM_CODES: dict[str, str] = {
    "R": "pump was reset (power interrupted)",
    "S": "motor stalled",
    "T": "safe-mode communication timeout",
    "E": "safe-mode communication error",
}

#: rate units: device code -> mL/min per device unit (preference order on ties)
RATE_UNITS: dict[str, float] = {"MM": 1.0, "UM": 1e-3, "MH": 1.0 / 60.0, "UH": 1e-3 / 60.0}
#: volume units: device code -> mL per device unit
VOLUME_UNITS: dict[str, float] = {"ML": 1.0, "UL": 1e-3}

#: reference syringe for the rate limits: 0.001-30 mL/min at 14.43 mm (limits scale with area)
REFERENCE_DIAMETER_MM = 14.43
REFERENCE_RATE_RANGE = (0.001, 30.0)
#: largest relative rounding the number format may introduce before a value is refused
MAX_RELATIVE_ROUNDING = 1e-3

NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
RATE_RE = re.compile(rf"({NUMBER})(UM|MM|UH|MH)")
VOLUME_RE = re.compile(rf"({NUMBER})(UL|ML)")
DIS_RE = re.compile(rf"I({NUMBER})W({NUMBER})(UL|ML)")
NUMBER_RE = re.compile(NUMBER)
#: a well-formed reply: STX, 2-digit address, status letter, printable data, ETX
REPLY_RE = re.compile(rb"\x02([0-9]{2})([IWSPA])([\x20-\x7e]*)\x03")
COMMAND_RE = re.compile(r"[A-Z]{3}")


class PumpStatus(enum.StrEnum):
    """The pump's motion status, from the reply's status letter."""

    INFUSING = "infusing"
    WITHDRAWING = "withdrawing"
    STOPPED = "stopped"
    PAUSED = "paused"
    ALARM = "alarm"

    @property
    def moving(self) -> bool:
        return self in (PumpStatus.INFUSING, PumpStatus.WITHDRAWING)


STATUS_LETTERS = {
    "I": PumpStatus.INFUSING,
    "W": PumpStatus.WITHDRAWING,
    "S": PumpStatus.STOPPED,
    "P": PumpStatus.PAUSED,
    "A": PumpStatus.ALARM,
}
DIRECTIONS = {"infuse": "INF", "withdraw": "WDR"}
DIRECTION_NAMES = {v: k for k, v in DIRECTIONS.items()}


@dataclass(frozen=True)
class PumpReply:
    """One parsed reply. ``error`` is an error code (``?OOR``...), ``alarm`` an alarm letter."""

    address: int
    status: PumpStatus
    data: str
    raw: bytes
    error: str | None = None
    alarm: str | None = None


class ByteLink(Protocol):
    url: str

    async def transaction(
        self,
        request: bytes,
        terminator: bytes,
        timeout: float | None = None,
    ) -> bytes: ...


# ---------------------------------------------------------------------- numbers
def format_number(value: float) -> str:
    """``value`` in the wire format: at most 4 significant digits in at most 5 characters.

    ``0.4`` -> ``0.400``, ``12.5`` -> ``12.50``, ``1234`` -> ``1234``. Raises
    ``ValueError`` for negative, non-finite or too large values (>= 9999.5).
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{value!r} cannot be sent to the pump (must be a finite number >= 0)")
    for decimals in (3, 2, 1, 0):
        text = f"{value:.{decimals}f}"
        if len(text) <= (5 if decimals else 4):
            return text
    raise ValueError(f"{value!r} is too large for the pump's number format (at most 9999)")


def encode_quantity(value: float, units: Mapping[str, float], what: str) -> tuple[str, str, float]:
    """Choose the device units that carry ``value`` (SI) most precisely.

    Returns ``(number text, unit code, value actually sent in SI)``. Raises
    ``ValueError`` if no unit carries it within 0.1 %, or it is not > 0.
    """
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    best: tuple[tuple[float, int], str, str, float] | None = None
    for order, (code, factor) in enumerate(units.items()):
        try:
            text = format_number(value / factor)
        except ValueError:
            continue
        sent = float(text) * factor
        error = abs(sent - value) / value
        key = (error if error > 1e-9 else 0.0, order)  # least rounding; on a tie the listed order
        if best is None or key < best[0]:
            best = (key, text, code, sent)
    if best is None or best[0][0] > MAX_RELATIVE_ROUNDING:
        near = f" (nearest: {best[1]}{best[2]})" if best is not None else ""
        raise ValueError(
            f"{what} {value!r} cannot be carried by the pump's 4-digit number format{near}"
        )
    return best[1], best[2], best[3]


def _wire_volume(ml: float) -> float:
    """The volume (mL) the pump's number format carries for ``ml`` (ValueError if none)."""
    return encode_quantity(ml, VOLUME_UNITS, "volume (mL)")[2]


def _wire_rate(ml_min: float) -> float:
    """The rate (mL/min) the pump's number format carries for ``ml_min`` (ValueError if none)."""
    return encode_quantity(ml_min, RATE_UNITS, "rate (mL/min)")[2]


#: the parameters of a move (dispense, withdraw), as the pump's number format carries them
VOLUME = Param(float, "mL", above=0, wire=_wire_volume, doc="volume to move")
RATE = Param(float, "mL/min", above=0, wire=_wire_rate, doc="pumping rate")


def parse_reply(raw: bytes, *, address: int, device: str) -> PumpReply:
    """Parse ``\\x02<2-digit address><status>[data]\\x03`` strictly (else :class:`ProtocolError`)."""
    m = REPLY_RE.fullmatch(raw)
    if m is None:
        _reject(raw, address, device)  # says what is wrong
    if int(m[1]) != address:
        raise ProtocolError(device, f"reply from address {int(m[1])}, expected {address}", raw)
    status = STATUS_LETTERS[m[2].decode("ascii")]
    data = m[3].decode("ascii")
    if status is PumpStatus.ALARM:
        if len(data) != 2 or data[0] != "?" or data[1] not in ALARM_CODES:
            raise ProtocolError(device, f"alarm status without a known alarm code ({data!r})", raw)
        return PumpReply(address, status, data, raw, alarm=data[1])
    if data.startswith("?"):
        if data not in ERROR_CODES:
            raise ProtocolError(device, f"unknown error code {data!r}", raw)
        return PumpReply(address, status, data, raw, error=data)
    return PumpReply(address, status, data, raw)


def _reject(raw: bytes, address: int, device: str) -> NoReturn:
    """Raise the :class:`ProtocolError` that names what makes ``raw`` malformed."""
    if not raw.startswith(STX):
        raise ProtocolError(device, "reply does not start with STX", raw)
    if not raw.endswith(ETX) or len(raw) < 2:
        raise ProtocolError(device, "reply does not end with ETX", raw)
    body = raw[1:-1]
    if any(b < 0x20 or b > 0x7E for b in body):
        raise ProtocolError(device, "reply contains non-printable bytes", raw)
    text = body.decode("ascii")
    if len(text) < 3 or not text[:2].isdigit():
        raise ProtocolError(device, "reply has no 2-digit address", raw)
    if int(text[:2]) != address:
        raise ProtocolError(device, f"reply from address {int(text[:2])}, expected {address}", raw)
    raise ProtocolError(device, f"unknown status letter {text[2]!r}", raw)


def parse_number(text: str, device: str, raw: bytes) -> float:
    if not NUMBER_RE.fullmatch(text):
        raise ProtocolError(device, f"not a number: {text!r}", raw)
    return float(text)
