"""The lab page: result-to-browser latency, and what open pages cost the service.

Run:  python benchmarks/page.py [--results 30] [--browsers 20] [--seconds 10] [--rounds 3]
      python benchmarks/page.py --quick          # CI smoke run

One simulated reference station (``SimulatedLab(stations=1)``, in a process of its own,
as a bench is outside the PC: its simulators' CPU is not the page's) opened by a
:class:`~bridge.service.LabService` on a local loopback Ray, the lab page served on
127.0.0.1 (:func:`bridge.webapp.lab_page`), real headless Chromium pages (Debian's
``chromium`` driven by Playwright), each in its own browser context (its own
connections: a browser keeps at most 6 to one host).

1. Latency: a campaign of ``--results`` experiments runs while one page shows it. The
   service's ``finished`` event comes right after the journal's ``done`` (the runner
   journals first); a ``MutationObserver`` in the page notes when each result's row
   appears (``Date.now()``, this machine's clock, the same as ``time.time()``).
   Median and p99 of the difference.
2. Cost: ``--seconds`` of 10 updates/s (result events fed to the service's listeners,
   the path every runner event takes to the pages) with 0, 1 and ``--browsers`` pages
   open on the lab view; this process's CPU time (the service, the page's server, the
   1 Hz station poll that runs while a page is open; not the simulators, not the
   browsers) per second, and the extra per page over the run with none. The three loads
   take turns ``--rounds`` times and each figure is the median of its rounds, so a
   slow spell of a shared machine lands on all three alike. Measured side by side in the
   same run; numbers are printed, not judged (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import psutil  # noqa: E402

from benchmarks.stats import med, pct  # noqa: E402
from bridge.httpserve import HttpBind  # noqa: E402
from bridge.labconfig import load_lab  # noqa: E402
from bridge.service import LabService  # noqa: E402
from bridge.webapp import lab_page  # noqa: E402
from loops.program import builtin_program, load_program  # noqa: E402
from loops.raylinks import init_ray  # noqa: E402

#: the simulated lab, in a process of its own: writes lab.yaml, says "ready", runs until
#: its stdin closes (this process ended, however it ended)
_LAB_SCRIPT = """
import asyncio, ctypes, signal, sys
from pathlib import Path
from bridge.simbench import sim_lab_yaml
from simulators.bench import SimulatedLab
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
lab_yaml, store, speed = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

async def main():
    async with SimulatedLab(stations=1, speed=speed) as sim:
        lab_yaml.write_text(sim_lab_yaml(sim, store))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def lab_process(folder: Path, speed: float) -> AsyncIterator[Path]:
    """The simulated lab running in a child process while the block runs; yields lab.yaml."""
    path = folder / "lab.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LAB_SCRIPT, str(path), str(folder / "journal.db"), str(speed),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=_ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if line.strip() != b"ready":
            raise RuntimeError(f"the simulated lab did not start (exit {await proc.wait()})")
        yield path
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


#: notes when each result row appears in the campaign view (ms since the epoch)
OBSERVER = """() => {
  window.__seen = {};
  new MutationObserver(() => {
    for (const tr of document.querySelectorAll('tr[data-state=done]')) {
      const id = tr.getAttribute('data-experiment');
      if (!(id in window.__seen)) window.__seen[id] = Date.now();
    }
  }).observe(document.body, {childList: true, subtree: true});
}"""


def program_text(experiments: int) -> str:
    base = load_program(builtin_program("color-match"))
    return dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=experiments),
        stop=dataclasses.replace(base.stop, target=None, no_improvement=None),
        initial_points=min(experiments, base.initial_points),
    ).to_markdown()


async def latency(service: LabService, url: str, browser: Any, n: int) -> list[float]:
    finished: dict[str, float] = {}
    remove = service.add_listener(
        lambda e: (
            finished.setdefault(str(e.get("experiment_id")), time.time())
            if e.get("event") == "finished"
            else None
        )
    )
    context = await browser.new_context()
    try:
        page = await context.new_page()
        started = await service.start_campaign("bench-page", program_text(n), who="bench")
        assert started.accepted, started
        await page.goto(f"{url}#/campaign/bench-page")
        await page.wait_for_selector("h1:has-text('Campaign bench-page')")
        await page.evaluate(OBSERVER)
        await service.wait_campaign("bench-page")
        await asyncio.sleep(1.0)  # the last row's render
        seen: dict[str, float] = await page.evaluate("window.__seen")
    finally:
        remove()
        await context.close()
    return [seen[e] - finished[e] * 1e3 for e in finished if e in seen]


