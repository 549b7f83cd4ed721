// x402-proxy dashboard. Plain DOM, no framework, no third-party code. Every string from a server is
// set with textContent (never innerHTML), so a hostile URL or label is shown, never run.
"use strict";

const TOKEN_KEY = "x402-proxy-admin-token";
const POLL_MS = 2000;
const STATES = ["pending", "settled", "in_doubt", "settled_undelivered", "rejected", "unsettled", "dry_run"];
let current = "overview";
let timer = null;

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return new Date(seconds * 1000).toLocaleString();
}

function units(amount, decimals) {
  if (amount === null || amount === undefined) return "";
  const text = String(amount).padStart(decimals + 1, "0");
  const whole = text.slice(0, text.length - decimals);
  const frac = text.slice(text.length - decimals).replace(/0+$/, "");
  return frac ? `${whole}.${frac}` : whole;
}

class ApiError extends Error {
  constructor(status, code, detail) { super(detail); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { "Authorization": `Bearer ${token}`, "Accept": "application/json" };
  const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (!response.ok) {
    const code = data && (data.code || data.type) || "error";
    const detail = data && (data.detail || data.title) || `HTTP ${response.status}`;
    throw new ApiError(response.status, String(code), String(detail));
  }
  return data;
}

function showError(error) {
  const box = $("error");
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  if (error instanceof ApiError && error.status === 401) { logout("The token was refused: log in again."); return; }
  box.textContent = error instanceof ApiError ? `${error.code}: ${error.message}` : String(error.message || error);
  box.hidden = false;
}

function replaceRows(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

// -- overview ---------------------------------------------------------------------------------------

function card(label, value) {
  return el("div", { class: "card" }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
}

function drawChart(payments, limit) {
  const chart = $("spend-chart");
  const now = Date.now() / 1000;
  const start = now - 86400;
  const counted = new Set(["pending", "settled", "in_doubt", "settled_undelivered"]);
  const points = payments
    .filter(p => counted.has(p.state) && p.created_at >= start)
    .sort((a, b) => a.created_at - b.created_at);
  let total = 0;
  const series = [[start, 0]];
  for (const p of points) {
    total += Number(p.amount) / 10 ** p.decimals;
    series.push([p.created_at, total]);
  }
  series.push([now, total]);
  const top = Math.max(limit, total, 1e-9) * 1.1;
  const x = t => 30 + ((t - start) / 86400) * 560;
  const y = v => 150 - (v / top) * 135;
  const path = series.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const text = (tx, ty, value) => { const node = svg("text", { x: tx, y: ty }); node.textContent = value; return node; };
  chart.replaceChildren(
    svg("line", { class: "limit", x1: 30, x2: 590, y1: y(limit), y2: y(limit) }),
    text(32, y(limit) - 3, `daily budget ${limit}`),
    svg("path", { class: "spend", d: path }),
    text(32, 158, "24 h ago"),
    text(560, 158, "now"),
    text(32, 12, `spent ${total.toFixed(6).replace(/0+$/, "").replace(/\.$/, "")}`),
  );
}

async function refreshOverview() {
  const [budget, payments, sessions, approvals] = await Promise.all([
    api("GET", "/budget"),
    api("GET", `/payments?since=${Math.floor(Date.now() / 1000) - 86400}&limit=10000`),
    api("GET", "/sessions?state=active").catch(() => ({ sessions: [] })),
    api("GET", "/approvals"),
  ]);
  const global = budget.global;
  $("budget-summary").replaceChildren(
    card("daily budget", global.limit), card("spent", global.spent), card("remaining", global.remaining),
    card("per host", budget.per_host_limit), card("max per payment", budget.max_per_payment),
  );
  drawChart(payments.payments, Number(global.limit));
  const perHost = Number(budget.per_host_limit) || 1;
  replaceRows($("hosts"), Object.entries(budget.hosts || {}).map(([host, h]) => {
    const fill = el("div");
    fill.style.width = `${Math.min(100, (Number(h.spent) / perHost) * 100)}%`;
    return el("tr", {}, el("td", {}, host), el("td", {}, h.spent), el("td", {}, h.remaining),
      el("td", {}, el("div", { class: "bar" }, fill)));
  }));
  const byState = {};
  for (const p of payments.payments) byState[p.state] = (byState[p.state] || 0) + 1;
  const waiting = approvals.approvals.filter(a => a.state === "waiting").length;
  $("counters").replaceChildren(
    card("active sessions", sessions.sessions.length),
    card("payments (24 h)", payments.payments.length),
    card("in doubt", byState.in_doubt || 0),
    card("undelivered", byState.settled_undelivered || 0),
    card("waiting approvals", waiting),
  );
  setBadge(waiting);
}

// -- sessions ---------------------------------------------------------------------------------------

// A channel session (batch-settlement): what was deposited, signed in vouchers, charged by the seller,
// refunded at the end, and the net spend (deposit - refunded, once refunded).
function channelCell(channel) {
  if (!channel) return el("td", {});
  const d = Number(channel.decimals) || 0;
  const part = (key, label, value) => el("div", { dataset: { channel: key } }, `${label} `, el("b", {}, value));
  const pending = channel.refunded === null || channel.refunded === undefined;
  return el("td", { class: "channel", dataset: { channelState: channel.state } },
    part("state", "channel", channel.state),
    part("deposit", "deposit", units(channel.deposit, d)),
    part("signed", "signed", units(channel.signed, d)),
    part("charged", "charged", units(channel.charged, d)),
    part("refunded", "refunded", pending ? "not yet" : units(channel.refunded, d)),
    part("net_spend", "net spend", pending ? "open" : units(channel.net_spend, d)));
}

async function refreshSessions() {
  const data = await api("GET", "/sessions");
  replaceRows($("session-table"), data.sessions.map(s => {
    const end = el("button", { dataset: { session: s.id } }, "End");
    end.disabled = s.state !== "active";
    end.addEventListener("click", () => endSession(s.id));
    return el("tr", {},
      el("td", {}, `${s.scope.kind} ${s.scope.url}`, s.label ? el("div", { class: "note" }, s.label) : null),
      el("td", { class: `state-${s.state}` }, s.state),
      el("td", {}, (s.credentials || []).join(", ")),
      el("td", {}, s.call_count),
      el("td", {}, s.amount_paid),
      channelCell(s.channel),
      el("td", {}, when(s.expires_at)),
      el("td", {}, end));
  }));
}

async function endSession(id) {
  const notify = $("notify-upstream").checked ? "?notify_upstream=true" : "";
  await api("DELETE", `/sessions/${encodeURIComponent(id)}${notify}`);
  await refreshSessions();
}

// -- payments ---------------------------------------------------------------------------------------

async function refreshPayments() {
  const query = new URLSearchParams({ limit: "500" });
  if ($("f-state").value) query.set("state", $("f-state").value);
  if ($("f-host").value.trim()) query.set("host", $("f-host").value.trim());
  if ($("f-since").value) query.set("since", String(Math.floor(Date.now() / 1000) - Number($("f-since").value)));
  const data = await api("GET", `/payments?${query}`);
  replaceRows($("payment-table"), data.payments.map(p => el("tr", { class: p.state },
    el("td", {}, p.id),
    el("td", { class: `state-${p.state}` }, p.state),
    el("td", {}, units(p.amount, p.decimals)),
    el("td", {}, p.host),
    el("td", {}, `${p.method} ${p.url}`, p.reason ? el("div", { class: "note" }, p.reason) : null),
    el("td", {}, p.tx_hash || ""),
    el("td", {}, when(p.created_at)),
    el("td", {}, p.approved_by || ""))));
}

async function reconcile() {
  const result = await api("POST", "/payments/reconcile");
  const parts = Object.entries(result).map(([k, ids]) => `${k}: ${ids.length ? ids.map(i => "#" + i).join(" ") : "-"}`);
  const box = $("reconcile-result");
  box.textContent = `Reconciled from the chain. ${parts.join("; ")}`;
  box.hidden = false;
  await refreshPayments();
}

// -- approvals --------------------------------------------------------------------------------------

function setBadge(waiting) {
  const badge = $("approval-count");
  badge.textContent = String(waiting);
  badge.hidden = waiting === 0;
}

async function refreshApprovals() {
  const data = await api("GET", "/approvals");
  setBadge(data.approvals.filter(a => a.state === "waiting").length);
  replaceRows($("approval-table"), data.approvals.map(a => {
    const actions = el("td", {});
    if (a.state === "waiting") {
      const remember = el("select", { "aria-label": "remember" },
        el("option", { value: "" }, "just this once"),
        el("option", { value: "host" }, "remember for this host"),
        el("option", { value: "scope" }, "remember for this scope"));
      const hours = el("input", { type: "number", min: "1", max: "720", value: "1", size: "3", "aria-label": "hours" });
      const approve = el("button", { class: "approve", dataset: { approval: a.id } }, "Approve");
      const deny = el("button", { class: "deny", dataset: { approval: a.id } }, "Deny");
      approve.addEventListener("click", () => decide(a.id, "approve", remember.value, Number(hours.value)));
      deny.addEventListener("click", () => decide(a.id, "deny", "", 0));
      actions.append(approve, " ", deny, " ", remember, " ", hours, " h");
    } else {
      actions.append(a.decided_by ? `by ${a.decided_by}` : "");
    }
    return el("tr", {},
      el("td", {}, a.id),
      el("td", { class: `state-${a.state}` }, a.state),
      el("td", {}, a.price),
      el("td", {}, `${a.method} ${a.url}`),
      el("td", {}, a.reason),
      el("td", {}, when(a.expires_at)),
      actions);
  }));
}

async function decide(id, decision, rememberFor, hours) {
  const body = { decision, via: "ui" };
  if (decision === "approve" && rememberFor) { body.remember_for = rememberFor; body.hours = hours || 1; }
  await api("POST", `/approvals/${encodeURIComponent(id)}`, body);
  await refreshApprovals();
}

// -- shell ------------------------------------------------------------------------------------------

const REFRESH = { overview: refreshOverview, sessions: refreshSessions, payments: refreshPayments, approvals: refreshApprovals };

async function refresh() {
  try {
    await REFRESH[current]();
    if (current !== "approvals" && current !== "overview") {
      const data = await api("GET", "/approvals");
      setBadge(data.approvals.filter(a => a.state === "waiting").length);
    }
    showError(null);
  } catch (error) {
    showError(error);
  }
}

function show(tab) {
  current = tab;
  for (const button of document.querySelectorAll("#tabs button[data-tab]")) {
    button.classList.toggle("active", button.dataset.tab === tab);
  }
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.id !== tab;
  refresh();
}

function start() {
  $("login").hidden = true;
  $("tabs").hidden = false;
  show(current);
  if (timer === null) timer = setInterval(refresh, POLL_MS);
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer !== null) { clearInterval(timer); timer = null; }
  for (const section of document.querySelectorAll("section.tab")) section.hidden = true;
  $("tabs").hidden = true;
  $("login").hidden = false;
  $("error").hidden = true;
  const box = $("login-error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function login(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("GET", "/budget");
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    const box = $("login-error");
    box.textContent = error instanceof ApiError && error.status === 401
      ? "Wrong token: the admin API refused it."
      : `Cannot reach the admin API: ${error.message}`;
    box.hidden = false;
    return;
  }
  $("token").value = "";
  $("login-error").hidden = true;
  start();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const state of STATES) $("f-state").append(el("option", { value: state }, state));
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => logout(""));
  for (const button of document.querySelectorAll("#tabs button[data-tab]")) {
    button.addEventListener("click", () => show(button.dataset.tab));
  }
  $("payment-filters").addEventListener("submit", event => { event.preventDefault(); refresh(); });
  $("reconcile").addEventListener("click", () => reconcile().catch(showError));
  if (sessionStorage.getItem(TOKEN_KEY)) start();
});
