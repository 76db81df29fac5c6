"""The simulated-bench entry point: the one runtime module allowed to import ``simulators``.

``labbridge sim`` starts a simulated lab on loopback (per station: syringe pumps
on a pty, the hotplate as a Modbus TCP server, the colour sensor on a BlueZ
stand-in, the enclosure on an MQTT broker, an MJPEG camera), writes its
``lab.yaml``, and runs a campaign on it (by default the colour match that ships
with labbridge) through the same code as ``labbridge run``: Ray station actors
behind the safety layer, the optimizer, camera verification, the journal. The
run folder keeps the lab config, the journal, the set-up results (the camera calibration), the
images and the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bridge.campaigns import run_with_signals
from bridge.labconfig import LabConfig, load_lab, parse_broker_url
from loops.campaign import CampaignRunner, CampaignSummary
from loops.program import Program, builtin_program
from safety import open_station, reference_envelope
from simulators.bench import SimulatedBench, SimulatedLab
from simulators.world import Faults

log = logging.getLogger(__name__)


def open_sim_station(bench: SimulatedBench, speed: float) -> Any:
    """``open_station`` for a simulated bench: the guard on the simulated clock, the
    device watchdog paced for it, the reference envelope (and the monitors it declares)."""
    return open_station(
        bench.name,
        [spec.as_dict() for spec in bench.instruments()],
        reference_envelope(),
        clock=bench.world.clock.now,
        supervisor_options={"device_time_scale": speed, "poll_interval": 0.1},
    )


#: the data of each simulated bench's experiment: the repository's examples/ folder
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass(frozen=True)
class BenchData:
    """What a simulated bench's stations use: an envelope (``reference`` or a file), set-up
    recipes (``reference`` or files) and the program ``labbridge sim`` runs by default."""

    envelope: str
    setup: tuple[str, ...]
    program: Path


def bench_data(bench: str) -> BenchData:
    """The data of simulated bench ``bench`` (``colour``: the reference bench, built in;
    ``buffer``: examples/buffer). Raises ``FileNotFoundError`` saying where it looked."""
    if bench == "colour":
        return BenchData("reference", ("reference",), builtin_program("color-match"))
    folder = EXAMPLES / bench
    data = BenchData(
        str(folder / "envelope.yaml"), (str(folder / "setup.yaml"),), folder / "program.md"
    )
    files = [Path(data.envelope), *map(Path, data.setup), data.program]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the {bench} bench's data are not here ({', '.join(map(str, missing))}): they ship "
            "in the source checkout's examples/ folder (pip install -e . from it)"
        )
    return data


def sim_lab_yaml(lab: SimulatedLab, store: Path, *, bridge_id: str = "labbridge-sim") -> str:
    """``lab.yaml`` text for a running simulated lab: its stations' instruments on loopback,
    its bench's envelope and set-up (:func:`bench_data`), its clock (``simulated``) and the
    BLE bus address (``env``).

    ``labbridge run program.md --lab <it>`` from another process drives the same benches
    (CLOCK_MONOTONIC is system-wide, so ``sim_at_real`` defines the clock there too)."""
    speed = lab.clock.speed
    data = bench_data(lab.bench)
    config = {
        "bridge_id": bridge_id,
        "store": str(store),
        "simulated": {"speed": speed, "sim_at_real": [lab.clock.now(), time.monotonic()]},
        "env": {"DBUS_SYSTEM_BUS_ADDRESS": lab.bluez.address if lab.bluez else ""},
        "stations": {
            bench.name: {
                "envelope": data.envelope,
                "setup": list(data.setup),
                "supervisor": {"device_time_scale": speed, "poll_interval": 0.1},
                "instruments": [spec.as_dict() for spec in bench.instruments()],
            }
            for bench in lab.stations
        },
    }
    header = "# A simulated lab on loopback, written by labbridge (valid while it runs)\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def known_faults() -> tuple[str, ...]:
    """The faults a simulated bench can have injected (``--fault``)."""
    return tuple(Faults.KNOWN)


@dataclass(frozen=True)
class RunningSimLab:
    """A simulated lab that is up: its loaded ``lab.yaml`` and the simulators behind it."""

    config: LabConfig
    sim: SimulatedLab

    def inject_fault(self, name: str) -> None:
        for bench in self.sim.stations:
            bench.inject_fault(name)


@contextlib.asynccontextmanager
async def simulated_lab(
    *,
    stations: int,
    speed: float,
    out: Path,
    store: Path | None = None,
    broker_url: str | None = None,
    embedded_broker: bool = False,
    bench: str = "colour",
) -> AsyncIterator[RunningSimLab]:
    """Start a simulated lab on loopback, write ``out/lab.yaml`` for it, yield it loaded.

    ``store``: the journal's path (default ``out/journal.db``); ``bench``: ``colour``
    or ``buffer``. The simulators run in this process until the block exits.
    """
    bench_data(bench)  # its data are there, before anything starts
    out.mkdir(parents=True, exist_ok=True)
    lab = SimulatedLab(
        bench=bench,
        stations=stations,
        speed=speed,
        broker_url=broker_url,
        prefer_broker="embedded" if embedded_broker else "mosquitto",
    )
    async with lab:
        path = out / "lab.yaml"
        path.write_text(sim_lab_yaml(lab, (store or out / "journal.db").resolve()))
        yield RunningSimLab(load_lab(path), lab)


async def check_broker(url: str, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError (saying what to do) unless something listens at the broker URL."""
    fields = parse_broker_url(url)
    host, port = fields["host"], fields["port"]
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        why = (
            f"no answer within {timeout_s:g} s"
            if isinstance(exc, TimeoutError)
            else "connection refused"
            if isinstance(exc, ConnectionRefusedError)
            else exc.strerror or str(exc)
        )
        raise ConnectionError(
            f"no MQTT broker answers at {host}:{port} ({why}): start it, "
            "fix --broker, or leave --broker out (labbridge sim then starts its own broker)"
        ) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def sim_campaign(
    program: Program,
    *,
    campaign_id: str,
    out: Path,
    stations: int | None = None,
    speed: float = 200.0,
    broker_url: str | None = None,
    embedded_broker: bool = False,
    fault: str | None = None,
    resume: bool = False,
    operator: str = "operator",
    ray_address: str | None = None,
    progress: bool = True,
    keep_running: bool = False,
    after: Callable[[RunningSimLab, CampaignSummary], None] | None = None,
    bench: str = "colour",
) -> CampaignSummary:
    """Run ``program`` on a simulated lab started for it (the run folder is ``out``).

    ``bench``: the simulated bench (``colour``, ``buffer``). ``fault``: a simulator fault injected once the stations are open and their
    set up (so the camera calibration itself is sound). ``after``: called
    with the lab and the summary while the lab is still up (e.g. to write the
    report). ``keep_running``: afterwards stay up as a simulated lab serving the
    MQTT campaign API (``labbridge serve``) until SIGINT/SIGTERM: other processes run
    campaigns on it over MQTT (its stations are held by the service meanwhile).
    """
    n = stations or program.stations
    if broker_url is not None:
        await check_broker(broker_url)
    async with simulated_lab(
        stations=n,
        speed=speed,
        out=out,
        broker_url=broker_url,
        embedded_broker=embedded_broker,
        bench=bench,
    ) as lab:
        print(
            f"simulated lab: {n} {bench} station(s) at {speed:g}x; run folder {out}",
            file=sys.stderr,
        )

        def on_runner(runner: CampaignRunner) -> None:
            if fault:
                lab.inject_fault(fault)
                print(f"fault injected into every station: {fault}", file=sys.stderr)

        summary = await run_with_signals(
            None if resume else program,
            lab.config,
            campaign_id=campaign_id,
            resume=resume,
            operator=operator,
            ray_address=ray_address,
            progress=progress,
            on_runner=on_runner,
        )
        if after is not None:
            after(lab, summary)
        if keep_running and summary.state == "done":
            await _stay_up(lab, out, broker_url)
    return summary


async def _stay_up(lab: RunningSimLab, out: Path, broker_url: str | None) -> None:
    """Serve the MQTT campaign API on the simulated lab until SIGINT/SIGTERM."""
    from bridge.mqttapi import mqtt_settings, serve

    url = broker_url or lab.sim.broker_url
    settings = mqtt_settings(lab.config, url)
    stop = asyncio.Event()  # SIGINT/SIGTERM from now on stop the service, then the lab
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def online(api: Any, service: Any) -> None:
        # printed once the API is subscribed: an e-stop sent after this line is acted on
        root = f"labbridge/{lab.config.bridge_id}"
        print(
            f"simulated lab serving its MQTT campaign API on {url} under {root}/ "
            f"(docs/mqtt-api.md): start campaigns on {root}/campaigns/start/<user>, e-stop "
            f"with labbridge estop --broker {url} --bridge-id {lab.config.bridge_id} --reason "
            f"...; its stations are held by this service (lab config {out / 'lab.yaml'}); "
            "Ctrl-C to stop",
            file=sys.stderr,
        )

    try:
        why = await serve(lab.config, settings, stop=stop, handle_signals=False, on_online=online)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print(f"stopping the simulated lab ({why})", file=sys.stderr)
