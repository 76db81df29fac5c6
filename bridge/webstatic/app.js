// The lab page (bridge/webapp.py). Hand-written, no dependencies, no CDN.
// Views by URL hash: #/lab, #/campaign/<id>, #/experiment/<id>, #/cameras, #/history.
// Live updates come as server-sent events (/api/events); on (re)connection the page reloads
// what it shows. Every element is built with DOM calls (text is never parsed as HTML).
"use strict";

const S = {
  lab: null,          // /api/state
  you: null,          // who is logged in: {user, role, may, csrf}
  campaign: null,     // the campaign on screen (/api/campaigns/<id>)
  approvals: null,    // its proposals awaiting approval (/api/campaigns/<id>/approvals)
  instance: null,     // which server process: a change means the service restarted
  source: null,       // the EventSource
  lostSince: null,
  fresh: new Set(),   // experiment ids that arrived live (highlighted)
};

// ------------------------------------------------------------------------ DOM helpers
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") Object.assign(el.style, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const $ = (id) => document.getElementById(id);

function num(v, digits = 4) {
  if (v === null || v === undefined || v === "") return "";
  if (typeof v === "boolean") return v ? "on" : "off";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Number(v.toPrecision(digits)).toString();
}
function when(t) {
  if (!t) return "";
  const d = new Date(t * 1000);
  return d.toLocaleString(undefined, { hour12: false });
}
function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString(undefined, { hour12: false }) : "";
}
function table(headers, rows, onRow) {
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { text: x })))),
    h("tbody", {}, rows.map((r) => {
      const tr = h("tr", { class: r.cls || (onRow ? "clickable" : null), ...(r.attrs || {}) },
        r.cells.map((c) => (c instanceof Node ? h("td", {}, c) : h("td", { class: typeof c === "number" ? "num" : null, text: num(c) }))));
      if (onRow && r.href) tr.addEventListener("click", (e) => { if (e.target.tagName !== "A") location.hash = r.href; });
      return tr;
    })));
}
function link(href, text) { return h("a", { href, text }); }
function expLink(eid) { return eid ? link(`#/experiment/${eid}`, eid) : ""; }
function swatch(colour, title) {
  if (!colour) return null;
  const el = h("span", { class: "swatch", title });
  el.style.background = colour;
  return el;
}
function notice(text, bad) {
  const n = $("notice");
  n.textContent = text;
  n.className = bad ? "notice bad" : "notice";
  n.hidden = !text;
}

// ---------------------------------------------------------------------------- HTTP
async function api(path, body) {
  const opts = { headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    if (S.you) opts.headers["X-CSRF-Token"] = S.you.csrf;
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) throw new Error((data && data.error) || `${r.status} ${r.statusText}`);
  return data;
}

// -------------------------------------------------------------------------- who
function renderWho() {
  const you = S.you;
  $("who").textContent = you ? `${you.user} (${you.role})` : (S.lab && S.lab.login ? "read-only" : "read-only: no users in lab.yaml");
  $("login-open").hidden = !!you || !(S.lab && S.lab.login);
  $("logout").hidden = !you;
  $("estop").disabled = false;
}
function may(action) { return !!(S.you && S.you.may.includes(action)); }

$("login-open").addEventListener("click", () => { $("login").hidden = false; $("login").user.focus(); });
$("login-cancel").addEventListener("click", () => { $("login").hidden = true; });
$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = e.target;
  try {
    await api("/api/login", { user: f.user.value, password: f.password.value });
    f.password.value = "";
    f.hidden = true;
    notice("");
    await refresh();
  } catch (err) {
    notice(`Log in: ${err.message}`, true);
  }
});
$("logout").addEventListener("click", async () => {
  try { await api("/api/logout", {}); } catch (err) { notice(`Log out: ${err.message}`, true); }
  S.you = null;
  await refresh();
});

// ------------------------------------------------------------------------ e-stop
// One click arms it, the next (within 5 s) trips every station: no dialog to wait for.
let armed = null;
$("estop").addEventListener("click", async () => {
  const b = $("estop");
  if (!may("estop")) {
    notice(S.you ? `${S.you.user} may not e-stop` : "Log in to e-stop (the bench's hardware e-stop needs no login).", true);
    if (!S.you) $("login-open").click();
    return;
  }
  if (!armed) {
    b.classList.add("armed");
    b.textContent = "CONFIRM E-STOP";
    armed = setTimeout(disarm, 5000);
    return;
  }
  disarm();
  b.disabled = true;
  try {
    const r = await api("/api/estop", { reason: "e-stop from the lab page" });
    const n = Object.keys(r.stations || {}).length;
    notice(`E-stop by ${r.who}: ${n} station(s) tripped in ${Math.round(r.elapsed_s * 1000)} ms` +
      (r.campaigns_aborted.length ? `; aborted ${r.campaigns_aborted.join(", ")}` : "") +
      (r.ok ? "" : " — NOT every instrument reached its safe state: check the bench"), !r.ok);
  } catch (err) {
    notice(`E-stop FAILED: ${err.message} — use the bench's hardware e-stop`, true);
  } finally {
    b.disabled = false;
    refresh();
  }
});
function disarm() {
  clearTimeout(armed);
  armed = null;
  $("estop").classList.remove("armed");
  $("estop").textContent = "E-STOP";
}

