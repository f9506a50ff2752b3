// flexserve's dashboard: polls /v1/dashboard/stats once a second with the key from the
// sign-in form (kept in this tab's sessionStorage), and redraws. No library, no build.
// Server data is written with textContent only: nothing it says can run as script.
"use strict";

const STATS_URL = "/v1/dashboard/stats";
const KEY_SLOT = "flexserve.dashboard.key";
const POLL_MS = 1000;
const HISTORY = 120; // samples kept for the chart: 2 minutes at one a second
const TIERS = ["priority", "default", "flex", "batch"];
const COLORS = { priority: "#d9480f", default: "#1c7ed6", flex: "#2b8a3e", batch: "#7048e8" };

const history = []; // {t, tiers: {tier: {queued, running, requests}}, busy: {model: s}}
let timer = null;
let session = 0; // a new sign-in ends the previous polling loop

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells, id) {
  const tr = el("tr");
  if (id) tr.id = id;
  for (const cell of cells) {
    const td = el("td");
    if (cell instanceof Node) td.appendChild(cell);
    else td.textContent = String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

function dollars(value) {
  return `$${Number(value).toFixed(6)}`;
}

function bar(fraction, label) {
  const outer = el("div", undefined, "bar");
  const inner = el("div", undefined, "fill");
  inner.style.width = `${Math.min(100, Math.max(0, fraction * 100)).toFixed(1)}%`;
  outer.appendChild(inner);
  outer.appendChild(el("span", label, "bar-label"));
  return outer;
}

// ---- sign in / out ------------------------------------------------------------------

function signIn(key) {
  sessionStorage.setItem(KEY_SLOT, key);
  $("login").hidden = true;
  $("board").hidden = false;
  $("logout").hidden = false;
  clearTimeout(timer);
  session += 1;
  poll(session);
}

function signOut(message) {
  sessionStorage.removeItem(KEY_SLOT);
  clearTimeout(timer);
  session += 1;
  history.length = 0;
  $("board").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("status").textContent = "signed out";
}

async function poll(mine) {
  const key = sessionStorage.getItem(KEY_SLOT);
  if (!key || mine !== session) return;
  try {
    const answer = await fetch(STATS_URL, {
      headers: { authorization: `Bearer ${key}` },
      cache: "no-store",
    });
    if (mine !== session) return;
    if (answer.status === 401 || answer.status === 403) {
      const body = await answer.json().catch(() => ({}));
      signOut((body.error && body.error.message) || `refused (${answer.status})`);
      return;
    }
    if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
    render(await answer.json());
    $("status").textContent = `live · ${new Date().toLocaleTimeString()}`;
    $("status").className = "status live";
  } catch (error) {
    $("status").textContent = `cannot reach the server (${error.message}); retrying`;
    $("status").className = "status down";
  }
  if (mine === session) timer = setTimeout(() => poll(mine), POLL_MS);
}

// ---- drawing ----------------------------------------------------------------------

function render(stats) {
  const previous = history[history.length - 1];
  const sample = { t: stats.created, tiers: {}, busy: {} };
  for (const tier of TIERS) {
    const t = stats.tiers[tier];
    sample.tiers[tier] = { queued: t.queued, running: t.running, requests: t.requests_total };
  }
  for (const [name, model] of Object.entries(stats.models)) {
    sample.busy[name] = model.busy_slot_seconds;
  }
  history.push(sample);
  if (history.length > HISTORY) history.shift();
  renderTiers(stats.tiers, previous, sample);
  renderModels(stats.models, previous, sample);
  renderCost(stats.cost);
  renderBatches(stats.batches);
  renderChart();
}

function perSecond(previous, sample, pick) {
  if (!previous) return null;
  const span = sample.t - previous.t;
  return span > 0 ? (pick(sample) - pick(previous)) / span : null;
}

function renderTiers(tiers, previous, sample) {
  const body = $("tiers").querySelector("tbody");
  body.replaceChildren();
  for (const tier of TIERS) {
    const t = tiers[tier];
    const rate = perSecond(previous, sample, (s) => s.tiers[tier].requests);
    const tr = row(
      [
        tier,
        t.requests_total,
        rate === null ? "–" : rate.toFixed(1),
        t.requests.completed || 0,
        t.shed_429,
        t.overloaded_503,
        t.preemptions,
        t.queued,
        t.running,
        seconds(t.ttft_seconds.p50),
        seconds(t.ttft_seconds.p90),
        seconds(t.ttft_seconds.p99),
      ],
      `tier-${tier}`,
    );
    const names = ["tier", "requests", "rate", "completed", "shed", "overloaded",
      "preemptions", "queued", "running", "p50", "p90", "p99"];
    tr.querySelectorAll("td").forEach((td, i) => { td.dataset.field = names[i]; });
    tr.firstChild.style.color = COLORS[tier];
    body.appendChild(tr);
  }
}

function renderModels(models, previous, sample) {
  const box = $("models");
  box.replaceChildren();
  for (const [name, model] of Object.entries(models)) {
    const card = el("div", undefined, "model");
    card.id = `model-${name}`;
    card.appendChild(el("h3", name));
    const busy = perSecond(previous, sample, (s) => s.busy[name] || 0);
    const measured = busy === null || !model.slots ? null : busy / model.slots;
    card.appendChild(bar(model.utilization,
      `${model.running} of ${model.slots} slots busy now, ${model.queued} queued`));
    card.appendChild(el("p",
      measured === null ? "utilization (busy slot-seconds): –"
        : `utilization (busy slot-seconds, last second): ${(measured * 100).toFixed(0)}%`,
      "hint"));
    const list = el("ul", undefined, "backends");
    for (const backend of model.backends) {
      const item = el("li", `${backend.name}: ${backend.state}${backend.up ? "" : " (down)"}`);
      item.className = backend.up ? "up" : "down";
      list.appendChild(item);
    }
    card.appendChild(list);
    box.appendChild(card);
  }
}

function renderCost(cost) {
  $("cost-total").textContent = dollars(cost.total_cost_usd);
  $("cost-saved").textContent = dollars(cost.flex_savings_usd);
  const body = $("costs").querySelector("tbody");
  body.replaceChildren();
  for (const tier of TIERS) {
    const t = cost.tiers[tier];
    if (!t) continue;
    body.appendChild(row([tier, t.requests, t.input_tokens, t.output_tokens,
      dollars(t.cost_usd)], `cost-${tier}`));
  }
}

function renderBatches(batches) {
  const body = $("batches").querySelector("tbody");
  body.replaceChildren();
  $("no-batches").hidden = batches.length > 0;
  for (const batch of batches) {
    const p = batch.progress;
    const eta = p.eta_seconds === null ? "–" : seconds(p.eta_seconds);
    body.appendChild(row([
      batch.id, batch.tenant, batch.status,
      bar(p.fraction, `${p.done} / ${p.total}`),
      eta, dollars(batch.cost.usd), dollars(batch.cost.saved_usd),
    ], `batch-${batch.id}`));
  }
}

function renderChart() {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const width = 600, height = 160;
  let top = 1;
  for (const s of history) {
    for (const tier of TIERS) top = Math.max(top, s.tiers[tier].queued, s.tiers[tier].running);
  }
  const x = (i) => (i / (HISTORY - 1)) * width;
  const y = (v) => height - 4 - (v / top) * (height - 14);
  const scale = document.createElementNS(ns, "text");
  scale.setAttribute("x", "4");
  scale.setAttribute("y", "12");
  scale.setAttribute("class", "axis");
  scale.textContent = `max ${top}`;
  svg.appendChild(scale);
  const offset = HISTORY - history.length;
  for (const tier of TIERS) {
    for (const field of ["queued", "running"]) {
      const line = document.createElementNS(ns, "polyline");
      const points = history.map((s, i) => `${x(i + offset).toFixed(1)},${y(s.tiers[tier][field]).toFixed(1)}`);
      line.setAttribute("points", points.join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", COLORS[tier]);
      line.setAttribute("stroke-width", "2");
      if (field === "running") line.setAttribute("stroke-dasharray", "4 3");
      svg.appendChild(line);
    }
  }
  const legend = $("legend");
  if (!legend.childElementCount) {
    for (const tier of TIERS) {
      const item = el("span", `${tier}`, "key");
      item.style.borderColor = COLORS[tier];
      legend.appendChild(item);
    }
    legend.appendChild(el("span", "solid: queued · dashed: running", "hint"));
  }
}

// ---- start ----------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    $("key").value = "";
    if (key) signIn(key);
  });
  $("logout").addEventListener("click", () => signOut());
  const key = sessionStorage.getItem(KEY_SLOT);
  if (key) signIn(key);
});
