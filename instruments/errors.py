"""Typed errors of the instruments layer.

Every error names what was involved (the URL, the device, the command) so a
message in a log is enough to find the cause without a debugger.

Hierarchy::

    InstrumentError
    ├── InvalidURLError            a transport URL that cannot be parsed / unknown scheme
    ├── UnknownDriverError         ``connect(kind=...)`` with no such registered driver
    ├── TransportError             something at the bus level (has ``.url``)
    │   ├── TransportOpenError     could not open the link
    │   ├── LinkLostError          the link dropped (reconnect on demand)
    │   └── TransportTimeout       no answer within the deadline (also a TimeoutError)
    ├── ProtocolError              a garbled, truncated or unexpected reply
    └── DeviceError                the device answered with an error
        ├── DeviceRejected         an error reply (pump ``?OOR``, enclosure ``ok: false``, ...)
        ├── DeviceAlarm            the device reports an alarm state
        ├── ModbusExceptionError   a Modbus exception reply (function, address, code)
        ├── ProbeNotImmersedError  a pH reading while the probe is out of the liquid / open circuit
        ├── CalibrationError       a calibration that did not finish (or was refused)
        └── BalanceError           an MT-SICS error reply of a balance (``.command``, ``.code``)
            ├── BalanceNotExecutable      ``<cmd> I``: not executable now (no stable reading)
            ├── BalanceOverload           ``<cmd> +``: overload / above the zero or tare range
            ├── BalanceUnderload          ``<cmd> -``: underload / below the zero or tare range
            ├── BalanceSyntaxError        ``ES``: the balance did not know the command
            ├── BalanceTransmissionError  ``ET``: a character arrived garbled (parity, framing)
            └── BalanceLogicalError       ``EL``: a parameter out of range
"""

from __future__ import annotations

from typing import Any


class InstrumentError(Exception):
    """Base class of every error raised by ``instruments``."""


class InvalidURLError(InstrumentError, ValueError):
    """A transport URL is malformed, has an unknown scheme or a bad option."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"invalid transport URL {url!r}: {problem}")
        self.url = url
        self.problem = problem


class UnknownDriverError(InstrumentError, LookupError):
    """No driver is registered under the requested kind."""

    def __init__(self, kind: str, known: list[str]) -> None:
        super().__init__(
            f"no driver registered for kind {kind!r}; known kinds: {', '.join(sorted(known)) or 'none'}"
        )
        self.kind = kind
        self.known = known


class TransportError(InstrumentError):
    """A bus-level failure. ``url`` names the link."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url


class TransportOpenError(TransportError):
    """The transport could not be opened (no such port, connection refused, ...)."""


class LinkLostError(TransportError):
    """The link dropped while in use. The next operation reconnects on demand."""


class TransportTimeout(TransportError, TimeoutError):
    """No (complete) answer arrived within the deadline."""


class ProtocolError(InstrumentError):
    """A reply that does not follow the wire protocol: garbled, truncated, wrong address."""

    def __init__(self, device: str, message: str, raw: Any = None) -> None:
        detail = f" (raw {raw!r})" if raw is not None else ""
        super().__init__(f"{device}: {message}{detail}")
        self.device = device
        self.raw = raw


class DeviceError(InstrumentError):
    """The device answered, and the answer is an error.

    ``reading``: when a driver's ``read()`` refuses a value the device flags as invalid,
    the rest of the snapshot it did get (the refused values ``None``, the flags saying
    why), so a station supervisor still sees the flags; None otherwise.
    """

    reading: dict[str, Any] | None = None

    def __init__(self, device: str, message: str) -> None:
        super().__init__(f"{device}: {message}")
        self.device = device


class DeviceRejected(DeviceError):
    """The device refused a command (e.g. pump ``?OOR`` out of range, ``?NA`` not now).

    ``code`` is the device's own error code, ``command`` what was sent.
    """

    def __init__(self, device: str, command: str, code: str, meaning: str) -> None:
        super().__init__(device, f"command {command!r} rejected with {code!r} ({meaning})")
        self.command = command
        self.code = code
        self.meaning = meaning


