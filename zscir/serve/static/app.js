// zscir serve: the search page. Plain JavaScript, no libraries, nothing fetched from outside this server.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const PAGE = 48;
  const state = {
    ref: null,          // gallery id of the reference
    upload: null,       // data: URL of an uploaded reference
    uploadName: "",
    targets: new Set(), // known targets of the example being shown
    limits: { max_k: 100, max_text_chars: 300, max_upload_bytes: 10485760 },
    offset: 0, total: 0, find: "", mode: "name",
    galleryCall: 0, searchCall: 0, // only the latest answer is shown
  };

  async function api(path, options) {
    let resp;
    try {
      resp = await fetch(path, options);
    } catch (err) {
      throw new Error("the server cannot be reached (" + err.message + ")");
    }
    let body = null;
    try { body = await resp.json(); } catch (err) { body = null; }
    if (!resp.ok) throw new Error(body && body.error ? body.error : "HTTP " + resp.status);
    return body;
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function setStatus(message, isError) {
    const s = $("status");
    s.textContent = message;
    s.classList.toggle("error", !!isError);
  }

  // ------------------------------------------------------------ reference
  function showReference(src, label) {
    const img = $("ref-img");
    img.hidden = !src;
    if (src) { img.src = src; img.alt = "Reference: " + label; }
    $("ref-name").textContent = label || "None chosen yet: pick one from the gallery, an example, or upload a picture.";
    $("reference").classList.toggle("empty", !src);
    $("ref-clear").hidden = !src;
  }

  function chooseGallery(id, url, name, keepTargets) {
    state.ref = id; state.upload = null; state.uploadName = "";
    if (!keepTargets) state.targets = new Set();
    $("upload").value = "";
    showReference(url + "?size=192", name);
    for (const b of document.querySelectorAll(".thumb")) b.setAttribute("aria-pressed", String(b.dataset.id === String(id)));
  }

  function chooseUpload(file) {
    if (!file) return;
    if (file.size > state.limits.max_upload_bytes) {
      setStatus("That file is " + (file.size / 1048576).toFixed(1) + " MB; the server accepts at most " +
        (state.limits.max_upload_bytes / 1048576).toFixed(1) + " MB.", true);
      $("upload").value = "";
      return;
    }
    const reader = new FileReader();
    reader.onload = () => {
      state.upload = reader.result; state.uploadName = file.name; state.ref = null; state.targets = new Set();
      showReference(reader.result, "Uploaded: " + file.name);
      for (const b of document.querySelectorAll(".thumb")) b.setAttribute("aria-pressed", "false");
      setStatus("Reference uploaded. Type the modification and search.");
      $("text").focus();
    };
    reader.onerror = () => setStatus("Cannot read that file.", true);
    reader.readAsDataURL(file);
  }

  function clearReference() {
    state.ref = null; state.upload = null; state.targets = new Set();
    $("upload").value = "";
    showReference(null, "");
    for (const b of document.querySelectorAll(".thumb")) b.setAttribute("aria-pressed", "false");
  }

  // ------------------------------------------------------------ gallery
  function thumb(item) {
    const caption = item.score == null ? item.name : item.name + " (" + item.score.toFixed(2) + ")";
    const button = el("button", {
      type: "button", class: "thumb", "aria-pressed": String(String(item.id) === String(state.ref)),
      "aria-label": "Use " + item.name + " as the reference", title: String(item.id), dataset: { id: String(item.id) },
    }, [el("img", { src: item.url + "?size=128", alt: "", loading: "lazy" }), el("span", { text: caption })]);
    button.addEventListener("click", () => {
      chooseGallery(item.id, item.url, item.name);
      setStatus("Reference chosen: " + item.name + ". Type the modification and search.");
    });
    return button;
  }

  async function loadGallery() {
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (state.mode === "text" && state.find) params.set("text", state.find);
    else {
      params.set("offset", String(state.offset));
      if (state.find) params.set("name", state.find);
    }
    const call = ++state.galleryCall;
    try {
      const page = await api("api/gallery?" + params.toString());
      if (call !== state.galleryCall) return;
      const grid = $("gallery");
      grid.replaceChildren(...page.items.map(thumb));
      state.total = page.total;
      const shown = page.items.length;
      if (state.mode === "text" && state.find) {
        $("page-info").textContent = "best " + shown + " for \u201c" + state.find + "\u201d";
      } else {
        $("page-info").textContent = shown ? (page.offset + 1) + "\u2013" + (page.offset + shown) + " of " + page.total
          : "no images match";
      }
      $("prev").disabled = state.mode === "text" && !!state.find || state.offset === 0;
      $("next").disabled = state.mode === "text" && !!state.find || state.offset + shown >= page.total;
    } catch (err) {
      if (call !== state.galleryCall) return;
      $("page-info").textContent = "";
      setStatus("Gallery: " + err.message, true);
    }
  }

  // ------------------------------------------------------------ examples
  async function loadExamples() {
    let examples = [];
    try { examples = await api("api/examples?limit=40"); } catch (err) { examples = []; }
    if (!examples.length) { $("tab-examples").hidden = true; return; }
    $("examples").replaceChildren(...examples.map((ex) => {
      const button = el("button", { type: "button", "aria-label": "Example: " + ex.text }, [
        el("img", { src: ex.reference.url + "?size=96", alt: "" }), el("span", { text: ex.text })]);
      button.addEventListener("click", () => {
        chooseGallery(ex.reference.id, ex.reference.url, ex.reference.name, true);
        state.targets = new Set(ex.targets.map(String));
        $("text").value = ex.text;
        $("exclude").checked = true;
        runSearch();
      });
      return el("li", {}, [button]);
    }));
  }

  // ------------------------------------------------------------ search
  function readK() {
    const k = Number($("k").value);
    if (!Number.isInteger(k) || k < 1 || k > state.limits.max_k) {
      throw new Error("Results: give a whole number from 1 to " + state.limits.max_k + ".");
    }
    return k;
  }

  function resultCard(item) {
    const isTarget = state.targets.has(String(item.id));
    const label = "#" + item.rank + " " + item.name + ", score " + item.score.toFixed(3) + (isTarget ? ", the expected target" : "");
    return el("li", { class: "result" + (isTarget ? " target" : ""), dataset: { id: String(item.id), rank: String(item.rank) } }, [
      el("a", { href: item.url, target: "_blank", rel: "noopener", "aria-label": label, title: String(item.id) }, [
        el("img", { src: item.url + "?size=256", alt: item.name })]),
      el("div", { class: "meta" }, [el("span", { class: "rank", text: "#" + item.rank }),
        el("span", { class: "score", text: item.score.toFixed(3) })]),
      el("div", { class: "name", text: item.name }),
      el("div", { class: "badge", text: "expected target" }),
    ]);
  }

  async function runSearch() {
    const text = $("text").value.trim();
    let k;
    try { k = readK(); } catch (err) { setStatus(err.message, true); $("k").focus(); return; }
    if (state.ref === null && !state.upload) {
      setStatus("Choose a reference image first (gallery, example or upload).", true);
      $("gallery-query").focus();
      return;
    }
    if (!text) { setStatus("Type what should be different about the reference.", true); $("text").focus(); return; }
    const body = { text: text, k: k, exclude_reference: $("exclude").checked };
    if (state.upload) body.reference_image = state.upload; else body.reference_id = state.ref;
    const call = ++state.searchCall;
    $("search-btn").disabled = true;
    setStatus("Searching\u2026");
    const start = performance.now();
    try {
      const res = await api("api/search", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      if (call !== state.searchCall) return;
      const total = performance.now() - start;
      $("results").replaceChildren(...res.results.map(resultCard));
      const found = state.targets.size ? res.results.find((r) => state.targets.has(String(r.id))) : null;
      setStatus(res.results.length + " results in " + res.took_ms.toFixed(1) + " ms on the server (" +
        total.toFixed(0) + " ms in all) from " + res.gallery_size.toLocaleString() + " images" +
        (res.excluded.length ? ", the reference left out" : "") +
        (state.targets.size ? (found ? "; expected target at rank " + found.rank : "; expected target not in the top " + res.k) : "") + ".");
      if (res.link) {
        $("link").href = res.link;
        $("link-row").hidden = false;
        history.replaceState(null, "", res.link);
      } else {
        $("link-row").hidden = true;
      }
    } catch (err) {
      if (call === state.searchCall) setStatus(err.message, true);
    } finally {
      if (call === state.searchCall) $("search-btn").disabled = false;
    }
  }

  // ------------------------------------------------------------ keyboard
  function moveInGrid(event, container, selector) {
    const items = Array.from(container.querySelectorAll(selector));
    const at = items.indexOf(document.activeElement.closest(selector) || document.activeElement);
    if (at < 0) return;
    const top = items[0].offsetTop;
    let columns = items.findIndex((item) => item.offsetTop !== top);
    if (columns < 1) columns = items.length;
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns }[event.key];
    if (step === undefined) return;
    const next = items[at + step];
    if (next) {
      event.preventDefault();
      (next.matches("button, a") ? next : next.querySelector("a, button")).focus();
    }
  }

  function selectTab(tab) {
    for (const t of document.querySelectorAll("[role=tab]")) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    tab.focus();
  }

  function wire() {
    $("gallery-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.find = $("gallery-query").value.trim();
      state.mode = $("gallery-mode").value;
      state.offset = 0;
      loadGallery();
    });
    $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadGallery(); });
    $("next").addEventListener("click", () => { state.offset += PAGE; loadGallery(); });
    $("upload").addEventListener("change", (event) => chooseUpload(event.target.files[0]));
    $("ref-clear").addEventListener("click", clearReference);
    $("search-form").addEventListener("submit", (event) => { event.preventDefault(); runSearch(); });
    $("text").addEventListener("input", () => { state.targets = new Set(); });
    $("gallery").addEventListener("keydown", (event) => moveInGrid(event, $("gallery"), ".thumb"));
    $("results").addEventListener("keydown", (event) => moveInGrid(event, $("results"), ".result"));
    const tabs = Array.from(document.querySelectorAll("[role=tab]"));
    for (const tab of tabs) {
      tab.addEventListener("click", () => selectTab(tab));
      tab.addEventListener("keydown", (event) => {
        const visible = tabs.filter((t) => !t.hidden);
        const at = visible.indexOf(tab);
        const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (step !== undefined) {
          event.preventDefault();
          selectTab(visible[(at + step + visible.length) % visible.length]);
        }
      });
    }
    document.addEventListener("keydown", (event) => {
      const typing = event.target.closest("input, select, textarea");
      if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.key === "/") { event.preventDefault(); selectTab($("tab-gallery")); $("gallery-query").focus(); }
      if (event.key === "t") { event.preventDefault(); $("text").focus(); }
    });
  }

  async function init() {
    wire();
    try {
      const health = await api("api/health");
      state.limits = health.limits;
      const m = health.model;
      $("facts").textContent = (m.name || "model") + " (" + m.stage + ", " + m.backbone + ") \u00b7 " +
        health.index.count.toLocaleString() + " gallery images \u00b7 " + health.index.metric + " \u00b7 " + m.device;
      $("k").max = String(state.limits.max_k);
      $("text").maxLength = state.limits.max_text_chars;
      $("upload-hint").textContent = "At most " + (state.limits.max_upload_bytes / 1048576).toFixed(0) +
        " MB. It is sent to this server only and not stored; a link cannot reproduce an uploaded reference.";
    } catch (err) {
      $("facts").textContent = "";
      setStatus("The server does not answer: " + err.message, true);
    }
    loadGallery();
    loadExamples();
    const params = new URLSearchParams(location.search);
    if (params.has("text")) $("text").value = params.get("text");
    if (params.has("k")) $("k").value = params.get("k");
    if (params.has("exclude")) $("exclude").checked = params.get("exclude") !== "0";
    if (params.has("ref")) {
      const id = params.get("ref");
      const url = "api/images/" + id.split("/").map(encodeURIComponent).join("/");
      chooseGallery(id, url, id.split("/").pop());
      if ($("text").value.trim()) runSearch();
    }
  }

  document.addEventListener("DOMContentLoaded", init);
})();
