// Voice for the web chat: one AudioContext for the microphone (an AudioWorklet that turns it into 16 kHz
// PCM16 frames) and for the spoken answers (PCM16 chunks scheduled back to back behind a small jitter
// buffer). Player keeps, per turn, what was scheduled where, so it can say how much of the turn's answer
// audio has really been played and silence it at once.

export const INPUT_RATE_HZ = 16000;
const FRAME_SAMPLES = INPUT_RATE_HZ / 10; // 100 ms frames
const JITTER_SECONDS = 0.12; // how far ahead the first chunk (or the first after a gap) is scheduled
const MIN_LEAD_SECONDS = 0.02; // a chunk due sooner than this would start late: rebuffer instead
const DEFAULT_OUTPUT_RATE_HZ = 22050;
const FLUSH_TIMEOUT_MS = 400;

let context = null;

/** The page's AudioContext, made on first use (ideally inside a user gesture, so it may start). */
export function audioContext() {
  if (!context) {
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) return null;
    context = new Context({ latencyHint: "interactive" });
  }
  return context;
}

/** Let sound play: browsers keep an AudioContext suspended until the user has interacted with the page. */
export function unlockAudio() {
  const ctx = audioContext();
  if (ctx && ctx.state === "suspended") ctx.resume().catch(() => {});
  return ctx;
}

export function base64ToBytes(text) {
  const binary = atob(text || "");
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export function bytesToBase64(bytes) {
  let binary = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(binary);
}

function pcm16ToFloat32(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const samples = new Float32Array(bytes.byteLength >> 1);
  for (let i = 0; i < samples.length; i++) samples[i] = view.getInt16(2 * i, true) / 0x8000;
  return samples;
}

/** The microphone as 100 ms frames of 16 kHz PCM16, each an ArrayBuffer whose first byte is 0x00. */
export class Microphone {
  constructor(onFrame) {
    this.onFrame = onFrame;
    this.stream = null;
    this.source = null;
    this.node = null;
    this.starting = null;
    this.flushWaiters = [];
  }

  get running() {
    return this.node !== null;
  }

  /** Opens the microphone (once); resolves when frames flow. Rejects when the user or browser refuses. */
  start() {
    if (this.node) return Promise.resolve();
    if (!this.starting) {
      this.starting = this.open().finally(() => {
        this.starting = null;
      });
    }
    return this.starting;
  }

  async open() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this browser cannot record audio here (the page needs HTTPS or localhost)");
    }
    const ctx = unlockAudio();
    if (!ctx || !ctx.audioWorklet) throw new Error("this browser has no AudioWorklet");
    if (!ctx.duplexCaptureLoaded) {
      await ctx.audioWorklet.addModule("/static/capture-worklet.js");
      ctx.duplexCaptureLoaded = true;
    }
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const node = new AudioWorkletNode(ctx, "duplex-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { targetRate: INPUT_RATE_HZ, frameSamples: FRAME_SAMPLES },
    });
    node.port.onmessage = (message) => {
      const { frame, flushed } = message.data;
      if (frame.byteLength > 1) this.onFrame(frame);
      if (flushed) this.flushWaiters.splice(0).forEach((resolve) => resolve());
    };
    const source = ctx.createMediaStreamSource(stream);
    source.connect(node);
    node.connect(ctx.destination); // pulls the worklet; its output is silence
    Object.assign(this, { stream, source, node });
  }

  /** Delivers the samples still buffered in the worklet (through onFrame), then resolves. */
  flush() {
    if (!this.node) return Promise.resolve();
    return new Promise((resolve) => {
      this.flushWaiters.push(resolve);
      this.node.port.postMessage("flush");
      setTimeout(resolve, FLUSH_TIMEOUT_MS); // a suspended context never answers
    });
  }

  stop() {
    if (this.source) this.source.disconnect();
    if (this.node) {
      this.node.port.onmessage = null;
      this.node.disconnect();
    }
    if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
    this.flushWaiters.splice(0).forEach((resolve) => resolve());
    Object.assign(this, { stream: null, source: null, node: null });
  }
}

/** Plays answer audio; one TurnPlayback per turn. */
export class Player {
  constructor(onChange) {
    this.onChange = onChange;
    this.turns = new Map(); // turnId -> playback
    this.stats = {
      chunksReceived: 0, chunksScheduled: 0, chunksPlayed: 0, chunksSkipped: 0, msScheduled: 0, msPlayed: 0,
      sourcesStarted: 0, sourcesStopped: 0, turnsSilenced: 0,
    };
    this.lastTurnId = "";
  }

  /** The offsets of the chunks scheduled for the latest turn that had audio here, and where it goes on. */
  latest() {
    const p = this.turns.get(this.lastTurnId);
    if (!p) return { offsetsScheduled: [], nextOffsetMs: 0 };
    return { offsetsScheduled: p.chunks.map((chunk) => chunk.offsetMs), nextOffsetMs: p.nextOffsetMs || 0 };
  }

