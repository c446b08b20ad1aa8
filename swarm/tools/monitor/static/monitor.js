// Stamen swarm monitor: polls /api/v1/state for each watched model and draws it. No build step.
// Every value from the swarm (names, peer ids) goes into the page as text, never as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = { ONLINE: "#2e9d5b", JOINING: "#d9a400", OFFLINE: "#9aa0a6", gap: "#d93025", route: "#1a73e8", push: "#9334e6" };
const COLUMNS = [
  ["Name", (r, names) => names.get(r.peer_id)],
  ["Peer ID", (r) => shortPeer(r.peer_id), "peer"],
  ["State", (r) => stateBadge(r.state)],
  ["Blocks", (r) => r.span],
  ["Steps/s/block", (r) => number(r.throughput), "num"],
  ["Fwd tok/s/block", (r) => number(r.forward_throughput), "num"],
  ["Dtype", (r) => r.dtype],
  ["Cache free", (r) => String(r.cache_tokens_left), "num"],
  ["Version", (r) => r.version],
  ["Pings to next servers", (r, names) => pings(r, names), "pings"],
  ["Top users (served, queued)", (r, names) => usage(r, names), "pings"],
  ["Points", (r) => (r.points > 0 ? number(r.points) : "-"), "num"],
];

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function shortPeer(peer) {
  return peer.length > 14 ? `${peer.slice(0, 8)}…${peer.slice(-4)}` : peer;
}

function number(value) {
  return Number.isFinite(value) ? (value >= 100 ? value.toFixed(0) : value.toFixed(1)) : "-";
}

function stateBadge(state) {
  return el("span", { class: `state ${state}` }, state);
}

function pings(row, names) {
  const entries = Object.entries(row.next_pings || {}).sort((a, b) => a[1] - b[1]);
  if (!entries.length) return "-";
  return entries.map(([peer, seconds]) => `${names.get(peer) || shortPeer(peer)} ${(1000 * seconds).toFixed(1)} ms`).join(", ");
}

function usage(row, names) {
  // the peers the server served most: rows x tokens x blocks run for each, and its work queued now
  const rows = row.usage || [];
  const fair = row.fair_share ? "fair share" : "fair share off";
  if (!rows.length) return fair;
  const listed = rows.map((u) => `${names.get(u.peer_id) || shortPeer(u.peer_id)} ${number(u.served)}` + (u.queued ? ` (${u.queued} queued)` : ""));
  return `${fair}: ${listed.join(", ")}`;
}

function blocksText(blocks) {
  const runs = [];
  for (const block of blocks) {
    const last = runs[runs.length - 1];
    if (last && last[1] === block) last[1] = block + 1;
    else runs.push([block, block + 1]);
  }
  return runs.map(([start, end]) => (end - start === 1 ? `${start}` : `${start}:${end}`)).join(", ");
}

// Coverage picture: a strip of online servers per block, one bar per server, then the routes.
function drawCoverage(report, numBlocks, names) {
  const label = 170, cell = Math.max(8, Math.min(36, Math.floor(1000 / numBlocks))), row = 18, pad = 4;
  const width = label + numBlocks * cell + 8;
  const routes = [["route", "relay", report.route, report.route_ms], ["push_route", "push", report.push_route, report.push_route_ms]];
  const height = 16 + 24 + (report.servers.length + routes.length) * (row + pad) + 8;
  const picture = svgEl("svg", { class: "coverage", viewBox: `0 0 ${width} ${height}`, width, height });
  const x = (block) => label + block * cell;
  const step = Math.max(1, Math.ceil(30 / cell));
  for (let block = 0; block <= numBlocks; block += step) {
    picture.append(svgEl("text", { x: x(block), y: 11, class: "label", "text-anchor": "middle" }, String(block)));
  }
  picture.append(svgEl("text", { x: label - 8, y: 33, "text-anchor": "end" }, "online servers per block"));
  const most = Math.max(1, ...report.coverage);
  report.coverage.forEach((count, block) => {
    const fill = count === 0 ? COLORS.gap : COLORS.ONLINE;
    const rect = svgEl("rect", { x: x(block) + 0.5, y: 16, width: cell - 1, height: 22, fill, "fill-opacity": count === 0 ? 1 : 0.35 + 0.65 * (count / most), class: "cell", "data-count": count });
    rect.append(svgEl("title", {}, `block ${block}: ${count} online server${count === 1 ? "" : "s"}`));
    picture.append(rect);
    if (cell >= 14) picture.append(svgEl("text", { x: x(block) + cell / 2, y: 31, class: "count", "text-anchor": "middle" }, String(count)));
  });
  let y = 16 + 24 + pad;
  for (const server of report.servers) {
    picture.append(svgEl("text", { x: label - 8, y: y + 13, "text-anchor": "end" }, names.get(server.peer_id)));
    const bar = svgEl("rect", { x: x(server.start) + 0.5, y, width: (server.end - server.start) * cell - 1, height: row, rx: 3, fill: COLORS[server.state] || COLORS.OFFLINE, class: "bar", "data-peer": server.peer_id });
    bar.append(svgEl("title", {}, `${names.get(server.peer_id)}: blocks ${server.span}, ${server.state}`));
    picture.append(bar);
    y += row + pad;
  }
  for (const [, kind, hops, ms] of routes) {
    const title = hops ? `route, ${kind} (~${ms.toFixed(1)} ms)` : `route, ${kind}: none`;
    picture.append(svgEl("text", { x: label - 8, y: y + 13, "text-anchor": "end" }, title));
    (hops || []).forEach((hop, index) => {
      const segment = svgEl("rect", { x: x(hop.start) + 0.5, y, width: (hop.end - hop.start) * cell - 1, height: row, rx: 3, fill: COLORS[kind === "relay" ? "route" : "push"], "fill-opacity": index % 2 ? 0.7 : 1, class: "hop", "data-kind": kind, "data-peer": hop.peer_id });
      segment.append(svgEl("title", {}, `${names.get(hop.peer_id) || hop.peer_id}: blocks ${hop.start}:${hop.end}`));
      picture.append(segment);
      const name = names.get(hop.peer_id) || shortPeer(hop.peer_id);
      if ((hop.end - hop.start) * cell > 7 * name.length) {
        picture.append(svgEl("text", { x: x(hop.start) + 4, y: y + 13, class: "count" }, name));
      }
    });
    y += row + pad;
  }
  return picture;
}

