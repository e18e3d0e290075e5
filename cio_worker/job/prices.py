"""Hourly prices of instance types, for what each attempt cost (wall seconds x hourly price).

The package ships ``prices.toml`` (list prices); a site names its own table instead. The file:

    currency = "USD"
    [on_demand]
    "n1-standard-8" = 0.38
    [preemptible]                 # optional: what a preemptible (spot) instance of the type costs
    "n1-standard-8" = 0.08

A type the table does not price has an unknown cost (None), never 0.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from cio_worker.errors import CioError

PACKAGED = "the packaged price table"


class PriceTableError(CioError, ValueError):
    code = "bad_price_table"


@dataclass(frozen=True)
class PriceTable:
    currency: str = "USD"
    on_demand: Mapping[str, float] = field(default_factory=dict)
    preemptible: Mapping[str, float] = field(default_factory=dict)
    source: str = PACKAGED

    def hourly(self, instance_type: str, preemptible: bool = False) -> float | None:
        """The type's hourly price, or None when the table does not price it (so: not 0)."""
        return (self.preemptible if preemptible else self.on_demand).get(instance_type)

    def cost(self, instance_type: str, wall_seconds: float | None, preemptible: bool = False) -> float | None:
        price = self.hourly(instance_type, preemptible)
        if price is None or wall_seconds is None:
            return None
        return price * wall_seconds / 3600.0


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The table in ``path`` (None: the packaged one); PriceTableError says what is wrong."""
    if path is None:
        text = resources.files("cio_worker.job").joinpath("prices.toml").read_text(encoding="utf-8")
        return parse_prices(text, PACKAGED)
    where = Path(path).expanduser()
    try:
        text = where.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PriceTableError(f"cannot read the price table {where}: {exc}") from None
    return parse_prices(text, str(where))


def parse_prices(text: str, source: str) -> PriceTable:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceTableError(f"price table {source} is not TOML: {exc}") from None
    unknown = sorted(set(data) - {"currency", "on_demand", "preemptible"})
    if unknown:
        raise PriceTableError(f"price table {source}: unknown key {unknown[0]!r} "
                              "(known: currency, [on_demand], [preemptible])")
    currency = data.get("currency", "USD")
    if not isinstance(currency, str) or not currency.strip():
        raise PriceTableError(f"price table {source}: currency must be text such as \"USD\"")
    tables = {name: _prices(data.get(name, {}), source, name) for name in ("on_demand", "preemptible")}
    if not tables["on_demand"] and not tables["preemptible"]:
        raise PriceTableError(f"price table {source} prices no instance type (add an [on_demand] table)")
    return PriceTable(currency.strip(), tables["on_demand"], tables["preemptible"], source)


def _prices(raw: Any, source: str, name: str) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise PriceTableError(f"price table {source}: [{name}] must be a table of \"type\" = hourly price")
    prices = {}
    for instance_type, price in raw.items():
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0:
            raise PriceTableError(f"price table {source}: {name}.{instance_type} must be an hourly price >= 0, "
                                  f"not {price!r}")
        prices[str(instance_type)] = float(price)
    return prices