// ------------------------------------------------------------------ live updates
function connect() {
  if (S.source) S.source.close();
  const es = new EventSource("/api/events");
  S.source = es;
  es.addEventListener("hello", (e) => {
    const m = JSON.parse(e.data);
    if (S.instance && m.instance !== S.instance) notice("The lab service restarted: showing it as it is now.");
    S.instance = m.instance;
    S.lostSince = null;
    setConn("live", "live");
    refresh();
  });
  es.addEventListener("stations", (e) => {
    if (!S.lab) return;
    S.lab.stations = JSON.parse(e.data).stations;
    if (view().name === "lab") renderSoon();
  });
  for (const kind of ["proposed", "started", "finished", "failed", "rejected", "cancelled", "unverified", "station", "state", "awaiting_approval", "approval"]) {
    es.addEventListener(kind, (e) => onRunnerEvent(kind, JSON.parse(e.data)));
  }
  for (const kind of ["campaign", "estop", "reset", "alert"]) {
    es.addEventListener(kind, () => refresh());
  }
  es.addEventListener("resync", () => { es.close(); setTimeout(connect, 200); });
  es.onerror = () => {
    S.lostSince = S.lostSince || Date.now() / 1000;
    setConn("lost", "lost the lab");
    if (es.readyState === EventSource.CLOSED) setTimeout(connect, 1000);  // e.g. a 502
  };
}
function setConn(cls, text) {
  const c = $("conn");
  c.className = `conn ${cls}`;
  c.textContent = text;
  const b = $("banner");
  if (cls === "lost") {
    b.textContent = `Lost the connection to the lab at ${clock(S.lostSince)}: what this page shows may be out of date. Reconnecting…`;
    b.hidden = false;
  } else {
    b.hidden = true;
  }
}

function onRunnerEvent(kind, m) {
  if ((kind === "awaiting_approval" || kind === "approval") && view().name === "lab") refreshSoon();  // its alerts
  const c = S.campaign;
  if (!c || m.campaign_id !== c.campaign_id) return;
  if (m.progress) c.progress = m.progress;
  if (kind === "state") { refresh(); return; }
  if (kind === "awaiting_approval" || kind === "approval") approvalsSoon(c.campaign_id);
  if (kind === "approval" && S.approvals) {  // decided, expired or cancelled: waits no more
    S.approvals.approvals = S.approvals.approvals.filter((a) => a.experiment_id !== m.experiment_id);
  }
  if (!m.experiment_id) { renderSoon(); return; }
  let row = c.experiments.find((r) => r.experiment_id === m.experiment_id);
  if (!row) {
    const seq = Number((m.experiment_id.match(/(\d+)$/) || [0, c.experiments.length + 1])[1]);
    row = { experiment_id: m.experiment_id, seq, params: {}, images: [], state: "proposed" };
    c.experiments.push(row);
    c.experiments.sort((a, b) => a.seq - b.seq);
  }
  const states = { proposed: "proposed", started: "running", finished: "done", failed: "failed", rejected: "rejected", cancelled: "cancelled", awaiting_approval: "awaiting-approval" };
  const decided = { approved: "checked", denied: "rejected", expired: "rejected", cancelled: "cancelled" };
  if (states[kind]) row.state = states[kind];
  if (kind === "approval" && decided[m.decision]) row.state = decided[m.decision];
  for (const k of ["station", "proposer", "objective", "verified"]) if (m[k] !== undefined) row[k] = m[k];
  if (m.params) row.params = m.params;
  if (m.reasons) row.reason = m.reasons.join("; ");
  else if (m.reason) row.reason = m.reason;
  if (m.images) row.images = Object.keys(m.images);
  if (kind === "finished") {
    const lab = m.measurements && m.measurements.lab;
    if (lab) row.lab = lab;
    S.fresh.add(m.experiment_id);
    if (row.verified === true) {
      const better = (a, b) => (c.objective.direction === "maximize" ? a > b : a < b);
      if (!c.best || better(row.objective, c.best.objective)) { c.best = { ...row }; refreshSoon(); }
    }
  }
  renderSoon();
}

let renderQueued = false;
function renderSoon() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}
let approvalsTimer = null;
function approvalsSoon(cid) {  // a proposal awaits approval, or one was decided or expired
  clearTimeout(approvalsTimer);
  approvalsTimer = setTimeout(async () => {
    try {
      const a = await api(`/api/campaigns/${encodeURIComponent(cid)}/approvals`);
      if (S.campaign && S.campaign.campaign_id === cid) { S.approvals = a; renderSoon(); }
    } catch (err) { notice(`Approvals: ${err.message}`, true); }
  }, 100);
}
let refreshTimer = null;
function refreshSoon() {  // the best result's colour comes from the journal
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 500);
}

