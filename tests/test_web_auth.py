"""The lab page's users, passwords, sessions and request checks, without a browser or Ray.

lab.yaml's ``users`` (errors name the line and field), the scrypt password file (private,
atomic, refused when others can read it) and ``labbridge users``; then the page's HTTP
surface over a real socket on 127.0.0.1 for a lab service that is not opened (nothing
here reaches a station): logins and their throttle, session cookies, CSRF, origins,
content types, body sizes, one-line errors, the static page and its headers, the event
stream; and binds beyond loopback refused without TLS by ``serve --web`` and ``sim --web``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx2
import pytest

from bridge.cli import main as labbridge
from bridge.httpserve import BindError, HttpBind
from bridge.labconfig import LabConfigError, load_lab
from bridge.service import LabService
from bridge.webapp import MAX_BODY_BYTES, lab_page
from bridge.webauth import FREE_FAILURES
from bridge.webcli import web_bind
from bridge.webusers import PasswordFileError, PasswordStore, verify_password
from bridge.webviews import channel_words

LAB = """
stations:
  bench-a:
    instruments:
      - {name: hotplate, kind: hotplate, url: "modbus-tcp://127.0.0.1:1?unit=1"}
    envelope:
      channels:
        hotplate.setpoint_c: {min: 0, max: 80, unit: degC}
        hotplate.heater: {unbounded: "on/off"}
        hotplate.stirrer: {unbounded: "on/off"}
        hotplate.stirrer_rpm: {min: 0, max: 1200, unit: rpm}
        hotplate.stirrer_setpoint_rpm: {min: 0, max: 1200, unit: rpm}
