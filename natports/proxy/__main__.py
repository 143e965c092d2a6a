"""`python -m natports.proxy [--state-dir DIR] [--config FILE] [--settings TOML]`: no CLI."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import NatportsError
from .config import config_path
from .daemon import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m natports.proxy")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("NATPORTS_STATE_DIR", "/var/lib/natports")),
    )
    parser.add_argument("--config", type=Path, default=None, help="default: STATE_DIR/proxy.json")
    parser.add_argument(
        "--settings",
        type=Path,
        default=Path(os.environ.get("NATPORTS_CONFIG", "/etc/natports/natports.toml")),
        help="the operator's natports.toml, for its [proxy] limits",
    )
    args = parser.parse_args(argv)
    try:
        serve(args.state_dir, args.config or config_path(args.state_dir), args.settings)
    except NatportsError as exc:
        print(f"natports proxy: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
