"""A real two-node Ray cluster on this machine, wired as a lab is: a head PC and a bench PC.

:class:`TwoNodeCluster` starts, with Ray's token authentication on (a token file of its
own, as docs/cluster.md sets a lab up):

- a network: the bench node in a network namespace of its own, joined to this machine by
  a veth pair (``10.77.N.1`` here, ``10.77.N.2`` there, a /30), so the bench node reaches
  the head at a non-loopback address as a bench PC does on a lab network. Where that is
  not possible (not root, no ``ip``), both nodes share this machine's own address (Ray
  lets no second node join over loopback: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
  which keeps a node on 127.0.0.1, it refuses multi-node clusters, and without it a
  127.x address is rewritten to the routable one) and :attr:`TwoNodeCluster.netns_skipped`
  says why;
- the head (``ray start --head --block``) offering ``station:<name>`` for its benches,
  the bench node (``ray start --block --address=head``) offering its own;
- each node's simulated benches *on that node* (in its namespace): the simulators are
  the hardware wired to that machine (``python -m benchmarks.nodeprocs sim``), on one
  simulated clock (CLOCK_MONOTONIC is system-wide);
- a lab.yaml (:meth:`TwoNodeCluster.lab_yaml`) naming the head (``ray.address``) and the
  token file, with each station's instruments and its node's BLE bus;
- with ``tls=True``, Ray's TLS on every node and driver as well (docs/cluster.md): a
  throw-away lab CA and a certificate for both nodes' addresses (and 127.0.0.1).

A driver (``labbridge run --lab``) joins it from this machine's side of the link (the head's
machine), as ``labbridge run``/``serve`` does on a lab's head. :meth:`kill_node` SIGKILLs
the bench node's raylet (the node dies: its station actors with it; its simulators stay,
as a bench stays powered when its PC crashes); :meth:`restart_node` brings it back.
:class:`HotplateProbe` reads a hotplate's registers over its real Modbus TCP wire, from
the bench's side (another master on the device's wire, as a technician's meter would be).

Every process the cluster starts carries ``LABBRIDGE_CLUSTER=<tag>`` in its environment
(Ray's daemons inherit it); :meth:`TwoNodeCluster.stop` ends them by that mark, never by
name, then removes the namespace and the veth pair, also after a failed start.
Used by tests/test_cluster.py and benchmarks/scale.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from benchmarks.rayhead import RAY

ROOT = Path(__file__).resolve().parents[1]
#: bounded waits (real s): a Ray node or a simulated bench coming up, a node going down
START_S = 120.0
STOP_S = 60.0
#: how fast the head declares a silent node dead (Ray's defaults take ~15-30 s): what a
#: lab would set too when it wants a dead bench PC noticed quickly (docs/cluster.md)
#: clusters started by this process: each takes another /30 of 10.77.0.0/16
_CLUSTERS = itertools.count()
HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}


def bench_names(first: int, count: int) -> list[str]:
    """The simulated benches' names: ``bench-a`` is index 0 (as ``labbridge sim`` names them)."""
    return [f"bench-{chr(ord('a') + i)}" for i in range(first, first + count)]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _routable_ip() -> str:
    """This machine's routable address, as Ray finds it for a node without --node-ip-address."""
    from ray._common.network_utils import node_ip_address_from_perspective

    return str(node_ip_address_from_perspective())


