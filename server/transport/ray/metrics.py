"""/metrics on Ray: every engine replica's `dit_*` series, labelled `replica`, plus the fleet's view.

Each replica sends its Prometheus exposition with its report (every second); the front-end serves them
in its own /metrics, after its own series, so Prometheus scrapes one target for the whole fleet and
tells replicas apart by the `replica` label. A single server has no `replica` label: dashboards select
`replica=~"$replica"`, which matches both. With several front-ends, each shares its own series through
the job store and serves every front-end's, labelled `frontend`: whichever one a scrape reaches, it
answers for the whole fleet.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .messages import Report


class _Fleet:
    def __init__(self, reports: list[Report], target: int | None):
        self.reports, self.target = reports, target

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for report in self.reports:
            for family in text_string_to_metric_families(report.metrics.decode()):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                merged.samples.extend(s._replace(labels={**s.labels, "replica": report.replica})
                                      for s in family.samples)
        yield from families.values()
        replicas = GaugeMetricFamily("dit_fleet_replicas", "engine replicas reporting to this front-end (Ray)")
        replicas.add_metric([], len(self.reports))
        yield replicas
        if self.target is not None:
            target = GaugeMetricFamily("dit_fleet_replicas_target", "engine replicas Ray Serve keeps, running or "
                                       "starting: its autoscaler's target")
            target.add_metric([], self.target)
            yield target


class _Labelled:
    def __init__(self, label: str, sources: list[tuple[str, bytes]]):
        self.label, self.sources = label, sources

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for value, exposition in self.sources:
            for family in text_string_to_metric_families(exposition.decode()):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                merged.samples.extend(s._replace(labels={**s.labels, self.label: value}) for s in family.samples)
        yield from families.values()


def labelled_exposition(label: str, sources: list[tuple[str, bytes]]) -> bytes:
    """Several expositions as one, each source's series labelled `label="<its name>"`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Labelled(label, sources))
    return generate_latest(registry)


def fleet_exposition(reports: list[Report], target: int | None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fleet(reports, target))
    return generate_latest(registry)
