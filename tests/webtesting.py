"""Helpers for the lab page's tests: a simulated lab served with its page, and a real
headless Chromium (Debian's ``chromium``, driven by Playwright by executable path).

``LABBRIDGE_DOCS_SCREENSHOTS=1`` makes :func:`shot` also copy its screenshots into
``docs/images/`` (where docs/web.md shows them); otherwise they stay in the test's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.httpserve import HttpBind
from bridge.labconfig import load_lab
from bridge.service import LabService
from bridge.simbench import sim_lab_yaml
from bridge.webapp import lab_page
from simulators.bench import SimulatedLab

ROOT = Path(__file__).resolve().parents[1]
DOCS_IMAGES = ROOT / "docs" / "images"
SPEED = 500.0
USERS = "users:\n  ana: operator\n  ben: viewer\n"
PASSWORDS = {"ana": "ana-at-the-bench", "ben": "ben-watches-it"}


def chromium_path() -> str:
    """Debian's chromium (skips, or fails with CI=true, when it is not installed)."""
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(path):
            return path
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "chromium is not installed (apt-get install chromium)"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(reason + " -- CI=true requires it")
    pytest.skip(reason)


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium (one per test module that needs one) via Playwright."""
    path = chromium_path()
    playwright = pytest.importorskip("playwright.async_api")
    async with playwright.async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


@dataclasses.dataclass
class WebLab:
    sim: SimulatedLab
    path: Path
    lab: Any
    service: LabService
    url: str = ""
    port: int = 0
    _page: contextlib.AsyncExitStack = dataclasses.field(default_factory=contextlib.AsyncExitStack)

    async def start_page(self) -> str:
        """Serve the lab page (again: on the same port once it has one)."""
        self._page = contextlib.AsyncExitStack()
        bind = HttpBind("127.0.0.1", self.port)
        self.url = await self._page.enter_async_context(lab_page(self.service, bind))
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])
        return self.url

    async def stop_page(self) -> None:
        """Stop the page's server (the lab service stays up): its browsers lose it."""
        await self._page.aclose()


@contextlib.asynccontextmanager
async def web_lab(tmp_path: Path, stations: int = 1, extra: str = "") -> AsyncIterator[WebLab]:
    """A simulated lab (users ana: operator, ben: viewer; ``extra``: more of lab.yaml) in a
    lab service with its page."""
    async with SimulatedLab(stations=stations, speed=SPEED) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db") + USERS + extra)
        lab = load_lab(path)
        store = lab.users.store()
        for user, password in PASSWORDS.items():
            store.set(user, password, who="test")
        async with LabService(lab) as service:
            web = WebLab(sim, path, lab, service)
            await web.start_page()
            try:
                yield web
            finally:
                await web.stop_page()


async def shot(page: Any, folder: Path, name: str, selector: str | None = None) -> Path:
    """A full-page screenshot ``name`` in ``folder`` (and docs/images/, see the module);
    with ``selector``, of that element only."""
    path = folder / name
    if selector is not None:
        await page.locator(selector).screenshot(path=str(path))
    else:
        header = "document.querySelector('header').style.position"
        await page.evaluate(f"{header} = 'static'")  # one header in a full-page shot
        await page.screenshot(path=str(path), full_page=True)
        await page.evaluate(f"{header} = ''")
    if os.environ.get("LABBRIDGE_DOCS_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMAGES / name)
    return path
