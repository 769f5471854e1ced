// Live progress of a project's background jobs (pretrain, embed, refit, retrain).
(function () {
  "use strict";
  const panel = document.getElementById("jobs");
  if (!panel) return;
  const rows = document.getElementById("job-rows");
  const text = (tag, value, cls) => {
    const el = document.createElement(tag);
    el.textContent = value;
    if (cls) el.className = cls;
    return el;
  };
  function render(data) {
    document.getElementById("active-model").textContent = data.active_model || "none yet";
    document.getElementById("active-encoder").textContent = data.active_encoder || "none yet";
    rows.replaceChildren();
    if (!data.runs.length) {
      const tr = document.createElement("tr");
      const td = text("td", "No jobs yet.", "muted");
      td.colSpan = 4;
      tr.append(td);
      rows.append(tr);
    }
    for (const run of data.runs) {
      const tr = document.createElement("tr");
      tr.className = "job-" + run.status;
      tr.append(text("td", run.kind + " #" + run.id));
      const status = text("td", run.status + " ");
      if (run.error) status.append(text("span", run.error.slice(0, 80), "error"));
      tr.append(status);
      const cell = document.createElement("td");
      const bar = document.createElement("progress");
      bar.max = 1;
      bar.value = run.progress;
      cell.append(bar, " " + Math.round(run.progress * 100) + "%");
      tr.append(cell, text("td", run.model_version || ""));
      rows.append(tr);
    }
  }
  async function poll() {
    let delay = 10000;
    try {
      const response = await fetch(panel.dataset.url, {headers: {Accept: "application/json"}});
      if (response.ok) {
        const data = await response.json();
        render(data);
        if (data.busy) delay = 2000;
      }
    } catch (err) { /* offline for a moment: try again later */ }
    setTimeout(poll, delay);
  }
  setTimeout(poll, 1500);
})();
