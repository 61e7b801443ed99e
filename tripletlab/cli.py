"""The ``tripletlab`` command line: ``losses``, ``train``, ``evaluate``, ``sweep``, ``rerun``, ``analyze``.

Each subcommand lives in its own module exposing ``configure(parser)`` and ``main(args) -> int``;
this file only dispatches, loads plugins, and turns errors into one clear line (an unexpected one
with the path of a log file holding its traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path


def _losses():
    from experiments.commands import losses

    return losses


def _train():
    from experiments.commands import train

    return train


def _evaluate():
    from experiments.commands import evaluate

    return evaluate


def _sweep():
    from sweeps import command

    return command


def _rerun():
    from sweeps import rerun_command

    return rerun_command


def _analyze():
    from analysis import command

    return command


# name -> (the subcommand's module, imported only when chosen so start-up stays fast; its help)
SUBCOMMANDS = {
    "losses": (_losses, "list registered losses with their hyperparameters"),
    "train": (_train, "train one model and track it in MLflow"),
    "evaluate": (_evaluate, "test a trained model again (an MLflow run or a checkpoint)"),
    "sweep": (_sweep, "tune and compare losses with Optuna"),
    "rerun": (_rerun, "train a sweep's final run again with the same seed (noise at a fixed seed)"),
    "analyze": (_analyze, "figures and a report from a finished sweep"),
}


def log_traceback(command: str) -> Path:
    """Write the exception being handled, with its traceback, to a new log file; returns its path."""
    from experiments.tracking.secrets import mask_secrets

    name = f"tripletlab-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path = Path(tempfile.gettempdir()) / name
    path.write_text(mask_secrets(traceback.format_exc()))
    return path


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``chosen`` only that subcommand's options configured."""
    parser = argparse.ArgumentParser(prog="tripletlab", description="Compare triplet-loss variants fairly.")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="load a loss plugin (module path or .py file); repeatable. Also read from TRIPLETLAB_PLUGINS.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (load, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument(
            "--plugin",
            action="append",
            default=[],
            dest="sub_plugin",
            metavar="MODULE_OR_FILE",
            help=argparse.SUPPRESS,
        )
        if chosen in (None, name):
            load().configure(sp)
        sp.set_defaults(_load=load)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    from losses import load_plugins

    load_plugins([*args.plugin, *args.sub_plugin])
    from experiments.train.interrupts import interrupts_recorded

    try:
        with interrupts_recorded():
            return int(args._load().main(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tripletlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tripletlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug or an environment problem: one line here, the traceback in a file
        from experiments.tracking.secrets import mask_secrets

        first = (str(exc).strip().splitlines() or [""])[0]
        summary = mask_secrets(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
        print(
            f"tripletlab {args.command}: unexpected error: {summary} (traceback in "
            f"{log_traceback(args.command)}; include it when reporting a bug)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
