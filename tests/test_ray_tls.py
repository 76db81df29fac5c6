"""Joining a Ray cluster with TLS: every way this process's TLS settings and the head's can
differ is one line, at once (loops/rayprobe.py), not a hang in Ray's retries.

The head here is a stand-in that does what Ray's GCS does on its port: with TLS, a
mutual-TLS handshake (it asks for a client certificate signed by its CA, ALPN h2), then
an HTTP/2 SETTINGS frame; without, the SETTINGS frame in plaintext. A real Ray head with
the token and TLS is docs/cluster.md's TLS rehearsal (tests/test_docs_cluster.py), which
joins it with TLS and is refused without; a real plaintext head refusing a TLS driver is
in tests/test_ray_auth.py. ``benchmarks/raytls.py`` (what TLS costs a call) runs here too, long.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loops.rayprobe import RayTlsError, check_ray_address
from simulators.brokercerts import make_test_certificates

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@contextlib.contextmanager
def stand_in_head(tls: ssl.SSLContext | None) -> Iterator[str]:
    """A server on 127.0.0.1 answering an HTTP/2 opening with SETTINGS, over ``tls`` if given."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            peer: socket.socket = conn
            try:
                conn.settimeout(5)
                if tls is not None:
                    peer = tls.wrap_socket(conn, server_side=True)  # owns the socket now
                peer.recv(64)
                peer.sendall(SETTINGS)
            except OSError:  # a handshake refused: the client sees it
                pass
            finally:
                peer.close()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def lab(folder: Path) -> dict[str, Path]:
    """A lab CA and a node certificate for 127.0.0.1 (client and server use, as Ray's)."""
    folder.mkdir()
    ca, cert, key = make_test_certificates(folder, ("127.0.0.1",), client_auth=True)
    return {"RAY_TLS_CA_CERT": ca, "RAY_TLS_SERVER_CERT": cert, "RAY_TLS_SERVER_KEY": key}


def server_context(files: dict[str, Path]) -> ssl.SSLContext:
    """What Ray's gRPC server does with the same variables: its certificate, and a client
    certificate required, signed by the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files["RAY_TLS_SERVER_CERT"], files["RAY_TLS_SERVER_KEY"])
    ctx.load_verify_locations(files["RAY_TLS_CA_CERT"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def use_tls(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path] | None) -> None:
    for var in ("RAY_USE_TLS", "RAY_TLS_CA_CERT", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY"):
        monkeypatch.delenv(var, raising=False)
    if files is not None:
        monkeypatch.setenv("RAY_USE_TLS", "1")
        for var, path in files.items():
            monkeypatch.setenv(var, str(path))


def test_each_tls_mismatch_with_the_head_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = lab(tmp_path / "lab")
    other = lab(tmp_path / "other")  # another lab's CA and certificate
    with stand_in_head(server_context(ours)) as address:
        use_tls(monkeypatch, ours)
        check_ray_address(address)  # the same CA, the head's IP in its certificate: passes

        use_tls(monkeypatch, None)
        with pytest.raises(RayTlsError) as exc:
            check_ray_address(address)
        assert str(exc.value) == (
            f"the Ray cluster at {address} uses TLS and this process does not: set "
            "RAY_USE_TLS=1, RAY_TLS_SERVER_CERT and RAY_TLS_SERVER_KEY (this machine's "
            "certificate and key) and RAY_TLS_CA_CERT (the lab's CA), as on the cluster's "
            "nodes, see docs/cluster.md"
        )

        use_tls(monkeypatch, ours)
        monkeypatch.delenv("RAY_TLS_SERVER_KEY")
        with pytest.raises(
            RayTlsError, match=r"RAY_USE_TLS is set but \$RAY_TLS_SERVER_KEY is not"
        ):
            check_ray_address(address)

        use_tls(monkeypatch, {**ours, "RAY_TLS_SERVER_CERT": tmp_path / "no-such.crt"})
        with pytest.raises(RayTlsError, match=r"cannot read \$RAY_TLS_SERVER_CERT .*no-such.crt"):
            check_ray_address(address)

        use_tls(monkeypatch, {**ours, "RAY_TLS_SERVER_KEY": other["RAY_TLS_SERVER_KEY"]})
        with pytest.raises(RayTlsError, match="the TLS files do not work together"):
            check_ray_address(address)

        use_tls(monkeypatch, other)  # trusts another CA: the head's certificate is no good
        with pytest.raises(RayTlsError, match="shows a certificate this machine does not trust"):
            check_ray_address(address)

        use_tls(monkeypatch, {**other, "RAY_TLS_CA_CERT": ours["RAY_TLS_CA_CERT"]})
        with pytest.raises(RayTlsError, match="refused this machine's certificate"):
            check_ray_address(address)  # trusts the head, but its own is another lab's

        use_tls(monkeypatch, ours)  # the head by a name its certificate does not carry
        port = address.rpartition(":")[2]
        with pytest.raises(RayTlsError, match="not valid for 'localhost'"):
            check_ray_address(f"localhost:{port}")

    with stand_in_head(None) as address:  # a plaintext head
        use_tls(monkeypatch, ours)
        with pytest.raises(RayTlsError) as exc:
            check_ray_address(address)
        assert str(exc.value) == (
            f"the Ray cluster at {address} does not use TLS and this process does (RAY_USE_TLS "
            "is set): unset RAY_USE_TLS, or restart the cluster's nodes with TLS, see "
            "docs/cluster.md"
        )
        use_tls(monkeypatch, None)
        check_ray_address(address)


@pytest.mark.long  # two Ray heads (10-30 s): the numbers are docs/cluster.md's
@pytest.mark.timeout(300)
def test_the_tls_benchmark_times_calls_without_and_with_tls() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.raytls", "--calls", "20"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    assert set(rows) == {"plain", "TLS"}, done.stdout
    for mode, (join_s, calls, median, p99, _) in rows.items():
        assert int(calls) == 20 and 0 < float(median) <= float(p99), (mode, done.stdout)
        assert float(join_s) > 0, (mode, done.stdout)
