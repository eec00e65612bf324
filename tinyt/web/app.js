// tinyt's translation page: plain JavaScript, no framework, no build step, nothing fetched
// from anywhere but the server that serves it (GET /api/models, POST /api/translate,
// POST /api/attention).
"use strict";

(() => {
  const DEBOUNCE_MS = 300;
  const MAX_NBEST = 16;
  const WORD_START = "\u2581"; // SentencePiece's mark of a piece that starts a word

  const $ = (id) => document.getElementById(id);
  const el = {
    error: $("error"), pairStatic: $("pair-static"), pairLabel: $("pair-select-label"),
    pair: $("pair"), swap: $("swap"), source: $("source"), sourceLabel: $("source-label"),
    charCount: $("char-count"), beam: $("beam"), nbest: $("nbest"), lp: $("length-penalty"),
    apiKeyField: $("api-key-field"), apiKey: $("api-key"), clear: $("clear"),
    translate: $("translate"), targetHeading: $("target-heading"), status: $("status"),
    output: $("output"), placeholder: $("output-placeholder"),
    altBox: $("alternatives-box"), alts: $("alternatives"), chosenNote: $("chosen-note"),
    copy: $("copy"), copyLabel: $("copy-label"),
    attToggle: $("attention-toggle"), attNote: $("attention-note"), attBody: $("attention-body"),
    lineField: $("line-field"), line: $("attention-line"), layer: $("layer"), head: $("head"),
    units: $("units"), attStatus: $("attention-status"), heatmap: $("heatmap"),
    modelInfo: $("model-info"),
  };

  const state = {
    models: [],
    limits: {},
    model: null,
    result: null,        // {q, hypotheses, beam, lengthPenalty}
    chosen: 0,
    attentionOpen: false,
    attention: null,     // the /api/attention answer shown
    attentionCache: new Map(),
  };

  // -- small helpers ---------------------------------------------------------------------------

  const store = {
    get(key) { try { return localStorage.getItem("tinyt." + key); } catch { return null; } },
    set(key, value) {
      try {
        if (value === null || value === "") localStorage.removeItem("tinyt." + key);
        else localStorage.setItem("tinyt." + key, value);
      } catch { /* storage switched off: settings are not remembered */ }
    },
  };

  const codePoints = (text) => Array.from(text).length; // the server counts characters so
  const splitLines = (text) => text.replace(/\r\n?/g, "\n").split("\n");
  const formatScore = (score) => (score < 0 ? "\u2212" : "") + Math.abs(score).toFixed(3);
  const pairName = (m) => `${m.source_name} \u2192 ${m.target_name}`;

  class RequestError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  async function api(path, body, signal) {
    let response;
    try {
      response = await fetch(path, body === undefined ? { signal } : {
        method: "POST", signal, headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new RequestError("The server cannot be reached: check that tinyt serve is still " +
                             "running, then try again.", 0);
    }
    let data = null;
    try { data = await response.json(); } catch { /* not JSON: named below */ }
    if (!response.ok) {
      const message = data && typeof data.error === "string" ? data.error
        : `The server answered ${response.status} ${response.statusText || ""}`.trim() + ".";
      throw new RequestError(message, response.status);
    }
    if (data === null) throw new RequestError("The server's answer was not JSON.", response.status);
    return data;
  }

  function showError(message) {
    el.error.textContent = "";
    if (!message) { el.error.classList.remove("visible"); return; }
    const strong = document.createElement("strong");
    strong.textContent = "Error: ";
    const text = document.createElement("span");
    text.className = "alert-text";
    text.textContent = message;
    el.error.append(strong, text);
    el.error.classList.add("visible");
  }

  // -- models and settings ---------------------------------------------------------------------

  async function loadModels() {
    let data;
    try {
      data = await api("/api/models");
    } catch (err) {
      showError(err.message + " Reload the page once it is up.");
      el.modelInfo.textContent = "No model information: the server did not answer.";
      return;
    }
    state.models = data.models || [];
    state.limits = data.limits || {};
    if (!state.models.length) { showError("This server serves no model."); return; }

    el.pair.textContent = "";
    for (const m of state.models) {
      const option = new Option(pairName(m), m.id);
      el.pair.add(option);
    }
    const several = state.models.length > 1;
    el.pairLabel.hidden = !several;
    el.pairStatic.hidden = several;

    if (state.limits.api_key_required) {
      el.apiKeyField.hidden = false;
      el.apiKey.value = store.get("apiKey") || "";
    }
    const nbest = Number(store.get("nbest"));
    if (Number.isInteger(nbest) && nbest >= 1 && nbest <= MAX_NBEST) el.nbest.value = nbest;

    const remembered = state.models.find((m) => m.id === store.get("pair"));
    selectModel(remembered || state.models[0], false);
    if (store.get("attention") === "open" && state.model.attention) setAttentionOpen(true);
    updateCount();
    if (el.source.value.trim()) translateNow();
  }

  function reverseOf(model) {
    return state.models.find((m) => m.source === model.target && m.target === model.source);
  }

  function selectModel(model, translate = true) {
    state.model = model;
    el.pair.value = model.id;
    el.pairStatic.textContent = pairName(model);
    el.swap.hidden = !reverseOf(model);
    el.sourceLabel.textContent = model.source_name;
    el.targetHeading.textContent = model.target_name;
    el.source.lang = model.source;
    el.output.lang = model.target;
    document.title = `tinyt \u00b7 ${pairName(model)}`;
    store.set("pair", state.models.length > 1 ? model.id : null);

    // The largest beam a request may ask for: the server's --max-beam (older servers: the
    // model's own bound); the beam grows to the number of alternatives asked for.
    const maxBeam = state.limits.max_beam || model.max_beam_size || 100;
    el.beam.max = Math.max(maxBeam, model.beam_size);  // the model's own beam is always allowed
    el.beam.value = model.beam_size;
    el.beam.placeholder = String(model.beam_size);
    el.nbest.max = Math.min(MAX_NBEST, maxBeam);
    if (Number(el.nbest.value) > Number(el.nbest.max)) el.nbest.value = el.nbest.max;
    el.lp.value = model.length_penalty;
    el.lp.placeholder = String(model.length_penalty);

    const facts = [
      `${model.id}`, model.engine,
      model.step != null ? `step ${model.step.toLocaleString("en")}` : null,
      model.parameters ? `${model.parameters.toLocaleString("en")} parameters` : null,
      model.layers && model.heads ? `${model.layers} layers \u00d7 ${model.heads} heads` : null,
      `beam ${model.beam_size}`, `length penalty ${model.length_penalty}`,
    ].filter(Boolean);
    el.modelInfo.textContent = "";
    const strong = document.createElement("strong");
    strong.textContent = facts.join(" \u00b7 ");
    const path = document.createElement("code");
    path.textContent = model.path;
    path.title = model.path;
    el.modelInfo.append(strong, document.createElement("br"), path);

    updateAttentionAvailability();
    state.attentionCache.clear();
    clearResult();
    if (translate && el.source.value.trim()) translateNow();
  }

  function settingsError() {
    const checks = [
      [el.beam, `Beam size must be a whole number from 1 to ${el.beam.max}.`],
      [el.nbest, `Alternatives must be a whole number from 1 to ${el.nbest.max}.`],
      [el.lp, "Length penalty must be a number from 0 to 10."],
    ];
    for (const [input, message] of checks) {
      const v = input.validity;
      // a length penalty between the arrows' 0.1 steps (0.65) is fine; a beam of 2.5 is not
      if (v.badInput || v.rangeUnderflow || v.rangeOverflow ||
          (v.stepMismatch && input !== el.lp)) return message;
    }
    return null;
  }

  function requestSettings() {
    const body = { nbest: el.nbest.value === "" ? 1 : Number(el.nbest.value) };
    // the model's own beam is left to the server (it may be over --max-beam, which bounds
    // only what requests ask for)
    if (el.beam.value !== "" && Number(el.beam.value) !== state.model.beam_size) {
      body.beam = Number(el.beam.value);
    }
    if (el.lp.value !== "") body.length_penalty = Number(el.lp.value);
    if (state.limits.api_key_required) body.api_key = el.apiKey.value;
    return body;
  }

  function updateCount() {
    const count = codePoints(el.source.value);
    const limit = state.limits.char_limit;
    el.charCount.textContent = limit ? `${count.toLocaleString("en")} / ${limit.toLocaleString("en")}`
                                     : count.toLocaleString("en");
    el.charCount.classList.toggle("over", Boolean(limit && count > limit));
  }

  // -- translation -----------------------------------------------------------------------------

  let debounceTimer = 0;
  let translateSeq = 0;            // the newest request; an older answer is dropped
  let translateAbort = null;

  function scheduleTranslate() {
    clearTimeout(debounceTimer);
    debounceTimer = setTimeout(translateNow, DEBOUNCE_MS);
  }

  function cancelTranslate() {
    clearTimeout(debounceTimer);
    translateSeq += 1;
    if (translateAbort) translateAbort.abort();
    translateAbort = null;
  }

  async function translateNow() {
    clearTimeout(debounceTimer);
    if (!state.model) return;
    const q = el.source.value;
    if (!q.trim()) {
      cancelTranslate();
      clearResult();
      showError(null);
      return;
    }
    const invalid = settingsError();
    if (invalid) { cancelTranslate(); clearResult(); showError(invalid); return; }

    const seq = ++translateSeq;
    if (translateAbort) translateAbort.abort();
    const abort = new AbortController();
    translateAbort = abort;
    const settings = requestSettings();
    const body = { q, source: state.model.source, target: state.model.target, ...settings };
    setPending(true);
    const started = performance.now();
    try {
      const data = await api("/api/translate", body, abort.signal);
      if (seq !== translateSeq) return;
      const hypotheses = (data.results && data.results[0] && data.results[0].hypotheses) || [];
      state.result = { q, hypotheses, beam: data.beam, lengthPenalty: data.length_penalty,
                       ms: Math.round(performance.now() - started) };
      state.chosen = 0;
      showError(null);
      renderResult();
    } catch (err) {
      if (seq !== translateSeq || (err && err.name === "AbortError")) return;
      clearResult();
      showError(err.message || String(err));
    } finally {
      if (seq === translateSeq) { setPending(false); translateAbort = null; }
    }
  }

  function setPending(pending) {
    el.output.classList.toggle("pending", pending);
    el.output.closest(".panel").setAttribute("aria-busy", pending ? "true" : "false");
    if (pending) {
      el.status.innerHTML = '<span class="spinner" aria-hidden="true"></span>Translating\u2026';
    }
  }

  function clearResult() {
    state.result = null;
    state.chosen = 0;
    state.attention = null;
    setPending(false);
    el.output.textContent = "";
    el.output.dataset.state = "empty";
    el.placeholder.hidden = false;
    el.status.textContent = "";
    el.alts.textContent = "";
    el.altBox.hidden = true;
    el.chosenNote.textContent = "";
    el.copy.disabled = true;
    renderAttention();
  }

  function renderResult() {
    const result = state.result;
    el.alts.textContent = "";
    result.hypotheses.forEach((hyp, i) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "alt";
      button.dataset.testid = "alternative";
      button.dataset.index = String(i);
      button.dataset.score = String(hyp.score);
      const rank = document.createElement("span");
      rank.className = "alt-rank";
      rank.textContent = String(i + 1);
      const text = document.createElement("span");
      text.className = "alt-text";
      text.dataset.testid = "alternative-text";
      text.lang = state.model.target;
      text.textContent = hyp.text;
      const score = document.createElement("span");
      score.className = "alt-score";
      score.dataset.testid = "alternative-score";
      score.title = "score: log-probability / length ** length penalty";
      score.textContent = formatScore(hyp.score);
      button.append(rank, text, score);
      button.addEventListener("click", () => choose(i));
      li.append(button);
      el.alts.append(li);
    });
    el.altBox.hidden = result.hypotheses.length < 2;
    const beamNote = `beam ${result.beam}`;
    el.status.textContent = `${beamNote} \u00b7 ${result.ms.toLocaleString("en")} ms`;
    el.status.title = `length penalty ${result.lengthPenalty}`;
    choose(0, false);
  }

  function choose(index, focus = false) {
    const result = state.result;
    if (!result || !result.hypotheses[index]) return;
    state.chosen = index;
    const hyp = result.hypotheses[index];
    el.output.textContent = hyp.text;
    el.output.dataset.state = "ready";
    el.output.dataset.index = String(index);
    el.placeholder.hidden = true;
    el.copy.disabled = false;
    for (const button of el.alts.querySelectorAll(".alt")) {
      const chosen = Number(button.dataset.index) === index;
      button.setAttribute("aria-pressed", chosen ? "true" : "false");
      button.classList.toggle("chosen", chosen);
    }
    const n = result.hypotheses.length;
    el.chosenNote.textContent = n < 2 ? `score ${formatScore(hyp.score)}`
      : index === 0 ? `Best of ${n} \u00b7 score ${formatScore(hyp.score)}`
        : `Alternative ${index + 1} of ${n} \u00b7 score ${formatScore(hyp.score)}`;
    if (focus) el.output.focus();
    renderAttention();
  }

  // -- copy ------------------------------------------------------------------------------------

  let copyTimer = 0;
  async function copyOutput() {
    const text = el.output.textContent;
    if (!text) return;
    let copied = false;
    try {
      await navigator.clipboard.writeText(text);
      copied = true;
    } catch {
      // no clipboard API (a page served over plain http to another machine): the old way
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.append(area);
      area.select();
      try { copied = document.execCommand("copy"); } catch { copied = false; }
      area.remove();
    }
    el.copyLabel.textContent = copied ? "Copied" : "Copy failed";
    el.copy.classList.toggle("done", copied);
    clearTimeout(copyTimer);
    copyTimer = setTimeout(() => {
      el.copyLabel.textContent = "Copy";
      el.copy.classList.remove("done");
    }, 1600);
  }

  // -- attention -------------------------------------------------------------------------------

  let attentionSeq = 0;
  let attentionAbort = null;

  function updateAttentionAvailability() {
    const model = state.model;
    if (model && !model.attention) {
      el.attToggle.hidden = true;
      el.attBody.hidden = true;
      el.attNote.hidden = false;
      el.attNote.textContent = `The ${pairName(model)} model is served by ${model.engine}, ` +
        "which gives no attention weights. Serve the run or bundle it was made from " +
        "(tinyt serve --run \u2026) to see them.";
    } else {
      el.attToggle.hidden = false;
      el.attNote.hidden = true;
      el.attBody.hidden = !state.attentionOpen;
    }
  }

  function setAttentionOpen(open) {
    state.attentionOpen = open;
    store.set("attention", open ? "open" : null);
    el.attToggle.setAttribute("aria-expanded", open ? "true" : "false");
    el.attToggle.textContent = open ? "Hide attention" : "Show attention";
    updateAttentionAvailability();
    renderAttention();
  }

  // The sentence whose attention is shown: the source line and its line of the chosen
  // hypothesis (a multi-line text is translated a line at a time; the lines stay aligned).
  function attentionTarget() {
    const result = state.result;
    if (!result) return null;
    const sources = splitLines(result.q);
    const translations = splitLines(result.hypotheses[state.chosen].text);
    const usable = sources.map((s, i) => i).filter((i) => sources[i].trim());
    if (!usable.length) return null;

    const previous = el.line.value;
    el.line.textContent = "";
    for (const i of usable) {
      const label = sources[i].length > 48 ? sources[i].slice(0, 47) + "\u2026" : sources[i];
      el.line.add(new Option(`${i + 1}: ${label}`, String(i)));
    }
    el.line.value = usable.map(String).includes(previous) ? previous : String(usable[0]);
    el.lineField.hidden = usable.length < 2;
    const i = Number(el.line.value);
    return { q: sources[i], translation: translations[i] || "" };
  }

  async function renderAttention() {
    if (!state.attentionOpen || !state.model || !state.model.attention) return;
    const target = attentionTarget();
    if (!target) {
      attentionSeq += 1;
      state.attention = null;
      el.heatmap.textContent = "";
      el.attStatus.textContent = "Translate a sentence to see where its translation looked.";
      return;
    }
    const settings = requestSettings();
    const body = { q: target.q, source: state.model.source, target: state.model.target };
    if (target.translation) body.translation = target.translation;
    if (settings.beam !== undefined) body.beam = Math.max(settings.beam, 1);
    if (settings.length_penalty !== undefined) body.length_penalty = settings.length_penalty;
    if (settings.api_key !== undefined) body.api_key = settings.api_key;
    const key = JSON.stringify([state.model.id, body.q, body.translation || null,
                                body.translation ? null : body.beam,
                                body.translation ? null : body.length_penalty]);
    const seq = ++attentionSeq;
    if (attentionAbort) attentionAbort.abort();
    attentionAbort = null;

    let data = state.attentionCache.get(key);
    if (!data) {
      const abort = new AbortController();
      attentionAbort = abort;
      el.attStatus.innerHTML = '<span class="spinner" aria-hidden="true"></span>' +
                               "Reading the attention\u2026";
      el.heatmap.classList.add("pending");
      try {
        data = await api("/api/attention", body, abort.signal);
      } catch (err) {
        if (seq !== attentionSeq || (err && err.name === "AbortError")) return;
        el.heatmap.classList.remove("pending");
        el.heatmap.textContent = "";
        el.attStatus.textContent = "No attention to show.";
        showError(err.message || String(err));
        return;
      }
      if (seq !== attentionSeq) return;
      attentionAbort = null;
      state.attentionCache.set(key, data);
      if (state.attentionCache.size > 64) {
        state.attentionCache.delete(state.attentionCache.keys().next().value);
      }
    }
    state.attention = data;
    el.heatmap.classList.remove("pending");
    fillLayerHead(data.layers, data.heads);
    drawHeatmap();
  }

  function fillLayerHead(layers, heads) {
    const fill = (select, count, noun, avgLabel, fallback) => {
      const wanted = select.value || fallback;
      if (select.options.length !== count + 1) {
        select.textContent = "";
        for (let i = 0; i < count; i++) select.add(new Option(`${noun} ${i + 1}`, String(i)));
        select.add(new Option(avgLabel, "avg"));
      }
      const values = Array.from(select.options, (o) => o.value);
      select.value = values.includes(wanted) ? wanted : fallback;
    };
    fill(el.layer, layers, "Layer", "Average of layers", String(layers - 1));
    fill(el.head, heads, "Head", "Average of heads", "avg");
  }

  // cross[layer][head] (rows: target pieces, columns: source pieces) for the selects' choice.
  function chosenMatrix(data) {
    const layers = el.layer.value === "avg" ? data.cross.map((_, i) => i) : [Number(el.layer.value)];
    const heads = el.head.value === "avg" ? data.cross[0].map((_, i) => i) : [Number(el.head.value)];
    if (layers.length === 1 && heads.length === 1) return data.cross[layers[0]][heads[0]];
    const rows = data.target_pieces.length;
    const cols = data.source_pieces.length;
    const out = Array.from({ length: rows }, () => new Array(cols).fill(0));
    for (const l of layers) {
      for (const h of heads) {
        const m = data.cross[l][h];
        for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) out[i][j] += m[i][j];
      }
    }
    const n = layers.length * heads.length;
    return out.map((row) => row.map((v) => Math.round((v / n) * 1e4) / 1e4));
  }

  // Words: a source word's weight is the sum over its pieces (rows still sum to 1), a target
  // word's row the mean of its pieces' rows.
  function groupWords(matrix, sourcePieces, targetPieces, sourceWords, targetWords) {
    const join = (pieces, words) => {
      const labels = [];
      pieces.forEach((p, i) => {
        const text = p === "</s>" ? p : p.replaceAll(WORD_START, "");
        labels[words[i]] = (labels[words[i]] || "") + text;
      });
      return labels.map((label) => label || WORD_START);
    };
    const srcLabels = join(sourcePieces, sourceWords);
    const tgtLabels = join(targetPieces, targetWords);
    const out = tgtLabels.map(() => new Array(srcLabels.length).fill(0));
    const counts = new Array(tgtLabels.length).fill(0);
    matrix.forEach((row, i) => {
      counts[targetWords[i]] += 1;
      row.forEach((v, j) => { out[targetWords[i]][sourceWords[j]] += v; });
    });
    return {
      matrix: out.map((row, w) => row.map((v) => Math.round((v / counts[w]) * 1e4) / 1e4)),
      sourceLabels: srcLabels, targetLabels: tgtLabels,
    };
  }

  function pieceLabel(cell, piece, plain) {
    cell.dataset.piece = piece;
    if (plain) { cell.textContent = piece; return; }
    if (piece === "</s>") {
      cell.textContent = piece;
      cell.classList.add("eos");
      cell.title = "end of sentence";
      return;
    }
    if (piece.startsWith(WORD_START)) {
      const mark = document.createElement("span");
      mark.className = "ws";
      mark.textContent = WORD_START;
      mark.setAttribute("aria-hidden", "true");
      cell.append(mark, piece.slice(1));
      cell.title = `${piece} (starts a word)`;
    } else {
      cell.textContent = piece;
      cell.title = `${piece} (continues a word)`;
    }
  }

  function drawHeatmap() {
    const data = state.attention;
    const table = el.heatmap;
    table.textContent = "";
    if (!data) return;
    let matrix = chosenMatrix(data);
    let sourceLabels = data.source_pieces;
    let targetLabels = data.target_pieces;
    const words = el.units.value === "words";
    if (words) {
      ({ matrix, sourceLabels, targetLabels } = groupWords(
        matrix, data.source_pieces, data.target_pieces, data.source_words, data.target_words));
    }
    const layerText = el.layer.value === "avg" ? "average of layers"
      : `layer ${Number(el.layer.value) + 1}`;
    const headText = el.head.value === "avg" ? "average of heads"
      : `head ${Number(el.head.value) + 1}`;

    const caption = document.createElement("caption");
    caption.className = "sr-only";
    caption.textContent = `Cross-attention, ${layerText}, ${headText}: rows are the ` +
      `translation's ${words ? "words" : "pieces"}, columns the source's.`;
    table.append(caption);

    const thead = document.createElement("thead");
    const headRow = document.createElement("tr");
    const corner = document.createElement("th");
    corner.className = "corner";
    corner.innerHTML = '<span class="corner-src">source \u2192</span>' +
                       '<span class="corner-tgt">\u2193 translation</span>';
    headRow.append(corner);
    sourceLabels.forEach((label, j) => {
      const th = document.createElement("th");
      th.scope = "col";
      th.className = "col";
      th.dataset.testid = "heatmap-col";
      th.dataset.col = String(j);
      const inner = document.createElement("span");
      inner.className = "col-label";
      pieceLabel(inner, label, words);
      th.dataset.piece = label;
      th.append(inner);
      headRow.append(th);
    });
    thead.append(headRow);

    const tbody = document.createElement("tbody");
    matrix.forEach((row, i) => {
      const tr = document.createElement("tr");
      tr.dataset.testid = "heatmap-row";
      const th = document.createElement("th");
      th.scope = "row";
      th.className = "row";
      pieceLabel(th, targetLabels[i], words);
      tr.append(th);
      row.forEach((value, j) => {
        const td = document.createElement("td");
        td.className = "cell";
        td.dataset.testid = "heatmap-cell";
        td.dataset.value = String(value);
        td.dataset.col = String(j);
        td.style.setProperty("--w", String(Math.min(1, Math.max(0, value))));
        if (value >= 0.5) td.classList.add("strong");
        td.title = `${targetLabels[i]} \u2192 ${sourceLabels[j]}: ${value.toFixed(4)}`;
        const sr = document.createElement("span");
        sr.className = "sr-only";
        sr.textContent = value.toFixed(2);
        td.append(sr);
        tr.append(td);
      });
      tbody.append(tr);
    });
    table.append(thead, tbody);
    table.dataset.layer = el.layer.value;
    table.dataset.head = el.head.value;
    table.dataset.units = el.units.value;
    table.dataset.translation = data.translation;
    el.attStatus.textContent = `\u201c${data.translation}\u201d \u00b7 ${layerText}, ${headText}` +
      ` \u00b7 ${targetLabels.length} \u00d7 ${sourceLabels.length}`;
  }

  function highlight(cell) {
    for (const old of el.heatmap.querySelectorAll(".hot")) old.classList.remove("hot");
    if (!cell || !cell.classList.contains("cell")) return;
    cell.classList.add("hot");
    cell.parentElement.querySelector("th").classList.add("hot");
    const col = el.heatmap.querySelector(`thead th[data-col="${cell.dataset.col}"]`);
    if (col) col.classList.add("hot");
  }

  // -- events ----------------------------------------------------------------------------------

  el.source.addEventListener("input", () => {
    updateCount();
    if (!el.source.value.trim()) { translateNow(); return; }
    scheduleTranslate();
  });
  el.translate.addEventListener("click", () => { translateNow(); });
  el.clear.addEventListener("click", () => {
    el.source.value = "";
    updateCount();
    translateNow();
    el.source.focus();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      translateNow();
    }
  });
  for (const input of [el.beam, el.nbest, el.lp]) {
    input.addEventListener("input", () => {
      if (input === el.nbest && el.nbest.checkValidity()) store.set("nbest", el.nbest.value);
      state.attentionCache.clear();
      scheduleTranslate();
    });
  }
  el.apiKey.addEventListener("change", () => {
    store.set("apiKey", el.apiKey.value);
    scheduleTranslate();
  });
  el.pair.addEventListener("change", () => {
    const model = state.models.find((m) => m.id === el.pair.value);
    if (model) selectModel(model);
  });
  el.swap.addEventListener("click", () => {
    const reverse = state.model && reverseOf(state.model);
    if (!reverse) return;
    if (state.result) {
      el.source.value = state.result.hypotheses[state.chosen].text;
      updateCount();
    }
    selectModel(reverse);
  });
  el.copy.addEventListener("click", copyOutput);
  el.attToggle.addEventListener("click", () => setAttentionOpen(!state.attentionOpen));
  el.line.addEventListener("change", renderAttention);
  for (const select of [el.layer, el.head, el.units]) select.addEventListener("change", drawHeatmap);
  el.heatmap.addEventListener("mouseover", (event) => highlight(event.target.closest("td")));
  el.heatmap.addEventListener("mouseleave", () => highlight(null));

  // Cmd+Enter on a Mac
  if (/Mac|iPhone|iPad/.test(navigator.platform || navigator.userAgent)) {
    const key = document.querySelector("#source-hint kbd");
    if (key) key.textContent = "\u2318";
  }
  clearResult();
  loadModels();
})();