// ----------------------------------------------------------------------- routing
function view() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  return { name: parts[0] || "lab", arg: decodeURIComponent(parts.slice(1).join("/")) };
}
window.addEventListener("hashchange", () => { S.campaign = null; S.approvals = null; refresh(); });

async function refresh() {
  try {
    S.lab = await api("/api/state");
    S.you = S.lab.you;
    $("bridge").textContent = S.lab.bridge_id + (S.lab.simulated ? " (simulated)" : "");
    renderWho();
    const v = view();
    if (v.name === "campaign") {
      const cid = encodeURIComponent(v.arg);
      [S.campaign, S.approvals] = await Promise.all([api(`/api/campaigns/${cid}`), api(`/api/campaigns/${cid}/approvals`)]);
    }
    await render(true);
  } catch (err) {
    notice(`Could not load: ${err.message}`, true);
  }
}

let rendering = null;
async function render(loaded) {
  const v = view();
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("here", a.getAttribute("href") === `#/${v.name}`);
  const main = $("view");
  try {
    let content;
    if (v.name === "campaign" && S.campaign) content = campaignView(S.campaign);
    else if (v.name === "experiment") content = loaded ? await experimentView(v.arg) : null;
    else if (v.name === "cameras") content = loaded ? await camerasView() : null;
    else if (v.name === "history") content = loaded ? await historyView() : null;
    else if (v.name === "lab" && S.lab) content = labView(S.lab);
    if (content) {
      const keep = document.activeElement && main.contains(document.activeElement) && document.activeElement.tagName === "INPUT";
      if (keep) return;  // someone is typing a reason: do not pull the form from under them
      main.replaceChildren(content);
    }
  } catch (err) {
    main.replaceChildren(h("p", { class: "bad", text: `Could not show this: ${err.message}` }));
  }
}

// ------------------------------------------------------------------------- lab
function stationState(name, st) {
  if (st.ok === false) return ["tripped", `not answering: ${st.error}`];
  if (st.tripped) return ["tripped", `TRIPPED: ${(st.trip && st.trip.reason) || "latched"}`];
  if (st.busy || st.experiment) {
    const c = st.campaign ? ` (campaign ${st.campaign})` : "";
    const step = typeof st.step === "number" && st.steps ? ` at step ${st.step + 1} of ${st.steps}` : "";
    return ["running", `running experiment ${st.experiment || "?"}${step}${c}`];
  }
  if (st.campaign) {
    const camp = S.lab.campaigns[st.campaign];
    if (camp && camp.state === "paused") return ["paused", `paused (campaign ${st.campaign})`];
    return ["idle", `idle, in campaign ${st.campaign}`];
  }
  return ["idle", "idle"];
}

function labView(lab) {
  const cards = Object.entries(lab.stations).map(([name, st]) => stationCard(name, st, lab));
  const live = Object.entries(lab.campaigns);
  return h("div", {},
    h("h1", { text: `The lab ${lab.bridge_id}` }),
    lab.service !== "online" ? h("p", { class: "bad", text: `The lab service is ${lab.service}.` }) : null,
    h("div", { class: "cards" }, cards.length ? cards : h("p", { text: "No station is open." })),
    h("h2", { text: "Campaigns in this service" }),
    live.length ? table(["campaign", "state", "stations"], live.map(([cid, c]) => ({
      href: `#/campaign/${cid}`, cells: [link(`#/campaign/${cid}`, cid), c.state, c.stations.join(", ")],
    })), true) : h("p", { class: "muted", text: "None yet: campaigns started over MQTT, MCP or labbridge sim appear here." }),
    h("h2", { text: "Latest refusals, trips, e-stops and resets" }),
    lab.alerts.length ? h("ul", { class: "alerts" }, lab.alerts.slice().reverse().map((a) =>
      h("li", {}, h("span", { class: "muted", text: `${clock(a.t)} ` }), a.text, " ", a.experiment_id ? expLink(a.experiment_id) : null)))
      : h("p", { class: "muted", text: "Nothing since the service started." }));
}

