// The microphone's AudioWorklet: mixes the input to mono, downsamples the context's rate to the session's
// input rate (16 kHz) by averaging each output sample's window of input samples (a box low-pass, enough for
// speech), and posts frames of PCM16 little-endian samples with a leading 0x00 byte: the WebSocket's binary
// audio frame, ready to send. A "flush" message posts what is buffered (the end of an utterance) at once.

class DuplexCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const settings = (options && options.processorOptions) || {};
    this.ratio = sampleRate / (settings.targetRate || 16000); // input samples per output sample
    this.frameSamples = settings.frameSamples || 1600; // 100 ms at 16 kHz
    this.phase = 0;
    this.sum = 0;
    this.count = 0;
    this.newFrame();
    this.port.onmessage = (message) => {
      if (message.data === "flush") this.post(true);
    };
  }

  newFrame() {
    this.frame = new Uint8Array(1 + 2 * this.frameSamples); // byte 0 stays 0x00: "raw audio follows"
    this.view = new DataView(this.frame.buffer);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      const channels = input.length;
      const length = input[0].length;
      for (let i = 0; i < length; i++) {
        let sample = 0;
        for (let c = 0; c < channels; c++) sample += input[c][i];
        this.sum += sample / channels;
        this.count += 1;
        this.phase += 1;
        while (this.phase >= this.ratio) {
          this.phase -= this.ratio;
          this.emit(this.count ? this.sum / this.count : 0);
          this.sum = 0;
          this.count = 0;
        }
      }
    }
    return true; // keep running while the node is connected
  }

  emit(value) {
    const clipped = Math.max(-1, Math.min(1, value));
    this.view.setInt16(1 + 2 * this.filled, clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff, true);
    this.filled += 1;
    if (this.filled === this.frameSamples) this.post(false);
  }

  post(flushed) {
    const bytes = this.filled === this.frameSamples ? this.frame : this.frame.slice(0, 1 + 2 * this.filled);
    this.port.postMessage({ frame: bytes.buffer, flushed }, [bytes.buffer]);
    this.newFrame();
  }
}

registerProcessor("duplex-capture", DuplexCapture);
