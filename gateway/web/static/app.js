// The Duplex web chat: one WebSocket (/v1/chat) carrying ChatRequest / ChatResponse in the proto3 JSON
// mapping. The session id, the last seen seq and the transcript are saved together in localStorage, so a
// reload reopens the session with resumeAfterSeq and a running answer goes on where it stopped, with
// nothing missed or repeated.

const STATE_KEY = "duplex.chat";
const TOKEN_KEY = "duplex.token";
const MAX_KEPT_MESSAGES = 200;
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 10000;
const CLOSE_UNAUTHENTICATED = 4401;
const CLOSE_IDLE = 4408;
const NOT_FOUND = 5;
const OUT_OF_RANGE = 11;
const CODE_NAMES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
  "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];
const EVENT_KINDS = [
  "sessionOpened", "messageAccepted", "turnStarted", "delta", "toolCall", "toolResult", "turnCompleted",
  "turnCancelled", "error", "pong", "quota",
];

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), error: $("error"), transcript: $("transcript"), composer: $("composer"),
  message: $("message"), stop: $("stop"), newChat: $("new-chat"), conversations: $("conversations"),
  conversationsEmpty: $("conversations-empty"), auth: $("auth"), tokenForm: $("token-form"), token: $("token"),
};

let state = loadState();
let socket = null; // the current WebSocket
let opened = false; // its session is open
let retryMs = FIRST_RETRY_MS;
let retryTimer = 0;
let conversationsRequest = 0; // only the latest list request renders
const bubbles = new Map(); // message key -> its <li>

function emptyState() {
  return { sessionId: "", conversationId: "", lastSeq: 0, turnId: "", messages: [] };
}

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem(STATE_KEY) || "null");
    if (saved && Array.isArray(saved.messages)) return { ...emptyState(), ...saved };
  } catch {
    // A corrupt entry is dropped.
  }
  return emptyState();
}

function saveState() {
  state.messages = state.messages.slice(-MAX_KEPT_MESSAGES);
  localStorage.setItem(STATE_KEY, JSON.stringify(state));
}

// --- the socket ---

function connect() {
  clearTimeout(retryTimer);
  if (socket) {
    socket.onclose = null; // replaced on purpose: not a lost connection
    socket.close(1000);
  }
  opened = false;
  updateStop();
  setStatus("connecting", "Connecting…");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/chat`, ["duplex.v1"]);
  socket = ws;
  ws.onopen = () => {
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) ws.send(JSON.stringify({ authorization: `Bearer ${token}` }));
    openSession();
  };
  ws.onmessage = (frame) => {
    let data;
    try {
      data = JSON.parse(frame.data);
    } catch {
      return;
    }
    if (data.event) onEvent(data.event);
  };
  ws.onclose = onSocketClosed;
}

function send(request) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(request));
}

function openSession() {
  const open = state.sessionId ? { sessionId: state.sessionId, resumeAfterSeq: state.lastSeq } : {};
  send({ open });
}

function onSocketClosed(closed) {
  socket = null;
  opened = false;
  updateStop();
  if (closed.code === CLOSE_UNAUTHENTICATED) {
    setStatus("error", "Sign-in required");
    const reason = closed.reason || "this gateway needs an access token";
    showError(`Sign-in needed: ${reason}. Paste a token under “Access token”.`);
    ui.auth.open = true;
    ui.token.focus();
  } else if (closed.code === CLOSE_IDLE) {
    setStatus("idle", "Disconnected while idle; sending reconnects");
  } else {
    setStatus("connecting", "Reconnecting…");
    retryTimer = setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
  }
}

// --- events ---

function onEvent(event) {
  const seq = Number(event.seq || 0);
  // Seen already: a replica whose log lags what we saw may answer an ahead-of-log resume from its own end.
  if (seq && seq <= state.lastSeq) return;
  if (seq) state.lastSeq = seq;
  const kind = EVENT_KINDS.find((name) => name in event);
  if (kind in handlers) handlers[kind](event, event[kind]);
  saveState();
}

const handlers = {
  sessionOpened(_event, session) {
    opened = true;
    retryMs = FIRST_RETRY_MS;
    state.sessionId = session.sessionId;
    state.conversationId = session.conversationId;
    setStatus("connected", "Connected");
    // Messages whose acceptance never arrived are sent again; the same id is answered only once.
    for (const m of state.messages) {
      if (m.role === "user" && !m.accepted) sendUserMessage(m);
    }
    updateStop();
    refreshConversations();
  },
  messageAccepted(_event, accepted) {
    const m = state.messages.find((x) => x.role === "user" && x.clientMessageId === accepted.clientMessageId);
    if (m) m.accepted = true;
  },
  turnStarted(event) {
    assistantMessage(event.turnId);
    state.turnId = event.turnId;
    updateStop();
  },
  delta(event, delta) {
    const m = assistantMessage(event.turnId);
    m.text += delta.text || "";
    render(m);
  },
  toolCall(event, call) {
    const m = assistantMessage(event.turnId);
    m.meta = `Using the ${call.name} tool…`;
    render(m);
  },
  turnCompleted(event, done) {
    const usage = done.usage || {};
    const speed = done.tokensPerSecond ? ` · ${done.tokensPerSecond.toFixed(1)} tokens/s` : "";
    endTurn(event.turnId, "done", `${usage.completionTokens || 0} tokens${speed}`);
  },
  turnCancelled(event) {
    endTurn(event.turnId, "stopped", "Stopped");
  },
  error(event, error) {
    const text = `${CODE_NAMES[error.code] || `code ${error.code}`}: ${error.message || "failed"}`;
    if (!opened && error.code === NOT_FOUND && state.sessionId) {
      // The saved session expired or belongs to another user: start afresh.
      state = emptyState();
      renderAll();
      send({ open: {} });
      return;
    }
    // A resume from ahead of the server's log: it says so and carries on from its end; nothing to show.
    if (!event.turnId && error.code === OUT_OF_RANGE) return;
    if (event.turnId) endTurn(event.turnId, "error", text);
    showError(text);
  },
};

function assistantMessage(turnId) {
  let m = state.messages.find((x) => x.role === "assistant" && x.turnId === turnId);
  if (!m) {
    m = { role: "assistant", turnId, text: "", status: "streaming", meta: "" };
    state.messages.push(m);
    render(m);
  }
  return m;
}

function endTurn(turnId, status, meta) {
  const m = assistantMessage(turnId);
  m.status = status;
  m.meta = meta;
  if (state.turnId === turnId) state.turnId = "";
  render(m);
  updateStop();
  refreshConversations();
}

// --- rendering ---

function renderAll() {
  ui.transcript.replaceChildren();
  bubbles.clear();
  state.messages.forEach(render);
  updateStop();
}

function render(m) {
  const key = m.role === "assistant" ? `turn:${m.turnId}` : `user:${m.clientMessageId}`;
  let li = bubbles.get(key);
  if (!li) {
    li = document.createElement("li");
    li.className = `message ${m.role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = m.role === "assistant" ? "Duplex" : "You";
    const text = document.createElement("div");
    text.className = "text";
    const meta = document.createElement("p");
    meta.className = "meta";
    li.append(who, text, meta);
    bubbles.set(key, li);
    ui.transcript.append(li);
  }
  li.dataset.status = m.status || "";
  if (m.turnId) li.dataset.turnId = m.turnId;
  li.setAttribute("aria-busy", String(m.status === "streaming"));
  li.querySelector(".text").textContent = m.text;
  li.querySelector(".meta").textContent = m.meta || "";
  li.scrollIntoView({ block: "end" });
}