function stationCard(name, st, lab) {
  const [cls, text] = stationState(name, st);
  const limits = (lab.limits[name] || {}).limits || {};
  const words = (ch) => lab.channels[ch] || { label: ch, unit: "" };
  const byInstrument = {};
  for (const [ch, r] of Object.entries(st.measured || {})) {
    const inst = ch.split(".")[0];
    (byInstrument[inst] = byInstrument[inst] || []).push([ch, r]);
  }
  const groups = Object.keys(byInstrument).sort().map((inst) => {
    const rows = byInstrument[inst].sort().map(([ch, r]) => ({
      cells: [words(ch).label.replace(`${inst}: `, ""), typeof r.value === "number" ? r.value : num(r.value), words(ch).unit, limits[ch] ? limits[ch].how : ""],
    }));
    const age = Math.min(...byInstrument[inst].map(([, r]) => r.age_s));
    return h("div", { class: "instrument", "data-instrument": inst },
      h("h4", {}, inst, h("span", { class: "muted", text: ` measured ${num(age, 2)} s ago` })),
      table(["quantity", "value", "unit", "envelope limit"], rows));
  });
  const commanded = Object.entries(st.commanded || {}).sort().map(([ch, v]) => ({
    cells: [words(ch).label, typeof v === "number" ? v : num(v), words(ch).unit, limits[ch] ? limits[ch].how : ""],
  }));
  const monitors = Object.entries(st.monitors || {});
  return h("div", { class: `card ${cls === "tripped" ? "tripped" : ""}`, "data-station": name },
    h("h2", {}, `Station ${name} `, h("span", { class: `state ${cls}`, text: text })),
    st.trip && st.tripped && st.trip.source ? h("p", { class: "muted", text: `what tripped it: ${st.trip.source}; latched until an operator resets it` }) : null,
    resetForm(name, st),
    h("h3", { text: "Live readings" }),
    groups.length ? h("div", { class: "instruments" }, groups) : h("p", { class: "muted", text: st.readings_error || "no readings yet" }),
    commanded.length ? h("details", {}, h("summary", { text: "Commanded targets" }),
      table(["quantity", "target", "unit", "envelope limit"], commanded)) : null,
    h("details", {}, h("summary", { text: "Envelope: limits, rules and monitors" }),
      table(["quantity", "unit", "limit"], Object.values(limits).map((l) => ({ cells: [l.label, l.unit, l.how] }))),
      h("ul", {}, ((lab.limits[name] || {}).rules || []).map((r) => h("li", {}, h("b", { text: r.name }), `: ${r.rule}`, r.why ? ` (${r.why})` : ""))),
      h("ul", {}, ((lab.limits[name] || {}).monitors || []).map((m) => h("li", {}, h("b", { text: m.name }), ` (${m.kind}): ${m.watches}`, m.doc ? ` — ${m.doc}` : ""))),
      monitors.length ? table(["monitor", "now"], monitors.map(([m, v]) => ({ cells: [m, typeof v === "object" ? JSON.stringify(v) : v] }))) : null));
}

function resetForm(name, st) {
  if (!st.tripped || !may("reset")) return null;
  const why = h("input", { type: "text", maxlength: 500, placeholder: "why it is safe now (recorded)", name: "why" });
  const drain = h("input", { type: "checkbox", name: "drain" });
  return h("form", {
    class: "controls", onsubmit: async (e) => {
      e.preventDefault();
      try {
        const r = await api("/api/reset", { why: why.value, stations: [name], drain: drain.checked });
        const s = r.stations[name];
        notice(s.ok ? `Station ${name} reset by ${r.who}` : `Station ${name} still latched: ${s.error}`, !s.ok);
        why.value = "";
        why.blur();
      } catch (err) { notice(`Reset: ${err.message}`, true); }
      refresh();
    },
  }, why, h("label", {}, drain, " also drain the vial"), h("button", { type: "submit", text: `Reset ${name}` }));
}

// -------------------------------------------------------------------- campaign
function campaignView(c) {
  const p = c.progress || {};
  const used = p.experiments !== undefined ? p.experiments : c.experiments.filter((e) => ["done", "failed"].includes(e.state)).length;
  const budget = p.budget || null;
  const obj = c.objective;
  const objLabel = obj.label + (obj.unit ? ` (${obj.unit})` : "");
  const inFlight = c.experiments.filter((e) => ["proposed", "checked", "queued", "running"].includes(e.state));
  const waiting = S.approvals && S.approvals.campaign_id === c.campaign_id ? S.approvals.approvals : [];
  const refused = c.experiments.filter((e) => e.state === "rejected");
  const best = c.best;
  return h("div", {},
    h("h1", {}, `Campaign ${c.campaign_id} `, h("span", { class: `state ${c.state}`, text: c.state })),
    c.reason ? h("p", { class: "muted", text: c.reason }) : null,
    h("p", {}, `Budget used: ${used}${budget ? ` of ${budget}` : ""} experiments`,
      c.budget ? ` (budget ${c.budget})` : "", c.stations.length ? `; stations ${c.stations.join(", ")}` : "",
      c.started_by ? `; started by ${c.started_by}` : "", "; ", h("a", { class: "report", href: `/reports/${c.campaign_id}/`, target: "_blank", text: "report" })),
    budget ? h("div", { class: "bar" }, h("div", { style: { width: `${Math.min(100, (100 * used) / budget)}%` } })) : null,
    controls(c),
    h("h2", { text: "Best so far (verified results only)" }),
    best ? bestView(c, best, objLabel) : h("p", { class: "muted", text: "No verified result yet." }),
    h("h2", { text: "Convergence" }),
    convergencePlot(c, objLabel),
    h("h2", { text: "Parameters explored" }),
    parameterPlots(c, objLabel),
    h("section", { id: "queue" },
    h("h2", { text: "Queue" }),
    h("h3", { text: `Awaiting approval (${waiting.length})` }),
    approvalsView(c, waiting),
    h("h3", { text: `In flight (${inFlight.length})` }),
    inFlight.length ? table(["experiment", "state", "station", "proposed by"], inFlight.map((e) => ({ href: `#/experiment/${e.experiment_id}`, cells: [expLink(e.experiment_id), e.state, e.station || "", e.proposer || ""] })), true) : h("p", { class: "muted", text: "nothing running" }),
    h("h3", { text: `Refused (${refused.length})` }),
    refused.length ? h("div", { id: "queue-refused" }, table(["experiment", "proposed by", "why refused"], refused.slice(-20).reverse().map((e) => ({ href: `#/experiment/${e.experiment_id}`, attrs: { "data-experiment": e.experiment_id }, cells: [expLink(e.experiment_id), e.proposer || "", e.reason || ""] })), true)) : h("p", { class: "muted", text: "no proposal refused" })),
    h("h2", { text: "Experiments" }),
    h("div", { id: "experiments" }, experimentsTable(c, objLabel)));
}

