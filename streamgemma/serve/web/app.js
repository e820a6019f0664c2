// The page of docs/browser.md: open or resume a session, chat with it, stream
// a transcript into it with running summaries, watch the live figures.
import { Wire, WireError, streamUrl } from "./wire.js";

// The turns of examples/transcript_agent.py (Gemma's chat format).
const USER_TURN = (text) => `<start_of_turn>user\n${text}<end_of_turn>\n<start_of_turn>model\n`;
const SUMMARY_REQUEST = USER_TURN("Summarize the meeting so far in two sentences.");
const END_OF_TURN = "<end_of_turn>\n";
const MAX_SAVED_CHAT = 200000; // characters of conversation kept in sessionStorage per session

const store = window.sessionStorage;
const $ = (id) => document.getElementById(id);

const state = {
  wire: null,
  session: null, // the id of the session this page works with (open, or to be resumed)
  busy: false, // a chat turn or a transcript is running
  generating: false,
  stopTranscript: false,
  transcriptRunning: false,
  chat: [], // [{role, text}] shown in the chat pane, saved per session
  streaming: null, // {entry, sink}: the chat reply being streamed
};

// -- status and errors ---------------------------------------------------------------------
function setStatus(text) {
  $("status").textContent = text;
}

function showError(error) {
  const text = error instanceof WireError && !["refused", "connection_closed", "input"].includes(error.code)
    ? `${error.code}: ${error.message}` : String(error.message || error);
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setState(name) {
  document.body.dataset.state = name;
}

function refreshControls() {
  const has = state.session !== null;
  $("copy-id").disabled = !has;
  $("snapshot").disabled = !has || state.transcriptRunning;
  $("close").disabled = !has || state.busy;
  $("cancel").disabled = !state.generating;
  $("send").disabled = !has || state.busy;
  $("transcript-start").disabled = !has || state.busy;
  $("transcript-stop").disabled = !state.transcriptRunning;
  $("open-new").disabled = state.busy;
  $("resume").disabled = state.busy;
}

// -- figures -------------------------------------------------------------------------------
function showPosition(position) {
  if (typeof position === "number") $("fig-position").textContent = String(position);
}

function resetFigures() {
  $("fig-tokens").textContent = "0";
  $("fig-ttft").textContent = "–";
  $("fig-rate").textContent = "–";
}

function formatBytes(n) {
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(2)} MiB`;
  if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
  return `${n} B`;
}

// -- connection and session ----------------------------------------------------------------
async function connect() {
  if (state.wire) {
    state.wire.onclose = null;
    state.wire.close(); // its session is detached on the server and stays resumable
  }
  const token = $("token").value;
  store.setItem("sg.token", token);
  const wire = new Wire(streamUrl(window.location), token);
  setState("connecting");
  setStatus("Connecting…");
  try {
    await wire.connect();
  } catch (error) {
    state.wire = null;
    setState("refused");
    throw await explainRefusal(error);
  }
  wire.onclose = (event) => {
    if (state.wire !== wire) return;
    state.wire = null;
    state.generating = false;
    setState("disconnected");
    setStatus(`Disconnected (code ${event.code}${event.reason ? ": " + event.reason : ""}). ` +
              "The session stays on the server; the next action resumes it.");
    refreshControls();
  };
  state.wire = wire;
  return wire;
}

// A refused handshake shows the page no HTTP status: if the server still
// answers plain requests, the refusal is about the credentials (or its limit).
async function explainRefusal(error) {
  try {
    const probe = await fetch("favicon.svg", { cache: "no-store" });
    if (probe.ok) {
      return new WireError("refused", "The server refused the connection: wrong token? " +
        "(HTTP 401; or 503 when the server is at its connection limit)");
    }
  } catch {
    // unreachable: said below
  }
  return new WireError("refused", `Cannot reach the server (${error.message}).`);
}

async function openSession(resumeId) {
  const wire = await connect();
  const msg = { type: "open" };
  if (resumeId) {
    msg.session = resumeId;
  } else {
    const seed = readInteger("open-seed", "seed of a new session", true);
    if (seed !== undefined) msg.seed = seed;
  }
  let opened;
  try {
    opened = await wire.request(msg);
  } catch (error) {
    state.session = null; // e.g. unknown_session: nothing is open now
    $("current-session").value = "";
    $("chat-log").replaceChildren();
    $("fig-position").textContent = "–";
    $("fig-state").textContent = "–";
    resetFigures();
    throw error;
  }
  state.session = opened.session;
  store.setItem("sg.session", opened.session);
  $("session-id").value = opened.session;
  $("current-session").value = opened.session;
  showPosition(opened.position);
  if (typeof opened.state_bytes === "number") {
    $("fig-state").textContent = `${formatBytes(opened.state_bytes)} (constant)`;
  }
  resetFigures();
  loadChat(opened.session, Boolean(resumeId));
  $("fig-snapshot").textContent = (resumeId && store.getItem(`sg.snapshot.${opened.session}`)) || "–";
  setState("idle");
  setStatus(`Session ${resumeId ? "resumed" : "opened"} at position ${opened.position}.`);
  const last = state.chat[state.chat.length - 1];
  if (last && last.open) await closeTurn(last); // a reply cut by a reload or a lost connection
  return opened;
}

// The open session, resumed on a new connection if the last one ended.
async function ensureSession() {
  if (state.session === null) throw new WireError("input", "Open or resume a session first.");
  if (!state.wire || !state.wire.open) await openSession(state.session);
  return state.wire;
}

async function append(text) {
  const wire = await ensureSession();
  const reply = await wire.request({ type: "append", session: state.session, text });
  showPosition(reply.position);
  return reply.position;
}

// -- sampling and generation ---------------------------------------------------------------
function readNumber(id, name) {
  const raw = $(id).value.trim();
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value)) throw new WireError("input", `${name}: enter a number.`);
  return value;
}

function readInteger(id, name, optional = false) {
  const raw = $(id).value.trim();
  if (raw === "" && optional) return undefined;
  if (!/^-?\d+$/.test(raw)) throw new WireError("input", `${name}: enter a whole number.`);
  const value = Number(raw);
  if (!Number.isSafeInteger(value)) throw new WireError("input", `${name}: at most 2^53 in this page.`);
  return value;
}

function sampling() {
  const params = {
    temperature: readNumber("temperature", "Temperature"),
    top_p: readNumber("top-p", "Top p"),
    top_k: readInteger("top-k", "Top k"),
    max_tokens: readInteger("max-tokens", "Max tokens"),
  };
  const seed = readInteger("seed", "Seed", true);
  if (seed !== undefined) params.seed = seed;
  return params;
}

// Runs one generation, writing its text into `sink` (an element) as it arrives.
async function generate(params, sink, log) {
  const wire = await ensureSession();
  const started = performance.now();
  let first = null;
  let count = 0;
  const startPosition = Number($("fig-position").textContent) || 0;
  $("fig-tokens").textContent = "0";
  $("fig-ttft").textContent = "…";
  $("fig-rate").textContent = "…";
  state.generating = true;
  setState("generating");
  log.setAttribute("aria-busy", "true");
  refreshControls();
  try {
    const done = await wire.generate(state.session, params, (ids, texts) => {
      const now = performance.now();
      if (first === null) {
        first = now;
        $("fig-ttft").textContent = `${Math.round(now - started)} ms`;
      }
      count += ids.length;
      sink.textContent += texts.join("");
      $("fig-tokens").textContent = String(count);
      $("fig-position").textContent = String(startPosition + count);
      if (count > 1 && now > first) $("fig-rate").textContent = ((count - 1) / ((now - first) / 1000)).toFixed(1);
      log.scrollTop = log.scrollHeight; // follow the stream inside the pane, not the page
    });
    if (done.text) sink.textContent += done.text;
    showPosition(done.position);
    if (first === null) $("fig-ttft").textContent = "–";
    if (count < 2) $("fig-rate").textContent = "–";
    setStatus(`Generation ended (${done.reason}) at position ${done.position}: ${count} tokens.`);
    return done;
  } catch (error) {
    if (first === null) $("fig-ttft").textContent = "–";
    if (count < 2) $("fig-rate").textContent = "–";
    throw error;
  } finally {
    state.generating = false;
    if (state.wire) setState("idle");
    log.setAttribute("aria-busy", "false");
    refreshControls();
  }
}

// Closes the model's turn so that later input is the user's again.
async function endTurn(done) {
  await append(done.reason === "stop" ? "\n" : END_OF_TURN);
}

// Closes a chat reply's turn that no `done` closed (the generation was refused or cut off).
async function closeTurn(entry) {
  await append(END_OF_TURN);
  entry.open = false;
  saveChat();
}

// -- chat ----------------------------------------------------------------------------------
function addMessage(role, text) {
  const item = document.createElement("div");
  item.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  $("chat-log").append(item);
  return body;
}

function loadChat(sessionId, resumed) {
  $("chat-log").replaceChildren();
  state.chat = [];
  if (!resumed) return;
  try {
    state.chat = JSON.parse(store.getItem(`sg.chat.${sessionId}`) || "[]");
  } catch {
    state.chat = [];
  }
  for (const entry of state.chat) addMessage(entry.role, entry.text);
}

function saveChat() {
  if (state.session === null) return;
  if (state.streaming) state.streaming.entry.text = state.streaming.sink.textContent; // a reload mid-reply
  let chat = state.chat;
  while (chat.length > 1 && JSON.stringify(chat).length > MAX_SAVED_CHAT) chat = chat.slice(1);
  state.chat = chat;
  store.setItem(`sg.chat.${state.session}`, JSON.stringify(chat));
}

async function sendMessage() {
  const text = $("prompt").value;
  const turns = $("chat-turns").checked;
  if (!text.trim() && turns) return;
  const params = sampling();
  await ensureSession();
  if (text) {
    addMessage("user", text);
    state.chat.push({ role: "user", text });
    $("prompt").value = "";
    await append(turns ? USER_TURN(text) : text);
  }
  const sink = addMessage("model", "");
  const entry = { role: "model", text: "", open: turns };
  state.chat.push(entry);
  state.streaming = { entry, sink };
  try {
    let done;
    try {
      done = await generate(params, sink, $("chat-log"));
    } catch (error) {
      if (turns && state.wire && state.wire.open) await closeTurn(entry).catch(() => {});
      throw error;
    }
    if (turns) await endTurn(done);
    entry.open = false;
  } finally {
    saveChat();
    state.streaming = null;
  }
}

// -- transcript ----------------------------------------------------------------------------
async function streamTranscript() {
  const lines = $("transcript-text").value.split(/\r?\n/).filter((line) => line.trim());
  if (lines.length === 0) throw new WireError("input", "The transcript is empty: paste text or choose a file.");
  const every = readInteger("every", "Summary every N lines");
  const summaryTokens = readInteger("summary-tokens", "Tokens per summary");
  const pause = readInteger("line-delay", "Pause between lines");
  if (every < 1 || summaryTokens < 1) throw new WireError("input", "N and tokens must be at least 1.");
  if (pause < 0) throw new WireError("input", "The pause between lines must be 0 ms or more.");
  const params = { ...sampling(), max_tokens: summaryTokens };
  await ensureSession();
  state.transcriptRunning = true;
  state.stopTranscript = false;
  refreshControls();
  try {
    for (let n = 1; n <= lines.length && !state.stopTranscript; n++) {
      const position = await append(lines[n - 1] + "\n");
      $("transcript-progress").textContent = `Line ${n} of ${lines.length} streamed (position ${position}).`;
      if (n % every === 0 || n === lines.length) {
        await append(SUMMARY_REQUEST);
        const item = document.createElement("div");
        item.className = "summary";
        const heading = document.createElement("h3");
        heading.textContent = `After line ${n}`;
        const body = document.createElement("p");
        body.className = "text";
        item.append(heading, body);
        $("summaries").append(item);
        await endTurn(await generate(params, body, $("summaries")));
      }
      if (pause > 0) await new Promise((resolve) => setTimeout(resolve, pause));
    }
    setStatus(state.stopTranscript ? "Transcript stopped." : `Transcript streamed: ${lines.length} lines.`);
  } finally {
    state.transcriptRunning = false;
    refreshControls();
  }
}

// -- buttons -------------------------------------------------------------------------------
// Runs an action, showing its error; `exclusive` actions hold the page busy.
async function act(action, exclusive = true) {
  const focused = document.activeElement; // disabled while busy: it loses focus, given back after
  clearError();
  if (exclusive) {
    if (state.busy) return;
    state.busy = true;
    refreshControls();
  }
  try {
    await action();
  } catch (error) {
    showError(error);
    if (!state.wire && document.body.dataset.state !== "refused") setState("disconnected");
    if (document.body.dataset.state === "connecting") setState(state.wire ? "idle" : "disconnected");
    setStatus(state.session !== null ? "The last action failed (see the message)." : "No session is open.");
  } finally {
    if (exclusive) state.busy = false;
    refreshControls();
    if (focused && focused !== document.body && document.activeElement === document.body && !focused.disabled) {
      focused.focus();
    }
  }
}

function cancel() {
  if (state.generating && state.wire && state.wire.open) {
    state.wire.send({ type: "cancel", session: state.session });
    setStatus("Cancelling…");
  }
}

async function copyId() {
  const field = $("current-session");
  try {
    await navigator.clipboard.writeText(field.value);
  } catch {
    // Without a secure context there is no clipboard API: copy the selected field.
    field.select();
    if (!document.execCommand("copy")) throw new WireError("input", "Copy failed: select the id and copy it.");
  }
  setStatus("Session id copied.");
}

async function snapshot() {
  const wire = await ensureSession();
  const reply = await wire.request({ type: "snapshot", session: state.session });
  // The stored state's position: mid-generation, the session has gone on since.
  if (reply.position > (Number($("fig-position").textContent) || 0)) showPosition(reply.position);
  $("fig-snapshot").textContent = `position ${reply.position}, ${new Date().toLocaleTimeString()}`;
  store.setItem(`sg.snapshot.${state.session}`, $("fig-snapshot").textContent);
  setStatus(`Snapshot stored on the server at position ${reply.position}.`);
}

async function closeSession() {
  if (!window.confirm("Close the session for good? The server deletes it and its snapshot.")) return;
  const wire = await ensureSession();
  await wire.request({ type: "close", session: state.session });
  store.removeItem(`sg.chat.${state.session}`);
  store.removeItem(`sg.snapshot.${state.session}`);
  store.removeItem("sg.session");
  setStatus(`Session closed.`);
  state.session = null;
  $("current-session").value = "";
  $("session-id").value = "";
  $("chat-log").replaceChildren();
  $("fig-position").textContent = "–";
  $("fig-snapshot").textContent = "–";
  resetFigures();
}

async function readFile() {
  const file = $("transcript-file").files[0];
  if (file) $("transcript-text").value = await file.text();
}

function main() {
  $("token").value = store.getItem("sg.token") || "";
  $("session-id").value = store.getItem("sg.session") || "";
  setState("idle");
  $("connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(() => openSession(null));
  });
  $("session-id").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault(); // (the form's submit button opens a new session)
      $("resume").click();
    }
  });
  $("resume").addEventListener("click", () => act(() => {
    const id = $("session-id").value.trim();
    if (!id) throw new WireError("input", "Enter the id of the session to resume.");
    return openSession(id);
  }));
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(sendMessage);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("transcript-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act(streamTranscript);
  });
  $("transcript-stop").addEventListener("click", () => {
    state.stopTranscript = true;
    cancel();
  });
  $("transcript-file").addEventListener("change", () => act(readFile, false));
  $("cancel").addEventListener("click", cancel);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") cancel();
  });
  $("copy-id").addEventListener("click", () => act(copyId, false));
  $("snapshot").addEventListener("click", () => act(snapshot, false));
  $("close").addEventListener("click", () => act(closeSession));
  window.addEventListener("pagehide", saveChat);
  refreshControls();
}

main();
