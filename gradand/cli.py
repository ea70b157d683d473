"""The ``gradand`` command line (grows with the experiments; see ``gradand --help``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _patchwork(args: argparse.Namespace) -> int:
    from gradand.experiments.patchwork import default_combiners, train

    print(f"{'method':<16}{'trained on':<12}{'weights':<44}{'held-out loss':>14}")
    for envs in [(0, 1, 2, 3), (0, 1)]:
        for name, combiner in default_combiners().items():
            result = train(combiner, environments=envs)
            weights = "[" + ", ".join(f"{w:5.2f}" for w in result.weights) + "]"
            held = "-" if len(envs) == 4 else f"{result.heldout_loss:.3f}"
            print(f"{name:<16}{str(len(envs)) + ' envs':<12}{weights:<44}{held:>14}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradand", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    reproduce = sub.add_parser("reproduce", help="reproduce one of the paper's experiments")
    experiments = reproduce.add_subparsers(dest="experiment", required=True)
    experiments.add_parser("patchwork", help="the reference notebook's linear regression (numpy)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradand`` command.

    Example:
        >>> from gradand.cli import main
        >>> main(["reproduce", "patchwork"])  # doctest: +ELLIPSIS
        method ...
        0
    """
    args = build_parser().parse_args(argv)
    handlers = {"patchwork": _patchwork}
    return handlers[args.experiment](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
