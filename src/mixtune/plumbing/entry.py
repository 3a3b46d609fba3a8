"""How a command runs: its parser (`--params` for every stage), a MixtuneError as one line and exit 1, an
interrupt as exit 130, never a traceback. Each stage module's `main` runs through it (`python -m
mixtune.stages.<name>`, what dvc.yaml calls), and so does the `mixtune` command (cli.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mixtune.plumbing.errors import MixtuneError


def parser(prog: str, description: str, params: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    if params:
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def run(prog: str, func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    try:
        func(args)
    except MixtuneError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], None], argv: list[str] | None = None) -> int:
    return run(p.prog, func, p.parse_args(argv))
