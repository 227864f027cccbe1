"""``labpnn`` command line: one subcommand per job, each defined in the module that does the job.

A command's module provides ``cli_<command>(parser) -> handler``: it adds its arguments to the
parser and returns ``handler(args) -> int`` (the exit code). Only the chosen command's module is
imported, so ``labpnn serve`` never imports torch and ``labpnn --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("labpnn.serve", "serve a rig (--config RIG.toml) or a fitted twin (--twin TWIN.pt) over ZeroMQ"),
    "monitor": ("labpnn.remote.monitor", "follow a device server's live stream: rates and trace statistics"),
    "keys": ("labpnn.remote.security", "create a CurveZMQ key pair"),
    "sim": ("labpnn.benches.cli", "start simulated instruments on 127.0.0.1 (e.g. `labpnn sim optical`)"),
    "inspect": ("labpnn.sessions.cli", "summarise a session file (--plot, --json)"),
    "import": ("labpnn.sessions.cli", "turn controls/traces recorded elsewhere (CSV, NPZ) into a session"),
    "replay": ("labpnn.remote.cli", "serve a recorded session as a device server"),
    "export": ("labpnn.sessions.export", "write a VNA session's S-parameters as Touchstone files"),
    "calibrate": ("labpnn.twin.calibrate", "measure a calibration sweep into a session"),
    "twin": ("labpnn.twin.cli", "fit and evaluate digital twins (`labpnn twin fit ...`)"),
    "train": ("labpnn.training.cli", "train a physical neural network (PAT or in-silico)"),
    "demo": ("labpnn.benches.demo", "the main job: simulated bench, calibrate, fit, train, evaluate"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: labpnn COMMAND [options]\n\ncommands:\n" + "\n".join(lines) + (
        "\n\n`labpnn COMMAND --help` for a command's options."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"labpnn {version('labpnn')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"labpnn: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"labpnn {command}", description=help_)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    handler = getattr(module, f"cli_{command}")(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `labpnn inspect ... | head`: the reader left, which is fine
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
