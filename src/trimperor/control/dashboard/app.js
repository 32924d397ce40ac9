// The trimperor dashboard: one WebSocket to the emperor (the control API at /ws).
"use strict";

const $ = (sel) => document.querySelector(sel);
let ws = null;
let nextId = 0;
const pending = new Map();
let selected = null;
let refreshTimer = null;
const LOG_MAX = 500;

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("trimperor-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("trimperor-token");
}

function request(cmd, fields = {}) {
  return new Promise((resolve, reject) => {
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      reject(new Error("not connected"));
      return;
    }
    const id = ++nextId;
    pending.set(id, resolve);
    ws.send(JSON.stringify({ id, cmd, ...fields }));
  });
}

function setConn(up, text) {
  const el = $("#conn");
  el.textContent = text;
  el.className = "conn " + (up ? "up" : "down");
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.floor(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + String(Math.floor((s % 86400) / 3600)).padStart(2, "0") + "h";
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "K", "M", "G"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + units[i];
}

function errorText(v) {
  if (v.held && v.state === "stopped") return "stopped from the control API";
  if (v.last_error) return v.last_error;
  if (v.state !== "waiting") return "";
  if (v.last_exit_signal) return "killed by " + v.last_exit_signal;
  if (v.last_exit_code) return "exit status " + v.last_exit_code;
  return "";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function act(cmd, name) {
  if (!confirm(cmd + " " + name + "?")) return;
  request(cmd, { names: [name] }).then((reply) => {
    if (!reply.ok) alert(cmd + " " + name + ": " + JSON.stringify(reply.errors || reply.error));
    scheduleRefresh();
  });
}

function render(status) {
  const e = status.emperor;
  $("#emperor").textContent = "pid " + e.pid + " · version " + e.version + " · up " + duration(e.uptime);
  $("#count").textContent = "(" + status.vassals.length + ")";
  const body = $("#vassals tbody");
  body.replaceChildren();
  for (const v of status.vassals) {
    const tr = document.createElement("tr");
    tr.dataset.name = v.name;
    if (v.name === selected) tr.className = "selected";
    const name = cell(tr, v.name, "name");
    name.onclick = () => select(v.name);
    cell(tr, v.kind);
    let state = v.held && v.state === "stopped" ? "stopped (ctl)" : v.state;
    if (v.health === "unhealthy" || v.health === "failing") state += " (" + v.health + ")";
    cell(tr, state, "state state-" + v.state);
    cell(tr, v.pid === null ? "-" : String(v.pid), "num pid");
    cell(tr, duration(v.uptime), "num uptime");
    cell(tr, v.cpu === null ? "-" : v.cpu.toFixed(1), "num cpu");
    cell(tr, bytes(v.rss), "num rss");
    cell(tr, String(v.restarts), "num restarts");
    cell(tr, String(v.wakes), "num wakes");
    cell(tr, errorText(v), "error");
    const actions = cell(tr, "");
    const running = !(v.held && v.state === "stopped");
    for (const cmd of running ? ["restart", "stop"] : ["start"]) {
      const b = document.createElement("button");
      b.textContent = cmd;
      b.className = "act-" + cmd;
      b.onclick = () => act(cmd, v.name);
      actions.appendChild(b);
    }
    body.appendChild(tr);
  }
  const sources = $("#sources tbody");
  sources.replaceChildren();
  for (const s of status.sources) {
    const tr = document.createElement("tr");
    cell(tr, s.uri);
    cell(tr, s.state, "state " + (s.state === "retrying" ? "state-waiting" : "state-running"));
    cell(tr, String(s.vassals), "num");
    cell(tr, s.last_error || "", "error");
    sources.appendChild(tr);
  }
}

function refresh() {
  refreshTimer = null;
  request("status").then(render, () => {});
}

function scheduleRefresh() {
  if (refreshTimer === null) refreshTimer = setTimeout(refresh, 100);
}

function stamp(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function appendLog(line) {
  const log = $("#log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.append(stamp(line.time) + " " + line.name + "| " + line.line + "\n");
  while (log.childNodes.length > LOG_MAX) log.removeChild(log.firstChild);
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function select(name) {
  selected = name;
  $("#logname").textContent = name;
  $("#log").textContent = "";
  for (const tr of document.querySelectorAll("#vassals tbody tr")) {
    tr.className = tr.dataset.name === name ? "selected" : "";
  }
  request("logs", { names: [name], n: 100 }).then((reply) => {
    if (selected === name) for (const line of reply.lines) appendLog(line);
  });
}

function connect() {
  const t = token();
  if (!t) {
    $("#login").hidden = false;
    setConn(false, "token needed");
    return;
  }
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(proto + "//" + location.host + "/ws?token=" + encodeURIComponent(t));
  ws.onopen = () => {
    setConn(true, "live");
    $("#login").hidden = true;
    request("subscribe", { events: true, logs: true });
    refresh();
    if (selected) select(selected);
  };
  ws.onmessage = (msg) => {
    const doc = JSON.parse(msg.data);
    if (doc.event === undefined) {
      const resolve = pending.get(doc.id);
      pending.delete(doc.id);
      if (resolve) resolve(doc);
    } else if (doc.event === "log") {
      if (doc.name === selected) appendLog(doc);
    } else {
      scheduleRefresh();
    }
  };
  ws.onclose = () => {
    setConn(false, "not connected");
    pending.clear();
    $("#login").hidden = false;
    setTimeout(connect, 2000);
  };
}

$("#login").onsubmit = (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("trimperor-token", $("#token").value);
  if (ws) ws.close();
  else connect();
};

setInterval(() => { if (ws && ws.readyState === WebSocket.OPEN) refresh(); }, 2000);
connect();
