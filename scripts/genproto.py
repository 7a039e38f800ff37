"""Generate the Python stubs for protos/ into duplex/<domain>/v1 (run as `make proto`).

`--check` generates into a scratch folder and exits 1 when the committed stubs differ, so stale stubs
fail the tests instead of shipping.
"""

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    well_known = str(resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Make every generated folder a regular package so `from duplex.chat.v1 import chat_pb2` works.
    for proto in files:
        package_dir = out_dir / Path(proto).parent
        while package_dir != out_dir / "duplex":
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent


def generated_files(root: Path) -> list[Path]:
    domains = {Path(p.relative_to(PROTO_ROOT)).parts[1] for p in proto_files()}
    found = []
    for domain in sorted(domains):
        found += sorted(p.relative_to(root) for p in (root / "duplex" / domain).rglob("*") if p.is_file()
                        and "__pycache__" not in p.parts)
    return found


def check() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        fresh_root = Path(scratch)
        (fresh_root / "duplex").mkdir()
        generate(fresh_root)
        fresh = generated_files(fresh_root)
        committed = generated_files(ROOT)
        stale = sorted(set(fresh) ^ set(committed))
        stale += [p for p in fresh if p in committed and not filecmp.cmp(fresh_root / p, ROOT / p, shallow=False)]
    if stale:
        print("generated stubs are stale; run `make proto`:", *map(str, stale), sep="\n  ")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the committed stubs are stale")
    if parser.parse_args().check:
        return check()
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
