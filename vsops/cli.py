"""The ``vsops`` command: ``vsops info`` and ``vsops bench``."""
from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vsops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, compiled and importable backends, backend per device")
    bench = commands.add_parser("bench", help="DiffTopK benchmark summary against Algorithm 1 and the bandwidth bound")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    args = parser.parse_args(argv)

    if args.command == "info":
        from vsops.info import info

        info()
    else:
        from vsops.bench import summary

        summary(args.device, getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
