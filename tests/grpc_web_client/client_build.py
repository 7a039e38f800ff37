"""Build the browser client at test time: stubs from `buf generate` (protoc-gen-es), one bundle from esbuild.

Both tools come from node_modules (`make node-tools`); nothing is fetched and nothing lands in the repo.
"""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NODE_BIN = ROOT / "node_modules" / ".bin"
PAGE = HERE / "index.html"


def node_tool(name: str) -> Path:
    tool = NODE_BIN / name
    if not tool.exists():
        raise FileNotFoundError(f"{tool} is missing: run `make node-tools` (npm install)")
    return tool


def run(command: list, **options) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, **options)
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout}{result.stderr}"


def generate_stubs(out_dir: Path) -> None:
    """ChatService and ConversationService for Connect-ES, into out_dir/duplex-stubs/duplex/chat/v1/."""
    template = HERE / "buf.gen.yaml"
    run(
        [node_tool("buf"), "generate", "--template", template, "-o", out_dir, "--path", "protos/duplex/chat/v1"],
        cwd=ROOT,  # buf.yaml and the template's local plugin path are relative to the repo root
    )


def bundle(out_dir: Path) -> Path:
    """client.js and everything it imports as one browser script."""
    target = out_dir / "client.js"
    # The stubs live outside the repo: NODE_PATH lets `duplex-stubs/...` resolve to them, and lets the
    # stubs' own `@bufbuild/protobuf` imports resolve to the repo's node_modules.
    env = {**os.environ, "NODE_PATH": os.pathsep.join([str(out_dir), str(ROOT / "node_modules")])}
    run(
        [node_tool("esbuild"), HERE / "client.js", "--bundle", "--format=iife", "--platform=browser",
         "--target=chrome120", f"--outfile={target}", "--log-level=warning"],
        env=env,
    )
    return target


def build_client(out_dir: Path) -> Path:
    generate_stubs(out_dir)
    return bundle(out_dir)