function serverTable(report, names) {
  const table = el("table", { class: "servers" });
  const head = el("tr");
  for (const [title] of COLUMNS) head.append(el("th", {}, title));
  const thead = el("thead");
  thead.append(head);
  const body = el("tbody");
  table.append(thead, body);
  for (const server of report.servers) {
    const tr = el("tr", { class: "server", "data-peer": server.peer_id });
    for (const [, value, css] of COLUMNS) {
      const content = value(server, names);
      const td = el("td", css ? { class: css } : {});
      if (content instanceof Node) td.append(content);
      else td.textContent = content;
      tr.append(td);
    }
    body.append(tr);
  }
  return table;
}

function render(section, model, report) {
  const names = new Map(report.servers.map((s) => [s.peer_id, s.public_name || shortPeer(s.peer_id)]));
  const online = report.servers.filter((s) => s.state === "ONLINE").length;
  const summary = el("p", { class: "summary" });
  summary.append(el("span", {}, `${online} of ${report.servers.length} servers online`));
  summary.append(el("span", { class: report.gaps.length ? "gaps error" : "gaps" }, report.gaps.length ? `Gaps: blocks ${blocksText(report.gaps)}` : "Gaps: none"));
  if (report.route_ms !== null && report.push_route_ms !== null) {
    const relay = report.route_ms.toFixed(1), push = report.push_route_ms.toFixed(1);
    summary.append(el("span", {}, `Route: ~${relay} ms/token with relay, ~${push} ms/token with push`));
    summary.append(el("span", { class: "muted" }, "(a client's round trips are unknown here: 50 ms assumed)"));
  }
  const parts = [summary, drawCoverage(report, model.num_blocks, names)];
  parts.push(report.servers.length ? serverTable(report, names) : el("p", { class: "muted" }, "No servers found."));
  section.querySelector(".body").replaceChildren(...parts);
}

function modelSection(model) {
  const section = el("section", { class: "model", "data-prefix": model.prefix });
  section.append(el("h2", {}, `${model.model}`));
  section.append(el("p", { class: "muted" }, `DHT prefix ${model.prefix}, ${model.num_blocks} blocks`));
  section.append(el("div", { class: "body" }));
  section.append(el("p", { class: "problem error" }));
  return section;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

async function refresh(models, sections, refreshSeconds) {
  const status = document.getElementById("status");
  let failures = 0;
  await Promise.all(models.map(async (model) => {
    const problem = sections.get(model.prefix).querySelector(".problem");
    try {
      const report = await getJSON(`/api/v1/state?model=${encodeURIComponent(model.prefix)}`);
      const section = sections.get(model.prefix), text = JSON.stringify(report);
      if (section.dataset.report !== text) {  // redraw only what changed: rows stay put while people read them
        render(section, model, report);
        section.dataset.report = text;
      }
      problem.textContent = "";
    } catch (error) {
      failures += 1;
      problem.textContent = `Could not update: ${error.message}`;
    }
  }));
  const when = new Date().toLocaleTimeString();
  status.textContent = `Updated ${when}, every ${refreshSeconds} s` + (failures ? ` (${failures} failed)` : "");
  status.dataset.updates = String(Number(status.dataset.updates || 0) + 1);
}

async function start() {
  const status = document.getElementById("status");
  let config;
  try {
    config = await getJSON("/api/v1/models");
  } catch (error) {
    status.textContent = `Could not reach the monitor: ${error.message}`;
    setTimeout(start, 5000);
    return;
  }
  const sections = new Map();
  const container = document.getElementById("models");
  for (const model of config.models) {
    const section = modelSection(model);
    sections.set(model.prefix, section);
    container.append(section);
  }
  const period = Math.max(1, config.refresh);
  const loop = async () => {
    await refresh(config.models, sections, period);
    setTimeout(loop, period * 1000);
  };
  loop();
}

start();
