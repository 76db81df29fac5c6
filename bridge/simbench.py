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
import dataclasses
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bridge.campaigns import join_ray, run_with_signals
from bridge.httpserve import HttpBind
from bridge.labconfig import LabConfig, load_lab
from bridge.labmqtt import parse_broker_url
from instruments.deadline import connect_failure
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
    notify: Path | None = None,
) -> AsyncIterator[RunningSimLab]:
    """Start a simulated lab on loopback, write ``out/lab.yaml`` for it, yield it loaded.

    ``store``: the journal's path (default ``out/journal.db``); ``bench``: ``colour``
    or ``buffer``; ``notify``: a YAML file whose ``notifications:`` the lab.yaml gets
    (docs/notifications.md). The simulators run in this process until the block exits.
    """
    from bridge.notifyconfig import notifications_from

    extra = notifications_from(notify) if notify is not None else ""
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
        path.write_text(sim_lab_yaml(lab, (store or out / "journal.db").resolve()) + extra)
        yield RunningSimLab(load_lab(path), lab)


async def check_broker(url: str, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError (saying what to do) unless something listens at the broker URL."""
    fields = parse_broker_url(url)
    host, port = fields["host"], fields["port"]
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        why = connect_failure(exc, timeout_s)
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
    web: HttpBind | None = None,
    web_any_port: bool = False,
    notify: Path | None = None,
) -> CampaignSummary:
    """Run ``program`` on a simulated lab started for it (the run folder is ``out``).

    ``bench``: the simulated bench (``colour``, ``buffer``). ``fault``: a simulator fault injected once the stations are open and their
    set up (so the camera calibration itself is sound). ``after``: called
    with the lab and the summary while the lab is still up (e.g. to write the
    report). ``web``: run the campaign inside a lab service (as ``labbridge serve`` does)
    that also serves the MQTT campaign API and the lab page there, whose URL is printed
    first: watch and steer the campaign from a browser. ``keep_running`` (with ``web``):
    afterwards stay up until SIGINT/SIGTERM: other processes run campaigns on the lab
    over MQTT, people watch and act from the page (its stations are held by the service).
    ``web_any_port``: if ``web``'s port is taken, serve the page on a free one. ``notify``:
    a YAML file with the lab's ``notifications:`` (sent while the lab service runs: ``web``).
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
        notify=notify,
    ) as lab:
        print(
            f"simulated lab: {n} {bench} station(s) at {speed:g}x; run folder {out}",
            file=sys.stderr,
        )

        if web is not None and not resume:
            summary = await _served_campaign(
                lab,
                program,
                campaign_id,
                out,
                web,
                keep_running=keep_running,
                broker_url=broker_url,
                operator=operator,
                ray_address=ray_address,
                progress=progress,
                fault=fault,
                after=after,
                web_any_port=web_any_port,
            )
            return summary

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
    return summary


async def _served_campaign(
    lab: RunningSimLab,
    program: Program,
    campaign_id: str,
    out: Path,
    web: HttpBind,
    *,
    keep_running: bool,
    broker_url: str | None,
    operator: str,
    ray_address: str | None,
    progress: bool,
    fault: str | None,
    after: Callable[[RunningSimLab, CampaignSummary], None] | None,
    web_any_port: bool,
) -> CampaignSummary:
    """The campaign inside a lab service with the MQTT campaign API and the lab page (see
    :func:`sim_campaign`); SIGINT/SIGTERM abort it with every station in its safe state."""
    from bridge.campaigns import CampaignProgress
    from bridge.mqttapi import mqtt_settings
    from bridge.mqttserve import serve
    from bridge.webapp import lab_page

    url = broker_url or lab.sim.broker_url
    settings = mqtt_settings(lab.config, url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signalled: list[str] = []
    pages: list[str] = []
    task: list[asyncio.Task[CampaignSummary]] = []

    def on_signal(name: str) -> None:
        signalled.append(name)
        print(
            f"\n{name}: stopping: campaign aborted, every station to its safe state",
            file=sys.stderr,
        )
        stop.set()

    @contextlib.asynccontextmanager
    async def page(service: Any) -> AsyncIterator[str]:
        bind = web
        if web_any_port:  # the default port taken (another lab page): any free one will do
            with socket.socket() as probe:
                if probe.connect_ex((web.host, web.port)) == 0:
                    bind = dataclasses.replace(web, port=0)
        async with lab_page(service, bind) as where:
            pages.append(where)
            print(f"the lab page: {where} (watch and steer the campaign there)", file=sys.stderr)
            yield where

    async def run(service: Any) -> CampaignSummary:
        if fault:
            lab.inject_fault(fault)
            print(f"fault injected into every station: {fault}", file=sys.stderr)
        bar = CampaignProgress(program, campaign_id) if progress else None

        def on_event(event: dict[str, Any]) -> None:
            if bar is not None and event.get("campaign_id") == campaign_id:
                bar(event)

        remove = service.add_listener(on_event)
        summary = None
        try:
            started = await service.start_campaign(
                campaign_id, program, stations=service.stations, who=operator
            )
            if not started.accepted:
                raise ValueError(f"campaign {campaign_id} not started: {'; '.join(started.errors)}")
            handle = await service.wait_campaign(campaign_id)
            summary = handle.summary
            if summary is None:
                raise RuntimeError(f"campaign {campaign_id}: {handle.reason}")
        finally:
            remove()
            if bar is not None:
                bar.close(summary)
        if after is not None:
            after(lab, summary)
        if keep_running and not signalled:
            root = f"labbridge/{lab.config.bridge_id}"
            print(
                f"campaign {campaign_id}: {summary.state}. simulated lab serving its MQTT "
                f"campaign API on {url} under {root}/ (docs/mqtt-api.md) and the lab page at "
                f"{pages[0] if pages else '?'}; its stations are held by this service (lab "
                f"config {out / 'lab.yaml'}); Ctrl-C to stop",
                file=sys.stderr,
            )
        else:
            stop.set()
        return summary

    def online(api: Any, service: Any) -> None:
        task.append(asyncio.create_task(run(service), name=f"sim-campaign-{campaign_id}"))
        task[0].add_done_callback(lambda t: stop.set() if t.exception() else None)

    # Ray's driver installs its own SIGTERM handler in ray.init: start (or join) Ray first
    join_ray(lab.config, ray_address)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        why = await serve(
            lab.config,
            settings,
            ray_address=ray_address,
            operator=operator,
            stop=stop,
            handle_signals=False,
            on_online=online,
            hosted=[page],
            page_url=lambda: pages[0] if pages else None,
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if task and not task[0].done():
            task[0].cancel()
        results = await asyncio.gather(*task, return_exceptions=True)
    if keep_running:
        print(f"stopping the simulated lab ({why})", file=sys.stderr)
    if not results:
        raise RuntimeError("the lab service stopped before the campaign started")
    if isinstance(results[0], BaseException):
        raise results[0]
    return results[0]