// Agents' proposals that a program's or lab.yaml's approval policy sends to a human.
function approvalsView(c, waiting) {
  if (!waiting.length) return h("p", { class: "muted", text: "no proposal awaits approval" });
  const who = may("approve") ? null : (S.you ? `${S.you.user} may not approve or deny proposals.` : "Log in as an operator to approve or deny.");
  return h("div", { id: "approvals" },
    who ? h("p", { class: "muted", text: who }) : null,
    table(["experiment", "proposed by", "parameters", "dry run", "why it needs approval", "expires", "decision"], waiting.map((a) => ({
      attrs: { "data-approval": a.experiment_id },
      cells: [expLink(a.experiment_id), a.proposer,
        h("ul", { class: "params" }, a.params.map((p) => h("li", {}, `${p.label}: `, h("b", { text: num(p.value) }), p.unit ? ` ${p.unit}` : ""))),
        dryRunText(a.dry_run),
        h("ul", {}, a.rules.map((r) => h("li", { text: r }))),
        `${clock(a.expires)} (${untilText(a.expires_in_s)})`,
        a.decision ? h("span", { text: `${a.decision === "approve" ? "approved" : "denied"} by ${a.who}: ${a.reason} (applied when the campaign runs again)` })
          : (may("approve") ? decideForm(c, a) : "")],
    }))));
}
function dryRunText(d) {
  if (d.when === "proposed") return h("span", { class: "good", text: "passed when proposed (dry-run again on its station before it runs)" });
  if (d.ok) return h("span", { class: "good", text: "passes now" });
  return h("span", { class: "bad", text: `refused now: ${d.reasons.join("; ")}` });
}
function untilText(s) {
  if (s <= 0) return "expired";
  if (s >= 3600) return `in ${num(s / 3600, 2)} h`;
  if (s >= 60) return `in ${Math.round(s / 60)} min`;
  return `in ${Math.round(s)} s`;
}
function decideForm(c, a) {
  const reason = h("input", { type: "text", maxlength: 500, name: "reason", placeholder: "why (recorded)" });
  const act = (decision) => async (e) => {
    e.preventDefault();
    if (!reason.value.trim()) { notice(`To ${decision} ${a.experiment_id}, give a reason (it is journaled).`, true); reason.focus(); return; }
    try {
      const r = await api(`/api/campaigns/${encodeURIComponent(c.campaign_id)}/approvals/${encodeURIComponent(a.experiment_id)}`, { decision, reason: reason.value });
      notice(`${a.experiment_id} ${decision === "approve" ? "approved" : "denied"} by ${r.who}: ${r.applied ? (r.state === "checked" ? "queued to run" : r.state) : r.note}`);
      reason.value = "";
      reason.blur();
    } catch (err) { notice(`${decision === "approve" ? "Approve" : "Deny"} ${a.experiment_id}: ${err.message}`, true); }
    refresh();
  };
  // Enter in the reason decides nothing: approving or denying is a button's click
  return h("form", { class: "controls decide", onsubmit: (e) => e.preventDefault() }, reason,
    h("button", { type: "button", onclick: act("approve"), text: "Approve" }),
    h("button", { type: "button", onclick: act("deny"), text: "Deny" }));
}

