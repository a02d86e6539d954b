"""Command line entry point: ``python -m zeda_lightning <subcommand> ...``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from zeda_lightning.demo import main as demo_main

        demo_main(argv[1:])
        return
    print("usage: python -m zeda_lightning demo [--family F] [--routing R]", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