"""
USERS = "users:\n  ana: operator\n  ben: viewer\n"


def _lab(tmp_path: Path, extra: str = USERS) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(LAB + extra)
    return path


# ==================================================================== lab.yaml
@pytest.mark.parametrize(
    ("extra", "line", "where", "what"),
    [
        ("users:\n  ana: admin\n", 14, "users.ana", "role 'admin' is not one of viewer, operator"),
        ("users:\n  'a b': viewer\n", 14, "users.a b", "is not a user name"),
        ("users: [ana]\n", 13, "users", "must be a mapping of user name -> role"),
        ("user_passwords: 7\n", 13, "user_passwords", "must be a file path"),
    ],
)
def test_lab_yaml_users_are_validated_with_file_line_and_field(
    tmp_path: Path, extra: str, line: int, where: str, what: str
) -> None:
    with pytest.raises(LabConfigError) as err:
        load_lab(_lab(tmp_path, extra))
    text = str(err.value)
    assert f"lab.yaml:{line}: {where}: " in text and what in text, text


def test_passwords_are_scrypt_hashed_private_and_managed_by_labbridge_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _lab(tmp_path)
    monkeypatch.setenv("ANA_PW", "correct horse battery")
    assert (
        labbridge(["users", "passwd", "ana", "--lab", str(path), "--password-env", "ANA_PW"]) == 0
    )
    assert "password of ana (operator) set, scrypt-hashed" in capsys.readouterr().out
    pw_file = tmp_path / "users.passwords"
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
    data = json.loads(pw_file.read_text())
    stored = data["users"]["ana"]["scrypt"]
    assert stored.startswith("scrypt$32768$8$1$") and "correct horse" not in pw_file.read_text()
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse batter", stored)
    store = load_lab(path).users.store()
    assert store.check("ana", "correct horse battery") and not store.check("ben", "anything!")
    # a user not in lab.yaml gets no password; a short one is refused; so is a bad source
    monkeypatch.setenv("EVE_PW", "whatever-long")
    assert (
        labbridge(["users", "passwd", "eve", "--lab", str(path), "--password-env", "EVE_PW"]) == 1
    )
    assert "no user 'eve' in" in capsys.readouterr().err
    monkeypatch.setenv("SHORT", "short")
    assert labbridge(["users", "passwd", "ben", "--lab", str(path), "--password-env", "SHORT"]) == 1
    assert "a password must be 8 to 1024 characters long (got 5)" in capsys.readouterr().err
    assert labbridge(["users", "passwd", "ben", "--lab", str(path), "--password-env", "NOPE"]) == 1
    assert "$NOPE is not set" in capsys.readouterr().err
    assert labbridge(["users", "list", "--lab", str(path), "--json"]) == 0
    listed = {u["user"]: u for u in json.loads(capsys.readouterr().out)["users"]}
    assert listed["ana"]["may"] == ["approve", "control", "estop", "reset"]
    assert listed["ana"]["password_set"]
    assert listed["ben"]["may"] == ["estop"] and listed["ben"]["password_set"] is None
    # a password file others can read is refused, as ssh refuses such a key
    os.chmod(pw_file, 0o644)
    with pytest.raises(PasswordFileError, match="accessible to others .*chmod 600"):
        PasswordStore(pw_file).records()
    os.chmod(pw_file, 0o600)
    assert labbridge(["users", "remove", "ana", "--lab", str(path)]) == 0
    assert not load_lab(path).users.store().check("ana", "correct horse battery")
    pw_file.write_text("{not json")
    with pytest.raises(PasswordFileError, match="is not valid JSON"):
        PasswordStore(pw_file).records()


def test_channel_names_read_as_words_with_units() -> None:
    assert channel_words("hotplate.liquid_c") == {
        "label": "hotplate: liquid temperature",
        "unit": "°C",
    }
    assert channel_words("red.rate_ml_min") == {"label": "red: rate", "unit": "mL/min"}
    assert channel_words("red.infused_ml") == {"label": "red: infused volume", "unit": "mL"}
    assert channel_words("hotplate.stirrer_rpm") == {
        "label": "hotplate: stirrer speed",
        "unit": "rpm",
    }
    assert channel_words("enclosure.lid") == {"label": "enclosure: lid", "unit": ""}


# ======================================================================== binds
def test_the_page_binds_beyond_loopback_only_with_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert web_bind("127.0.0.1:0", None, None).loopback
    with pytest.raises(BindError, match="passwords and session cookies would cross the network"):
        web_bind("0.0.0.0:8765", None, None)
    with pytest.raises(BindError, match=r"TLS needs both .*--web-tls-cert and --web-tls-key"):
        web_bind("127.0.0.1:8765", tmp_path / "c.pem", None)
    path = _lab(tmp_path)
    # refused before anything opens (no broker, no Ray, no station)
    argv = ["serve", "--lab", str(path), "--broker", "mqtt://127.0.0.1:1"]
    assert labbridge([*argv, "--web", "0.0.0.0:8765"]) == 1
    assert "0.0.0.0 is not a loopback address" in capsys.readouterr().err
    assert labbridge(["sim", "--web", "192.0.2.1:8765", "--out", str(tmp_path / "run")]) == 1
    assert "192.0.2.1 is not a loopback address" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ================================================================ HTTP surface
async def test_requests_are_checked_before_anything_is_done(tmp_path: Path) -> None:
    lab = load_lab(_lab(tmp_path))
    store = lab.users.store()
    store.set("ana", "ana-at-the-bench", who="test")
    store.set("ben", "ben-watches-it", who="test")
    service = LabService(lab)  # never opened: nothing here may reach a station
    async with lab_page(service, HttpBind("127.0.0.1", 0)) as url:
        origin = url.rstrip("/")
        async with httpx2.AsyncClient(base_url=url, timeout=120) as http:
            page = await http.get("/")
            assert page.status_code == 200 and "E-STOP" in page.text
            csp = page.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp
            assert page.headers["x-content-type-options"] == "nosniff"
            script = await http.get("/static/app.js")
            assert script.status_code == 200 and "EventSource" in script.text
            state = (await http.get("/api/state")).json()
            assert state["you"] is None and state["login"] is True and state["service"] == "new"
            # the event stream starts with hello and this server's instance
            async with http.stream("GET", "/api/events") as events:
                assert events.headers["content-type"].startswith("text/event-stream")
                lines = events.aiter_lines()
                assert await anext(lines) == "retry: 1000"
                assert await anext(lines) == "event: hello"
                assert (await anext(lines)).startswith('data: {"instance": ')
            # bad requests: one-line errors, nothing done
            too_big = await http.post(
                "/api/login", content=b"{" + b" " * MAX_BODY_BYTES + b"}", headers=_json()
            )
            assert too_big.status_code == 413 and "larger than 16384 bytes" in too_big.text
            assert (
                await http.post("/api/login", content=b"[1]", headers=_json())
            ).status_code == 400
            assert (await http.post("/api/login", content=b"{", headers=_json())).json() == {
                "error": "the request body is not JSON"
            }
            assert (await http.post("/api/login", content=b"user=ana")).status_code == 415
            foreign = await http.post(
                "/api/login",
                json={"user": "ana", "password": "ana-at-the-bench"},
                headers={"Origin": "http://evil.example"},
            )
            assert foreign.status_code == 403 and "http://evil.example" in foreign.text
            assert (await http.get("/api/experiments/..%2Fetc")).status_code == 404
            assert (await http.get("/reports/x%20y/")).status_code == 404
            decide = {"decision": "approve", "reason": "looks fine"}
            nobody = await http.post("/api/campaigns/c-1/approvals/c-1-0001", json=decide)
            assert nobody.status_code == 401
            assert nobody.json() == {"error": "log in to approve or deny proposals"}
            for bad in ("x%20y/approvals/c-1-0001", "c-1/approvals/..%2Fetc"):
                assert (await http.post(f"/api/campaigns/{bad}", json=decide)).status_code == 404
            # the viewer: e-stop only; an e-stop on a service that is not open is a 409
            ben = await http.post(
                "/api/login",
                json={"user": "ben", "password": "ben-watches-it"},
                headers={"Origin": origin},
            )
            assert ben.status_code == 200
            cookie = ben.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
            you = (await http.get("/api/state")).json()["you"]
            assert you["user"] == "ben" and you["may"] == ["estop"]
            token = {"X-CSRF-Token": you["csrf"]}
            reset = await http.post("/api/reset", json={"why": "x"}, headers=token)
            assert reset.status_code == 403 and "ben (viewer) may not reset stations" in reset.text
            approve = await http.post(
                "/api/campaigns/c-1/approvals/c-1-0001", json=decide, headers=token
            )
            assert approve.status_code == 403 and approve.json() == {
                "error": "ben (viewer) may not approve or deny proposals: lab.yaml's users give "
                "that to operators"
            }
            estop = await http.post("/api/estop", json={}, headers=token)
            assert estop.status_code == 409 and "not open" in estop.text
            # logging out needs the token too; afterwards the cookie is worth nothing
            assert (await http.post("/api/logout", json={})).status_code == 403
            assert (await http.post("/api/logout", json={}, headers=token)).status_code == 200
            assert (await http.get("/api/state")).json()["you"] is None
            # failed logins of one user slow the next ones down
            for _ in range(FREE_FAILURES):
                bad = await http.post("/api/login", json={"user": "ana", "password": "wrong-one"})
                assert bad.status_code == 401 and bad.json() == {"error": "wrong user or password"}
            locked = await http.post(
                "/api/login", json={"user": "ana", "password": "ana-at-the-bench"}
            )
            assert locked.status_code == 429 and "too many failed logins for ana" in locked.text
            nobody = await http.post("/api/login", json={"user": "zed", "password": "whatever1"})
            assert nobody.status_code == 401 and nobody.json() == {
                "error": "wrong user or password"
            }


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}
