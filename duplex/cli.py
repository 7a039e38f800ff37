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

    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return asyncio.run(launcher.run_all(args.startup_timeout))
        return asyncio.run(chat_client.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
