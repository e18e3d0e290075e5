"""What one attempt took, from its outcome: the figures its final report carries (``AttemptFigures``)."""

from __future__ import annotations

from typing import Any, Mapping

from cio_worker.job.document import TaskDocument
from cio_worker.job.prices import PriceTable
from cio_worker.node.execution import TaskOutcome
from cio_worker.queue.base import AttemptFigures


def instance_of(doc: TaskDocument, identity: Mapping[str, Any]) -> tuple[str, bool]:
    """(instance type, preemptible) of the machine the attempt ran on: what its metadata said,
    else what the job asked for."""
    machine = identity.get("machine_type") or doc.job.instance_type or ""
    preemptible = identity.get("preemptible")
    return str(machine), doc.job.preemptible if preemptible is None else bool(preemptible)


def attempt_figures(doc: TaskDocument, outcome: TaskOutcome, prices: PriceTable, identity: Mapping[str, Any], *,
                    log: str = "", drain_seconds: float | None = None) -> AttemptFigures:
    run, sync = outcome.run, outcome.sync
    return AttemptFigures(
        cpu_seconds=None if run is None else run.cpu_user + run.cpu_system,
        peak_rss_bytes=None if run is None else run.peak_rss_bytes,
        sync_bytes=None if sync is None else sync.bytes_downloaded,
        sync_seconds=None if sync is None else outcome.timings.get("sync", sync.seconds),
        upload_bytes=outcome.upload_bytes if outcome.upload_seconds is not None else None,
        upload_seconds=outcome.upload_seconds,
        log=log,
        **_timed(doc, outcome.timings.get("total"), prices, identity, drain_seconds),
    )


def stopped_figures(doc: TaskDocument, wall: float, prices: PriceTable, identity: Mapping[str, Any], *,
                    drain_seconds: float | None = None) -> AttemptFigures:
    """The figures of an attempt the hard stop ended before it had an outcome: its wall time so
    far and what that cost; what the outcome would have measured stays unknown."""
    return AttemptFigures(**_timed(doc, wall, prices, identity, drain_seconds))


def _timed(doc: TaskDocument, wall: float | None, prices: PriceTable, identity: Mapping[str, Any],
           drain_seconds: float | None) -> dict[str, Any]:
    instance_type, preemptible = instance_of(doc, identity)
    hourly = prices.hourly(instance_type, preemptible) if instance_type else None
    return dict(
        wall_seconds=wall,
        instance_type=instance_type,
        hourly_price=hourly,
        cost=prices.cost(instance_type, wall, preemptible) if hourly is not None else None,
        currency=prices.currency if hourly is not None else "",
        drain_seconds=None if drain_seconds is None else max(0.0, drain_seconds),
        storage_scheme=doc.job.storage.partition(":")[0].lower(),
    )
