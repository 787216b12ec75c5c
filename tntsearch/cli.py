"""``tntsearch COMMAND ...``: one command for every tool, as ``mlflow``, ``ray`` and ``optuna`` do.

``tntsearch X ARGS`` runs exactly what ``python -m tntsearch.X ARGS`` runs (``runpy``), so the
flags, ``--help`` and exit codes are each module's own (docs/design.md, module map) and both
forms keep working. ``tntsearch --help`` lists the commands without importing any of them.
Tab completion (bash, zsh): ``eval "$(register-python-argcomplete tntsearch)"``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import runpy
import sys
from typing import Sequence

__all__ = ["COMMANDS", "main"]

# command -> the help line; it runs `python -m tntsearch.<command>`
COMMANDS: dict[str, str] = {
    "run": "search the architectures a spec describes (Ray Tune + Optuna, tracked in MLflow)",
    "cost": "params, MACs and measured speed of one architecture",
    "train": "train one architecture with a spec's data and recipe (Ray Train)",
    "data": "write FFCV .beton files (image folders, .npz, CIFAR, digits)",
    "report": "a search's front from MLflow as one HTML page; import fallback files",
    "export": "ship a front point: safetensors, TorchScript, torch.export, ONNX, MLflow registry",
    "supernet": "train a weight-sharing supernet and search it",
}


def _available(command: str) -> bool:
    return importlib.util.find_spec(f"tntsearch.{command}") is not None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tntsearch", description="Hardware-aware architecture search for TNT vision models.",
        epilog="`tntsearch COMMAND --help` shows a command's options; `python -m tntsearch.COMMAND` is the same.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text if _available(name) else f"{text} (not available yet)", add_help=False)
    return p


def _complete() -> None:
    """Shell completion, only when the shell asks (argcomplete sets ``_ARGCOMPLETE``): the
    command names, and the options of the commands whose module exposes its parser."""
    import argcomplete

    p = argparse.ArgumentParser(prog="tntsearch")
    sub = p.add_subparsers(dest="command")
    for name, text in COMMANDS.items():
        parents = []
        if _available(name):
            mod = importlib.import_module(f"tntsearch.{name}")
            make = next((getattr(mod, f) for f in ("_parser", "build_parser", "_build_parser") if hasattr(mod, f)), None)
            parents = [make()] if make else []
        sub.add_parser(name, help=text, parents=parents, add_help=False, conflict_handler="resolve")
    argcomplete.autocomplete(p)


def main(argv: Sequence[str] | None = None) -> int:
    if "_ARGCOMPLETE" in os.environ:
        _complete()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv)  # the list of commands (--help), or an error naming them
        return 2
    command, rest = argv[0], argv[1:]
    if not _available(command):
        print(f"error: `tntsearch {command}` is not available in this version", file=sys.stderr)
        return 2
    sys.argv = [f"tntsearch {command}", *rest]
    runpy.run_module(f"tntsearch.{command}", run_name="__main__", alter_sys=True)
    return 0  # a module whose main returned without sys.exit


if __name__ == "__main__":
    sys.exit(main())
