"""The shipped example shot (package data): see shot_A/README.md."""

from __future__ import annotations

from pathlib import Path


def example_dir(name: str = "shot_A") -> Path:
    """The example's directory: job.toml, README.md and root/ (the artist's filesystem root)."""
    return Path(__file__).resolve().parent / name


def example_job_path(name: str = "shot_A") -> Path:
    return example_dir(name) / "job.toml"


def example_root(name: str = "shot_A") -> Path:
    """Re-root the example's artist paths here: ``PathMap.rooted(str(example_root()))``."""
    return example_dir(name) / "root"
