"""Small shots written into a temporary directory for end-to-end tests: an artist root with a
project, textures and a job spec, all with absolute artist paths (one Windows C:/ path)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Shot:
    root: Path  # plays the artist's filesystem root
    spec: Path  # the job spec (TOML)

    @property
    def texture(self) -> Path:
        return self.root / "proj" / "tex" / "wood.png"


def make_shot(
    base: Path,
    *,
    frames: str = "1-4",
    chunk_size: int = 2,
    tiles: int = 1,
    retries_failed: int = 1,
    retries_preempted: int = 2,
    dependency_scan: str = "smart",
    scouts: str | None = None,
) -> Shot:
    root = base / "artist"
    (root / "proj" / "tex").mkdir(parents=True, exist_ok=True)
    (root / "proj" / "shots").mkdir(parents=True, exist_ok=True)
    (root / "proj" / "tex" / "wood.png").write_bytes(b"wood texture v1\n" * 64)
    project = {
        "format": "cio-project/1",
        "images": {
            "project://scene/image1": {
                "frames": frames,
                "save_as": "C:/proj/renders/main/beauty.####.png",
                "resolution": [32, 24],
                "inputs": ["project://scene/wood"],
            }
        },
        "references": {"project://scene/wood": {"path": "C:/proj/tex/wood.png"}},
    }
    (root / "proj" / "shots" / "shot.project").write_text(json.dumps(project), encoding="utf-8")
    scout_lines = f'use_scout_frames = true\nscout_frames = "{scouts}"\n' if scouts else ""
    spec = base / "job.toml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            [job]
            title = "e2e"
            project_file = "/proj/shots/shot.project"
            images = ["project://scene/image1"]
            chunk_size = {chunk_size}
            tiles = {tiles}
            dependency_scan = "{dependency_scan}"
            instance_type = "n1-standard-2"
            """
        )
        + scout_lines
        + textwrap.dedent(
            f"""\

            [autoretry_policy]
            preempted = {retries_preempted}
            failed = {retries_failed}
            """
        ),
        encoding="utf-8",
    )
    return Shot(root, spec)
