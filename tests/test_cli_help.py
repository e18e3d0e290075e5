"""The command line explains itself, and starts without the cloud SDKs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from cio_worker.cli.main import build_parser

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("boto3", "botocore", "google", "requests", "psutil")


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0] if found else None


def every_parser(parser: argparse.ArgumentParser, name: str = "cio-worker") -> dict[str, argparse.ArgumentParser]:
    """The parser and, at any depth, its commands' parsers (``cio-worker token create``), by name."""
    found = {name: parser}
    commands = subcommands(parser)
    for command, sub in (commands.choices.items() if commands else ()):
        found.update(every_parser(sub, f"{name} {command}"))
    return found


def test_every_command_has_a_summary_and_a_description() -> None:
    root = build_parser()
    assert len(subcommands(root).choices) >= 10
    for name, parser in every_parser(root).items():
        commands = subcommands(parser)
        if commands is None:
            continue
        summaries = {a.dest: a.help for a in commands._choices_actions}
        for command, sub in commands.choices.items():
            assert summaries.get(command), f"{name} {command} has no help= (its line in {name} --help)"
            assert sub.description and sub.description.strip(), f"{name} {command} has no description="


def test_every_option_and_argument_has_a_help_line() -> None:
    missing = [
        f"{name}: {'/'.join(action.option_strings) or action.dest}"
        for name, parser in every_parser(build_parser()).items()
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS or not str(action.help).strip()
    ]
    assert not missing, "arguments without help: " + ", ".join(missing)


def test_every_help_text_formats() -> None:
    root = build_parser()
    assert "COMMAND --help" in root.format_help()
    for name, parser in every_parser(root).items():
        assert name in parser.format_help()  # a bad %(...)s in a help line fails here


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_building_the_parser_loads_no_cloud_sdk() -> None:
    loaded = run_python(
        "import sys; from cio_worker.cli.main import build_parser; build_parser(); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    assert loaded == "[]"


def test_the_frames_command_loads_no_cloud_sdk() -> None:
    loaded = run_python(
        "import io, sys; from cio_worker.cli.main import main; "
        "assert main(['frames', '1-10'], stdout=io.StringIO()) == 0; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    assert loaded == "[]"
