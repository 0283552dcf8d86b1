// The console's one script: the live state (server-sent events) into the tables, the forms posted
// with the session's CSRF token, Try it's drop zone. No framework, no build step.
"use strict";

const csrf = document.querySelector('meta[name="csrf"]').content;
const page = document.body.dataset.page;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function say(text, ok) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.className = "message " + (ok ? "ok" : "error");
  box.hidden = false;
}

async function post(url, body) {
  const response = await fetch(url, {method: "POST", body, credentials: "same-origin",
                                     headers: {"X-CSRF-Token": csrf}});
  let data;
  try { data = await response.json(); } catch (_) { data = {error: `${response.status} ${response.statusText}`}; }
  if (!response.ok) throw new Error(data.error || `${response.status}`);
  return data;
}

function renderFleet(state) {
  const body = document.querySelector("#fleet tbody");
  if (!body) return;
  const rows = state.fleet.map((r) => el("tr", {"data-worker": r.worker, "data-model": r.model},
    el("td", {}, r.worker), el("td", {}, r.model), el("td", {class: "active"}, r.active || "-"),
    el("td", {}, r.standby.join(", ") || "-"),
    el("td", {}, Object.entries(r.weights).map(([v, w]) => `${v} ${w}%`).join(", ")),
    el("td", {}, r.shadow || ""),
    el("td", {}, r.versions.map((v) => el("span", {class: "state " + v.state, title: v.reason || ""},
      `${v.version} ${v.state}${v.on_demand ? " (on demand)" : ""}`))),
    el("td", {}, r.in_flight), el("td", {}, r.last_seq), el("td", {}, r.rollout || ""),
    el("td", {class: "error"}, r.last_error || ""), el("td", {}, `${r.heard_s_ago} s ago`)));
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", {colspan: 12, class: "empty"},
    "no worker heard yet"))]));
  const rejected = document.getElementById("rejected");
  rejected.hidden = !state.rejected_events;
  rejected.textContent = `${state.rejected_events} status event(s) ignored: they failed authentication`;
}

function renderTimeline(state) {
  const list = document.getElementById("timeline");
  if (!list) return;
  const items = state.updates.map((u) => el("li", {class: "command " + u.outcome, "data-command": u.command_id},
    el("div", {class: "head"}, el("b", {}, `${u.model} #${u.seq}`), " ", u.summary, " ",
      el("span", {class: "outcome"}, u.outcome), u.issuer ? el("span", {class: "issuer"}, ` by ${u.issuer}`) : null),
    el("ul", {class: "workers"}, u.workers.map((w) => el("li", {"data-worker": w.worker},
      el("span", {class: "worker"}, w.worker), " ",
      w.phases.map((p) => el("span", {class: "phase " + p.phase, title: p.at},
        p.phase + (p.seconds !== null ? ` ${p.seconds.toFixed(2)} s` : ""))),
      w.reason ? el("span", {class: "reason"}, w.reason) : null)))));
  list.replaceChildren(...(items.length ? items : [el("li", {class: "empty"}, "no command yet")]));
  const rollouts = document.getElementById("rollouts");
  rollouts.replaceChildren(...(state.rollouts.length ? state.rollouts.map((r) => el("div", {class: "rollout"},
    el("b", {}, `${r.model} ${r.running ? "(running)" : "(finished)"}`), el("pre", {}, r.lines.join("\n"))))
    : [el("p", {class: "empty"}, "none")]));
}

function renderChoices(state) {
  const models = Object.keys(state.models);
  const versions = [...new Set(Object.values(state.models).flat()), "stable", "canary"];
  for (const list of document.querySelectorAll("datalist#models")) {
    list.replaceChildren(...models.map((m) => el("option", {value: m})));
  }
  for (const list of document.querySelectorAll("datalist#versions")) {
    list.replaceChildren(...versions.map((v) => el("option", {value: v})));
  }
  const select = document.getElementById("try-model");
  if (select && select.dataset.models !== models.join(",")) {
    const chosen = select.value;
    select.replaceChildren(...models.map((m) => el("option", {value: m}, m)));
    if (models.includes(chosen)) select.value = chosen;
    select.dataset.models = models.join(",");
  }
}

function render(state) {
  document.body.classList.toggle("signed-in", state.signed_in);
  renderFleet(state);
  renderTimeline(state);
  renderChoices(state);
}

function follow() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/events");
  source.addEventListener("state", (event) => {
    live.textContent = "live";
    live.className = "live on";
    render(JSON.parse(event.data));
  });
  source.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
}

function wireForms() {
  for (const form of document.querySelectorAll("form[data-api]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try { say((await post(form.dataset.api, new FormData(form))).message, true); } catch (e) { say(e.message, false); }
    });
  }
  for (const button of document.querySelectorAll("button[data-api-button]")) {
    button.addEventListener("click", async () => {
      try { say((await post(button.dataset.apiButton, new FormData(button.form))).message, true); }
      catch (e) { say(e.message, false); }
    });
  }
}

function panel(entry) {
  const r = entry.result;
  const t = r.timings || {};
  const caption = r.status === "ok"
    ? `${r.model}/${r.version} on ${r.worker_id} (asked: ${entry.asked}) — ${r.output ? r.output.task : "detect"}, ` +
      `${r.detections.length} found; total ${t.total_ms.toFixed(1)} ms (queue ${(t.queue_wait_ms || 0).toFixed(1)}, ` +
      `decode ${t.decode_ms.toFixed(1)}, inference ${t.inference_ms.toFixed(1)})`
    : `${r.model}/${r.version || "?"} (asked: ${entry.asked}): ${r.error.code} — ${r.error.message}`;
  return el("figure", {class: "panel " + r.status, "data-version": r.version || ""},
    entry.png ? el("img", {src: entry.png, alt: caption}) : null, el("figcaption", {}, caption),
    el("details", {}, el("summary", {}, "result JSON"), el("pre", {}, JSON.stringify(r, null, 2))));
}

function wireTry() {
  const form = document.getElementById("form-try");
  const input = document.getElementById("try-file");
  const drop = document.getElementById("drop");
  const results = document.getElementById("results");
  const send = async () => {
    if (!input.files.length) return;
    results.replaceChildren(el("p", {class: "hint"}, "running…"));
    try {
      const data = await post("/api/try", new FormData(form));
      results.replaceChildren(...data.results.map(panel));
      say(`ran on ${data.results.map((e) => e.result.version || "?").join(" and ")}`, true);
    } catch (e) {
      results.replaceChildren();
      say(e.message, false);
    }
  };
  input.addEventListener("change", send);
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) { input.files = event.dataTransfer.files; send(); }
  });
}

if (page !== "login") {
  follow();
  wireForms();
  if (page === "try") wireTry();
}
for (const link of document.querySelectorAll(`[data-nav="${page}"]`)) link.classList.add("here");
