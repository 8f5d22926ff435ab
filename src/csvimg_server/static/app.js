// The csvimg upload page: upload a CSV, follow its progress, show the results.
//
// Talks to the public HTTP API only (see /openapi.json). Plain JavaScript,
// no build step, no dependencies; every piece of server data goes into the
// page through textContent or attributes, never as HTML.
//
// API keys: when the "API key" field is filled, every API call carries
// "Authorization: Bearer <key>" - but only to this server's own origins,
// never to the image hosts of the "before" thumbnails. <img> cannot send
// that header, so with a key the compressed images and the output CSV are
// fetched and shown through blob: URLs.
"use strict";

(() => {
  const POLL_MS = 500;
  const RETRY_MS = 2000;
  const PAGE = 1000;
  const EAGER_THUMBS = 120; // the first thumbnails load at once, the rest when scrolled to
  const KEY_STORE = "csvimg.apiKey";
  const FINISHED = new Set(["COMPLETED", "FAILED"]);
  const STATUS_TEXT = {
    PENDING: "Queued",
    PROCESSING: "Compressing",
    COMPLETED: "Finished",
    FAILED: "Finished: every image failed",
  };
  // Header names the server accepts for the serial and name columns
  // (csvimg.manifest: lower-cased, without spaces, dots, dashes, underscores).
  const SERIAL_NAMES = new Set(["sno", "serialnumber", "serialno", "serial", "no", "#", "srno",
    "slno"]);
  const NAME_NAMES = new Set(["productname", "product", "name"]);

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("upload-form"),
    drop: $("drop-zone"),
    file: $("file"),
    fileStatus: $("file-status"),
    callback: $("callback-url"),
    quality: $("quality"),
    apiKey: $("api-key"),
    submit: $("submit"),
    message: $("message"),
    problems: $("problems"),
    problemsHeading: $("problems-heading"),
    problemsSummary: $("problems-summary"),
    problemsBody: document.querySelector("#problems-table tbody"),
    progressSection: $("progress-section"),
    requestId: $("request-id"),
    progress: $("progress"),
    percent: $("progress-percent"),
    progressText: $("progress-text"),
    live: $("live"),
    results: $("results"),
    stats: $("summary-stats"),
    outputLink: $("output-link"),
    productsTable: $("products-table"),
  };

  const trustedOrigins = new Set([location.origin]);
  let current = null; // the request id being shown
  let timer = null;
  let lastStatus = null;
  let blobUrls = [];
  let thumbObserver = null;
  let thumbCount = 0;

  // ------------------------------------------------------------ helpers

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function formatBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  }

  function savedPercent(bytesIn, bytesOut) {
    if (!bytesIn) return null;
    return (1 - bytesOut / bytesIn) * 100;
  }

  function formatSaved(pct) {
    if (pct === null) return "–";
    if (pct < 0) return `${Math.abs(pct).toFixed(1)}% larger`;
    return `${pct.toFixed(1)}%`;
  }

  function plural(n, one, many) {
    return `${n.toLocaleString("en")} ${n === 1 ? one : many}`;
  }

  function announce(text) {
    // Re-setting the same text would not be announced again; clear first.
    el.live.textContent = "";
    window.setTimeout(() => { el.live.textContent = text; }, 50);
  }

  function showMessage(text, kind = "error") {
    el.message.textContent = text;
    el.message.className = `message message-${kind}`;
    el.message.hidden = false;
  }

  function clearMessage() {
    el.message.hidden = true;
    el.message.textContent = "";
  }

  // ---------------------------------------------------------------- API

  function apiKey() {
    return el.apiKey.value.trim();
  }

  function authHeaders(url) {
    const key = apiKey();
    if (!key) return {};
    const target = new URL(url, document.baseURI);
    return trustedOrigins.has(target.origin) ? { Authorization: `Bearer ${key}` } : {};
  }

  async function api(url, options = {}) {
    const headers = { Accept: "application/json", ...authHeaders(url), ...(options.headers || {}) };
    return fetch(url, { ...options, headers, credentials: "same-origin", cache: "no-store" });
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return null;
    }
  }

  function explain(status, body) {
    const detail = body && typeof body.error === "string" ? body.error : "";
    if (status === 401) {
      return apiKey()
        ? "The server refused this API key. Check the “API key” field and try again."
        : "This server needs an API key. Enter it in the “API key” field and try again.";
    }
    if (status === 403) return `This API key is not allowed to do that. ${detail}`.trim();
    if (status === 413) return detail || "The CSV is larger than the server accepts.";
    if (status === 429) return "Too many requests right now; wait a moment and try again.";
    if (status >= 500) return `The server had a problem (${status}). ${detail}`.trim();
    return detail || `The server answered ${status}.`;
  }

  function showHttpError(status, body) {
    showMessage(explain(status, body));
    if (status === 401 || status === 403) el.apiKey.focus();
  }

  // ------------------------------------------------------------- upload

  function describeFile() {
    const file = el.file.files[0];
    el.fileStatus.textContent = file
      ? `Chosen: ${file.name} (${formatBytes(file.size)})`
      : "No file chosen.";
    el.drop.classList.toggle("has-file", Boolean(file));
  }

  function setBusy(busy) {
    el.submit.disabled = busy;
    el.form.setAttribute("aria-busy", busy ? "true" : "false");
    el.submit.textContent = busy ? "Uploading…" : "Upload and compress";
  }

  function hideProblems() {
    el.problems.hidden = true;
    el.problemsBody.replaceChildren();
  }

  function showProblems(body, filename) {
    const errors = body.errors;
    el.problemsSummary.textContent =
      `${filename}: ${plural(errors.length, "problem", "problems")} found. ` +
      "Fix them and upload the file again; nothing was processed.";
    el.problemsBody.replaceChildren(
      ...errors.map((p) =>
        h("tr", {},
          h("td", { class: "num", text: p.row === null ? "whole file" : p.row }),
          h("td", { text: p.column === null ? "–" : p.column }),
          h("td", {}, h("code", { text: p.code })),
          // The row has its own column; the message need not repeat it.
          h("td", { text: p.row === null ? p.message : p.message.replace(`row ${p.row}: `, "") }),
        ),
      ),
    );
    el.problems.hidden = false;
    el.problemsHeading.focus();
  }

  async function onSubmit(event) {
    event.preventDefault();
    clearMessage();
    hideProblems();
    const file = el.file.files[0];
    if (!file) {
      showMessage("Choose a CSV file first.");
      el.file.focus();
      return;
    }
    const form = new FormData();
    form.append("file", file, file.name);
    const callback = el.callback.value.trim();
    if (callback) form.append("callback_url", callback);
    const quality = el.quality.value.trim();
    if (quality) form.append("quality", quality);

    setBusy(true);
    let response;
    try {
      response = await api("api/v1/upload", { method: "POST", body: form });
    } catch (err) {
      setBusy(false);
      showMessage(`Cannot reach the server: ${err.message}`);
      return;
    }
    const body = await readJson(response);
    setBusy(false);
    if (response.ok && body && body.request_id) {
      start(body.request_id, body.status_url);
    } else if (response.status === 400 && body && Array.isArray(body.errors) && body.errors.length) {
      showProblems(body, file.name);
      announce(`The CSV was not accepted: ${plural(body.errors.length, "problem", "problems")}.`);
    } else {
      showHttpError(response.status, body);
    }
  }

  // ----------------------------------------------------------- progress

  function stop() {
    if (timer !== null) window.clearTimeout(timer);
    timer = null;
  }

  function start(requestId, statusUrl) {
    stop();
    current = requestId;
    lastStatus = null;
    if (statusUrl) {
      try {
        trustedOrigins.add(new URL(statusUrl, document.baseURI).origin);
      } catch {
        // not a URL: the page's own origin is enough
      }
    }
    history.replaceState(null, "", `#request=${encodeURIComponent(requestId)}`);
    el.requestId.textContent = requestId;
    el.progress.value = 0;
    el.progress.max = 1;
    el.percent.textContent = "0%";
    el.progressText.textContent = "Waiting for the server…";
    el.progressSection.hidden = false;
    el.results.hidden = true;
    poll(requestId);
  }

  function schedule(requestId, delay) {
    stop();
    timer = window.setTimeout(() => poll(requestId), delay);
  }

  async function poll(requestId) {
    if (requestId !== current) return;
    let response;
    try {
      response = await api(`api/v1/status/${encodeURIComponent(requestId)}`);
    } catch {
      el.progressText.textContent = "Lost the connection to the server; retrying…";
      schedule(requestId, RETRY_MS);
      return;
    }
    if (requestId !== current) return;
    const body = await readJson(response);
    if (!response.ok || !body) {
      if (response.status >= 500 || response.status === 429) {
        el.progressText.textContent = `The server answered ${response.status}; retrying…`;
        schedule(requestId, RETRY_MS);
      } else if (response.status === 404) {
        showMessage(`There is no request ${requestId} on this server.`);
        el.progressSection.hidden = true;
      } else {
        showHttpError(response.status, body);
      }
      return;
    }
    updateProgress(body);
    if (FINISHED.has(body.status)) {
      await showResults(requestId, body);
    } else {
      schedule(requestId, POLL_MS);
    }
  }

  function updateProgress(status) {
    const { total, done, failed } = status.progress;
    const finished = done + failed;
    const pct = total ? Math.floor((finished / total) * 100) : 100;
    el.progress.max = Math.max(total, 1);
    el.progress.value = total ? finished : 1;
    el.progress.setAttribute("aria-valuetext", `${finished} of ${total} images (${pct}%)`);
    el.percent.textContent = `${pct}%`;
    el.progressText.textContent =
      `${STATUS_TEXT[status.status] || status.status}: ${finished.toLocaleString("en")} of ` +
      `${plural(total, "image", "images")} (${done.toLocaleString("en")} compressed, ` +
      `${failed.toLocaleString("en")} failed)`;
    el.progressSection.dataset.status = status.status;
    if (status.status !== lastStatus) {
      lastStatus = status.status;
      if (status.status === "PENDING") announce(`Queued: ${plural(total, "image", "images")}.`);
      if (status.status === "PROCESSING") {
        announce(`Compressing ${plural(total, "image", "images")}…`);
      }
      // The finished state is announced with the results.
    }
  }

  // ------------------------------------------------------------ results

  async function fetchItems(requestId) {
    const items = [];
    for (let offset = 0; ; offset += PAGE) {
      const url = `api/v1/requests/${encodeURIComponent(requestId)}/items` +
        `?offset=${offset}&limit=${PAGE}`;
      const response = await api(url);
      const body = await readJson(response);
      if (!response.ok || !body) throw Object.assign(new Error("items"), { response, body });
      items.push(...body.items);
      if (!body.next || body.items.length === 0) return items;
    }
  }

  function parseCsv(text) {
    // RFC 4180: quoted fields may hold commas, quotes ("") and line breaks.
    const rows = [];
    let row = [];
    let field = "";
    let quoted = false;
    for (let i = 0; i < text.length; i += 1) {
      const c = text[i];
      if (quoted) {
        if (c === '"') {
          if (text[i + 1] === '"') {
            field += '"';
            i += 1;
          } else {
            quoted = false;
          }
        } else {
          field += c;
        }
      } else if (c === '"') {
        quoted = true;
      } else if (c === ",") {
        row.push(field);
        field = "";
      } else if (c === "\n" || c === "\r") {
        if (c === "\r" && text[i + 1] === "\n") i += 1;
        row.push(field);
        rows.push(row);
        row = [];
        field = "";
      } else {
        field += c;
      }
    }
    if (field !== "" || row.length) {
      row.push(field);
      rows.push(row);
    }
    return rows;
  }

  function unneutralise(cell) {
    // The output CSV defuses formula-like cells with a leading apostrophe.
    return /^'[=+\-@\t\r]/.test(cell) ? cell.slice(1) : cell;
  }

  async function fetchProducts(requestId) {
    // Serial numbers and names come from the output CSV, whose data rows
    // are the request's rows in order (the items' "row" indexes them).
    try {
      const response = await api(
        `api/v1/requests/${encodeURIComponent(requestId)}/output.csv`,
        { headers: { Accept: "text/csv" } },
      );
      if (!response.ok) return null;
      const [header, ...rows] = parseCsv(await response.text());
      const norm = (cell) => unneutralise(cell).toLowerCase().replace(/[\s._-]+/g, "");
      const serial = header.findIndex((c) => SERIAL_NAMES.has(norm(c)));
      const name = header.findIndex((c) => NAME_NAMES.has(norm(c)));
      return rows.map((cells) => ({
        serial: serial >= 0 ? unneutralise(cells[serial] || "") : "",
        name: name >= 0 ? unneutralise(cells[name] || "") : "",
      }));
    } catch {
      return null;
    }
  }

  function revokeBlobs() {
    for (const url of blobUrls) URL.revokeObjectURL(url);
    blobUrls = [];
  }

  async function loadThumb(img) {
    const url = img.dataset.src;
    delete img.dataset.src;
    const headers = authHeaders(url);
    if (!headers.Authorization) {
      img.src = url;
      return;
    }
    try {
      const response = await fetch(url, { headers, credentials: "same-origin" });
      if (!response.ok) throw new Error(String(response.status));
      const blobUrl = URL.createObjectURL(await response.blob());
      blobUrls.push(blobUrl);
      img.src = blobUrl;
    } catch {
      img.dispatchEvent(new Event("error"));
    }
  }

  function observeThumb(img) {
    if (!thumbObserver) {
      thumbObserver = new IntersectionObserver((entries) => {
        for (const entry of entries) {
          if (entry.isIntersecting) {
            thumbObserver.unobserve(entry.target);
            loadThumb(entry.target);
          }
        }
      }, { rootMargin: "600px 0px" });
    }
    thumbObserver.observe(img);
  }

  function thumbnail(url, alt, kind) {
    const frame = h("div", { class: `thumb thumb-${kind}` });
    const img = h("img", {
      alt,
      width: 96,
      height: 96,
      decoding: "async",
      referrerpolicy: "no-referrer",
      "data-src": url,
      "data-kind": kind,
    });
    img.addEventListener("error", () => {
      frame.classList.add("thumb-missing");
      frame.replaceChildren(h("span", { class: "thumb-placeholder", text: "No preview" }),
        h("span", { class: "visually-hidden", text: alt }));
      frame.title = kind === "before"
        ? "The original image could not be shown here (its host may not allow it)."
        : "The compressed image could not be loaded.";
    }, { once: true });
    img.addEventListener("load", () => frame.classList.add("thumb-loaded"), { once: true });
    frame.append(img);
    thumbCount += 1;
    if (thumbCount <= EAGER_THUMBS) loadThumb(img);
    else observeThumb(img);
    return frame;
  }

  function productRows(product, index, items) {
    const label = product && (product.serial || product.name)
      ? [product.serial && `No. ${product.serial}`, product.name].filter(Boolean).join(" · ")
      : `Product ${index + 1}`;
    const group = h("tbody", { class: "product" });
    items.forEach((item, i) => {
      const ordinal = items.length > 1 ? ` (image ${i + 1} of ${items.length})` : "";
      const tr = h("tr", { class: `item item-${item.status.toLowerCase()}` });
      if (i === 0) {
        tr.append(h("th", { scope: "rowgroup", rowspan: items.length, class: "product-name" },
          h("span", { class: "product-label", text: label }),
          h("span", { class: "product-count", text: plural(items.length, "image", "images") })));
      }
      tr.append(h("td", { class: "cell-thumb" },
        thumbnail(item.input_url, `Before: ${label}${ordinal}`, "before"),
        h("a", { class: "source", href: item.input_url, target: "_blank",
          rel: "noopener noreferrer", text: shortUrl(item.input_url) })));
      if (item.status === "DONE" && item.output_url) {
        const pct = savedPercent(item.bytes_in, item.bytes_out);
        tr.append(
          h("td", { class: "cell-thumb" },
            thumbnail(item.output_url, `After: ${label}${ordinal}`, "after"),
            item.width && item.height
              ? h("span", { class: "dims", text: `${item.width} × ${item.height}` })
              : null),
          h("td", { class: "num size" },
            h("span", { text: formatBytes(item.bytes_in) }),
            h("span", { class: "arrow", "aria-label": "to", text: " → " }),
            h("span", { text: formatBytes(item.bytes_out) })),
          h("td", { class: `num saved${pct !== null && pct < 0 ? " saved-worse" : ""}` },
            h("strong", { text: formatSaved(pct) })),
        );
      } else {
        tr.append(h("td", { colspan: 3, class: "failure" },
          h("span", { class: "badge badge-failed", text: "Failed" }),
          " ",
          h("code", { class: "error-code", text: item.error_code || item.status }),
          h("span", { class: "error-message", text: item.error_message || "" })));
      }
      group.append(tr);
    });
    return group;
  }

  function shortUrl(url) {
    try {
      const u = new URL(url);
      const tail = u.pathname.split("/").filter(Boolean).pop() || "/";
      return `${u.host}/…/${tail}`;
    } catch {
      return url;
    }
  }

  function renderSummary(status, items) {
    const done = items.filter((i) => i.status === "DONE");
    const bytesIn = done.reduce((sum, i) => sum + (i.bytes_in || 0), 0);
    const bytesOut = done.reduce((sum, i) => sum + (i.bytes_out || 0), 0);
    const pct = savedPercent(bytesIn, bytesOut);
    const stat = (term, value, cls) =>
      h("div", { class: `stat${cls ? ` ${cls}` : ""}` }, h("dt", { text: term }),
        h("dd", { text: value }));
    el.stats.replaceChildren(
      stat("Images", status.progress.total.toLocaleString("en")),
      stat("Compressed", status.progress.done.toLocaleString("en"), "stat-ok"),
      stat("Failed", status.progress.failed.toLocaleString("en"),
        status.progress.failed ? "stat-failed" : ""),
      stat("Size", `${formatBytes(bytesIn)} → ${formatBytes(bytesOut)}`),
      stat("Saved", formatSaved(pct), "stat-saved"),
    );
    return pct;
  }

  async function downloadWithKey(event) {
    const url = el.outputLink.href;
    if (!authHeaders(url).Authorization) return; // a plain link does it
    event.preventDefault();
    try {
      const response = await api(url, { headers: { Accept: "text/csv" } });
      if (!response.ok) {
        showHttpError(response.status, await readJson(response));
        return;
      }
      const blobUrl = URL.createObjectURL(await response.blob());
      const a = h("a", { href: blobUrl, download: el.outputLink.getAttribute("download") || "" });
      document.body.append(a);
      a.click();
      a.remove();
      window.setTimeout(() => URL.revokeObjectURL(blobUrl), 10000);
    } catch (err) {
      showMessage(`Cannot download the output CSV: ${err.message}`);
    }
  }

  async function showResults(requestId, status) {
    let items;
    try {
      items = await fetchItems(requestId);
    } catch (err) {
      if (err.response) showHttpError(err.response.status, err.body);
      else showMessage("Lost the connection to the server while loading the results.");
      return;
    }
    const products = await fetchProducts(requestId);
    if (requestId !== current) return;

    revokeBlobs();
    if (thumbObserver) thumbObserver.disconnect();
    thumbCount = 0;
    const pct = renderSummary(status, items);
    if (status.output_csv_url) {
      el.outputLink.href = status.output_csv_url;
      el.outputLink.hidden = false;
    } else {
      el.outputLink.hidden = true;
    }
    const byRow = new Map();
    for (const item of items) {
      if (!byRow.has(item.row)) byRow.set(item.row, []);
      byRow.get(item.row).push(item);
    }
    for (const old of el.productsTable.querySelectorAll("tbody")) old.remove();
    for (const [row, rowItems] of [...byRow.entries()].sort((a, b) => a[0] - b[0])) {
      rowItems.sort((a, b) => a.position - b.position);
      el.productsTable.append(productRows(products && products[row], row, rowItems));
    }
    el.results.hidden = false;
    const { done, failed } = status.progress;
    announce(
      `Finished: ${plural(done, "image", "images")} compressed, ${failed} failed` +
      `${pct === null ? "" : `, ${formatSaved(pct)} saved`}. The results are below.`,
    );
  }

  // --------------------------------------------------------------- wiring

  function init() {
    try {
      el.apiKey.value = sessionStorage.getItem(KEY_STORE) || "";
    } catch {
      // storage disabled: the field still works for this page
    }
    el.apiKey.addEventListener("input", () => {
      try {
        if (apiKey()) sessionStorage.setItem(KEY_STORE, apiKey());
        else sessionStorage.removeItem(KEY_STORE);
      } catch {
        // storage disabled
      }
    });

    el.file.addEventListener("change", () => {
      describeFile();
      clearMessage();
      hideProblems();
    });
    for (const type of ["dragenter", "dragover"]) {
      el.drop.addEventListener(type, (event) => {
        event.preventDefault();
        event.dataTransfer.dropEffect = "copy";
        el.drop.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "dragend", "drop"]) {
      el.drop.addEventListener(type, () => el.drop.classList.remove("dragging"));
    }
    el.drop.addEventListener("drop", (event) => {
      event.preventDefault();
      const files = event.dataTransfer.files;
      if (files && files.length) {
        el.file.files = files;
        el.file.dispatchEvent(new Event("change", { bubbles: true }));
      }
    });
    // A file dropped next to the zone would make the browser navigate to it.
    for (const type of ["dragover", "drop"]) {
      window.addEventListener(type, (event) => {
        if (!el.drop.contains(event.target)) event.preventDefault();
      });
    }
    el.form.addEventListener("submit", onSubmit);
    el.outputLink.addEventListener("click", downloadWithKey);

    describeFile();
    const resume = /request=([0-9a-fA-F-]{36})/.exec(location.hash);
    if (resume) start(resume[1], null);
  }

  init();
})();
