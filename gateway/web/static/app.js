// The Duplex web chat: one WebSocket (/v1/chat) carrying ChatRequest / ChatResponse in the proto3 JSON
// mapping. The session id, the last seen seq and the transcript are saved together in localStorage, so a
// reload reopens the session with resumeAfterSeq and a running answer goes on where it stopped, with
// nothing missed or repeated.
//
// Voice: the microphone goes out as binary frames (0x00, then 16 kHz PCM16), held to talk (push-to-talk,
// ended by a commit) or streamed hands-free (the server's VAD ends utterances). Spoken answers come as
// audio events, played live; Stop or a barge-in silences them at once and tells the server how much was
// heard (interrupt with playedMs), and the answer's text is trimmed to what was spoken. Audio is live-only:
// a resumed page never plays audio of a turn that has ended, nor anything twice.

import { Microphone, Player, bytesToBase64, unlockAudio, INPUT_RATE_HZ } from "./voice.js";

const STATE_KEY = "duplex.chat";
const TOKEN_KEY = "duplex.token";
const VOICE_KEY = "duplex.voice";
const MAX_KEPT_MESSAGES = 200;
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 10000;
const REPLAY_SETTLE_MS = 200;
const CLOSE_UNAUTHENTICATED = 4401;
const CLOSE_IDLE = 4408;
const INVALID_ARGUMENT = 3;
const NOT_FOUND = 5;
const OUT_OF_RANGE = 11;
const CODE_NAMES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
  "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];
const EVENT_KINDS = [
  "sessionOpened", "messageAccepted", "turnStarted", "delta", "toolCall", "toolResult", "turnCompleted",
  "turnCancelled", "error", "pong", "quota", "speechStarted", "speechStopped", "transcript", "audio",
  "sessionUpdated",
];
const MANUAL = "TURN_DETECTION_MANUAL";
const SERVER_VAD = "TURN_DETECTION_SERVER_VAD";
const PCM16 = "AUDIO_ENCODING_PCM16";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), error: $("error"), transcript: $("transcript"), composer: $("composer"),
  message: $("message"), stop: $("stop"), newChat: $("new-chat"), conversations: $("conversations"),
  conversationsEmpty: $("conversations-empty"), auth: $("auth"), tokenForm: $("token-form"), token: $("token"),
  mic: $("mic"), micLabel: $("mic-label"), handsFree: $("hands-free"), speak: $("speak"),
  voiceState: $("voice-state"),
};

let state = loadState();
let socket = null; // the current WebSocket
let opened = false; // its session is open
let retryMs = FIRST_RETRY_MS;
let retryTimer = 0;
let conversationsRequest = 0; // only the latest list request renders
const bubbles = new Map(); // message key -> its <li>

// --- voice state (in memory: audio is live-only) ---
const prefs = loadPrefs(); // speakAnswers is kept across reloads; hands-free never reopens the mic by itself
const player = new Player(updateVoiceUi);
const mic = new Microphone(onMicFrame);
const voiceStats = { audioEvents: 0, framesSent: 0, bytesSent: 0, commits: 0, interruptsSent: 0, bargeIns: 0 };
let talking = null; // the push-to-talk utterance being held: { id, framesSent }
let hearing = false; // the server heard speech start and not yet stop (hands-free)
let sessionVoice = null; // the open session's voice options, as the server said
let replayUntilSeq = 0; // events up to this seq are the replay of a resume
const replayedAudio = new Map(); // turnId -> the newest replayed audio of a turn this page never played
let replayTimer = 0;

Object.defineProperty(window, "duplexVoice", {
  // Read-only statistics of the page's voice (for people debugging audio, and for tests).
  get: () => Object.freeze({
    ...player.stats, ...voiceStats, ...player.latest(),
    playing: player.isPlaying(), playedMs: state.turnId ? player.playedMs(state.turnId) : 0,
    micOpen: mic.running, talking: Boolean(talking), handsFree: prefs.handsFree, speakAnswers: prefs.speakAnswers,
  }),
});

