"""An executable ``cnode`` on PATH that runs the cnode simulator (``cio_worker.sim.cnode``).

The simulator itself runs as ``python -m cio_worker.sim.cnode ...`` or the ``cnode-sim`` console
script; this module does not import it, so that ``-m`` runs without a double-import warning.
"""

from __future__ import annotations

import shlex
import stat
import sys
from pathlib import Path

import cio_worker

__all__ = ["install_cnode_shim"]


def install_cnode_shim(bin_dir: Path, python: str = sys.executable) -> Path:
    """Write an executable ``bin_dir/cnode`` that runs the simulator with ``python``.

    The script puts this checkout of ``cio_worker`` first on PYTHONPATH, so it works whether or not
    the package is installed into that interpreter.
    """
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    package_root = str(Path(cio_worker.__file__).resolve().parent.parent)
    script = (
        "#!/bin/sh\n"
        "# cnode stand-in written by cio_worker.sim.shim.install_cnode_shim\n"
        f'PYTHONPATH={shlex.quote(package_root)}"${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        "export PYTHONPATH\n"
        f'exec {shlex.quote(python)} -m cio_worker.sim.cnode "$@"\n'
    )
    target = bin_dir / "cnode"
    target.write_text(script, encoding="utf-8")
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return target
