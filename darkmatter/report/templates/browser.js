// The dark-matter token browser. Plain JavaScript, no network: everything comes from the embedded JSON
// (layout documented in darkmatter/report_browser.py). Only one page of contexts is in the DOM at a time.
"use strict";
(() => {
  const started = performance.now();
  const D = JSON.parse(document.getElementById("dm-data").textContent);
  const $ = (id) => document.getElementById(id);
  const perPage = D.limits.contexts_per_page;
  const pages = Math.max(1, Math.ceil(D.contexts.length / perPage));
  const state = { sae: D.saes.length ? D.saes[0].sae_id : null, kind: D.kinds[0].key, shared: false, page: 0,
                  current: null };

  const esc = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  // Newlines get a visible mark, so a newline token has something to shade.
  const shown = (s) => (s === "" ? "∅" : esc(s).replace(/\n/g, '<i class="nl">↵</i>\n'));
  // In lists whitespace must be visible, since " the" and "the" are different tokens.
  const visible = (s) => esc(s).replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→");
  const fmt = (v) => (v === null ? "—" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3));
  const pct = (v) => (v === null || v === undefined ? "—" : (100 * v).toFixed(0) + "%");
  const pos = (ci, ti) => (D.contexts[ci].positions ? D.contexts[ci].positions[ti] : D.contexts[ci].start + ti);
  const text = (ci, ti) => D.vocab[D.contexts[ci].tokens[ti]];
  const kindInfo = (key) => D.kinds.find((k) => k.key === key);
  const value = (kind, ci, ti) => {
    const a = D.norms[state.sae][kind];
    const q = a.q[ci][ti];
    return q === null ? null : q * a.step;
  };

  // White → the kind's colour in 101 steps, computed once (recolouring then allocates no strings).
  const ramp = (hex) => {
    const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
    return Array.from({ length: 101 }, (_, i) =>
      `rgb(${rgb.map((c) => Math.round(255 + (c - 255) * (i / 100) * 0.9)).join(",")})`);
  };
  const ramps = Object.fromEntries(D.kinds.map((k) => [k.key, ramp(k.color)]));
  const scaleMax = () => {
    const n = D.norms[state.sae];
    return (state.shared ? Math.max(...D.kinds.map((k) => n[k.key].p99)) : n[state.kind].p99) || 1;
  };

  function buttons() {
    const oneFamily = new Set(D.saes.map((s) => `${s.hook}|${s.architecture}`)).size === 1;
    $("sae-buttons").innerHTML = D.saes.map((s) =>
      `<button type="button" data-sae="${esc(s.sae_id)}" title="${esc(s.sae_id)}">` +
      `${oneFamily && s.width ? `w${s.width}${s.k ? ` · k${s.k}` : ""}` : esc(s.sae_id)}</button>`).join("");
    $("kind-buttons").innerHTML = D.kinds.map((k) =>
      `<button type="button" data-kind="${k.key}"><span class="swatch" style="background:${k.color}"></span>` +
      `${k.label}</button>`).join("");
  }

  function renderPage() {
    const parts = [];
    const lo = state.page * perPage;
    for (let ci = lo; ci < Math.min(D.contexts.length, lo + perPage); ci++) {
      const c = D.contexts[ci];
      parts.push(`<article class="ctx" id="ctx-${ci}"><h3>context ${c.id}<span>${esc(c.doc || "")} · positions ` +
                 `${pos(ci, 0)}–${pos(ci, c.tokens.length - 1)}</span></h3><div class="tokens">`);
      for (let ti = 0; ti < c.tokens.length; ti++) {
        parts.push(`<span id="t-${ci}-${ti}" data-c="${ci}" data-t="${ti}">${shown(text(ci, ti))}</span>`);
      }
      parts.push("</div></article>");
    }
    $("contexts").innerHTML = parts.join("") || '<p class="empty">No contexts in the store.</p>';
    const pager = `<button type="button" data-page="${state.page - 1}" ${state.page === 0 ? "disabled" : ""}>` +
      `← previous</button><span>page ${state.page + 1} of ${pages} · contexts ${lo + 1}–` +
      `${Math.min(D.contexts.length, lo + perPage)} of ${D.contexts.length}</span><button type="button" ` +
      `data-page="${state.page + 1}" ${state.page >= pages - 1 ? "disabled" : ""}>next →</button>`;
    $("pager-top").innerHTML = pager;
    $("pager-bottom").innerHTML = pager;
    shade();
  }

  function shade() {
    if (!state.sae) return;
    const a = D.norms[state.sae][state.kind];
    const colours = ramps[state.kind];
    const max = scaleMax();
    for (const el of $("contexts").querySelectorAll("span[data-t]")) {
      const q = a.q[+el.dataset.c][+el.dataset.t];
      el.classList.toggle("na", q === null);
      if (q === null) { el.style.backgroundColor = ""; el.style.color = ""; continue; }
      const i = Math.min(100, Math.round((100 * q * a.step) / max));
      el.style.backgroundColor = colours[i];
      el.style.color = i > 65 ? "#fff" : "";
    }
  }

  function renderControls() {
    for (const b of $("sae-buttons").children) b.classList.toggle("active", b.dataset.sae === state.sae);
    for (const b of $("kind-buttons").children) {
      const on = b.dataset.kind === state.kind;
      b.classList.toggle("active", on);
      b.style.background = on ? kindInfo(b.dataset.kind).color : "";
    }
    const colours = ramps[state.kind];
    $("legend-bar").style.background = `linear-gradient(90deg, ${colours[0]}, ${colours[100]})`;
    $("legend-hi").textContent = `≥ ${fmt(scaleMax())}`;
    const s = D.saes.find((x) => x.sae_id === state.sae) || {};
    $("sae-stats").textContent = `${state.sae} · FVU ${s.fvu == null ? "—" : fmt(s.fvu)} · FVU nonlinear ` +
      `${s.fvu_nonlinear == null ? "—" : fmt(s.fvu_nonlinear)} · L0 ${s.l0_mean == null ? "—" : fmt(s.l0_mean)} · ` +
      `share of ‖error‖²: linear ${pct(s.linear_share_of_sq_norm)}, nonlinear ${pct(s.nonlinear_share_of_sq_norm)}`;
  }

  function renderWorst() {
    const items = state.sae ? D.worst[state.sae][state.kind] : [];
    const step = state.sae ? D.norms[state.sae][state.kind].step : 1;
    $("worst-note").textContent = `Top ${items.length} by ${kindInfo(state.kind).label} error norm among the ` +
      `${D.contexts.length} embedded contexts. Click one to open it in context.`;
    $("worst-list").innerHTML = items.map(([ci, ti, q], r) =>
      `<li><button type="button" data-c="${ci}" data-t="${ti}"><span class="rank">${r + 1}</span>` +
      `<span class="tok">${visible(text(ci, ti))}</span><span class="val">${fmt(q * step)}</span>` +
      `<span class="where">context ${D.contexts[ci].id}, position ${pos(ci, ti)}</span></button></li>`).join("");
  }

  function update() {
    if (!state.sae) return;  // an empty store: the contexts are shown unshaded
    renderControls(); shade(); renderWorst();
  }

  // Open token (ci, ti) in context: turn to its page, scroll it to the middle and highlight it.
  function reveal(ci, ti) {
    const page = Math.floor(ci / perPage);
    if (page !== state.page) { state.page = page; renderPage(); }
    document.querySelectorAll(".tokens span.hl").forEach((el) => el.classList.remove("hl"));
    const el = $(`t-${ci}-${ti}`);
    el.classList.add("hl");
    el.scrollIntoView({ block: "center", behavior: "instant" });
    state.current = [ci, ti];
    describe(el);
  }

  function describe(el) {
    const ci = +el.dataset.c, ti = +el.dataset.t;
    const parts = D.kinds.map((k) => {
      const v = fmt(value(k.key, ci, ti));
      return k.key === state.kind ? `<b>${k.label} ${v}</b>` : `${k.label} ${v}`;
    });
    $("info").innerHTML = `<span class="tok">${visible(text(ci, ti))}</span> · context ${D.contexts[ci].id}, ` +
      `position ${pos(ci, ti)} · ‖error‖: ${parts.join(" · ")}`;
  }

  $("sae-buttons").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-sae]");
    if (b) { state.sae = b.dataset.sae; update(); }
  });
  const setKind = (kind) => { state.kind = kind; update(); };
  $("kind-buttons").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-kind]");
    if (b) setKind(b.dataset.kind);
  });
  $("shared-scale").addEventListener("change", (e) => { state.shared = e.target.checked; update(); });
  for (const id of ["pager-top", "pager-bottom"]) {
    $(id).addEventListener("click", (e) => {
      const b = e.target.closest("button[data-page]");
      if (b && !b.disabled) { state.page = +b.dataset.page; renderPage(); $("contexts").scrollIntoView(); }
    });
  }
  $("worst-list").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-c]");
    if (!b) return;
    document.querySelectorAll("#worst-list button.current").forEach((x) => x.classList.remove("current"));
    b.classList.add("current");
    reveal(+b.dataset.c, +b.dataset.t);
  });
  $("contexts").addEventListener("mouseover", (e) => {
    const el = e.target.closest("span[data-t]");
    if (el && state.sae) describe(el);
  });
  document.addEventListener("keydown", (e) => {
    const k = D.kinds[Number(e.key) - 1];
    if (k && !e.ctrlKey && !e.metaKey && !e.altKey) setKind(k.key);
  });

  buttons();
  if (!state.sae) $("info").textContent = "The store has no SAEs yet.";
  renderPage();
  update();
  // Read by the browser test (and handy in the console): how long building the page took.
  window.darkmatterBrowser = { renderMs: performance.now() - started, state };
})();