  playback(turnId) {
    let p = this.turns.get(turnId);
    if (!p) {
      p = { turnId, chunks: [], nextOffsetMs: null, scheduledEnd: 0, silenced: false, playedMs: null };
      this.turns.set(turnId, p);
      const stale = [...this.turns.keys()].slice(0, -20); // forget old turns
      stale.forEach((id) => this.turns.delete(id));
    }
    return p;
  }

  has(turnId) {
    const p = this.turns.get(turnId);
    return Boolean(p && p.chunks.length);
  }

  isSilenced(turnId) {
    const p = this.turns.get(turnId);
    return Boolean(p && p.silenced);
  }

  /** Schedules one AudioOutput (proto3 JSON) of a turn; false when it is not played. */
  play(turnId, audio) {
    this.stats.chunksReceived += 1;
    const p = this.playback(turnId);
    const ctx = audioContext();
    const encoding = (audio.format && audio.format.encoding) || "AUDIO_ENCODING_PCM16";
    const offsetMs = Number(audio.offsetMs || 0);
    const duplicate = p.nextOffsetMs !== null && offsetMs < p.nextOffsetMs - 1;
    if (p.silenced || duplicate || !ctx || encoding !== "AUDIO_ENCODING_PCM16") return this.skip();
    if (ctx.state !== "running") {
      ctx.resume().catch(() => {});
      return this.skip(); // sound is blocked until the user touches the page; the text goes on
    }
    const samples = pcm16ToFloat32(base64ToBytes(audio.data));
    if (!samples.length) return this.skip();
    const durationMs = Number(audio.durationMs || 0);
    const rate = Number((audio.format && audio.format.sampleRateHz) || 0)
      || (durationMs ? Math.round((samples.length * 1000) / durationMs) : DEFAULT_OUTPUT_RATE_HZ);
    const buffer = ctx.createBuffer(1, samples.length, rate);
    buffer.copyToChannel(samples, 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const now = ctx.currentTime;
    const start = p.scheduledEnd < now + MIN_LEAD_SECONDS ? now + JITTER_SECONDS : p.scheduledEnd;
    const chunk = {
      source, start, end: start + buffer.duration, offsetMs, durationMs: durationMs || buffer.duration * 1000,
      done: false,
    };
    source.onended = () => {
      if (!chunk.done) {
        chunk.done = true;
        this.stats.chunksPlayed += 1;
        this.stats.msPlayed += Math.round(chunk.durationMs);
      }
      this.onChange();
    };
    source.start(start);
    p.chunks.push(chunk);
    this.lastTurnId = turnId;
    p.scheduledEnd = chunk.end;
    p.nextOffsetMs = offsetMs + chunk.durationMs;
    this.stats.chunksScheduled += 1;
    this.stats.sourcesStarted += 1;
    this.stats.msScheduled += Math.round(chunk.durationMs);
    this.onChange();
    return true;
  }

  skip() {
    this.stats.chunksSkipped += 1;
    return false;
  }

  /** How much of the turn's answer audio has been played, on the turn's own timeline (offset_ms). */
  playedMs(turnId) {
    const p = this.turns.get(turnId);
    if (!p || !p.chunks.length) return 0;
    if (p.playedMs !== null) return p.playedMs;
    const now = audioContext().currentTime;
    let played = p.chunks[0].offsetMs; // what came before this page's first chunk played elsewhere
    for (const chunk of p.chunks) {
      if (chunk.start > now) break;
      played = chunk.offsetMs + Math.min(chunk.durationMs, (now - chunk.start) * 1000);
    }
    return Math.round(played);
  }

  isPlaying(turnId) {
    const ctx = context;
    if (!ctx) return false;
    const now = ctx.currentTime;
    const playing = (p) => !p.silenced && p.scheduledEnd > now;
    if (turnId !== undefined) {
      const p = this.turns.get(turnId);
      return Boolean(p && playing(p));
    }
    return [...this.turns.values()].some(playing);
  }

  /** Stops the turn's audio at once (every scheduled source); later audio of it is ignored. Returns played ms. */
  silence(turnId) {
    const p = this.playback(turnId);
    if (p.silenced) return p.playedMs || 0;
    const played = this.playedMs(turnId);
    p.playedMs = played;
    p.silenced = true;
    for (const chunk of p.chunks) {
      if (chunk.done) continue;
      chunk.done = true;
      try {
        chunk.source.stop();
      } catch {
        // never started: nothing to stop
      }
      chunk.source.disconnect();
      this.stats.sourcesStopped += 1;
    }
    this.stats.turnsSilenced += 1;
    this.onChange();
    return played;
  }

  /** Silences every turn that is still playing; their ids. */
  silenceAll() {
    const stopped = [];
    for (const p of this.turns.values()) {
      if (!p.silenced && p.chunks.some((chunk) => !chunk.done)) {
        this.silence(p.turnId);
        stopped.push(p.turnId);
      }
    }
    return stopped;
  }
}