def _marked(tag: str, node: str | None = None) -> list[int]:
    """Pids of the processes whose environment carries this cluster's mark (and node's)."""
    want = f"LABBRIDGE_CLUSTER={tag}".encode()
    node_mark = None if node is None else f"LABBRIDGE_NODE={node}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env and (node_mark is None or node_mark in env):
            out.append(int(entry.name))
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill(pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class Network:
    """The two nodes' addresses: a namespace and a veth pair, or ("", "": Ray picks this
    machine's address for both) none."""

    head_ip: str
    bench_ip: str
    netns: str | None = None
    host_link: str | None = None
    skipped: str | None = None  # why there is no namespace

    @classmethod
    def create(cls, tag: str, block: int) -> Network:
        """A namespace ``lbn<tag>`` with the bench end of a veth pair; loopback (with the
        reason in ``skipped``) when that is not possible here."""
        if os.environ.get("LABBRIDGE_NO_NETNS") == "1":
            return cls("", "", skipped="LABBRIDGE_NO_NETNS=1")
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return cls("", "", skipped="network namespaces need root and ip(8)")
        base = f"10.77.{block // 64}.{(block % 64) * 4}"
        prefix = base.rsplit(".", 1)[0]
        last = int(base.rsplit(".", 1)[1])
        net = cls(f"{prefix}.{last + 1}", f"{prefix}.{last + 2}", f"lbn{tag}", f"lbh{tag}")
        ns, host, peer = net.netns, net.host_link, f"lbw{tag}"
        assert ns is not None and host is not None
        steps = [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", host, "type", "veth", "peer", "name", peer],
            ["ip", "link", "set", peer, "netns", ns],
            ["ip", "addr", "add", f"{net.head_ip}/30", "dev", host],
            ["ip", "link", "set", host, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{net.bench_ip}/30", "dev", peer],
            ["ip", "netns", "exec", ns, "ip", "link", "set", peer, "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        ]
        for argv in steps:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            if done.returncode != 0:
                net.remove()
                why = f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}"
                return cls("", "", skipped=f"no network namespace ({why})")
        return net

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command on the bench node's side."""
        return [] if self.netns is None else ["ip", "netns", "exec", self.netns]

    def remove(self) -> None:
        """Remove the veth pair (both ends) and the namespace; idempotent."""
        if self.host_link is not None:
            subprocess.run(["ip", "link", "del", self.host_link], capture_output=True, check=False)
        if self.netns is not None:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)


@dataclass
class Node:
    """One Ray node of the cluster and the simulated benches wired to it."""

    role: str  # head | bench
    ip: str
    stations: list[str]
    first: int
    prefix: list[str]
    temp: Path
    proc: subprocess.Popen[bytes] | None = None
    sim: subprocess.Popen[bytes] | None = None
    lab: dict[str, Any] = field(default_factory=dict)  # its sim's lab.yaml, loaded

    @property
    def log(self) -> Path:
        return self.temp.parent / f"{self.role}.log"


class TwoNodeCluster:
    """A head and a bench node (module docstring). ``head_stations``/``bench_stations``: how
    many simulated benches each node has (named ``bench-a``, ``bench-b``... head first; the
    bench node may have none);
    ``speed``: the simulated clock's; ``camera_fps``: the simulated cameras' frame rate
    (CPU: 16 cameras at 10 fps is a core); ``bench_node``: False starts the head alone (its
    benches only; no namespace). Use as a context manager or call :meth:`start` and
    :meth:`stop`."""

    def __init__(
        self,
        head_stations: int = 1,
        bench_stations: int = 1,
        *,
        speed: float = 500.0,
        camera_fps: float = 4.0,
        tls: bool = False,
        bench_node: bool = True,
    ) -> None:
        self.tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"[:9]
        self.speed = speed
        self.camera_fps = camera_fps
        self.dir = Path(tempfile.mkdtemp(prefix="lbc-", dir="/tmp"))  # short: Ray's socket paths
        self.token_file = self.dir / "ray-token"
        self.home = self.dir / "home"
        self.sim_at_real = (0.0, time.monotonic())
        self.net: Network | None = None
        self.port = 0
        self.nodes: dict[str, Node] = {}
        self._counts = (head_stations, bench_stations)
        self.tls = tls
        self._bench_node = bench_node

    # -------------------------------------------------------------- set-up
    @property
    def address(self) -> str:
        """The head's GCS address (what ``ray.address`` / ``--ray-address`` name)."""
        assert self.net is not None
        return f"{self.net.head_ip}:{self.port}"

    @property
    def netns_skipped(self) -> str | None:
        """Why the bench node is not in a namespace of its own (None: it is)."""
        return None if self.net is None else self.net.skipped

    def env(self, node: str | None = None) -> dict[str, str]:
        """The environment of this cluster's processes: no Ray setting of this process (its
        own session's token, address), the cluster's token file, an empty home, the mark."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            HOME=str(self.home),
            PYTHONPATH=str(ROOT),
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            LABBRIDGE_CLUSTER=self.tag,
        )
        if self.tls:
            env.update(self.tls_env())
        assert self.net is not None
        if node is not None:
            env["LABBRIDGE_NODE"] = node
        return env

    def tls_env(self) -> dict[str, str]:
        """Ray's TLS variables of this cluster (``tls=True``): its CA, the nodes' certificate."""
        return {
            "RAY_USE_TLS": "1",
            "RAY_TLS_CA_CERT": str(self.dir / "ca.crt"),
            "RAY_TLS_SERVER_CERT": str(self.dir / "server.crt"),
            "RAY_TLS_SERVER_KEY": str(self.dir / "server.key"),
        }

    def driver_env(self) -> dict[str, str]:
        """For a driver (``labbridge run``) on the head's machine: the token comes from
        lab.yaml ``ray.token_file``, nothing else of Ray's is set."""
        env = self.env()
        env.pop("RAY_AUTH_TOKEN_PATH")
        env.pop("RAY_AUTH_MODE")
        return env

    def start(self) -> TwoNodeCluster:
        try:
            self.home.mkdir()
            self.token_file.write_text(secrets.token_hex(32) + "\n")
            self.token_file.chmod(0o600)
            self.net = (
                Network.create(self.tag, (os.getpid() + next(_CLUSTERS)) % 4096)
                if self._bench_node
                else Network("", "", skipped="one node: no bench node")
            )
            if self.tls:
                from simulators.brokercerts import make_test_certificates

                ips = [ip for ip in (self.net.head_ip, self.net.bench_ip) if ip]
                ips = ips or [_routable_ip()]  # no namespace: Ray picks this machine's address
                make_test_certificates(self.dir, (*ips, "127.0.0.1"), client_auth=True)
            self.port = _free_port(self.net.head_ip)
            heads, benches = self._counts
            self.nodes = {
                "head": Node(
                    "head", self.net.head_ip, bench_names(0, heads), 0, [], self.dir / "h" / "ray"
                ),
                "bench": Node(
                    "bench",
                    self.net.bench_ip,
                    bench_names(heads, benches),
                    heads,
                    self.net.prefix(),
                    self.dir / "b" / "ray",
                ),
            }
            if not heads:
                raise ValueError("the head needs at least one bench (the lab's clock is its)")
            benched = [n for n in self.nodes.values() if n.stations]
            for node in benched:  # the simulators first: they are the benches
                self._start_sim(node)
            for node in benched:
                self._wait_sim(node)
            self._start_node(self.nodes["head"])
            if self._bench_node:
                self._start_node(self.nodes["bench"])
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, node: Node) -> None:
        node.temp.mkdir(parents=True, exist_ok=True)
        argv = [
            str(RAY),
            "start",
            "--block",
            *([f"--node-ip-address={node.ip}"] if node.ip else []),
            "--num-cpus=1",
            f"--resources={json.dumps({f'station:{n}': 1 for n in node.stations})}",
            "--disable-usage-stats",
            f"--temp-dir={node.temp}",
            f"--object-store-memory={80 * 1024 * 1024}",
        ]
        if node.role == "head":
            argv += ["--head", f"--port={self.port}", "--include-dashboard=false"]
            env = {**self.env(node.role), **HEALTH_CHECK}
        else:
            argv += [f"--address={self.address}"]
            env = self.env(node.role)
        with node.log.open("a") as log:
            log.write(f"\n--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n")
            log.flush()
            node.proc = subprocess.Popen(
                [*node.prefix, *argv],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_S
        start = node.log.stat().st_size
        while time.monotonic() < deadline:
            with node.log.open("rb") as f:
                f.seek(max(0, start - 4096))
                text = f.read().decode(errors="replace")
            if "Ray runtime started" in text.rsplit("--- ", 1)[-1]:
                if not node.ip:  # no namespace: the address Ray chose (this machine's)
                    found = re.search(r"Local node IP: (\S+)", text.rsplit("--- ", 1)[-1])
                    node.ip = found.group(1) if found else ""
                    if node.role == "head":
                        assert self.net is not None
                        self.net.head_ip = node.ip
                return
            if node.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(
            f"the {node.role} Ray node did not start: see {node.log}:\n{text[-2000:]}"
        )

    def _start_sim(self, node: Node) -> None:
        out = self.dir / f"{node.role}-lab.yaml"
        argv = [
            sys.executable,
            "-m",
            "benchmarks.nodeprocs",
            "sim",
            "--first",
            str(node.first),
            "--stations",
            str(len(node.stations)),
            "--speed",
            str(self.speed),
            "--camera-fps",
            str(self.camera_fps),
            "--sim-at-real",
            str(self.sim_at_real[0]),
            str(self.sim_at_real[1]),
            "--out",
            str(out),
            "--store",
            str(self.dir / "journal.db"),
        ]
        with (self.dir / f"{node.role}-sim.log").open("w") as log:
            node.sim = subprocess.Popen(
                [*node.prefix, *argv],
                env=self.env(f"{node.role}-sim"),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_sim(self, node: Node) -> None:
        out = self.dir / f"{node.role}-lab.yaml"
        deadline = time.monotonic() + START_S
        while not out.exists():
            assert node.sim is not None
            if node.sim.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / f"{node.role}-sim.log").read_text()
                raise RuntimeError(
                    f"the {node.role} node's simulated benches did not start:\n{log}"
                )
            time.sleep(0.1)
        node.lab = yaml.safe_load(out.read_text())

    def lab_yaml(
        self, store: Path, *, with_address: bool = True, mqtt: dict[str, Any] | None = None
    ) -> str:
        """lab.yaml for the whole lab: every node's stations (their instruments on that node,
        its BLE bus in the station's ``env``), the head's address (unless ``with_address``
        is false: then ``--ray-address`` or ``$RAY_ADDRESS`` must name it) and the token file;
        ``mqtt``: its ``mqtt:`` section (the service's broker, e.g. :meth:`broker_url`)."""
        head = self.nodes["head"].lab
        config: dict[str, Any] = {
            "bridge_id": f"two-node-{self.tag}",
            "store": str(store),
            "ray": {"token_file": str(self.token_file)},
            "simulated": head["simulated"],
            "stations": {},
        }
        if with_address:
            config["ray"]["address"] = self.address
        if mqtt is not None:
            config["mqtt"] = dict(mqtt)
        for node in self.nodes.values():
            for name, station in node.lab.get("stations", {}).items():
                config["stations"][name] = {**station, "env": dict(node.lab.get("env") or {})}
        return "# two Ray nodes on this machine (benchmarks/twonode.py)\n" + yaml.safe_dump(
            config, sort_keys=False
        )

    def station_urls(self, name: str) -> dict[str, str]:
        """Instrument name -> URL of station ``name`` (reachable from its node's side)."""
        for node in self.nodes.values():
            if name in node.lab.get("stations", {}):
                return {i["name"]: i["url"] for i in node.lab["stations"][name]["instruments"]}
        raise KeyError(name)

    # ------------------------------------------------------------ faults
    def kill_node(self, role: str = "bench") -> list[int]:
        """SIGKILL the node's raylet (its workers, the station actors, die with it); waits
        for its ``ray start --block`` to notice and ends the node's other Ray processes, as
        a crashed PC has none left. Its simulators stay (the bench keeps its power).
        Returns the raylet's pid(s)."""
        node = self.nodes[role]
        raylets = [p for p in _marked(self.tag, role) if _comm(p) == "raylet"]
        if not raylets:
            raise RuntimeError(f"no raylet of the {role} node is running")
        _kill(raylets)
        if node.proc is not None:
            try:
                node.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)
        _kill(_marked(self.tag, role))
        return raylets

    def restart_node(self, role: str = "bench") -> None:
        """Start the node again (same address, same stations): its PC came back."""
        self._start_node(self.nodes[role])

    def ensure_up(self) -> None:
        """Start again any node that is down (a test before killed it)."""
        for role, node in self.nodes.items():
            if role == "bench" and not self._bench_node:
                continue
            if node.proc is None or node.proc.poll() is not None:
                self.restart_node(role)

    def broker_url(self) -> str:
        """The head's simulated MQTT broker (its benches' enclosures use it), as a broker URL."""
        for station in self.nodes["head"].lab["stations"].values():
            for instrument in station["instruments"]:
                if instrument["url"].startswith("mqtt://"):
                    parts = urlsplit(instrument["url"])
                    return f"mqtt://{parts.hostname}:{parts.port}"
        raise RuntimeError("the head's benches have no MQTT instrument")

    # ------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """End every process of the cluster (simulators, Ray nodes: SIGTERM, then SIGKILL of
        whatever carries its mark), remove the namespace and veth pair, delete its folder.
        Idempotent; also after a failed start."""
        for node in reversed(list(self.nodes.values())):
            for proc in (node.proc, node.sim):
                if proc is None or proc.poll() is not None:
                    continue
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        for _ in range(50):  # Ray's daemons and workers that outlived their node's stop
            left = _marked(self.tag)
            if not left:
                break
            _kill(left)
            time.sleep(0.1)
        if self.net is not None:
            self.net.remove()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TwoNodeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HotplateProbe:
    """A second Modbus master on a simulated hotplate's TCP wire, from the bench's side (in
    its namespace): every ``every_s`` real seconds it reads holding 0-4 and input 0-4 and
    appends them as a JSON line (``heater``, ``stirrer``, ``watchdog_s``, ``status``,
    ``plate_c``, ``t``: time.monotonic()) to a file; :meth:`samples` reads them."""

    def __init__(self, cluster: TwoNodeCluster, station: str, every_s: float = 0.02) -> None:
        self.path = cluster.dir / f"probe-{station}.jsonl"
        url = cluster.station_urls(station)["hotplate"]
        role = next(r for r, n in cluster.nodes.items() if station in n.stations)
        argv = [
            sys.executable,
            "-m",
            "benchmarks.nodeprocs",
            "probe",
            url,
            str(self.path),
            "--every",
            str(every_s),
        ]
        with (cluster.dir / "probe.log").open("a") as log:
            self.proc = subprocess.Popen(
                [*cluster.nodes[role].prefix, *argv],
                env=cluster.env("probe"),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

    def samples(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=STOP_S)


@contextlib.contextmanager
def two_node_cluster(
    head_stations: int = 1, bench_stations: int = 1, **kwargs: Any
) -> Iterator[TwoNodeCluster]:
    """:class:`TwoNodeCluster` as a context manager (stopped, namespace removed, on exit)."""
    cluster = TwoNodeCluster(head_stations, bench_stations, **kwargs)
    with cluster:
        yield cluster
