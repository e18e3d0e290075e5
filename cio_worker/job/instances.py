"""A catalogue of GCE and EC2 instance types: cores, memory and flavor for the job's tokens.

The description follows the submitter's form, ``2 core, 7.50GB Mem`` (the ``<instance>`` token).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Mapping

from cio_worker.errors import CioError


class UnknownInstanceType(CioError, ValueError):
    code = "unknown_instance_type"


@dataclass(frozen=True)
class InstanceType:
    name: str
    cores: int
    memory_gb: float
    flavor: str  # standard, highmem, highcpu
    provider: str  # gce or ec2

    @property
    def description(self) -> str:
        return f"{self.cores} core, {self.memory_gb:.2f}GB Mem"


@dataclass(frozen=True)
class InstanceCatalogue:
    types: Mapping[str, InstanceType]

    @classmethod
    def of(cls, types: Iterable[InstanceType]) -> "InstanceCatalogue":
        return cls({t.name: t for t in types})

    def get(self, name: str) -> InstanceType:
        try:
            return self.types[name]
        except (KeyError, TypeError):
            pass
        close = difflib.get_close_matches(str(name), list(self.types), n=5, cutoff=0.6)
        if not close:
            family = str(name).split("-")[0].split(".")[0]
            close = [n for n in self.types if n.startswith(family)][:5] or list(self.types)[:5]
        raise UnknownInstanceType(
            f"instance type {name!r} is not in the catalogue; close names: {', '.join(close)}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.types

    def names(self) -> list[str]:
        return list(self.types)


# Memory per core (GB) of each GCE family and flavor, and the core counts offered.
_GCE_FAMILIES: tuple[tuple[str, str, float, tuple[int, ...]], ...] = (
    ("n1", "standard", 3.75, (1, 2, 4, 8, 16, 32, 64, 96)),
    ("n1", "highmem", 6.5, (2, 4, 8, 16, 32, 64, 96)),
    ("n1", "highcpu", 0.9, (2, 4, 8, 16, 32, 64, 96)),
    ("n2", "standard", 4.0, (2, 4, 8, 16, 32, 48, 64, 80, 96, 128)),
    ("n2", "highmem", 8.0, (2, 4, 8, 16, 32, 48, 64, 80, 96, 128)),
    ("n2", "highcpu", 1.0, (2, 4, 8, 16, 32, 48, 64, 80, 96)),
    ("e2", "standard", 4.0, (2, 4, 8, 16, 32)),
    ("e2", "highmem", 8.0, (2, 4, 8, 16)),
    ("e2", "highcpu", 1.0, (2, 4, 8, 16, 32)),
    ("c2", "standard", 4.0, (4, 8, 16, 30, 60)),
)
# EC2 families: flavor, memory per core (GB).
_EC2_FAMILIES: tuple[tuple[str, str, float], ...] = (
    ("m5", "standard", 4.0),
    ("c5", "highcpu", 2.0),
    ("r5", "highmem", 8.0),
)
_EC2_SIZES: dict[str, tuple[tuple[str, int], ...]] = {
    "m5": (("large", 2), ("xlarge", 4), ("2xlarge", 8), ("4xlarge", 16), ("8xlarge", 32), ("12xlarge", 48), ("16xlarge", 64), ("24xlarge", 96)),
    "c5": (("large", 2), ("xlarge", 4), ("2xlarge", 8), ("4xlarge", 16), ("9xlarge", 36), ("12xlarge", 48), ("18xlarge", 72), ("24xlarge", 96)),
    "r5": (("large", 2), ("xlarge", 4), ("2xlarge", 8), ("4xlarge", 16), ("8xlarge", 32), ("12xlarge", 48), ("16xlarge", 64), ("24xlarge", 96)),
}


def _builtin_types() -> list[InstanceType]:
    types = [
        InstanceType(f"{family}-{flavor}-{cores}", cores, round(cores * per_core, 2), flavor, "gce")
        for family, flavor, per_core, counts in _GCE_FAMILIES
        for cores in counts
    ]
    types += [
        InstanceType(f"{family}.{size}", cores, cores * per_core, flavor, "ec2")
        for family, flavor, per_core in _EC2_FAMILIES
        for size, cores in _EC2_SIZES[family]
    ]
    return types


def default_catalogue() -> InstanceCatalogue:
    return InstanceCatalogue.of(_builtin_types())


DEFAULT_INSTANCE_TYPE = "n1-standard-4"