function controls(c) {
  if (!c.live) return null;
  if (!may("control")) return h("p", { class: "muted", text: S.you ? `${S.you.user} may not control campaigns.` : "Log in as an operator to pause, resume, stop or abort." });
  const reason = h("input", { type: "text", maxlength: 500, placeholder: "reason (recorded; optional)" });
  const act = (action) => async () => {
    if (action === "abort" && !confirm(`Abort ${c.campaign_id}? Its stations are tripped into their safe state.`)) return;
    try {
      const r = await api(`/api/campaigns/${c.campaign_id}/control`, { action, reason: reason.value || undefined });
      notice(`Campaign ${c.campaign_id}: ${action} by ${S.you.user}: now ${r.state}`);
      reason.value = "";
    } catch (err) { notice(`${action}: ${err.message}`, true); }
    refresh();
  };
  return h("div", { class: "controls" },
    c.state === "paused" ? h("button", { type: "button", onclick: act("resume"), text: "Resume" }) : h("button", { type: "button", onclick: act("pause"), text: "Pause" }),
    h("button", { type: "button", onclick: act("stop"), text: "Stop", title: "running experiments finish" }),
    h("button", { type: "button", onclick: act("abort"), text: "Abort", title: "stations tripped into their safe state" }),
    reason);
}

function paramLabel(p) { return p.label + (p.unit ? ` (${p.unit})` : ""); }

function bestView(c, best, objLabel) {
  const colour = best.colour;
  return h("div", {},
    h("p", {}, `${objLabel}: `, h("b", { text: num(best.objective) }), " — ", expLink(best.experiment_id),
      best.station ? ` on ${best.station}` : "", best.proposer ? `, proposed by ${best.proposer}` : ""),
    table(["parameter", "value"], c.parameters.map((p) => ({ cells: [paramLabel(p), best.params[p.name]] }))),
    c.objective.target_colour || colour ? h("div", { class: "swatches" },
      colour ? h("span", {}, swatch(colour, "measured colour"), "measured colour") : null,
      c.objective.target_colour ? h("span", {}, swatch(c.objective.target_colour, "target colour"), "target colour") : null) : null,
    (best.images || []).includes("outcome") ? h("div", { class: "frames" },
      h("figure", {}, h("a", { href: `#/experiment/${best.experiment_id}` }, h("img", { src: `/api/experiments/${best.experiment_id}/overlay.png`, alt: "photo of the best result with the camera's overlays" })),
        h("figcaption", { text: "The camera's photo of this result, with what it measured" }))) : null);
}

function experimentsTable(c, objLabel) {
  const rows = c.experiments.slice().reverse().map((e) => ({
    href: `#/experiment/${e.experiment_id}`,
    attrs: { "data-experiment": e.experiment_id, "data-state": e.state },
    cls: S.fresh.has(e.experiment_id) ? "clickable new" : "clickable",
    cells: [expLink(e.experiment_id), e.state, e.station || "", e.proposer || "",
      ...c.parameters.map((p) => (e.params || {})[p.name]),
      e.objective === null || e.objective === undefined ? "" : e.objective,
      e.verified === true ? "verified" : e.verified === false ? `unverified: ${e.reason || ""}` : (e.state === "done" ? "not checked" : (e.reason || "")),
      (e.images || []).includes("outcome") ? "photo" : ""],
  }));
  S.fresh.clear();
  return table(["experiment", "state", "station", "proposed by", ...c.parameters.map(paramLabel), objLabel, "verification", "camera"], rows, true);
}

