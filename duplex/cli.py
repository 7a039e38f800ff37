"""The `duplex` command: `duplex up` runs the whole system, `duplex chat` talks to it."""

import argparse
import asyncio
import sys

from duplex import chat_client, launcher


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

    token = commands.add_parser("token", help="mint a JWT for a user (needs DUPLEX_JWT_SECRET)")
    token.add_argument("--user", required=True, help="the user id (the token's subject)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")

    commands.add_parser("migrate", help="apply the history database migrations (DUPLEX_DATABASE_URL)")

    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return asyncio.run(launcher.run_all(args.startup_timeout))
        if args.command == "token":
            return print_token(args.user, args.ttl)
        if args.command == "migrate":
            return migrate()
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


def migrate() -> int:
    from history_service.migrate import migrate as apply_migrations
    from history_service.settings import HistorySettings

    asyncio.run(apply_migrations(HistorySettings()))
    print("duplex migrate: the history database is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