function renderConversations(list) {
  ui.conversations.replaceChildren(
    ...list.map((c) => {
      const li = document.createElement("li");
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = c.title || "Untitled conversation";
      const meta = document.createElement("span");
      meta.className = "meta";
      const count = c.messageCount || 0;
      meta.textContent = `${count} message${count === 1 ? "" : "s"}`;
      li.append(title, meta);
      li.dataset.conversationId = c.conversationId;
      if (c.conversationId === state.conversationId) li.setAttribute("aria-current", "true");
      return li;
    }),
  );
  ui.conversationsEmpty.hidden = list.length > 0;
}

async function refreshConversations() {
  const request = ++conversationsRequest;
  const token = localStorage.getItem(TOKEN_KEY);
  let list = [];
  try {
    const response = await fetch("/v1/conversations?pageSize=50", {
      headers: token ? { Authorization: `Bearer ${token}` } : {},
      cache: "no-store",
    });
    if (response.ok) list = (await response.json()).conversations || [];
  } catch {
    // Shown as an empty list; the socket's status says whether the gateway is reachable.
  }
  if (request === conversationsRequest) renderConversations(list);
}

function setStatus(kind, text) {
  ui.status.dataset.state = kind;
  ui.status.textContent = text;
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function updateStop() {
  ui.stop.disabled = !(opened && state.turnId);
}

// --- user actions ---

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sendUserMessage(m) {
  send({ message: { clientMessageId: m.clientMessageId, text: m.text } });
}

ui.composer.addEventListener("submit", (submitted) => {
  submitted.preventDefault();
  const text = ui.message.value.trim();
  if (!text) return;
  hideError();
  const m = { role: "user", text, clientMessageId: newId(), accepted: false };
  state.messages.push(m);
  saveState();
  render(m);
  ui.message.value = "";
  if (opened) sendUserMessage(m);
  else if (!socket) connect(); // sent once the session opens
});

ui.message.addEventListener("keydown", (key) => {
  if (key.key === "Enter" && !key.shiftKey && !key.isComposing) {
    key.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => send({ cancel: { turnId: state.turnId } }));

ui.newChat.addEventListener("click", () => {
  state = emptyState();
  saveState();
  renderAll();
  hideError();
  connect();
  ui.message.focus();
});

ui.tokenForm.addEventListener("submit", (submitted) => {
  submitted.preventDefault();
  const token = ui.token.value.trim();
  if (token) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
  hideError();
  connect();
  refreshConversations();
});

ui.token.value = localStorage.getItem(TOKEN_KEY) || "";
renderAll();
connect();
refreshConversations();