class DeviceAlarm(DeviceError):
    """The device is in an alarm state (e.g. pump stalled)."""

    def __init__(self, device: str, code: str, meaning: str) -> None:
        super().__init__(device, f"alarm {code!r} ({meaning})")
        self.code = code
        self.meaning = meaning


MODBUS_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class ModbusExceptionError(DeviceError):
    """A Modbus exception reply: names the function code, the address and the exception code."""

    def __init__(self, device: str, function_code: int, address: int, exception_code: int) -> None:
        name = MODBUS_EXCEPTION_NAMES.get(exception_code, "unknown exception")
        super().__init__(
            device,
            f"Modbus exception {exception_code} ({name}) for function {function_code} at address {address}",
        )
        self.function_code = function_code
        self.address = address
        self.exception_code = exception_code


class ProbeNotImmersedError(DeviceError):
    """A pH reading was taken while the probe reports "not immersed or open circuit".

    The device then repeats its last value: that is not a measurement, so no
    number is returned. ``last_ph`` is the value the device repeated (for logs only).
    """

    def __init__(self, device: str, last_ph: float | None = None) -> None:
        super().__init__(
            device,
            "pH probe not immersed or open circuit (status bit1): no valid reading; put the "
            "probe in the liquid (check the level covers the junction) and the cable, then read again",
        )
        self.last_ph = last_ph


class CalibrationError(DeviceError):
    """A calibration did not finish within its deadline, or the device refused it."""

    def __init__(self, device: str, message: str, buffer_ph: float | None = None) -> None:
        super().__init__(device, message)
        self.buffer_ph = buffer_ph


class BalanceError(DeviceError):
    """A balance answered a command with an MT-SICS error (``command``, ``code``, ``advice``)."""

    #: what the reply means, and what to do about it
    meaning: str = "error reply"
    advice: str = ""

    def __init__(self, device: str, command: str, code: str, reply: str = "") -> None:
        detail = f" (reply {reply!r})" if reply else ""
        super().__init__(
            device, f"command {command!r}: {self.meaning}{detail}; {self.advice}".rstrip("; ")
        )
        self.command = command
        self.code = code
        self.reply = reply


class BalanceNotExecutable(BalanceError):
    """``<cmd> I``: the command cannot be executed now (no stable reading within the device's
    timeout: vibration, a draught, liquid still flowing or a stirrer turning)."""

    meaning = "not executable (no stable reading within the balance's timeout)"
    advice = (
        "stop what disturbs the pan (stirrer, pumps, draught), let it settle and retry, "
        "or use the immediate command (SI, ZI)"
    )


class BalanceOverload(BalanceError):
    """``<cmd> +``: overload, or above the range the command accepts (zero/tare range)."""

    meaning = "overload (the load is above the balance's range or the zero/tare range)"
    advice = "take load off the pan (capacity 220 g on the bench balance)"


class BalanceUnderload(BalanceError):
    """``<cmd> -``: underload, or below the range the command accepts (pan missing?)."""

    meaning = "underload (the load is below the balance's range or the zero/tare range)"
    advice = "check that the weighing pan is in place and nothing lifts it"


class BalanceSyntaxError(BalanceError):
    """``ES``: the balance did not recognise the command."""

    meaning = "syntax error (ES): the balance does not know this command"
    advice = "check the command and the balance's MT-SICS level"


class BalanceTransmissionError(BalanceError):
    """``ET``: the balance received a garbled character (parity, framing, baud rate)."""

    meaning = "transmission error (ET): the balance received a garbled character"
    advice = "check the cable and the line settings (9600 8N1), then send the command again"


class BalanceLogicalError(BalanceError):
    """``EL``: a logical error (a parameter out of range)."""

    meaning = "logical error (EL): a parameter is out of range for this balance"
    advice = "check the command's parameter against the balance's ranges"
