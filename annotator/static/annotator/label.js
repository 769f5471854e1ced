// The label page: a viewer (zoom, pan, brightness/contrast, invert, Grad-CAM) and answers
// by hotkey, saved with fetch; the next scan's payload comes back in the same response, so
// the page swaps scans without reloading. Timings are kept in window.medlabel.timings.
// A refit the answer queued runs in the background: the answer never waits for it; the status
// line says "Model updating…", polls model-status every 2 s meanwhile, then says what came of it.
// No answer is taken for a scan before its image is on screen (loaded, decoded, painted), nor
// while the last one is saving, nor from a held key's auto-repeat; each refusal is said.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const root = $("labeler");
  // read on each request: signing in again (another tab) gives a new token
  const csrf = () => (document.cookie.match(/(?:^|; )csrftoken=([^;]+)/) || [])[1] || "";
  const view = {scale: 1, x: 0, y: 0, invert: false, cam: false, window: null, frame: null};
  const medlabel = (window.medlabel = {timings: [], saved: 0, payload: null});
  let payload = JSON.parse($("label-payload").textContent);
  // the scan's image: "loading" until it is on screen ("ready"), or "failed" (the page says
  // why in words; the scan can then only be skipped). Answers wait for "ready".
  let imageState = "loading";
  let imageProblem = "";
  let loadSeq = 0;            // a newer scan's load makes an older one's events stale
  let saving = null;          // "answer" or "undo" while that request is in flight
  let queued = null;          // "undo" or "back" pressed during a save: done once it is saved
  // the submission id of the answer last sent for this scan, with what it said: a retry of
  // the same answer reuses it (the server stores it once); another answer gets a new one
  let attempt = null;
  // The reading time sent as duration_ms: only while the page is visible and the reader is
  // active. Two minutes without a pointer, key or wheel input stop the count (those two
  // minutes count); the next input resumes it. A tab left open overnight is not read.
  const IDLE_MS = 2 * 60 * 1000;
  const reading = {counted: 0, since: null, lastInput: 0};
  function readingMs(now = performance.now()) {
    if (reading.since === null) return reading.counted;
    return reading.counted + Math.max(0, Math.min(now, reading.lastInput + IDLE_MS) - reading.since);
  }
  function readingPause(now = performance.now()) {
    reading.counted = readingMs(now);
    reading.since = null;
  }
  function readingStart(now = performance.now()) {   // a new scan on screen
    reading.counted = 0;
    reading.lastInput = now;
    reading.since = document.visibilityState === "hidden" ? null : now;
  }
  function readingInput() {
    const now = performance.now();
    if (document.visibilityState === "hidden") return;
    if (reading.since !== null && now - reading.lastInput > IDLE_MS) readingPause(now);   // was idle
    if (reading.since === null) reading.since = now;
    reading.lastInput = now;
  }
  for (const type of ["pointerdown", "pointermove", "keydown", "wheel"]) {
    document.addEventListener(type, readingInput, {capture: true, passive: true});
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") readingPause(); else readingInput();
  });
  medlabel.readingMs = readingMs;
  const newId = () => (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now());
  // findings sets: {finding id: "present" | "uncertain"}; unmarked findings are absent
  let marks = {};
  const NEXT_MARK = {undefined: "present", present: "uncertain", uncertain: undefined};

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  }

  // --- viewer ---------------------------------------------------------------------------
  // How many screen pixels one pixel of the scan (its stored size) takes at fit (scale 1).
  function fitFactor() {
    const box = $("viewport").getBoundingClientRect();
    const w = payload.scan.width || 1, h = payload.scan.height || 1;
    return Math.min(box.width / w, box.height / h);
  }
  function applyView() {
    $("stage").style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
    const b = $("brightness").value / 100, c = $("contrast").value / 100;
    const img = $("scan-image");
    img.style.filter = `brightness(${b}) contrast(${c})` + (view.invert ? " invert(1)" : "");
    const shown = fitFactor() * view.scale;
    // a tiny scan blown up is shown as its pixels (crisp), not as a smooth blur
    img.classList.toggle("pixelated", shown >= 2);
    $("cam-image").classList.toggle("pixelated", shown >= 2);
    $("zoom-level").textContent = view.scale === 1 ? "fit" : Math.round(view.scale * 100) + "% of fit";
    const times = shown >= 10 ? shown.toFixed(0) : shown.toFixed(shown >= 1 ? 1 : 2);
    $("native-size").textContent = `${payload.scan.width}×${payload.scan.height} px, shown at ${times}×`;
    $("cam-image").hidden = !view.cam;
    $("cam-image").style.opacity = $("cam-opacity").value / 100;
    $("cam-opacity-label").hidden = !view.cam;
    $("cam-legend").hidden = !view.cam;
    for (const [id, on] of [["toggle-cam", view.cam], ["invert", view.invert]]) {
      $(id).classList.toggle("on", on);
      $(id).setAttribute("aria-pressed", on ? "true" : "false");
    }
    const w = view.window;
    $("window-readout").textContent = w ? `W ${fmt(w.width)} L ${fmt(w.center)}${payload.scan.window.units ? " " + payload.scan.window.units : ""}` : "";
  }
  function fmt(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(1); }
  // --- window / level from the stored values (greyscale scans) ----------------------------
  let windowTimer = null;
  // what the viewer shows: the preview (the default window of the representative slice), or
  // the server's rendering of another slice and/or another window from the stored values
  function middleFrame() { return Math.floor((payload.scan.frames || 1) / 2); }
  function imageUrl(w) {
    const params = [];
    const frames = payload.scan.frames || 1;
    if (frames > 1 && view.frame !== null && view.frame !== middleFrame()) params.push(`frame=${view.frame}`);
    if (w && windowChanged()) params.push(`center=${encodeURIComponent(w.center.toFixed(3))}`, `width=${encodeURIComponent(w.width.toFixed(3))}`);
    return params.length ? `${payload.scan.render}?${params.join("&")}` : payload.scan.preview;
  }
  function windowUrl(w) { return imageUrl(w); }
  // --- slices of a series imported as one scan: wheel, ↑/↓ or PageUp/PageDown ----------------
  function sliceReadout() {
    const frames = payload.scan.frames || 1;
    $("slice-readout").hidden = frames < 2;
    if (frames < 2) return;
    const k = view.frame === null ? middleFrame() : view.frame;
    const where = payload.scan.slices && payload.scan.slices[k] !== null && payload.scan.slices[k] !== undefined
      ? ` · ${payload.scan.slices[k].toFixed(1)} mm` : "";
    $("slice-readout").textContent = `slice ${k + 1} / ${frames}${where}`;
  }
  function showSlice(k) {
    const frames = payload.scan.frames || 1;
    if (frames < 2) { say("This scan has one image: there are no other slices."); return; }
    view.frame = Math.max(0, Math.min(frames - 1, k));
    sliceReadout();
    $("scan-image").src = imageUrl(view.window);
    // the neighbours next, so scrolling on is immediate
    for (const n of [view.frame - 1, view.frame + 1]) {
      if (n >= 0 && n < frames) {
        const keep = view.frame; view.frame = n;
        (new Image()).src = imageUrl(view.window);
        view.frame = keep;
      }
    }
  }
  function stepSlice(delta) {
    showSlice((view.frame === null ? middleFrame() : view.frame) + delta);
  }
  medlabel.showSlice = showSlice;
  function setWindow(w, {now = false} = {}) {
    const info = payload.scan.window;
    if (!info) return;
    const span = Math.max(info.range[1] - info.range[0], 1);
    view.window = {center: Math.min(info.range[1] + span, Math.max(info.range[0] - span, w.center)),
                   width: Math.min(span * 4, Math.max(span / 1000, w.width))};
    applyView();
    clearTimeout(windowTimer);
    // the server renders the window from the stored file: at most one request every 120 ms
    windowTimer = setTimeout(() => { $("scan-image").src = windowUrl(view.window); }, now ? 0 : 120);
  }
  function zoomNative() {
    // one stored pixel per screen pixel, centred
    const box = $("viewport").getBoundingClientRect();
    const next = 1 / fitFactor();
    view.scale = Math.min(64, Math.max(0.05, next));
    view.x = box.width / 2 * (1 - view.scale);
    view.y = box.height / 2 * (1 - view.scale);
    applyView();
  }
  function zoom(factor, cx, cy) {
    const box = $("viewport").getBoundingClientRect();
    cx = cx === undefined ? box.width / 2 : cx;
    cy = cy === undefined ? box.height / 2 : cy;
    const next = Math.min(64, Math.max(0.25, view.scale * factor));
    const k = next / view.scale;
    view.x = cx - k * (cx - view.x);
    view.y = cy - k * (cy - view.y);
    view.scale = next;
    applyView();
  }
  function resetView() {
    view.scale = 1; view.x = 0; view.y = 0; view.invert = false;
    $("brightness").value = 100; $("contrast").value = 100;
    const info = payload.scan.window;
    const wasWindowed = view.window !== null;
    view.window = info ? {center: info.center, width: info.width} : null;
    if (info) $("window-preset").value = "0";
    if ((wasWindowed && info) || view.frame !== null) {     // the default window, middle slice
      view.frame = null;
      sliceReadout();
      $("scan-image").src = payload.scan.preview;
    }
    applyView();
  }
  $("viewport").addEventListener("wheel", (e) => {
    e.preventDefault();
    // a series scrolls through its slices (Ctrl + wheel zooms); a single image zooms
    if ((payload.scan.frames || 1) > 1 && !e.ctrlKey && !e.metaKey) {
      stepSlice(e.deltaY > 0 ? 1 : -1);
      return;
    }
    const box = $("viewport").getBoundingClientRect();
    zoom(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - box.left, e.clientY - box.top);
  }, {passive: false});
  // left-drag pans; right-drag changes the window (greyscale scans): horizontal = width,
  // vertical = level, as in radiology viewers
  let drag = null;
  $("viewport").addEventListener("contextmenu", (e) => e.preventDefault());
  $("viewport").addEventListener("pointerdown", (e) => {
    if (e.button === 2 && payload.scan.window && view.window) {
      drag = {mode: "window", x: e.clientX, y: e.clientY, start: Object.assign({}, view.window)};
    } else {
      drag = {mode: "pan", x: e.clientX - view.x, y: e.clientY - view.y};
    }
    $("viewport").setPointerCapture(e.pointerId);
  });
  $("viewport").addEventListener("pointermove", (e) => {
    if (!drag) return;
    if (drag.mode === "window") {
      const info = payload.scan.window;
      const perPixel = Math.max(info.range[1] - info.range[0], 1) / 500;
      setWindow({center: drag.start.center + (e.clientY - drag.y) * perPixel,
                 width: drag.start.width + (e.clientX - drag.x) * perPixel});
      return;
    }
    view.x = e.clientX - drag.x; view.y = e.clientY - drag.y;
    applyView();
  });
  $("viewport").addEventListener("pointerup", () => { drag = null; });
  // A control used with the mouse hands the keyboard back to the page, so hotkeys (and ↑ ↓ for
  // slices) keep working after a drag or a click. A control reached and moved with keys keeps
  // the focus while it is adjusted (its change events blur nothing); Escape hands it back.
  let lastInputKind = "key";
  document.addEventListener("pointerdown", () => { lastInputKind = "pointer"; }, true);
  document.addEventListener("keydown", () => { lastInputKind = "key"; }, true);
  function giveBackFocus(e) {
    if (lastInputKind === "pointer" && e.currentTarget && e.currentTarget.blur) e.currentTarget.blur();
  }
  for (const id of ["brightness", "contrast", "cam-opacity"]) {
    $(id).addEventListener("input", applyView);
    $(id).addEventListener("change", giveBackFocus);
    $(id).addEventListener("pointerup", giveBackFocus);
  }
  $("window-preset").addEventListener("change", (e) => {
    const preset = payload.scan.window && payload.scan.window.presets[Number(e.target.value)];
    if (preset) setWindow({center: preset.center, width: preset.width}, {now: true});
    giveBackFocus(e);
  });
  // The focused viewer, zoomed in beyond fit: an arrow moves the view a tenth of the viewer
  // that way (Shift: a fiftieth), as scrolling would. At fit the arrows keep their page meaning.
  function panKey(key, fine) {
    const box = $("viewport").getBoundingClientRect();
    const part = fine ? 0.02 : 0.1;
    if (key === "ArrowLeft") view.x += box.width * part;
    else if (key === "ArrowRight") view.x -= box.width * part;
    else if (key === "ArrowUp") view.y += box.height * part;
    else if (key === "ArrowDown") view.y -= box.height * part;
    applyView();
  }
  // The window from the keyboard (greyscale scans), as right-drag does it: [ narrower, ] wider
  // (10% a press); { and } (Shift+[ and Shift+]) move the level down / up a tenth of the width.
  const WINDOW_KEYS = {"[": [0, 1 / 1.1], "]": [0, 1.1], "{": [-0.1, 1], "}": [0.1, 1]};
  function windowKey(key) {
    const step = WINDOW_KEYS[key];
    if (!step) return false;
    if (!payload.scan.window || !view.window) {
      say(`"${key}" changes the window of greyscale scans; this one is in colour: use brightness and contrast.`);
      return true;
    }
    setWindow({center: view.window.center + step[0] * view.window.width, width: view.window.width * step[1]});
    return true;
  }
  $("invert").addEventListener("click", () => { view.invert = !view.invert; applyView(); });
  $("toggle-cam").addEventListener("click", () => {
    if (!payload.gradcam) return;
    view.cam = !view.cam;
    const cam = $("cam-image");
    if (view.cam && cam.getAttribute("src") !== payload.gradcam) {
      $("cam-progress").hidden = false;         // the map takes a moment: say so
      cam.src = payload.gradcam;
    }
    applyView();
  });
  $("cam-image").addEventListener("load", () => { $("cam-progress").hidden = true; });
  $("cam-image").addEventListener("error", () => {
    $("cam-progress").hidden = true;
    if (view.cam) { view.cam = false; applyView(); say("The Grad-CAM map could not be computed for this scan.", "error"); }
  });
  $("zoom-in").addEventListener("click", () => zoom(1.25));
  $("zoom-out").addEventListener("click", () => zoom(1 / 1.25));
  $("zoom-native").addEventListener("click", zoomNative);
  $("reset").addEventListener("click", resetView);
  for (const button of document.querySelectorAll(".viewer-tools button")) {
    button.addEventListener("click", giveBackFocus);
  }
  function say(text, cls) {
    $("status").textContent = text;
    $("status").className = cls || "muted";
  }
  // A signed-out session: the JSON endpoints answer 401 with the reason and the sign-in page
  // (a redirect to that page, which fetch follows, is read the same way).
  function sessionEnded(response) {
    if (response.status === 401) return true;
    return !!(response.redirected && root.dataset.login &&
              new URL(response.url, location.href).pathname === root.dataset.login);
  }
  function saySignIn(data) {
    const status = $("status");
    status.replaceChildren();
    status.className = "error";
    status.append((data && data.error) || "Your session has ended: sign in again, then repeat what you did. Nothing was saved.", " ");
    const link = el("a", "Sign in again");
    link.href = ((data && data.login) || root.dataset.login || "/accounts/login/") +
      "?next=" + encodeURIComponent(location.pathname + location.search);
    link.id = "sign-in-again";
    status.append(link);
    stopPolling();
  }

  // --- compare with the most similar labeled scans (same zoom, window and sliders) ---------
  let compareIndex = -1;
  function compareNext() {
    const list = payload.similar || [];
    if (!list.length) { say("No similar labeled scans to compare with yet."); return; }
    compareIndex = compareIndex + 1 >= list.length ? -1 : compareIndex + 1;
    showCompared();
  }
  function compareEnd() { if (compareIndex >= 0) { compareIndex = -1; showCompared(); } }
  function windowChanged() {
    const info = payload.scan.window;
    return !!(info && view.window && (view.window.center !== info.center || view.window.width !== info.width));
  }
  function showCompared() {
    const img = $("scan-image"), note = $("compare-note");
    if (compareIndex < 0) {
      img.src = imageUrl(view.window);
      note.hidden = true;
      note.textContent = "";
      return;
    }
    const n = payload.similar[compareIndex];
    // the same window where there is one; a scan that has none falls back to its preview
    img.onerror = () => { img.onerror = null; img.src = n.preview; };
    img.src = windowChanged() ? `/scans/${n.scan}/window.png?center=${view.window.center.toFixed(3)}&width=${view.window.width.toFixed(3)}` : n.preview;
    note.hidden = false;
    note.textContent = `Comparing: similar scan #${n.scan}` + (n.labels.length ? ` (${n.labels.join(", ")})` : "") +
      ` · similarity ${n.similarity} · ${compareIndex + 1} of ${payload.similar.length} — c: next, Esc: back to this scan`;
  }

  // --- previous scan and undo ------------------------------------------------------------
  const answered = [];        // this visit's answers, newest last: {id, url}
  function updateHistoryButtons() {
    $("back").disabled = !answered.length;
    $("undo").disabled = !answered.length;
  }
  // leaving the page on purpose (nothing in flight any more: no "leave the page?" question)
  function leave(url) {
    saving = null;
    window.location.href = url;
  }
  function goBack() {
    if (saving === "answer") {       // after the save: the previous scan is the one saved
      queued = "back";
      say("Still saving the last answer… you go to the previous scan once it is saved.");
      return;
    }
    if (saving === "undo") { say("Still undoing your last answer: it then shows that scan.", "error"); return; }
    const last = answered[answered.length - 1];
    if (!last) { say("No previous scan yet: this is the first one you read here."); return; }
    leave(last.url);
  }
  async function undoLast() {
    if (saving === "answer") {       // the answer being saved is the one to take back
      queued = "undo";
      say("Still saving the last answer… it is undone once it is saved.");
      return;
    }
    if (saving === "undo") { say("Still undoing your last answer…", "error"); return; }
    const last = answered[answered.length - 1];
    if (!last) { say("Nothing to undo: you have not answered a scan here yet."); return; }
    saving = "undo";
    updateAnswering();
    say("undoing…");
    try {
      const response = await fetch(root.dataset.undo.replace("0/undo/", `${last.id}/undo/`), {
        method: "POST", credentials: "same-origin",
        headers: {"X-CSRFToken": csrf(), Accept: "application/json"}});
      const data = await response.json().catch(() => ({error: `server answered ${response.status}`, unread: true}));
      if (sessionEnded(response)) { saySignIn(response.status === 401 ? data : null); return; }
      if (response.status === 403 && (data.csrf || data.unread)) { sayReload("Nothing was undone", data); return; }
      if (!response.ok) { say(data.error || "could not undo", "error"); return; }
      answered.pop();
      leave(data.scan_url);
    } catch (err) {
      say("network error: nothing was changed, try again", "error");
    } finally {
      if (saving === "undo") saving = null;
      updateAnswering();
    }
  }
  $("back").addEventListener("click", goBack);
  $("undo").addEventListener("click", undoLast);

  // --- rendering a payload ----------------------------------------------------------------
  function render(p, measureFrom) {
    payload = p;
    medlabel.payload = p;
    const img = $("scan-image");
    const seq = ++loadSeq;
    imageState = "loading";
    imageProblem = "";
    attempt = null;
    // The scan itself first; the Grad-CAM overlay, the similar scans' thumbnails and the
    // next scan's image are fetched once it is on screen, so they never delay it. Answers
    // are taken from then on, and the reading time counts from then.
    let loadedAt = null;
    const shown = () => {
      if (seq !== loadSeq) return;
      const shownAt = performance.now();
      readingStart(shownAt);
      if (measureFrom !== undefined) {
        // key → next image loaded (as bench/label_latency reports it), and → painted
        const ms = loadedAt - measureFrom;
        medlabel.shownTimings = medlabel.shownTimings || [];
        medlabel.shownTimings.push(shownAt - measureFrom);
        medlabel.timings.push(ms);
        document.body.dataset.lastSwapMs = ms.toFixed(1);
      }
      imageState = "ready";
      updateAnswering();
      document.body.dataset.scan = String(p.scan.id);
      if (p.gradcam && view.cam) $("cam-image").src = p.gradcam;
      for (const thumb of document.querySelectorAll("#similar img[data-src]")) {
        thumb.src = thumb.dataset.src;
        thumb.removeAttribute("data-src");
      }
      if (p.prefetch) (new Image()).src = p.prefetch;
    };
    // the preview first; without it (its file lost), the scan rendered from its stored file
    const fallback = `${p.scan.render}?frame=${Math.floor((p.scan.frames || 1) / 2)}`;
    const problems = [];
    img.onload = () => {
      if (seq !== loadSeq) return;
      if (!img.naturalWidth) { img.onerror(); return; }
      img.onload = img.onerror = null;   // once: a window or a comparison reloads it later
      loadedAt = performance.now();
      // on screen = decoded, made visible and painted: the frame after the next one
      const painted = () => {
        if (seq !== loadSeq) return;
        img.classList.remove("pending");
        requestAnimationFrame(() => requestAnimationFrame(shown));
      };
      (img.decode ? img.decode() : Promise.resolve()).then(painted, painted);
      if (img.getAttribute("src") === fallback) {
        p.scan.preview = fallback;       // "reset" and the window go back to this one
        say(`This scan's preview could not be loaded (${problems[0]}): it is shown rendered from its stored file.`);
      }
    };
    img.onerror = async () => {
      if (seq !== loadSeq) return;
      const failed = img.getAttribute("src");
      const why = await whyNotLoaded(failed);
      if (seq !== loadSeq) return;
      problems.push(why);
      if (failed !== fallback) { img.src = fallback; return; }
      img.onload = img.onerror = null;
      imageState = "failed";
      imageProblem = problems.length > 1 && problems[0] !== problems[1]
        ? `the preview: ${problems[0]}; the stored file: ${problems[1]}` : problems[0];
      updateAnswering();
      document.body.dataset.scan = String(p.scan.id);
      say("This scan's image could not be loaded (the viewer says why): it cannot be answered here. Press s to skip it, and tell an admin.", "error");
    };
    img.classList.add("pending");        // the last scan's image is not shown for this one
    img.src = p.scan.preview;
    compareIndex = -1;
    $("compare-note").hidden = true;
    view.window = null;
    view.frame = null;
    sliceReadout();
    $("viewport").setAttribute("aria-label", viewerLabel());
    const info = p.scan.window;
    $("window-tools").hidden = !info;
    const presets = $("window-preset");
    presets.replaceChildren();
    if (info) {
      info.presets.forEach((preset, i) => {
        const option = el("option", `${preset.name} (W ${fmt(preset.width)} L ${fmt(preset.center)})`);
        option.value = String(i);
        presets.append(option);
      });
    }
    $("yours").hidden = !p.yours;
    $("yours").textContent = p.yours ? `You answered this scan before: ${p.yours.label || p.yours.outcome}. A new answer replaces it in training.` : "";
    $("cam-image").removeAttribute("src");
    $("cam-progress").hidden = true;
    $("toggle-cam").disabled = !p.gradcam;
    if (!p.gradcam) view.cam = false;
    $("scan-id").textContent = "#" + p.scan.id;
    $("scan-meta").textContent = [p.scan.dataset, p.scan.modality, p.scan.split].filter(Boolean).join(" · ");
    $("model-version").textContent = p.model_version || "none yet";
    const pr = p.progress;
    $("progress-line").textContent = pr ? `this round (#${pr.round_number}): ${pr.labeled} of ${pr.total} read · your labels in the project: ${pr.yours_total} · all labels: ${pr.labels_in_project}` : "";
    $("held").hidden = !p.held_by;
    $("held").textContent = p.held_by ? `${p.held_by} has this scan open; your answer is kept as a second reading.` : "";
    // why
    $("why").hidden = !p.item;
    if (p.item) {
      const r = p.item.reason;
      $("why-text").textContent = r.words || r.why || "Chosen by the project's strategy.";
      // the numbers behind the words, on hover (and for screen readers, as a description)
      const parts = [`#${p.item.rank} in round ${p.item.round}`, `${r.why || "strategy"} score ${p.item.score}`].concat(r.details);
      $("why-text").title = parts.join(" · ");
      const near = (r.neighbours || []).map((n) => `#${n.scan} ${n.label || "?"}`);
      $("why-details").textContent = near.length ? "Most similar labeled scans: " + near.join(", ") + "." : "";
      $("why-details").title = (r.neighbours || []).map((n) => `#${n.scan} similarity ${n.similarity}`).join(", ");
    }
    // suggestion; a scan unlike anything the model was trained on (novelty.ood) gets a
    // warning, and the suggestion is shown as not confident
    const list = $("top-classes");
    list.replaceChildren();
    const s = p.suggestion;
    const novelty = p.novelty;
    const ood = !!(novelty && novelty.ood);
    const warning = $("novelty-warning");
    warning.hidden = !ood;
    warning.textContent = ood ? (novelty.message || "This scan is unlike the scans the model was trained on.") : "";
    if (ood && typeof novelty.percentile === "number") warning.title = `novelty percentile ${novelty.percentile}`;
    else warning.removeAttribute("title");
    $("suggestion-card").classList.toggle("not-confident", ood && !!s);
    $("suggestion-caution").hidden = !(ood && s);
    $("model-notice").hidden = !(p.model_notice || p.blinded);
    $("model-notice").textContent = p.blinded || p.model_notice || "";
    if (s) {
      $("suggestion-text").textContent = (ood ? "not confident: " : "") + `${s.class_name} — ${(s.confidence * 100).toFixed(0)}% ${s.calibrated ? "(calibrated)" : "(not calibrated yet)"}`;
      $("suggestion-text").className = ood ? "not-confident" : "";
      $("suggestion-text").dataset.classId = s.class_id;
      for (const t of s.top) {
        const li = el("li");
        const bar = el("span", null, "bar");
        bar.style.width = Math.max(2, t.p * 100) + "%";
        li.append(el("span", t.name, "bar-label"), bar, el("span", (t.p * 100).toFixed(0) + "%", "muted"));
        list.append(li);
      }
    } else if (p.model_error) {
      // the model could not answer: say so in words (the reason is in the server log too)
      $("suggestion-text").textContent = `No suggestion: ${p.model_error}`;
      $("suggestion-text").className = "error";
    } else if (p.blinded) {
      $("suggestion-text").textContent = "Hidden for a blind reading.";
      $("suggestion-text").className = "muted";
    } else if (p.no_label_set) {
      // no set's classes apply: nothing to suggest, whatever model the project has
      $("suggestion-text").textContent = "No suggestion: no label set applies to this scan, so no class can be suggested for it (see below).";
      $("suggestion-text").className = "muted";
    } else if (p.model_version) {
      $("suggestion-text").textContent = `The model has not learned the ${p.scan.label_set || "this scan's"} classes yet: label scans of at least two of them.`;
      $("suggestion-text").className = "muted";
    } else {
      $("suggestion-text").textContent = "No model yet: the first one trains once a label set has labels of two classes.";
      $("suggestion-text").className = "muted";
    }
    $("label-set").textContent = p.no_label_set
      ? "No label set applies to this scan: an admin must assign its dataset to one."
      : (p.scan.label_set ? `Classes of ${p.scan.label_set}` : "");
    // findings (several per scan) or classes (one per scan)
    const findingsMode = !!p.findings_mode;
    $("findings-panel").hidden = !findingsMode;
    $("class-buttons").hidden = findingsMode;
    marks = {};
    if (findingsMode) {
      for (const f of p.findings) if (f.preselected) marks[f.id] = "present";
      renderFindings();
      if (p.findings_model) {
        $("suggestion-text").textContent = `Findings at or above their thresholds are preselected (${p.findings_model}).`;
        $("suggestion-text").className = "";
      } else if (!p.model_error) {
        $("suggestion-text").textContent = "No findings model yet: your first answers train one.";
        $("suggestion-text").className = "muted";
      }
      $("label-set").textContent = p.scan.label_set ? `Findings of ${p.scan.label_set}` : "";
    }
    const buttons = $("class-buttons");
    buttons.replaceChildren();
    for (const c of findingsMode ? [] : p.classes) {
      const b = el("button", null, "class-button");
      b.type = "button";
      b.dataset.classId = c.id;
      b.dataset.key = c.key;
      b.style.borderLeftColor = c.color;
      b.title = c.description || c.name;
      if (c.key) b.append(el("kbd", c.key), " ");
      b.append(c.name);
      if (s && !ood && s.class_id === c.id) b.classList.add("suggested");
      b.addEventListener("click", () => submit({outcome: "label", class_id: c.id}, c.name));
      buttons.append(b);
    }
    updateAnswering();
    // similar
    const similar = $("similar");
    similar.replaceChildren();
    if (p.similar_error) similar.append(el("p", p.similar_error, "warning"));
    else if (!p.similar.length) similar.append(el("p", "None yet (needs embeddings and labeled scans).", "muted"));
    for (const n of p.similar) {
      const a = el("a", null, "thumb");
      a.href = `/scans/${n.scan}/`;
      a.target = "_blank";
      const im = el("img");
      im.dataset.src = n.preview; im.alt = "scan " + n.scan;
      a.append(im, el("span", (n.labels.join(", ") || "?") + " · " + n.similarity));
      similar.append(a);
    }
    $("status").textContent = "";
    $("status").className = "muted";
    resetView();
    updateAnswering();
  }

  // --- whether the scan can be answered now, shown on the page ---------------------------
  function updateAnswering() {
    const state = saving ? "saving" : imageState;     // loading | ready | failed | saving
    document.body.dataset.answering = state;
    const open = state === "ready";
    for (const b of document.querySelectorAll("#class-buttons button, #findings-save, #no-finding, #unsure")) {
      b.disabled = !open;
    }
    $("skip").disabled = !(open || state === "failed");
    $("findings-list").classList.toggle("locked", !open);
    const note = $("image-note");
    note.hidden = imageState === "ready";
    note.className = "image-note " + imageState;
    note.setAttribute("role", imageState === "failed" ? "alert" : "status");
    note.textContent = imageState === "loading" ? "Loading the scan… answers wait until it is shown."
      : imageState === "failed" ? `This scan's image could not be loaded: ${imageProblem}. Answering is off for this scan (s skips it).` : "";
  }
  // Whether an answer (or a finding's mark) may be given now; if not, the page says why and
  // that the key was not used. A skip is allowed for a scan whose image failed.
  function mayAnswer(kind, label) {
    const what = label ? `"${label}" was not used` : "that was not used";
    if (saving === "answer") {
      say(`Still saving the last answer… ${what}: press it again once the next scan is shown.`, "error");
      return false;
    }
    if (saving === "undo") { say(`Still undoing your last answer… ${what}.`, "error"); return false; }
    if (imageState === "failed") {
      if (kind === "skip") return true;
      say(`This scan's image could not be loaded (${imageProblem}), so it cannot be answered: ${what}. Press s to skip it.`, "error");
      return false;
    }
    if (imageState !== "ready") {
      say(`The scan is still loading: ${what}. Answer once it is shown.`, "error");
      return false;
    }
    return true;
  }
  // Why an image did not load, in words: the server's own reason where it gave one.
  async function whyNotLoaded(url) {
    try {
      const response = await fetch(url, {credentials: "same-origin", cache: "no-store",
                                         headers: {Accept: "application/json"}});
      if (sessionEnded(response)) return "your session has ended: sign in again";
      if (response.ok) return "the file is not an image this browser can show";
      const type = response.headers.get("Content-Type") || "";
      let reason = "";
      if (type.includes("json")) {
        const data = await response.json().catch(() => ({}));
        reason = data.error || data.detail || "";
      } else if (type.startsWith("text/plain")) {
        reason = (await response.text()).trim();
      }
      reason = reason.replace(/[.\s]+$/, "").slice(0, 300);
      return reason ? `${reason} (the server answered ${response.status})` : `the server answered ${response.status}`;
    } catch (err) {
      return "the server could not be reached";
    }
  }

  function renderFindings() {
    const list = $("findings-list");
    list.replaceChildren();
    for (const f of payload.findings) {
      const li = el("li", null, "finding " + (marks[f.id] || "unmarked"));
      li.dataset.findingId = f.id;
      li.dataset.state = marks[f.id] || "absent";
      li.style.borderLeftColor = f.color;
      // a threshold above 1: the model cannot tell scans apart on this finding (a constant
      // head): never preselected, and said so rather than "≥100%"
      const never = f.threshold !== null && f.threshold !== undefined && f.threshold > 1;
      li.title = (f.description || f.name) + (never ? " · never preselected: the model cannot yet tell scans apart on it"
        : f.threshold !== null && f.threshold !== undefined ? ` · preselected at ${(f.threshold * 100).toFixed(0)}% and above` : "");
      if (f.key) li.append(el("kbd", f.key), " ");
      li.append(el("span", f.name, "finding-name"));
      li.append(el("span", marks[f.id] || "", "finding-state"));
      if (f.p !== null && f.p !== undefined) {
        const bar = el("span", null, "bar");
        bar.style.width = Math.max(2, f.p * 100) + "%";
        li.append(bar, el("span", never ? `${(f.p * 100).toFixed(0)}% (not learned yet)`
          : `${(f.p * 100).toFixed(0)}% (≥${(f.threshold * 100).toFixed(0)}%)`, "muted"));
      }
      li.addEventListener("click", () => toggleFinding(f.id, f.name));
      list.append(li);
    }
  }
  function toggleFinding(id, label) {
    if (!mayAnswer("answer", label)) return;
    const next = NEXT_MARK[marks[id]];
    if (next) marks[id] = next; else delete marks[id];
    renderFindings();
    // Grad-CAM follows the finding the reader is working on
    const f = payload.findings.find((k) => k.id === id);
    if (f && f.gradcam) {
      payload.gradcam = f.gradcam;
      $("toggle-cam").disabled = false;
      if (view.cam) $("cam-image").src = f.gradcam;
    }
  }
  function findingsAnswer(noFinding) {
    const scores = {};
    for (const f of payload.findings) if (f.p !== null && f.p !== undefined) scores[f.id] = f.p;
    const shown = {shown_model_version: payload.findings_model || "", shown_scores: scores};
    if (noFinding) return Object.assign({outcome: "findings", no_finding: true}, shown);
    const findings = {};
    for (const f of payload.findings) findings[f.id] = marks[f.id] || "absent";
    return Object.assign({outcome: "findings", findings: findings}, shown);
  }
  function saveFindings() {
    if (!mayAnswer("answer", "Enter")) return;
    if (!Object.keys(marks).length) {
      $("status").textContent = "Nothing is marked: press 0 to record \"no finding\".";
      $("status").className = "error";
      return;
    }
    submit(findingsAnswer(false), "Enter");
  }
  $("findings-save").addEventListener("click", saveFindings);
  $("no-finding").addEventListener("click", () => submit(findingsAnswer(true), "no finding"));

  // --- model status ----------------------------------------------------------------------
  const statusUrl = root.dataset.modelStatus;
  const POLL_MS = 2000;
  let pollTimer = null;
  let pollFailures = 0;
  let statusIssued = 0;      // each status request (a poll or an answer) gets a number, and
  let statusApplied = 0;     // an older "not updating" never overrides a newer status
  let watching = false;      // "Model updating…" is on screen: say what came of it after
  let baseline;              // newest finished classifier when the update started
  let lastSeen;              // newest finished classifier seen (undefined: not asked yet)

  function outcome(st, before) {
    const last = st.last, run = st.last_run;
    if (last && last.version !== before) {
      if (last.status === "active") return [`Model ${last.version} is now active`, "promoted"];
      if (last.status === "ready") {
        const reason = (last.reason || "").replace(/^not promoted:\s*/i, "") || "no reason given";
        const streak = st.held_back_in_a_row > 1 ? ` (${st.held_back_in_a_row} in a row)` : "";
        return [`${last.version} was held back: ${reason}${streak}`, "held-back"];
      }
      if (last.status === "failed") return [`${last.version} failed: ${last.reason || "see the run's log"}`, "failed"];
    }
    if (run && (run.status === "failed" || run.status === "abandoned")) {
      return [`Model update failed: ${run.error || run.status}`, "failed"];
    }
    return [st.model_version ? `Model update finished; ${st.model_version} stays active` : "Model update finished", ""];
  }

  function showModelStatus(st, seq) {
    if (!st || (!st.updating && seq < statusApplied)) return;
    statusApplied = Math.max(statusApplied, seq);
    medlabel.modelStatus = st;
    const line = $("model-status");
    const last = st.last ? st.last.version : null;
    if (st.updating) {
      if (!watching) baseline = lastSeen === undefined ? last : lastSeen;
      watching = true;
      const r = st.run;
      let detail = "";
      if (r) detail = r.status === "running" && r.progress > 0 ? ` (${r.kind}, ${Math.round(r.progress * 100)}%)` : ` (${r.kind}${r.status === "queued" ? ", queued" : ""})`;
      line.textContent = "Model updating…" + detail;
      line.className = "model-status updating";
      schedulePoll();
    } else {
      stopPolling();
      if (watching || (lastSeen !== undefined && last !== lastSeen)) {
        const [text, kind] = outcome(st, watching ? baseline : lastSeen);
        line.textContent = text;
        line.className = "model-status " + kind;
      }
      watching = false;
    }
    lastSeen = last;
  }

  function schedulePoll() {
    if (pollTimer === null && statusUrl) pollTimer = setTimeout(poll, POLL_MS);
  }
  function stopPolling() {
    if (pollTimer !== null) clearTimeout(pollTimer);
    pollTimer = null;
  }
  async function poll() {
    pollTimer = null;
    const seq = ++statusIssued;
    try {
      const response = await fetch(statusUrl, {credentials: "same-origin", cache: "no-store",
                                               headers: {Accept: "application/json"}});
      if (sessionEnded(response)) {
        saySignIn(response.status === 401 ? await response.json().catch(() => null) : null);
        return;
      }
      if (!response.ok) throw new Error(`server answered ${response.status}`);
      const st = await response.json();
      pollFailures = 0;
      showModelStatus(st, seq);
    } catch (err) {
      pollFailures += 1;
      if (pollFailures < 5) schedulePoll();    // a hiccup: try again; after 5, the next answer says
    }
  }

  // --- answering --------------------------------------------------------------------------
  // An answer in words, as the reader gave it.
  function describe(answer) {
    if (answer.outcome === "label") {
      const c = payload.classes.find((k) => k.id === answer.class_id);
      return c ? c.name : "that class";
    }
    if (answer.outcome === "findings") return answer.no_finding ? "no finding" : "these findings";
    return answer.outcome;
  }
  function note(text, cls) {
    $("answer-note").hidden = !text;
    $("answer-note").textContent = text || "";
    $("answer-note").className = cls || "info-line";
  }
  // The server has this scan's answer under this submission id, and it says something else
  // (never from this page's own retries, which send a new id for a new answer): say what is
  // stored, and offer to save what the reader pressed as their new answer.
  function offerChange(answer, data, label) {
    const status = $("status");
    status.replaceChildren();
    status.className = "error";
    status.append(`${data.error}. `);
    const change = el("button", `Save ${describe(answer)} instead`, "small");
    change.type = "button";
    change.id = "save-instead";
    change.addEventListener("click", () => {
      attempt = {key: JSON.stringify(answer), id: newId()};
      submit(answer, label);
    });
    status.append(change);
  }
  async function submit(answer, label) {
    if (!mayAnswer(answer.outcome === "skip" ? "skip" : "answer", label)) return;
    const key = JSON.stringify(answer);
    if (!attempt || attempt.key !== key) attempt = {key, id: newId()};
    // where the keyboard was (a button pressed with Enter): before the save disables it
    const focusWas = document.activeElement;
    saving = "answer";
    updateAnswering();
    note("");
    const started = performance.now();
    const s = payload.suggestion;
    const scanId = payload.scan.id;
    const body = Object.assign({
      duration_ms: imageState === "ready" ? Math.round(readingMs(started)) : "",   // active time on screen
      shown_model_version: s ? s.model_version : "",
      shown_suggestion: s ? s.class_id : "",
      shown_confidence: s ? s.confidence : "",
      shown_acquisition_score: payload.item ? payload.item.score : "",
      query_round: payload.item ? payload.item.round : "",
      submission_id: attempt.id,
    }, answer);
    say("saving…");
    const statusSeq = ++statusIssued;
    let saved = false;
    try {
      const response = await fetch(payload.scan.answer, {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRFToken": csrf(), Accept: "application/json"},
        body: JSON.stringify(body),
      });
      const data = await response.json().catch(() => ({error: `server answered ${response.status}`, unread: true}));
      if (sessionEnded(response)) { saySignIn(response.status === 401 ? data : null); return; }
      // a refused security check (CSRF), or a 403 that is not the view's JSON: the request
      // never reached the answer, so it was not saved, and pressing again cannot fix it
      if (response.status === 403 && (data.csrf || data.unread)) { sayReload(`Your answer (${describe(answer)}) was NOT saved`, data); return; }
      if (!response.ok) {
        if (data.code === "submission_conflict" && data.stored) offerChange(answer, data, label);
        else if (data.unread || response.status >= 500) {
          // the answer may have been stored before the error: pressing the same answer
          // again sends the same submission id (stored once); another one is a new answer
          say(`${data.error || `server answered ${response.status}`}: your answer (${describe(answer)}) may or may not have been saved. Press it again (it is never stored twice), or press another answer: that one is saved as yours.`, "error");
        } else {
          say(data.error || `could not save (${response.status})`, "error");
        }
        return;
      }
      saved = true;
      medlabel.saved += 1;
      answered.push({id: data.saved.id, url: payload.scan.url});
      updateHistoryButtons();
      medlabel.lastServerMs = data.server_ms;
      medlabel.lastUpdating = !!(data.model_status && data.model_status.updating);
      showModelStatus(data.model_status, statusSeq);
      saving = null;
      $("status").className = "muted";
      if (queued) return;                // undo / back, pressed during the save: below
      if (data.next) {
        history.replaceState({}, "", data.next.scan.url);
        render(data.next, started);
        // said in the status line (a polite live region): what was saved, and the scan now
        // shown; the round was done: the model chose the next batch, and this scan is its first
        say(`Saved ${data.saved.words || describe(answer)} on #${scanId}; now reading #${data.next.scan.id}.` +
            (data.new_round ? " Round done: the model chose the next batch." : ""));
        keepFocus(focusWas);
        const words = [];
        if (!data.saved.created) words.push(`Saved: ${data.saved.words} on scan #${scanId} (the earlier request had reached the server).`);
        else if (data.replaced) words.push(`Saved ${data.saved.words} on scan #${scanId}: it replaces your earlier answer there (${data.replaced.words}).`);
        if (data.too_quick) words.push(data.too_quick);
        note(words.join(" "), data.too_quick ? "warning-banner" : "info-line");
      } else {
        say(`Saved ${data.saved.words || describe(answer)} on #${scanId}; no scans left: going to the worklist.`);
        leave(data.worklist);
      }
    } catch (err) {
      say(`network error: your answer (${describe(answer)}) may or may not have reached the server. Press it again (it is never stored twice), or press another answer: that one is saved as yours.`, "error");
    } finally {
      if (saving === "answer") saving = null;
      updateAnswering();
      const then = queued;
      queued = null;
      if (then && saved) {
        if (then === "undo") undoLast(); else goBack();
      } else if (then) {
        $("status").append(` ${then === "undo" ? "The undo" : "Going to the previous scan"} you asked for during the save was not done: the answer was not saved.`);
      }
    }
  }
  // After an answer the next scan is drawn: a focused control that is gone (the class button
  // pressed) or was disabled meanwhile leaves the keyboard on the page's body. Focus goes back
  // to that control where it still exists, else to the viewer (the new scan); focus that is
  // still on something is left where it is.
  function keepFocus(was) {
    if (!was || was === document.body || was === document.documentElement) return;
    const now = document.activeElement;
    if (now && now !== document.body && now !== document.documentElement && !now.disabled) return;
    if (was.isConnected && !was.disabled && !was.closest("[hidden]")) was.focus();
    else $("viewport").focus({preventScroll: true});
  }
  // The security check refused the request (the CSRF cookie missing or expired): nothing was
  // saved, and only a reload (which sets the cookie again) lets answers through.
  function sayReload(what, data) {
    const status = $("status");
    status.replaceChildren();
    status.className = "error";
    const why = data && data.csrf && data.error ? ` (${data.error.replace(/[.\s]+$/, "")})` : "";
    status.append(`${what}: the page's security cookie is missing or expired${why}. Reload the page, then answer again.`, " ");
    const reload = el("button", "Reload the page", "small");
    reload.type = "button";
    reload.id = "reload-page";
    reload.addEventListener("click", () => location.reload());
    status.append(reload);
  }
  $("skip").addEventListener("click", () => submit({outcome: "skip"}, "skip"));
  $("unsure").addEventListener("click", () => submit({outcome: "unsure"}, "unsure"));
  // a page left while an answer is in flight: the browser asks first
  window.addEventListener("beforeunload", (e) => {
    if (!saving) return;
    e.preventDefault();
    e.returnValue = "";
  });

  function keyHelp() {
    const answers = payload.findings_mode
      ? "finding keys toggle present / uncertain, Enter saves, 0 no finding"
      : (payload.classes.filter((c) => c.key).map((c) => c.key).join(" ") || "no class keys") + " answer";
    const slices = (payload.scan.frames || 1) > 1 ? ", ↑ ↓ PageUp PageDown or the wheel: slices (Ctrl + wheel zooms)" : "";
    const windows = payload.scan.window ? ", [ ] window width, { } window level" : "";
    return `${answers}; s skip, u unsure, g heat map, c compare with similar scans, i invert, n 1:1, r reset, + − zoom${windows}${slices}, ← previous scan, Backspace undo; ` +
      "on the focused viewer (Tab to it), zoomed in: arrows pan (Shift: finer); Esc on a slider or list: back to these keys";
  }
  // The viewer's name for screen readers: what it does from the keyboard and with the mouse.
  function viewerLabel() {
    const windows = payload.scan.window ? "; [ and ] window width, { and } window level" : "";
    const slices = (payload.scan.frames || 1) > 1 ? "; PageUp and PageDown slices (↑ ↓ too at fit)" : "";
    return "Scan viewer. Keys when focused: + and − zoom, arrows pan once zoomed in (Shift: finer)" +
      `${windows}${slices}. Mouse: drag to pan, wheel to zoom` +
      ((payload.scan.frames || 1) > 1 ? " (slices in a series; Ctrl + wheel zooms)" : "") +
      (payload.scan.window ? ", right-drag to change the window" : "") + ".";
  }
  // Single-key shortcuts can be turned off (WCAG 2.1.4, e.g. for speech input, where a spoken
  // word would press its letters): then only buttons and controls take keys, and the focused
  // viewer its own (zoom, pan, window), which act only while it has focus. Kept per browser.
  const SHORTCUTS = "medlabel.shortcuts";
  let shortcuts = true;
  try { shortcuts = localStorage.getItem(SHORTCUTS) !== "off"; } catch (err) { /* storage off: on */ }
  $("shortcuts").checked = shortcuts;
  $("shortcuts").addEventListener("change", (e) => {
    shortcuts = e.target.checked;
    try { localStorage.setItem(SHORTCUTS, shortcuts ? "on" : "off"); } catch (err) { /* this visit only */ }
    say(shortcuts ? "Single-key shortcuts are on." : "Single-key shortcuts are off: use the buttons (Tab, then Enter or Space).");
  });
  // the keys a focused slider keeps for itself, held down too
  const SLIDER_KEYS = new Set(["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End"]);
  // the focused viewer's own keys, which work with single-key shortcuts off too
  const VIEWER_KEYS = new Set(["+", "=", "-", "[", "]", "{", "}"]);
  // held down, only these repeat (zoom, slices, window, panning); a held answer key answers once
  const REPEATS = new Set(["ArrowUp", "ArrowDown", "PageUp", "PageDown", "+", "=", "-", "[", "]", "{", "}"]);
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const target = e.target;
    // Escape on a control hands the keyboard back to the page
    const control = target.closest("input, select, textarea, button, a");
    if (e.key === "Escape" && control) { e.preventDefault(); control.blur(); return; }
    // a text field or a list keeps its keys; a slider keeps its own (arrows, PageUp/PageDown,
    // Home/End) and a checkbox Space, and they leave the letters to the page
    if (target.closest("input:not([type=range]):not([type=checkbox]), textarea, select")) return;
    if (target.closest("input[type=range]") && SLIDER_KEYS.has(e.key)) return;
    const onViewer = target === $("viewport");
    if (onViewer && e.key.startsWith("Arrow") && view.scale > 1) { e.preventDefault(); panKey(e.key, e.shiftKey); return; }
    if (e.repeat && !REPEATS.has(e.key)) {
      e.preventDefault();      // (a held Enter on a focused button would press it again too)
      return;
    }
    // Enter or Space on a focused button presses it (keyboard-only use), Space ticks a
    // checkbox; any other key on a slider, checkbox or button is a hotkey for the page
    if (target.closest("button, a") && (e.key === "Enter" || e.key === " ")) return;
    if (target.closest("input[type=checkbox]") && e.key === " ") return;
    if (!shortcuts && !(onViewer && VIEWER_KEYS.has(e.key))) return;
    if (e.key === "ArrowLeft") { e.preventDefault(); goBack(); return; }
    if (e.key === "Backspace") { e.preventDefault(); undoLast(); return; }
    if (e.key === "ArrowDown" || e.key === "PageDown") { e.preventDefault(); stepSlice(1); return; }
    if (e.key === "ArrowUp" || e.key === "PageUp") { e.preventDefault(); stepSlice(-1); return; }
    if (windowKey(e.key)) { e.preventDefault(); return; }
    const key = e.key.toLowerCase();
    if (payload.findings_mode) {
      const f = payload.findings.find((k) => k.key && k.key === key);
      if (f) { e.preventDefault(); toggleFinding(f.id, f.key); return; }
      if (key === "enter") { e.preventDefault(); saveFindings(); return; }
      if (key === "0") { e.preventDefault(); submit(findingsAnswer(true), "0"); return; }
    }
    const c = payload.findings_mode ? null : payload.classes.find((k) => k.key && k.key === key);
    if (c) { e.preventDefault(); submit({outcome: "label", class_id: c.id}, c.key); return; }
    if (key === "s") submit({outcome: "skip"}, "s");
    else if (key === "u") submit({outcome: "unsure"}, "u");
    else if (key === "i") $("invert").click();
    else if (key === "g") $("toggle-cam").click();
    else if (key === "r") resetView();
    else if (key === "n") zoomNative();
    else if (key === "c") compareNext();
    else if (e.key === "Escape") compareEnd();
    else if (key === "+" || key === "=") zoom(1.25);
    else if (key === "-") zoom(1 / 1.25);
    else if (key === "?" || key === "h") say("Keys: " + keyHelp() + ".");
    else if (e.key.length === 1 && e.key !== " ") {
      // a key that does nothing says so, and what would work
      say(`"${e.key}" does nothing here. Keys: ${keyHelp()}.`, "error");
    }
  });

  render(payload);
  if (statusUrl) poll();     // a refit may already be running (another reader's answers)
})();
