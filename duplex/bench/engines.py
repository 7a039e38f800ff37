"""The offline speech engines alone, one job at a time, through llm_service's own engine functions: what one
utterance costs local-whisper and what one sentence costs local-piper (wall time and CPU time). Run in its
own process by `duplex bench`, which prints one JSON object:

    python -m duplex.bench.engines '{"audio_path": "utterance.pcm", "sentences": ["..."], "repeats": 5}'
"""

import json
import sys
import time


def timed(function, *args) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def measure(config: dict) -> dict:
    from llm_service.providers import local_speech

    threads = config.get("threads", 1)
    with open(config["audio_path"], "rb") as source:
        utterance = source.read()
    rate = config.get("sample_rate", 16000)
    whisper, load_ms, _ = timed(local_speech.whisper_engine, threads, 1)
    transcripts, walls, cpus = [], [], []
    for _ in range(config.get("repeats", 5)):
        text, wall, cpu = timed(local_speech.transcribe_pcm, whisper, utterance, rate, "en")
        transcripts.append(text)
        walls.append(wall)
        cpus.append(cpu)
    whisper_figures = {
        "load_ms": load_ms, "utterance_seconds": len(utterance) / 2 / rate, "transcript": transcripts[0],
        "wall_ms_p50": median(walls), "cpu_ms_p50": median(cpus), "threads": threads,
    }
    piper, load_ms, _ = timed(local_speech.piper_engine, threads)
    voice_rate = local_speech.piper_sample_rate()
    sentences = []
    for sentence in config["sentences"]:
        walls, cpus = [], []
        for _ in range(config.get("repeats", 5)):
            pcm, wall, cpu = timed(local_speech.synthesize_text, piper, sentence)
            walls.append(wall)
            cpus.append(cpu)
        audio_ms = len(pcm) / 2 / voice_rate * 1000
        sentences.append({"text": sentence, "chars": len(sentence), "audio_ms": audio_ms,
                          "wall_ms_p50": median(walls), "cpu_ms_p50": median(cpus),
                          "real_time_factor": median(walls) / max(audio_ms, 1e-9)})
    total_audio = sum(s["audio_ms"] for s in sentences)
    piper_figures = {
        "load_ms": load_ms, "threads": threads, "sentences": sentences,
        "wall_ms_per_sentence": sum(s["wall_ms_p50"] for s in sentences) / max(len(sentences), 1),
        "cpu_ms_per_sentence": sum(s["cpu_ms_p50"] for s in sentences) / max(len(sentences), 1),
        "real_time_factor": sum(s["wall_ms_p50"] for s in sentences) / max(total_audio, 1e-9),
    }
    return {"whisper": whisper_figures, "piper": piper_figures}


def main() -> None:
    print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
