// qmpd dashboard: renders the snapshots pushed on /live; buttons POST to
// /api/jobs/ID/VERB with the token taken from the page's #token=... fragment.
"use strict";

const TOKEN_KEY = "qmpd-token";
(function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
})();
const token = () => sessionStorage.getItem(TOKEN_KEY);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "style") e.setAttribute("style", v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

async function verb(id, v) {
  const err = document.getElementById("error");
  try {
    const r = await fetch(`/api/jobs/${encodeURIComponent(id)}/${v}`,
                          {method: "POST", headers: {Authorization: "Bearer " + token()}});
    const body = await r.json();
    err.hidden = r.ok;
    if (!r.ok) err.textContent = `${v} ${id}: ${body.error.desc}`;
  } catch (e) {
    err.hidden = false;
    err.textContent = String(e);
  }
}

function renderJobs(jobs) {
  const tbody = document.querySelector("#jobs tbody");
  tbody.replaceChildren();
  document.getElementById("no-jobs").hidden = jobs.length > 0;
  for (const j of jobs) {
    const pct = j.total > 0 ? (100 * j.current / j.total) : (j.finished ? 100 : 0);
    const state = j.finished ? j.outcome : (j.paused && j.status !== "running" ? "paused" : j.status);
    const buttons = el("td");
    if (!j.finished && token()) {
      for (const v of ["pause", "resume", "cancel"]) {
        buttons.append(el("button", {"data-verb": v, onclick: () => verb(j.id, v)}, v));
      }
    }
    tbody.append(el("tr", {class: "job " + state, "data-job": j.id},
      el("td", {}, j.id), el("td", {}, j.type),
      el("td", {class: "status"}, j.finished ? `${j.outcome}` + (j.error ? `: ${j.error}` : "") : j.status),
      el("td", {}, el("div", {class: "bar", "data-progress": pct.toFixed(2)},
                      el("div", {class: "fill", style: `width: ${pct.toFixed(2)}%`}))),
      el("td", {}, `${bytes(j.current)} / ${bytes(j.total)}`),
      el("td", {class: "rate"}, j.rate ? bytes(j.rate) + "/s" : ""),
      el("td", {}, j.finished ? "took " + duration(j.elapsed) : duration(j.eta)),
      el("td", {}, j.speed ? bytes(j.speed) + "/s" : "none"),
      buttons));
  }
}

function renderBitmaps(nodes) {
  const box = document.getElementById("bitmaps");
  box.replaceChildren();
  let n = 0;
  for (const node of nodes) {
    for (const bm of node.bitmaps) {
      n++;
      const strip = el("div", {class: "heat", title: "dirty clusters from offset 0 to the end",
                               "data-hot": String(bm.heat.filter(x => x > 0).length)});
      for (const x of bm.heat) {
        strip.append(el("span", {class: x > 0 ? "hot" : "",
                                 style: x > 0 ? `background: rgba(220, 38, 38, ${0.25 + 0.75 * x})` : ""}));
      }
      const flags = [bm.recording ? "recording" : "disabled", bm.busy ? "busy" : ""].filter(Boolean).join(", ");
      box.append(el("div", {class: "bitmap", "data-bitmap": `${node.name}/${bm.name}`},
        el("div", {class: "meta"}, el("b", {}, `${node.name} / ${bm.name}`),
           `: ${bytes(bm.count)} dirty of ${bytes(bm.size)}, granularity ${bytes(bm.granularity)}, ${flags}`),
        strip));
    }
  }
  document.getElementById("no-bitmaps").hidden = n > 0;
}

function renderGraph(nodes, backends, devices) {
  // guest devices -> BlockBackends -> root nodes -> children; then the
  // devices without a drive and the nodes no backend or parent holds
  const byName = new Map(nodes.map(n => [n.name, n]));
  const isChild = new Set(nodes.flatMap(n => Object.values(n.children)));
  const isRoot = new Set(backends.map(b => b.root).filter(Boolean));
  const item = (node, role) => {
    const li = el("li", {"data-node": node.name},
      role ? el("span", {class: "role"}, role + ": ") : "",
      el("span", {class: "node-name"}, node.name), ` ${node.driver}`,
      node.filter ? " (filter)" : "",
      node.file ? ` ${node.file}` : "", `, ${bytes(node.size)}`, node.read_only ? ", read-only" : "",
      `, read ${bytes(node.bytes_read)}, written ${bytes(node.bytes_written)}`);
    const kids = Object.entries(node.children);
    if (kids.length) {
      const ul = el("ul");
      for (const [r, name] of kids) if (byName.has(name)) ul.append(item(byName.get(name), r));
      li.append(ul);
    }
    return li;
  };
  const backendItem = (b) => {
    const li = el("li", {"data-backend": b.name, class: "backend"},
      el("span", {class: "kind"}, "backend "), el("span", {class: "backend-name"}, b.name || "(anonymous)"),
      b.root ? "" : ", no medium", b.io_status !== "ok" ? `, I/O status ${b.io_status}` : "");
    if (b.root && byName.has(b.root)) li.append(el("ul", {}, item(byName.get(b.root), "root")));
    return li;
  };
  const deviceItem = (d, inner) => {
    const li = el("li", {"data-device": d.path, class: "device"},
      el("span", {class: "kind"}, "device "), el("span", {class: "device-name"}, d.id || d.path),
      ` ${d.model}`, d.id ? ` ${d.path}` : "");
    if (inner) li.append(el("ul", {}, inner));
    return li;
  };
  const top = backends.map(b => b.device ? deviceItem(b.device, backendItem(b)) : backendItem(b));
  for (const d of devices) if (d.backend === null) top.push(deviceItem(d, null));
  for (const n of nodes) if (!isChild.has(n.name) && !isRoot.has(n.name)) top.push(item(n, ""));
  document.getElementById("graph").replaceChildren(...top);
  document.getElementById("no-nodes").hidden = top.length > 0;
}

function renderEvents(events) {
  document.getElementById("events").replaceChildren(...events.map(e => {
    const t = new Date(e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000);
    return el("li", {}, `${t.toLocaleTimeString()} ${e.event} ${e.data ? JSON.stringify(e.data) : ""}`);
  }));
}

function renderClients(clients) {
  document.getElementById("clients").replaceChildren(...clients.map(c =>
    el("li", {}, `${c.name} (${c.transport}${c.peer ? " from " + c.peer : ""}${c.negotiating ? ", negotiating" : ""})`)));
}

function render(s) {
  document.getElementById("name").textContent = s.name || "";
  renderJobs(s.jobs);
  renderBitmaps(s.nodes);
  renderGraph(s.nodes, s.backends || [], s.devices || []);
  renderEvents(s.events);
  renderClients(s.clients);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function connect() {
  const conn = document.getElementById("conn");
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/live");
  ws.onopen = () => { conn.textContent = "live"; conn.className = "badge"; };
  ws.onmessage = (m) => render(JSON.parse(m.data));
  ws.onclose = () => {
    conn.textContent = "disconnected"; conn.className = "badge off";
    setTimeout(connect, 2000);
  };
}

document.getElementById("auth").textContent = token() ? "controls on" : "read-only (open with #token=TOKEN)";
connect();
