"""`duplex bench` end to end, small: every scenario runs (the headline openai rows against the fake
OpenAI-compatible server, the demo model's rows, voice against its fake upstream too), and the report carries
its figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

DUPLEX = str(Path(sys.executable).parent / "duplex")
SERVICES = {"gateway", "llm_service", "session_service", "history_service"}
OPENAI_LABELS = ["openai: server direct", "openai: llm_service alone", "openai: full chain"]
DEMO_LABELS = ["demo: full chain", "demo: llm_service direct", "demo: WebSocket", "demo: grpc-web",
               "demo: coalescing off"]


def test_a_small_benchmark_runs_every_scenario_and_reports_its_figures(tmp_path):
    output = tmp_path / "bench.json"
    finished = subprocess.run(
        [DUPLEX, "bench", "--streams", "2", "--duration", "2", "--compare-streams", "2", "--idle", "20",
         "--tokens-per-second", "100", "--voice-sessions", "2", "--voice-offline-sessions", "0",
         "--voice-duration", "1", "--voice-pause", "0", "--output", str(output)],
        capture_output=True, text=True, timeout=240,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "knee" in finished.stdout
    assert "Voice: end of speech" in finished.stdout
    assert "\nTargets\n" in finished.stdout and "coalescing window: 50 ms" in finished.stdout
    report = json.loads(output.read_text())

    assert [run["label"] for run in report["runs"]] == OPENAI_LABELS + DEMO_LABELS
    for run in report["runs"]:
        assert "failed" not in run, run
        assert run["errors"] == 0 and run["turns"] > 0, run
        assert run["tokens_per_second"] > 0 and run["tokens_per_delta"] >= 1, run
        assert 0 < run["ttft_p50_ms"] <= run["ttft_p99_ms"], run
        assert run["cpu_us_per_token_services"] == pytest.approx(sum(run["cpu_us_per_token"][n] for n in SERVICES))
    for run in report["runs"][3:]:
        assert set(run["cpu_us_per_message"]) == SERVICES | {"loadgen"}
    assert report["runs"][-1]["tokens_per_delta"] == 1  # coalescing off: one token per delta

    # The headline: the openai provider against the fake server; its CPU is measured apart.
    direct, alone, chain = report["runs"][:3]
    assert direct["tokens_per_delta"] == 1  # a content chunk per token, straight from the server
    for run in (direct, alone, chain):
        assert set(run["cpu_us_per_token"]) == SERVICES | {"fake_upstream", "loadgen"}, run
    for run in (alone, chain):
        assert run["capacity_tokens_per_second"] > 0, run
    [added] = report["openai"]["added_ttft"]
    assert added["streams"] == 2 and {"full_chain_p50_ms", "full_chain_p99_ms", "llm_service_p50_ms"} <= set(added)
    assert report["openai"]["knee_streams"] in (None, 2)
    assert all(isinstance(t["met"], bool | None) and t["figure"] for t in report["openai"]["targets"])
    assert report["idle"]["idle_streams"] == 20 and "kib_per_idle_stream" in report["idle"]
    assert report["knee_streams"] in (None, 2)
    assert {"gateway_added_ttft_p50_ms", "gateway_cpu_WebSocket_vs_grpc"} <= set(report["ratios"])

    # Voice against the fake upstream of fixed latency: every turn heard, answered and spoken.
    voice = report["voice"]
    assert voice["audio_lead_ms"] >= 600_000 and voice["upstream_latencies_ms"]["transcription_ms"] > 0
    [run] = voice["runs"]
    assert run["label"] == "voice, fake upstream" and run["sessions"] == 2, run
    assert run["errors"] == 0 and run["turns"] >= 2, run
    fixed = sum(voice["upstream_latencies_ms"].values())
    assert run["upstream_fixed_ms"] == fixed
    assert fixed < run["first_audio_ms"]["p50"] <= run["first_audio_ms"]["p99"], run
    assert run["added_ms"]["p50"] == run["first_audio_ms"]["p50"] - fixed
    assert run["transcript_ms"]["p50"] < run["first_delta_ms"]["p50"] < run["first_audio_ms"]["p50"], run
    assert run["upstream_requests_per_turn"]["transcriptions"] == 1 and run["upstream_requests_per_turn"]["chats"] == 1
    assert run["upstream_requests_per_turn"]["speeches"] >= 1 and run["answer_audio_ms_per_turn"] > 0, run
    assert set(run["cpu_ms_per_turn"]) == {
        "gateway", "llm_service", "session_service", "history_service", "fake_upstream", "loadgen"}
    assert voice["target"]["sessions"] == 2 and isinstance(voice["target"]["met"], bool)
