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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class System:
    """The four services as separate processes on free loopback ports."""

    def __init__(self, data_dir: str, tokens_per_second: float, coalesce_window_ms: int):
        self.ports = {name: free_port() for name in ("GATEWAY", "LLM", "SESSION", "HISTORY", "HTTP")}
        self.env = dict(os.environ)
        self.env.update({f"DUPLEX_{name}_LISTEN": f"127.0.0.1:{port}" for name, port in self.ports.items()})
        self.env.update(
            DUPLEX_DATA_DIR=data_dir, DUPLEX_LOCAL_TOKENS_PER_SECOND=str(tokens_per_second),
            DUPLEX_LLM_COALESCE_WINDOW_MS=str(coalesce_window_ms), DUPLEX_LOG_LEVEL="WARNING",
            DUPLEX_QUOTA_MESSAGES_PER_MINUTE="0", DUPLEX_QUOTA_TOKENS_PER_DAY="0",
        )
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


async def measure(system: System, transport: str, streams: int, config: BenchConfig, label: str) -> dict:
    """One scenario: drive `streams` streams for the configured time; CPU per relayed message per process."""
    reply_seconds = 48 / config.tokens_per_second  # the demo model's reply is ~45-50 tokens
    load = {
        "transport": transport, "target": system.target(transport), "streams": streams,
        "duration_seconds": config.duration_seconds, "ramp_seconds": min(config.ramp_seconds, streams / 50),
        "interval_seconds": reply_seconds + 0.5,
    }
    before = {name: procstats.sample(pid) for name, pid in system.pids().items()}
    raw = await run_loadgen(load)
    after = {name: procstats.sample(pid) for name, pid in system.pids().items()}
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


def format_row(r: dict) -> str:
    cpu = " ".join(f"{name.split('_')[0][:4]}={us:.0f}" for name, us in r["cpu_us_per_message"].items())
    return (f"  {r['label']:<22} {r['transport']:<8} N={r['streams']:<5} ttft p50/p99 {r['ttft_p50_ms']:6.1f}/"
            f"{r['ttft_p99_ms']:6.1f} ms  delivery p50/p99 {r['delivery_p50_ms']:6.1f}/{r['delivery_p99_ms']:6.1f} ms"
            f"  {r['tokens_per_second']:7.0f} tok/s ({r['tokens_per_delta']:.1f}/delta)  errors {r['errors']}"
            f"  cpu us/msg {cpu}")


async def run(config: BenchConfig, data_dir: str) -> dict:
    report: dict = {"machine": machine(), "config": config.__dict__, "runs": [], "started": time.time()}
    print(f"Duplex benchmark on {report['machine']['description']}", flush=True)
    async with System(f"{data_dir}/coalesced", config.tokens_per_second, config.coalesce_window_ms) as system:
        for streams in config.streams:
            report["runs"].append(await measure(system, "grpc", streams, config, "full chain"))
        compared = (("llm", "llm_service direct"), ("ws", "edge: WebSocket"), ("grpc-web", "edge: grpc-web"))
        for transport, label in compared if config.compare_streams else ():
            try:
                report["runs"].append(await measure(system, transport, config.compare_streams, config, label))
            except Exception as error:  # an edge that isn't there is reported, not fatal
                report["runs"].append({"label": label, "transport": transport, "failed": str(error)[:500]})
                print(f"  {label}: failed: {str(error)[:200]}", flush=True)
        if config.idle_streams:
            report["idle"] = await measure_idle(system, config.idle_streams)
        report["knee_streams"] = knee(report["runs"])
        if config.soak_minutes:
            report["soak"] = await soak(system, report["knee_streams"] or min(config.streams), config)
    if config.compare_streams:
        async with System(f"{data_dir}/uncoalesced", config.tokens_per_second, 0) as system:
            report["runs"].append(await measure(system, "grpc", config.compare_streams, config, "coalescing off"))
    report["ratios"] = ratios(report["runs"], config.compare_streams)
    return report


def knee(runs: list[dict]) -> int | None:
    """The largest N at which the full chain's p99 delivery latency stays under 100 ms, error-free."""
    good = [r["streams"] for r in runs if r.get("label") == "full chain" and r["delivery_p99_ms"] < 100
            and r["errors"] == 0]
    return max(good, default=None)


def ratios(runs: list[dict], streams: int) -> dict:
    def find(label: str) -> dict | None:
        return next((r for r in runs if r.get("label") == label and r.get("streams") == streams
                     and "failed" not in r), None)

    full, direct = find("full chain"), find("llm_service direct")
    out: dict = {}
    if full and direct:
        out["gateway_added_ttft_p50_ms"] = full["ttft_p50_ms"] - direct["ttft_p50_ms"]
        out["gateway_added_ttft_p99_ms"] = full["ttft_p99_ms"] - direct["ttft_p99_ms"]
    for label in ("edge: WebSocket", "edge: grpc-web", "coalescing off"):
        other = find(label)
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
    print("\nSummary")
    print(f"  knee (largest N with p99 delivery < 100 ms): {report['knee_streams']}")
    for key, value in report["ratios"].items():
        print(f"  {key}: {value:.2f}")
    if "idle" in report:
        print(f"  gateway memory per idle stream: {report['idle']['kib_per_idle_stream']:.1f} KiB")