async def cost(
    service: LabService, url: str, browser: Any, pages: int, seconds: float, rate: float
) -> tuple[float, int]:
    """CPU seconds per second of this process during ``seconds`` of ``rate`` events/s with
    ``pages`` pages open, and the events the pages received."""
    contexts = [await browser.new_context() for _ in range(pages)]
    try:
        opened = []
        for ctx in contexts:
            page = await ctx.new_page()
            await page.goto(f"{url}#/lab")
            await page.wait_for_selector("#conn.live")
            await page.evaluate(  # count on the page's own stream (app.js's S.source)
                "() => { window.__n = 0;"
                " S.source.addEventListener('finished', () => { window.__n += 1; }); }"
            )
            opened.append(page)
        await asyncio.sleep(1.5)  # connected and quiet
        me = psutil.Process()
        cpu0, t0 = sum(me.cpu_times()[:2]), time.monotonic()
        k = 0
        while time.monotonic() - t0 < seconds:
            service._emit(  # the path every runner event takes to the pages
                {
                    "event": "finished",
                    "campaign_id": "load",
                    "experiment_id": f"load-{k:05d}",
                    "station": "bench-a",
                    "params": {"red_ml": 0.5},
                    "proposer": "optimizer:bayes",
                    "objective": 10.0,
                    "verified": True,
                }
            )
            k += 1
            await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        elapsed = time.monotonic() - t0
        cpu = sum(me.cpu_times()[:2]) - cpu0
        await asyncio.sleep(0.5)
        received = sum([int(await p.evaluate("window.__n")) for p in opened])
    finally:
        for ctx in contexts:
            await ctx.close()
    return cpu / elapsed, received


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    init_ray(stations=("bench-a",), local=True, log_to_driver=False)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lb-bench-page-") as tmp:
        async with lab_process(Path(tmp), args.speed) as path:
            async with (
                LabService(load_lab(path)) as service,
                lab_page(service, HttpBind("127.0.0.1", 0)) as url,
                async_playwright() as p,
            ):
                browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                try:
                    print(f"1. latency over {args.results} results ...", file=sys.stderr)
                    out["latency_ms"] = await latency(service, url, browser, args.results)
                    for r in range(args.rounds):
                        for n in (0, 1, args.browsers):
                            print(
                                f"2. round {r + 1}/{args.rounds}: {n} page(s), "
                                f"{args.seconds:g} s at 10 updates/s",
                                file=sys.stderr,
                            )
                            got = await cost(service, url, browser, n, args.seconds, 10.0)
                            out.setdefault(f"cost_{n}", []).append(got)
                finally:
                    await browser.close()
    return out


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    lat = r["latency_ms"]
    print(f"\nlab page, {os.cpu_count()} cores")
    print(
        f"result in the journal -> visible in the browser: median {med(lat):.0f} ms, "
        f"p99 {pct(lat, 0.99):.0f} ms, max {max(lat):.0f} ms ({len(lat)} results)"
    )
    loads = {n: [c for c, _ in r[f"cost_{n}"]] for n in (0, 1, args.browsers)}
    cpu = {n: med(v) for n, v in loads.items()}
    print(
        "service CPU at 10 updates/s (this process: service, page server, station poll; "
        f"median of {args.rounds} round(s), lowest-highest):"
    )
    print(f"  {'pages':>6} {'CPU %':>7} {'range':>13} {'events received':>16}")
    for n, v in loads.items():
        spread = f"{min(v) * 100:.1f}-{max(v) * 100:.1f}"
        got = sum(g for _, g in r[f"cost_{n}"])
        want = n * args.seconds * 10 * args.rounds
        print(f"  {n:>6} {cpu[n] * 100:>7.1f} {spread:>13} {got:>8}/{want:<7.0f}")
    more = args.browsers - 1
    each = (cpu[args.browsers] - cpu[1]) / more * 100 if more else float("nan")
    print(
        f"  the first page: +{(cpu[1] - cpu[0]) * 100:.2f} % CPU (with it the 1 Hz station "
        f"poll that all pages share); each further page: {each:+.2f} % CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--results", type=int, default=30, help="results timed (default 30)")
    parser.add_argument("--browsers", type=int, default=20, help="pages at once (default 20)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per load (default 10)")
    parser.add_argument("--speed", type=float, default=500.0, help="simulated clock (500)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of the loads (3)")
    parser.add_argument("--quick", action="store_true", help="a CI smoke run")
    args = parser.parse_args()
    if args.quick:
        args.results, args.browsers, args.seconds, args.rounds = 3, 3, 3.0, 1
    if min(args.results, args.browsers, args.rounds) < 1 or not args.seconds > 0:
        parser.error("--results, --browsers and --rounds must be >= 1 and --seconds > 0")
    logging.basicConfig(level=logging.WARNING)
    for name in ("bridge", "safety", "loops", "bleak"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    report(args, asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
