"""The `duplex` command: `duplex up` runs the whole system, `duplex chat` talks to it."""

import argparse
import asyncio
import sys

from duplex import chat_client, launcher, voice_client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="duplex", description="Duplex: a real-time AI assistant backend")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the four services on loopback until Ctrl-C")
    up.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for SERVING")

    chat = commands.add_parser("chat", help="chat in the terminal (Ctrl-C stops an answer, twice quits)")
    chat.add_argument("-m", "--message", help="send one message, print the answer and exit")
    chat.add_argument("--target", default=None, help="gateway address (default: DUPLEX_GATEWAY_TARGET or :50051)")
    chat.add_argument("--session", default="", help="re-attach to this session id")
    chat.add_argument("--conversation", default="", help="continue this conversation id")
    chat.add_argument("--model", default="", help="model name (default: the server's)")
    chat.add_argument("--system", default="", help="system prompt for a new session")

    voice = commands.add_parser("voice", help="speak a WAV recording to the assistant and save its spoken answer")
    voice.add_argument("--wav", required=True, help="the question, a 16-bit PCM WAV file")
    voice.add_argument("--out", default="answer.wav", help="where the answer's audio goes (default answer.wav)")
    voice.add_argument("--target", default=None, help="gateway address (default: DUPLEX_GATEWAY_TARGET or :50051)")
    voice.add_argument("--session", default="", help="re-attach to this session id")
    voice.add_argument("--model", default="", help="model name (default: the server's)")
    voice.add_argument("--voice", default="", help="the speaking voice (default: the speech model's)")

    token = commands.add_parser("token", help="mint a JWT for a user (needs DUPLEX_JWT_SECRET)")
    token.add_argument("--user", required=True, help="the user id (the token's subject)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")

    commands.add_parser("migrate", help="apply the history database migrations (DUPLEX_DATABASE_URL)")

    bench = commands.add_parser("bench", help="load-benchmark the whole chain on loopback (minutes)")
    bench.add_argument("--streams", default="1,100,500,1000",
                       help="concurrent streams per run, comma-separated (0 = no text runs)")
    bench.add_argument("--scenarios", default="openai,demo",
                       help="text scenarios, comma-separated: openai (the headline: llm_service's openai provider "
                            "against a fake OpenAI-compatible server; server direct, llm_service alone, full chain) "
                            "and demo (the in-process demo model, with the comparisons); default both")
    bench.add_argument("--tokens-per-second", type=float, default=50.0,
                       help="model pace per stream (the demo model's and the fake server's)")
    bench.add_argument("--duration", type=float, default=20.0, help="seconds of load per run")
    bench.add_argument("--ramp", type=float, default=5.0, help="seconds over which streams start")
    bench.add_argument("--compare-streams", type=int, default=100,
                       help="N for the side-by-side comparisons (0 = skip them)")
    bench.add_argument("--idle", type=int, default=2000, help="idle streams held open for memory (0 = skip)")
    bench.add_argument("--soak-minutes", type=float, default=0.0, help="memory soak at the knee (0 = skip)")
    bench.add_argument("--coalesce-ms", type=int, default=50, help="llm_service coalescing window")
    bench.add_argument("--voice-sessions", default="0",
                       help="concurrent voice sessions per run against a fake OpenAI-compatible upstream of fixed "
                            "latency, comma-separated, e.g. 1,20 (default 0 = skip voice)")
    bench.add_argument("--voice-offline-sessions", default="1,3",
                       help="voice sessions per run on the offline engines (local-whisper + local-demo + "
                            "local-piper), comma-separated; only when --voice-sessions runs voice (0 = skip)")
    bench.add_argument("--voice-duration", type=float, default=30.0, help="seconds of speaking per voice run")
    bench.add_argument("--voice-pause", type=float, default=1.0, help="seconds between a voice turn's end and the next")
    bench.add_argument("--output", default="bench-results.json", help="where the JSON report goes")

    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return asyncio.run(launcher.run_all(args.startup_timeout))
        if args.command == "token":
            return print_token(args.user, args.ttl)
        if args.command == "migrate":
            return migrate()
        if args.command == "bench":
            return run_bench(args)
        if args.command == "voice":
            return asyncio.run(voice_client.run(args))
        return asyncio.run(chat_client.run(args))
    except KeyboardInterrupt:
        return 130


def print_token(user_id: str, ttl_seconds: int) -> int:
    from gateway.auth import mint_token
    from gateway.settings import GatewaySettings

    try:
        print(mint_token(GatewaySettings(), user_id, ttl_seconds))
    except ValueError as error:
        print(f"duplex token: {error}", file=sys.stderr)
        return 1
    return 0


def run_bench(args) -> int:
    import json
    import tempfile

    from duplex.bench import runner

    def counts(text: str) -> tuple[int, ...]:
        return tuple(n for n in (int(part) for part in text.split(",") if part.strip()) if n > 0)

    voice_sessions = counts(args.voice_sessions)
    scenarios = tuple(part.strip() for part in args.scenarios.split(",") if part.strip())
    if unknown := set(scenarios) - {"openai", "demo"}:
        print(f"duplex bench: unknown scenarios {sorted(unknown)} (choose from openai, demo)", file=sys.stderr)
        return 2
    config = runner.BenchConfig(
        streams=counts(args.streams), tokens_per_second=args.tokens_per_second,
        duration_seconds=args.duration, ramp_seconds=args.ramp, compare_streams=args.compare_streams,
        idle_streams=args.idle, soak_minutes=args.soak_minutes, coalesce_window_ms=args.coalesce_ms,
        output=args.output, voice_sessions=voice_sessions,
        voice_offline_sessions=counts(args.voice_offline_sessions) if voice_sessions else (),
        voice_duration_seconds=args.voice_duration, voice_pause_seconds=args.voice_pause, scenarios=scenarios,
    )
    with tempfile.TemporaryDirectory(prefix="duplex-bench-") as data_dir:
        report = asyncio.run(runner.run(config, data_dir))
    runner.print_summary(report)
    with open(args.output, "w") as out:
        json.dump(report, out, indent=2)
    print(f"\nwrote {args.output}")
    return 0


def migrate() -> int:
    from duplex.common.logs import configure_logging
    from history_service.migrate import migrate as apply_migrations
    from history_service.settings import HistorySettings

    settings = HistorySettings()
    configure_logging(settings.log_level, "migrate")
    revision = asyncio.run(apply_migrations(settings))
    print(f"duplex migrate: the history database is at revision {revision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
