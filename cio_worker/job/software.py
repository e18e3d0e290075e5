"""Clarisse versions and the environment their software package sets on a node (contract.md 7).

The package's entries come first in a job's environment, before the user's: ``PATH`` appends the
version's ``bin`` directory and ``ILISE_SERVER`` names the licence server (exclusive).
Versions are written ``5.0.sp8``; ``5.0 SP8`` and ``clarisse 5.0 SP8`` are read the same.
"""

from __future__ import annotations

import difflib
import posixpath
from dataclasses import dataclass

from cio_worker.job.environment import EnvEntry
from cio_worker.errors import CioError

LICENSE_SERVER = "conductor_ilise:40500"
INSTALL_ROOT = "/opt/isotropix/clarisse"
KNOWN_VERSIONS = (
    "4.0.sp3",
    "4.0.sp5",
    "4.0.sp8",
    "4.0.sp12",
    "5.0.sp1",
    "5.0.sp4",
    "5.0.sp8",
    "5.0.sp12",
)


class UnknownSoftwareVersion(CioError, ValueError):
    code = "unknown_software"


def normalise_version(text: str) -> str:
    words = str(text).strip().lower().split()
    if words and words[0] == "clarisse":
        words = words[1:]
    return ".".join(words)


@dataclass(frozen=True)
class ClarissePackage:
    version: str
    install_dir: str
    license_server: str = LICENSE_SERVER

    @property
    def bin_dir(self) -> str:
        return posixpath.join(self.install_dir, "bin")

    def environment(self) -> tuple[EnvEntry, ...]:
        return (
            EnvEntry("PATH", self.bin_dir, "append"),
            EnvEntry("ILISE_SERVER", self.license_server, "exclusive"),
        )


@dataclass(frozen=True)
class SoftwareCatalogue:
    versions: tuple[str, ...] = KNOWN_VERSIONS
    install_root: str = INSTALL_ROOT
    license_server: str = LICENSE_SERVER

    @property
    def default_version(self) -> str:
        return self.versions[-1]

    def package(self, version: str) -> ClarissePackage:
        name = normalise_version(version)
        if name not in self.versions:
            close = difflib.get_close_matches(name, self.versions, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UnknownSoftwareVersion(
                f"Clarisse version {version!r} is not available on the render nodes "
                f"(known: {', '.join(self.versions)}){hint}"
            )
        return ClarissePackage(name, posixpath.join(self.install_root, name), self.license_server)