function emptyState() {
  return { sessionId: "", conversationId: "", lastSeq: 0, turnId: "", messages: [] };
}

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem(STATE_KEY) || "null");
    if (saved && Array.isArray(saved.messages)) {
      // An utterance that was still being heard when the page went away is gone with the microphone.
      saved.messages = saved.messages.filter((m) => !(m.voice && !m.text && !m.accepted));
      return { ...emptyState(), ...saved };
    }
  } catch {
    // A corrupt entry is dropped.
  }
  return emptyState();
}

function saveState() {
  state.messages = state.messages.slice(-MAX_KEPT_MESSAGES);
  localStorage.setItem(STATE_KEY, JSON.stringify(state));
}

function loadPrefs() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(VOICE_KEY) || "{}") || {};
  } catch {
    // defaults
  }
  return { speakAnswers: Boolean(saved.speakAnswers), handsFree: false };
}

function savePrefs() {
  localStorage.setItem(VOICE_KEY, JSON.stringify({ speakAnswers: prefs.speakAnswers }));
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
  ws.binaryType = "arraybuffer";
  socket = ws;
  ws.onopen = () => {
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) ws.send(JSON.stringify({ authorization: `Bearer ${token}` }));
    openSession();
  };
  ws.onmessage = (frame) => {
    if (typeof frame.data !== "string") return; // the page speaks JSON; binary answers are not asked for
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

function sendBinary(frame) {
  if (!(opened && socket && socket.readyState === WebSocket.OPEN)) return false;
  socket.send(frame);
  voiceStats.framesSent += 1;
  voiceStats.bytesSent += frame.byteLength;
  return true;
}

function openSession() {
  const open = state.sessionId ? { sessionId: state.sessionId, resumeAfterSeq: state.lastSeq } : {};
  if (!state.sessionId && voiceWanted()) open.voice = voiceOptions();
  send({ open });
}

function onSocketClosed(closed) {
  socket = null;
  opened = false;
  hearing = false;
  updateStop();
  updateVoiceUi();
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
  if (replayUntilSeq && seq >= replayUntilSeq) endReplay();
  saveState(); // lastSeq too: a reload must not be sent (and play) an audio event this page already had
}

const handlers = {
  sessionOpened(_event, session) {
    opened = true;
    retryMs = FIRST_RETRY_MS;
    state.sessionId = session.sessionId;
    state.conversationId = session.conversationId;
    sessionVoice = session.voice || {};
    // What a resume replays (up to the log's end when opened) is told apart from what happens live.
    replayUntilSeq = session.resumed && Number(session.lastSeq || 0) > state.lastSeq ? Number(session.lastSeq) : 0;
    setStatus("connected", "Connected");
    // Messages whose acceptance never arrived are sent again; the same id is answered only once.
    for (const m of state.messages) {
      if (m.role === "user" && !m.voice && !m.accepted) sendUserMessage(m);
    }
    syncVoiceOptions();
    updateStop();
    updateVoiceUi();
    refreshConversations();
  },
  sessionUpdated(_event, updated) {
    sessionVoice = updated.voice || {};
  },
  messageAccepted(_event, accepted) {
    const m = state.messages.find((x) => x.role === "user" && x.clientMessageId === accepted.clientMessageId);
    if (m) {
      m.accepted = true;
      if (m.voice) {
        m.status = "final";
        render(m);
      }
    }
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
    const spoken = usage.audioOutputMs ? ` · ${(usage.audioOutputMs / 1000).toFixed(1)} s spoken` : "";
    dropReplayedAudio(event.turnId); // its audio was live-only; what is playing now plays out
    endTurn(event.turnId, "done", `${usage.completionTokens || 0} tokens${speed}${spoken}`);
  },
  turnCancelled(event, cancelled) {
    dropReplayedAudio(event.turnId);
    silenceTurn(event.turnId);
    if (!cancelled.interrupted) {
      endTurn(event.turnId, "stopped", "Stopped");
      return;
    }
    // Barge-in or Stop during speech: the answer is what was heard.
    const m = assistantMessage(event.turnId);
    m.text = Array.from(m.text).slice(0, Number(cancelled.heardChars || 0)).join("");
    m.interrupted = true;
    const heard = cancelled.playedMs ? ` after ${(cancelled.playedMs / 1000).toFixed(1)} s` : "";
    endTurn(event.turnId, "stopped", `Interrupted${heard}`);
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
    if (event.turnId) dropReplayedAudio(event.turnId);
    if (event.turnId && voiceTurnFailed(event.turnId, error, text)) return;
    if (event.turnId) endTurn(event.turnId, "error", text);
    showError(text);
  },
  speechStarted(event) {
    hearing = true;
    // Hands-free barge-in: the server already stops the answer; the page only has to go quiet at once.
    for (const turnId of player.silenceAll()) {
      voiceStats.bargeIns += 1;
      markSilenced(turnId);
    }
    voiceMessage(event.turnId, "");
    updateVoiceUi();
  },
  speechStopped() {
    hearing = false;
    updateVoiceUi();
  },
  transcript(event, heard) {
    const m = voiceMessage(event.turnId, heard.clientMessageId || "");
    m.text = (heard.text || "").trim(); // the engine's text may start with a space; the stored one is trimmed
    m.status = heard.final ? (m.text ? "final" : "empty") : "interim";
    if (heard.final) hearing = false;
    render(m);
    updateVoiceUi();
  },
  audio(event, audio) {
    voiceStats.audioEvents += 1;
    const turnId = event.turnId;
    const m = state.messages.find((x) => x.role === "assistant" && x.turnId === turnId);
    // Never the audio of a turn that has ended (a replay) or that the user silenced.
    if ((m && (m.status !== "streaming" || m.silenced)) || !prefs.speakAnswers || player.isSilenced(turnId)) {
      player.skip();
      return;
    }
    if (!m) assistantMessage(turnId);
    const seq = Number(event.seq || 0);
    if (replayUntilSeq && seq && seq <= replayUntilSeq && !player.has(turnId)) {
      // Replayed audio of a running turn this page has not been playing: its older chunks have had their
      // time already, so only the newest one is kept, played once the replay is over.
      if (replayedAudio.has(turnId)) player.skip();
      replayedAudio.set(turnId, audio);
      clearTimeout(replayTimer);
      replayTimer = setTimeout(endReplay, REPLAY_SETTLE_MS);
      return;
    }
    player.play(turnId, audio);
  },
};

function dropReplayedAudio(turnId) {
  if (replayedAudio.delete(turnId)) player.skip();
}

function endReplay() {
  replayUntilSeq = 0;
  clearTimeout(replayTimer);
  for (const [turnId, audio] of replayedAudio) player.play(turnId, audio);
  replayedAudio.clear();
}

function assistantMessage(turnId) {
  let m = state.messages.find((x) => x.role === "assistant" && x.turnId === turnId);
  if (!m) {
    m = { role: "assistant", turnId, text: "", status: "streaming", meta: "" };
    state.messages.push(m);
    render(m);
  }
  return m;
}

/** The user's bubble of a voice turn: by utterance id, by turn, or the one held to talk that has no turn yet. */
function findVoiceMessage(turnId, clientMessageId) {
  const voiceMessages = state.messages.filter((x) => x.role === "user" && x.voice);
  return (clientMessageId && voiceMessages.find((x) => x.clientMessageId === clientMessageId))
    || (turnId && voiceMessages.find((x) => x.turnId === turnId))
    || voiceMessages.find((x) => !x.turnId && !x.accepted && ["listening", "hearing"].includes(x.status));
}

/** The user's bubble of a voice turn, made when the server heard speech this page did not start. */
function voiceMessage(turnId, clientMessageId) {
  let m = findVoiceMessage(turnId, clientMessageId);
  if (!m) {
    m = {
      role: "user", voice: true, key: `voice:${clientMessageId || turnId}`, clientMessageId, turnId, text: "",
      status: "hearing", accepted: false,
    };
    state.messages.push(m);
  }
  if (turnId) m.turnId = turnId;
  if (clientMessageId) m.clientMessageId = clientMessageId;
  render(m);
  return m;
}

/** A voice turn that failed before it was answered: said on the user's bubble, gently when nothing was heard. */
function voiceTurnFailed(turnId, error, text) {
  const answered = state.messages.some((x) => x.role === "assistant" && x.turnId === turnId);
  if (answered) return false;
  const m = findVoiceMessage(turnId, "");
  if (!m) {
    // A voice turn the page never saw begin (its audio was refused before anything was heard): no bubble.
    if (!(talking || prefs.handsFree)) return false;
    showError(text);
    return true;
  }
  m.turnId = turnId;
  const nothingHeard = error.code === INVALID_ARGUMENT && !m.text.trim();
  m.status = nothingHeard ? "empty" : "error";
  m.meta = nothingHeard ? "No speech recognized. Hold the microphone button and speak." : text;
  m.accepted = true; // nothing to send again
  if (state.turnId === turnId) state.turnId = "";
  hearing = false;
  render(m);
  updateStop();
  updateVoiceUi();
  if (!nothingHeard) showError(text);
  return true;
}

function endTurn(turnId, status, meta) {
  const m = assistantMessage(turnId);
  m.status = status;
  m.meta = meta;
  if (state.turnId === turnId) state.turnId = "";
  render(m);
  updateStop();
  updateVoiceUi();
  refreshConversations();
}

// --- rendering ---

function renderAll() {
  ui.transcript.replaceChildren();
  bubbles.clear();
  state.messages.forEach(render);
  updateStop();
}

function keyOf(m) {
  if (m.key) return m.key;
  return m.role === "assistant" ? `turn:${m.turnId}` : `user:${m.clientMessageId}`;
}

function render(m) {
  const key = keyOf(m);
  let li = bubbles.get(key);
  if (!li) {
    li = document.createElement("li");
    li.className = `message ${m.role}${m.voice ? " voice" : ""}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = m.role === "assistant" ? "Duplex" : m.voice ? "You (voice)" : "You";
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
  if (m.interrupted) li.dataset.interrupted = "true";
  li.setAttribute("aria-busy", String(["streaming", "listening", "hearing", "interim"].includes(m.status)));
  li.querySelector(".text").textContent = m.text;
  li.querySelector(".meta").textContent = m.meta || "";
  li.scrollIntoView({ block: "end" });
}

function removeMessage(m) {
  state.messages = state.messages.filter((x) => x !== m);
  const li = bubbles.get(keyOf(m));
  if (li) li.remove();
  bubbles.delete(keyOf(m));
  saveState();
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
  // Stop also silences an answer whose last words are still playing after its turn ended.
  ui.stop.disabled = !((opened && state.turnId) || player.isPlaying());
}

// --- voice ---

function voiceOptions() {
  return {
    speakAnswers: prefs.speakAnswers,
    inputFormat: { encoding: PCM16, sampleRateHz: INPUT_RATE_HZ },
    outputFormat: { encoding: PCM16 },
    turnDetection: prefs.handsFree ? SERVER_VAD : MANUAL,
  };
}

function voiceWanted() {
  return prefs.speakAnswers || prefs.handsFree;
}

/** Tells the session the page's voice options when they differ from what it has. */
function syncVoiceOptions() {
  if (!opened || !sessionVoice) return;
  const have = sessionVoice;
  const input = have.inputFormat || {};
  const same = Boolean(have.speakAnswers) === prefs.speakAnswers
    && (have.turnDetection === SERVER_VAD) === prefs.handsFree
    && [undefined, "AUDIO_ENCODING_UNSPECIFIED", PCM16].includes(input.encoding)
    && [undefined, 0, INPUT_RATE_HZ].includes(input.sampleRateHz);
  if (same) return;
  send({ updateSession: { voice: voiceOptions() } });
  sessionVoice = voiceOptions(); // until sessionUpdated says what the session has
}

function onMicFrame(frame) {
  if (prefs.handsFree) {
    sendBinary(frame);
    return;
  }
  if (!talking) return;
  if (talking.framesSent === 0) {
    // The utterance's first audio names it, so its transcript finds this bubble; the rest goes raw.
    const data = bytesToBase64(new Uint8Array(frame, 1));
    if (!opened) return;
    send({ audio: { data, clientMessageId: talking.id } });
    voiceStats.framesSent += 1;
    voiceStats.bytesSent += frame.byteLength;
  } else if (!sendBinary(frame)) {
    return;
  }
  talking.framesSent += 1;
}

/** Stops the playing answer at once; with `tell`, says how much was heard (Stop and push-to-talk barge-in). */
function interruptSpeech(tell) {
  const running = state.turnId;
  let stopped = false;
  for (const turnId of player.silenceAll()) {
    stopped = true;
    const played = player.playedMs(turnId);
    markSilenced(turnId);
    if (tell && turnId === running) {
      send({ interrupt: { turnId, playedMs: played } });
      voiceStats.interruptsSent += 1;
    }
  }
  // A running spoken turn whose audio has not started (or was skipped) is interrupted with nothing heard.
  if (tell && running && !stopped && player.has(running)) {
    player.silence(running);
    markSilenced(running);
    send({ interrupt: { turnId: running, playedMs: player.playedMs(running) } });
    voiceStats.interruptsSent += 1;
    stopped = true;
  }
  updateStop();
  updateVoiceUi();
  return stopped;
}

function silenceTurn(turnId) {
  if (player.isPlaying(turnId) || player.has(turnId)) player.silence(turnId);
  updateStop();
  updateVoiceUi();
}

function markSilenced(turnId) {
  const m = state.messages.find((x) => x.role === "assistant" && x.turnId === turnId);
  if (m) m.silenced = true;
  saveState();
}

async function startTalking() {
  if (talking || prefs.handsFree) return;
  hideError();
  unlockAudio();
  if (interruptSpeech(true)) voiceStats.bargeIns += 1;
  const id = `u-${newId()}`;
  talking = { id, framesSent: 0 };
  const m = {
    role: "user", voice: true, key: `voice:${id}`, clientMessageId: id, turnId: "", text: "", status: "listening",
    accepted: false,
  };
  state.messages.push(m);
  render(m);
  updateVoiceUi();
  if (!opened && !socket) connect();
  try {
    await mic.start();
  } catch (error) {
    micFailed(error);
  }
}

async function stopTalking() {
  const held = talking;
  if (!held || held.releasing) return;
  held.releasing = true; // frames still arriving (the flush) go out; a second release is ignored
  if (mic.starting) await mic.starting.catch(() => {});
  await mic.flush(); // the last few milliseconds of speech still sit in the worklet
  talking = null;
  const m = state.messages.find((x) => x.voice && x.clientMessageId === held.id);
  if (held.framesSent === 0) {
    if (m && !m.turnId && !m.text) removeMessage(m); // nothing was sent: nothing to answer
  } else {
    send({ commit: { clientMessageId: held.id } });
    voiceStats.commits += 1;
    if (m && m.status === "listening") {
      m.status = "hearing";
      render(m);
    }
  }
  saveState();
  updateVoiceUi();
}

function micFailed(error) {
  const held = talking;
  talking = null;
  if (held) {
    const m = state.messages.find((x) => x.voice && x.clientMessageId === held.id);
    if (m && !m.text) removeMessage(m);
  }
  if (prefs.handsFree) setHandsFree(false);
  const reason = error && error.name === "NotAllowedError" ? "access to the microphone was refused" : String(error.message || error);
  showError(`The microphone cannot be used: ${reason}.`);
  updateVoiceUi();
}

async function setHandsFree(on) {
  prefs.handsFree = on;
  ui.handsFree.checked = on;
  hearing = false;
  syncVoiceOptions(); // before any audio: the session's VAD must be on to hear it
  if (on) {
    unlockAudio();
    hideError();
    try {
      await mic.start();
    } catch (error) {
      micFailed(error);
    }
  } else {
    mic.stop();
  }
  updateVoiceUi();
}

function setSpeakAnswers(on) {
  prefs.speakAnswers = on;
  ui.speak.checked = on;
  savePrefs();
  if (on) unlockAudio();
  else interruptSpeech(false); // quiet now; the answer goes on as text
  syncVoiceOptions();
  updateVoiceUi();
}

function updateVoiceUi() {
  let kind = "idle";
  let text = "";
  if (talking) [kind, text] = ["listening", "Listening… release to send"];
  else if (hearing) [kind, text] = ["hearing", "Hearing speech…"];
  else if (player.isPlaying()) [kind, text] = ["speaking", "Speaking…"];
  else if (prefs.handsFree && mic.running) [kind, text] = ["listening", "Listening…"];
  if (ui.voiceState.dataset.state !== kind) {
    ui.voiceState.dataset.state = kind;
    ui.voiceState.textContent = text;
  }
  ui.mic.dataset.state = kind;
  ui.mic.setAttribute("aria-pressed", String(Boolean(talking)));
  const label = prefs.handsFree ? "Stop listening" : talking ? "Release to send" : "Hold to talk";
  ui.mic.setAttribute("aria-label", label);
  ui.micLabel.textContent = prefs.handsFree ? "Listening" : talking ? "Release to send" : "Hold to talk";
  updateStop();
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
  if (prefs.speakAnswers) unlockAudio();
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

ui.stop.addEventListener("click", () => {
  const turnId = state.turnId;
  // During a spoken answer: quiet at once, and the answer kept is what was heard. Otherwise a cancel.
  const spoken = interruptSpeech(true);
  if (turnId && !spoken) send({ cancel: { turnId } });
});

// Push-to-talk: hold the button (pointer, or Space while it is focused); Enter or a click without a
// pointer press (assistive technology) starts and ends an utterance in turn. In hands-free mode the button
// stops listening.
ui.mic.addEventListener("pointerdown", (down) => {
  if (down.button !== 0 || prefs.handsFree) return;
  down.preventDefault();
  ui.mic.focus();
  ui.mic.setPointerCapture(down.pointerId);
  startTalking();
});
for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) {
  ui.mic.addEventListener(name, () => stopTalking());
}
ui.mic.addEventListener("keydown", (key) => {
  if (key.key !== " ") return;
  key.preventDefault();
  if (!key.repeat) startTalking();
});
ui.mic.addEventListener("keyup", (key) => {
  if (key.key !== " ") return;
  key.preventDefault(); // no click: the release ends the utterance
  stopTalking();
});
ui.mic.addEventListener("click", (click) => {
  if (prefs.handsFree) {
    setHandsFree(false);
    return;
  }
  if (click.detail !== 0) return; // a pointer press: handled by pointerdown / pointerup
  if (talking) stopTalking();
  else startTalking();
});
ui.mic.addEventListener("contextmenu", (menu) => menu.preventDefault()); // a long touch is talking
ui.mic.addEventListener("blur", () => stopTalking());

ui.handsFree.addEventListener("change", () => setHandsFree(ui.handsFree.checked));
ui.speak.addEventListener("change", () => setSpeakAnswers(ui.speak.checked));
// Browsers start sound only after the user has touched the page.
for (const name of ["pointerdown", "keydown"]) {
  document.addEventListener(name, () => prefs.speakAnswers && unlockAudio(), { passive: true });
}

ui.newChat.addEventListener("click", () => {
  player.silenceAll();
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
ui.speak.checked = prefs.speakAnswers;
ui.handsFree.checked = false;
renderAll();
updateVoiceUi();
connect();
refreshConversations();