// ------------------------------------------------------------------------ plots
const SVGNS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...kids) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  for (const kid of kids.flat()) if (kid) el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  return el;
}
function ticks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const step0 = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((x) => x >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(6)));
  return out;
}
// points: [{x, y, cls, title, href}]; axes {label, lo, hi}
function scatter({ points, x, y, line, target, width = 640, height = 300, title }) {
  const m = { l: 62, r: 12, t: 14, b: 40 };
  const W = width - m.l - m.r, H = height - m.t - m.b;
  const ys = points.map((p) => p.y).concat(target !== null && target !== undefined ? [target] : []);
  let ylo = y.lo !== undefined ? y.lo : Math.min(...ys), yhi = y.hi !== undefined ? y.hi : Math.max(...ys);
  if (!isFinite(ylo)) { ylo = 0; yhi = 1; }
  if (yhi === ylo) { yhi += 1; ylo -= 1; }
  const pad = (yhi - ylo) * 0.05; ylo -= pad; yhi += pad;
  let xlo = x.lo, xhi = x.hi;
  if (xhi === xlo) { xhi += 1; xlo -= 1; }
  const X = (v) => m.l + ((v - xlo) / (xhi - xlo)) * W;
  const Y = (v) => m.t + H - ((v - ylo) / (yhi - ylo)) * H;
  const g = s("svg", { class: "plot", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": title || y.label });
  for (const v of ticks(ylo, yhi, 5)) g.append(s("line", { class: "grid", x1: m.l, x2: m.l + W, y1: Y(v), y2: Y(v) }), s("text", { x: m.l - 6, y: Y(v) + 4, "text-anchor": "end" }, num(v, 3)));
  for (const v of ticks(xlo, xhi, 6)) g.append(s("text", { x: X(v), y: m.t + H + 15, "text-anchor": "middle" }, num(v, 3)));
  g.append(s("line", { class: "axis", x1: m.l, x2: m.l + W, y1: m.t + H, y2: m.t + H }), s("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: m.t + H }));
  g.append(s("text", { x: m.l + W / 2, y: height - 6, "text-anchor": "middle" }, x.label));
  g.append(s("text", { x: 12, y: m.t + H / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${m.t + H / 2})` }, y.label));
  if (target !== null && target !== undefined) {
    g.append(s("line", { class: "target", x1: m.l, x2: m.l + W, y1: Y(target), y2: Y(target) }), s("text", { x: m.l + W - 4, y: Y(target) - 4, "text-anchor": "end" }, `target ${num(target)}`));
  }
  if (line && line.length) g.append(s("polyline", { class: "best", points: line.map(([a, b]) => `${X(a)},${Y(b)}`).join(" ") }));
  for (const p of points) {
    const dot = s("circle", { cx: X(p.x), cy: Y(p.y), r: p.r || 4, class: p.cls }, s("title", {}, p.title || ""));
    if (p.href) { const a = s("a", { href: p.href }); a.append(dot); g.append(a); } else g.append(dot);
  }
  return g;
}

function results(c) {
  return c.experiments.filter((e) => e.state === "done" && typeof e.objective === "number");
}
function dotClass(e, newest) {
  let cls = e.verified === false ? "unverified" : (e.proposer || "").startsWith("optimizer") ? "trusted" : "agent";
  if (newest) cls += " newest";
  return cls;
}

function convergencePlot(c, objLabel) {
  const done = results(c);
  if (!done.length) return h("p", { class: "muted", text: "No results yet: the plot starts with the first." });
  const better = (a, b) => (c.objective.direction === "maximize" ? a > b : a < b);
  let best = null; const line = [];
  for (const e of done) {
    if (e.verified === true || (e.verified === null && !done.some((d) => d.verified === false))) {
      if (best === null || better(e.objective, best)) best = e.objective;
    }
    if (best !== null) line.push([e.seq, best]);
  }
  const last = done[done.length - 1];
  const points = done.map((e) => ({ x: e.seq, y: e.objective, cls: dotClass(e, e === last), href: `#/experiment/${e.experiment_id}`, title: `${e.experiment_id}: ${num(e.objective)}${e.verified === false ? " (unverified)" : ""}` }));
  const maxSeq = Math.max(...c.experiments.map((e) => e.seq), 1);
  return h("figure", { "data-results": String(done.length) },
    scatter({ points, line, target: c.objective.target, x: { label: "experiment number", lo: 0, hi: maxSeq + 1 }, y: { label: objLabel }, title: "convergence" }),
    h("figcaption", { text: `Each result's ${c.objective.label} (${c.objective.direction === "maximize" ? "higher" : "lower"} is better); blue line: the best verified so far; hollow orange: unverified (not trusted); purple: proposed by an agent or operator; dashed green: the target.` }));
}

function parameterPlots(c, objLabel) {
  const done = results(c);
  if (!done.length || !c.parameters.length) return h("p", { class: "muted", text: "Nothing explored yet." });
  return h("div", { class: "panels" }, c.parameters.map((p) => scatter({
    points: done.map((e) => ({ x: Number(e.params[p.name]), y: e.objective, cls: dotClass(e, false), r: 3.5, href: `#/experiment/${e.experiment_id}`, title: `${e.experiment_id}: ${p.name}=${num(e.params[p.name])}` })),
    x: { label: paramLabel(p), lo: p.low !== null ? p.low : Math.min(...done.map((e) => e.params[p.name])), hi: p.high !== null ? p.high : Math.max(...done.map((e) => e.params[p.name])) },
    y: { label: c.objective.short }, width: 300, height: 220, target: c.objective.target,
  })));
}

// ------------------------------------------------------------------ experiment
async function experimentView(eid) {
  const r = await api(`/api/experiments/${encodeURIComponent(eid)}`);
  const v = r.view;
  const frames = Object.entries({ reference: "before: the scene before anything was poured", outcome: "after: the outcome", overlay: "after, with what the camera measured" })
    .filter(([role]) => r.images[role]).map(([role, text]) => h("figure", { "data-role": role }, h("a", { href: r.images[role].url, target: "_blank" }, h("img", { src: r.images[role].url, alt: text })), h("figcaption", { text })));
  const verified = r.verified === true ? "verified" : r.verified === false ? "UNVERIFIED" : "not checked";
  return h("div", {},
    h("h1", {}, `Experiment ${r.experiment_id} `, h("span", { class: `state ${r.state}`, text: r.state })),
    h("p", {}, "Campaign ", link(`#/campaign/${r.campaign_id}`, r.campaign_id), r.station ? ` · station ${r.station}` : "", ` · proposed by ${r.proposer}`,
      r.objective !== null && r.objective !== undefined ? ` · objective ${num(r.objective)}` : "", ` · ${verified}`),
    r.reason ? h("p", { class: r.state === "done" ? "muted" : "bad", text: r.reason }) : null,
    h("h2", { text: "Parameters" }),
    table(["parameter", "value"], v.parameters.map((p) => ({ cells: [paramLabel(p), (r.params || {})[p.name]] }))),
    h("h2", { text: "Measurements" }),
    v.measurements.length ? table(["measurement", "value", "unit"], v.measurements.map((m) => ({ cells: [m.label, m.colour ? h("span", {}, swatch(m.colour, m.label), m.value) : m.value, m.unit] })))
      : h("p", { class: "muted", text: "none" }),
    h("h2", { text: `Verification: ${verified}` }),
    v.verification_reasons.length ? h("ul", {}, v.verification_reasons.map((x) => h("li", { class: "bad", text: x }))) : null,
    v.checks.length ? table(["check", "passed", "value", "bound", "compared"], v.checks.map((c) => ({ cls: c.ok === false ? "bad" : null, cells: [c.check, c.ok === true ? "yes" : c.ok === false ? "NO" : "", c.value, c.bound, c.compared] })))
      : h("p", { class: "muted", text: "no checks recorded" }),
    h("h3", { text: "Camera frames" }),
    frames.length ? h("div", { class: "frames" }, frames) : h("p", { class: "muted", text: "no frames" }),
    h("h2", { text: `Steps (${v.steps.length} of ${v.planned_steps} run)` }),
    table(["#", "started", "ended", "step", "took (lab clock, s)", "safety", "returned"], v.steps.map((st) => ({
      cls: st.refused.length || st.error ? "bad" : null,
      cells: [st.index + 1, clock(st.started), clock(st.ended), st.text, st.duration_s === undefined ? "" : Number(st.duration_s.toFixed(2)),
        st.refused.length ? `REFUSED: ${st.refused.join("; ")}` : `${st.allowed} allowed`, st.error || st.result || ""],
    }))),
    h("h2", { text: "Journal" }),
    table(["time", "state"], v.transitions.map((t) => ({ cells: [when(t.t), t.state] }))),
    h("details", {}, h("summary", { text: `Safety verdicts (${r.verdicts.length})` }),
      table(["time", "command", "allowed", "rule", "reason"], r.verdicts.map((x) => ({ cls: x.allowed ? null : "bad", cells: [clock(x.t), commandText(x.command), x.allowed ? "yes" : "REFUSED", x.rule || "", x.reason || ""] })))),
    h("details", {}, h("summary", { text: "The journal's record" }), h("pre", { text: JSON.stringify({ ...r, view: undefined }, null, 2) })));
}
function commandText(c) {
  if (!c) return "";
  if (typeof c === "string") return c;
  const args = Object.entries(c.params || {}).map(([k, v]) => `${k}=${num(v)}`).join(", ");
  return `${c.instrument || ""}.${c.action || c.command || ""}(${args})`;
}

// --------------------------------------------------------------------- cameras
async function camerasView() {
  const r = await api("/api/cameras");
  return h("div", {}, h("h1", { text: "Cameras" }),
    h("p", { class: "muted", text: "Each station's newest outcome frame, with what the camera measured drawn on it." }),
    h("div", { class: "frames" }, r.stations.map((st) => {
      const f = r.frames[st];
      if (!f) return h("figure", {}, h("figcaption", { text: `${st}: no frame yet` }));
      return h("figure", { "data-station": st }, h("a", { href: `#/experiment/${f.experiment_id}` }, h("img", { src: `/api/experiments/${f.experiment_id}/overlay.png`, alt: `station ${st}: newest frame` })),
        h("figcaption", {}, `${st}: experiment `, expLink(f.experiment_id), ` at ${clock(f.t)}`));
    })));
}

// --------------------------------------------------------------------- history
async function historyView() {
  const r = await api("/api/campaigns");
  return h("div", {}, h("h1", { text: "Campaigns" }),
    r.campaigns.length ? table(["campaign", "state", "started", "last change", "report"], r.campaigns.map((c) => ({
      href: `#/campaign/${c.campaign_id}`,
      cells: [link(`#/campaign/${c.campaign_id}`, c.campaign_id), c.state + (c.live ? " (live)" : ""), when(c.created), when(c.updated),
        h("a", { class: "report", href: `/reports/${c.campaign_id}/`, target: "_blank", text: "report" })],
    })), true) : h("p", { class: "muted", text: "The journal has no campaign yet." }));
}

// ------------------------------------------------------------------------ start
if (!location.hash) location.hash = "#/lab";
connect();
