"""The JSON Schemas of the MQTT campaign API (``docs/schemas/<name>.schema.json``).

Requests (``start``, ``proposal``, ``control``, ``approval``, ``estop``, ``reset``) are checked
against them before anything is done (:func:`schema_errors` lists every problem);
the service's messages (``reply``, ``status``, ``campaign-status``, ``result``,
``approval-event``)
follow them. :func:`write_schemas` writes them into ``docs/schemas/``; a test
checks that the files there are these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from bridge.mqttlink import short
from bridge.service import CAMPAIGN_ID, CONTROL_ACTIONS

__all__ = ["REQUESTS", "SCHEMAS", "schema_errors", "write_schemas"]

_MAX_ERRORS = 20

_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_NOTE = {
    "type": "string",
    "maxLength": 2000,
    "description": (
        "free text, logged (who sends a request is the broker user, the last level of its "
        "topic, never a payload field)"
    ),
}
_REPLY = {
    "reply_to": {
        "type": "string",
        "minLength": 1,
        "maxLength": 512,
        "pattern": r"^[^+#\u0000]+$",
        "description": (
            "MQTT 3.1.1 clients: the topic to answer on, under labbridge/<bridge_id>/replies/ "
            "(MQTT v5 clients may use the response topic property instead)"
        ),
    },
    "correlation_id": {
        "type": "string",
        "maxLength": 256,
        "description": "echoed in the reply (MQTT v5 correlation data is echoed as well)",
    },
}
_STATION = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"}
_STATIONS = {"type": "array", "minItems": 1, "uniqueItems": True, "items": _STATION}


def _request_schema(
    name: str, title: str, props: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    return {
        "$schema": _DRAFT,
        "$id": f"{name}.schema.json",
        "title": title,
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": {**props, **_REPLY},
    }


#: the JSON Schemas of every request and message, by name (``docs/schemas/<name>.schema.json``)
SCHEMAS: dict[str, dict[str, Any]] = {
    "start": _request_schema(
        "start",
        "labbridge/<bridge_id>/campaigns/start: start a campaign (idempotent by id)",
        {
            "id": {
                "type": "string",
                "pattern": CAMPAIGN_ID.pattern,
                "description": "the campaign id (also a topic level): the idempotency key",
            },
            "program": {
                "type": ["string", "object"],
                "minLength": 1,
                "description": (
                    "the campaign: program.md text (YAML front matter + Markdown), or its front "
                    "matter as an object (see docs/campaigns.md and loops/program.py)"
                ),
            },
            "body": {
                "type": "string",
                "maxLength": 65536,
                "description": "with an object program: its Markdown body",
            },
            "lab": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"stations": _STATIONS},
                "description": "which stations to run on (default: free ones, up to program.stations)",
            },
            "note": _NOTE,
        },
        ["id", "program"],
    ),
    "proposal": _request_schema(
        "proposal",
        "labbridge/<bridge_id>/campaigns/<id>/proposals/<user>: an agent proposes an experiment "
        "(attributed to agent:<user>)",
        {
            "params": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 64,
                "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                "additionalProperties": {"type": "number"},
                "description": "parameter name -> value, in the program's units",
            },
            "note": _NOTE,
        },
        ["params"],
    ),
    "control": _request_schema(
        "control",
        "labbridge/<bridge_id>/campaigns/<id>/control/<user>: pause, resume, stop or abort a "
        "campaign",
        {
            "action": {
                "enum": list(CONTROL_ACTIONS),
                "description": (
                    "pause/resume: no new experiments meanwhile; stop: running experiments finish; "
                    "abort: every station of the campaign is tripped into its safe state"
                ),
            },
            "reason": {"type": "string", "maxLength": 1000},
            "note": _NOTE,
        },
        ["action"],
    ),
    "approval": _request_schema(
        "approval",
        "labbridge/<bridge_id>/campaigns/<id>/approvals/<user>: approve or deny an agent's "
        "proposal awaiting approval (the approver is <user>, the broker user)",
        {
            "experiment_id": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}-[0-9]{4,9}$",
                "description": "the experiment awaiting approval (<campaign id>-<seq>)",
            },
            "decision": {
                "enum": ["approve", "deny"],
                "description": "approve: it is queued and runs; deny: it is rejected",
            },
            "reason": {
                "type": "string",
                "minLength": 1,
                "maxLength": 1000,
                "pattern": r"\S",
                "description": "why (journaled with the approver)",
            },
            "note": _NOTE,
        },
        ["experiment_id", "decision", "reason"],
    ),
    "estop": _request_schema(
        "estop",
        "labbridge/<bridge_id>/estop/<user>: trip every station (any message on the topic trips "
        "them)",
        {
            "reason": {"type": "string", "minLength": 1, "maxLength": 1000, "pattern": r"\S"},
            "note": _NOTE,
        },
        ["reason"],
    ),
    "reset": _request_schema(
        "reset",
        "labbridge/<bridge_id>/reset/<user>: unlatch tripped stations whose monitors have cleared",
        {
            "why": {"type": "string", "minLength": 1, "maxLength": 1000, "pattern": r"\S"},
            "stations": _STATIONS,
            "drain": {
                "type": "boolean",
                "description": (
                    "also empty the vial through the safety guard (after an experiment was "
                    "stopped half-way and left liquid in it)"
                ),
            },
            "note": _NOTE,
        },
        ["why"],
    ),
    "reply": {
        "$schema": _DRAFT,
        "$id": "reply.schema.json",
        "title": "an answer to a request (on the response topic or reply_to)",
        "type": "object",
        "required": ["request", "ok", "t"],
        "properties": {
            "request": {
                "enum": ["campaigns/start", "proposals", "control", "approvals", "estop", "reset"]
            },
            "ok": {"type": "boolean", "description": "the service did what was asked"},
            "correlation_id": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {"type": "string"},
                "description": "every problem found (when ok is false)",
            },
            "warnings": {"type": "array", "items": {"type": "string"}},
            "topic": {"type": "string", "description": "the request's topic"},
            "busy": {
                "type": "boolean",
                "description": "refused unread: too many requests; retry after retry_after_s",
            },
            "retry_after_s": {"type": "number"},
            "quota": {
                "type": "object",
                "description": (
                    "a proposal refused for its proposer's quota (lab.yaml): which limit, "
                    "used of limit, and when it frees up (frees_at, Unix seconds; null: not "
                    "by waiting)"
                ),
                "required": ["quota", "limit", "used", "ok", "frees_at"],
                "properties": {
                    "quota": {"type": "string"},
                    "limit": {"type": "number"},
                    "used": {"type": "number"},
                    "unit": {"type": "string"},
                    "ok": {"type": "boolean"},
                    "frees_at": {"type": ["number", "null"]},
                },
            },
            "stale": {
                "type": "boolean",
                "description": "an e-stop queued while the service was down: acted on anyway",
            },
            "retained": {
                "type": "boolean",
                "description": "an e-stop published retained: acted on; clear it (docs)",
            },
            "campaign_id": {"type": "string"},
            "accepted": {"type": "boolean"},
            "awaiting_approval": {
                "type": "boolean",
                "description": "a proposal that waits for an operator's approval (approvals)",
            },
            "approval": {
                "type": "object",
                "description": "why it waits (rules) and until when (expires_t, Unix seconds)",
            },
            "reasons": {"type": "array", "items": {"type": "string"}},
            "t": {"type": "number", "description": "when the reply was sent (Unix seconds)"},
        },
    },
    "status": {
        "$schema": _DRAFT,
        "$id": "status.schema.json",
        "title": "labbridge/<bridge_id>/status (retained; the Last Will sets it offline)",
        "type": "object",
        "required": ["state", "bridge_id", "api"],
        "properties": {
            "state": {"enum": ["starting", "online", "stopping", "offline"]},
            "bridge_id": {"type": "string"},
            "api": {"type": "integer"},
            "reason": {"type": ["string", "null"]},
            "t": {"type": "number"},
            "stations": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["ok"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "tripped": {"type": "boolean"},
                        "busy": {"type": "boolean"},
                        "campaign": {"type": ["string", "null"]},
                    },
                },
            },
            "campaigns": {"type": "object"},
        },
    },
    "campaign-status": {
        "$schema": _DRAFT,
        "$id": "campaign-status.schema.json",
        "title": "labbridge/<bridge_id>/campaigns/<id>/status (retained)",
        "type": "object",
        "required": ["campaign_id", "state", "stations", "progress", "t"],
        "properties": {
            "campaign_id": {"type": "string"},
            "state": {"enum": ["running", "paused", "done", "stopped", "aborted", "error"]},
            "reason": {"type": ["string", "null"]},
            "stations": {"type": "array", "items": {"type": "string"}},
            "progress": {
                "type": "object",
                "required": ["experiments", "in_flight", "done", "failed", "rejected"],
            },
            "approvals": {
                "type": "array",
                "description": "proposals awaiting an operator's approval, oldest first",
                "items": {
                    "type": "object",
                    "required": ["experiment_id", "proposer", "params", "rules", "expires_t"],
                },
            },
            "summary": {"type": ["object", "null"]},
            "t": {"type": "number"},
        },
    },
    "approval-event": {
        "$schema": _DRAFT,
        "$id": "approval-event.schema.json",
        "title": "labbridge/<bridge_id>/campaigns/<id>/approvals: a proposal started waiting "
        "for approval, or was decided",
        "type": "object",
        "required": ["campaign_id", "experiment_id", "event", "proposer", "params", "t"],
        "properties": {
            "campaign_id": {"type": "string"},
            "experiment_id": {"type": "string"},
            "event": {"enum": ["awaiting", "approved", "denied", "expired", "cancelled"]},
            "proposer": {"type": "string", "description": "agent:<id>"},
            "params": {"type": "object"},
            "rules": {
                "type": "array",
                "items": {"type": "string"},
                "description": "awaiting: each policy that asked for a human, with the values",
            },
            "expires_t": {"type": "number", "description": "awaiting: until when (Unix s)"},
            "who": {"type": "string", "description": "approved/denied: the approver"},
            "reason": {"type": "string"},
            "via": {"type": ["string", "null"], "description": "mqtt, cli or api"},
            "t": {"type": "number"},
        },
    },
    "result": {
        "$schema": _DRAFT,
        "$id": "result.schema.json",
        "title": "labbridge/<bridge_id>/campaigns/<id>/results: one finished experiment",
        "type": "object",
        "required": [
            "campaign_id",
            "experiment_id",
            "outcome",
            "station",
            "proposer",
            "parameters",
            "t",
        ],
        "properties": {
            "campaign_id": {"type": "string"},
            "experiment_id": {"type": "string"},
            "outcome": {"enum": ["done", "failed"]},
            "station": {"type": ["string", "null"]},
            "proposer": {
                "type": "string",
                "description": "optimizer:<strategy>, agent:<id> or operator:<who>",
            },
            "parameters": {"type": "object"},
            "measurements": {"type": ["object", "null"]},
            "objective": {
                "type": ["object", "null"],
                "required": ["measure", "value", "direction"],
                "properties": {
                    "measure": {"type": "string"},
                    "value": {"type": ["number", "null"]},
                    "direction": {"enum": ["minimize", "maximize"]},
                },
            },
            "verified": {"type": ["boolean", "null"]},
            "verification": {"type": ["object", "null"]},
            "reason": {"type": ["string", "null"], "description": "why it failed"},
            "t": {"type": "number"},
        },
    },
}
REQUESTS = ("start", "proposal", "control", "approval", "estop", "reset")
_VALIDATORS = {name: jsonschema.Draft202012Validator(SCHEMAS[name]) for name in SCHEMAS}


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema of :data:`SCHEMAS` as ``<name>.schema.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, schema in SCHEMAS.items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        out.append(path)
    return out


def schema_errors(name: str, data: Any) -> list[str]:
    """Every problem of ``data`` against schema ``name``, as ``field: problem`` lines."""
    errors = sorted(
        _VALIDATORS[name].iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]
    )
    out = []
    for e in errors[:_MAX_ERRORS]:
        where = ".".join(str(p) for p in e.absolute_path) or "(payload)"
        out.append(f"{where}: {short(e.message)}")
    if len(errors) > _MAX_ERRORS:
        out.append(f"... and {len(errors) - _MAX_ERRORS} more")
    return out
