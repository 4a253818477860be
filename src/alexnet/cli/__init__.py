"""``alexnet train | evaluate | predict | prepare | bench | import-weights | features | retrieve | visualize |
export | serve | experiment | make-dataset | config``: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from alexnet.cli import bench, data, evaluate, experiment, tools, train
from alexnet.errors import AlexNetError, Stopped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alexnet",
        description="AlexNet (Krizhevsky, Sutskever & Hinton 2012): train, evaluate, inspect and deploy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # In the order of `alexnet --help`.
    for register in (
        train.register,
        evaluate.register,
        tools.register,
        data.register,
        bench.register,
        train.register_config,
        experiment.register,
    ):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.command_line = shlex.join(["alexnet", *args.argv])  # recorded with results
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("alexnet").setLevel(logging.INFO)
    try:
        return args.handler(args)
    except AlexNetError as e:
        print(f"alexnet: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"alexnet: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("alexnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
