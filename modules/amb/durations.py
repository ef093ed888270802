"""Latency histograms kept as plain lists and read at scrape time: the bus's handler and
request times and the services' request times (``docs/observability.md``). prometheus_client
is imported only when a histogram family is built for a scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from prometheus_client.core import HistogramMetricFamily

LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of every latency histogram: from a handler on the in-memory bus to a
panel of LLM calls."""


class Durations:
    """Observed durations (seconds) by a tuple of bounded label values, kept as histogram
    buckets (:data:`LATENCY_BUCKETS`).

    Each label tuple has one list (:meth:`series`): a count per bucket, the count above the
    last bound, then the sum of the durations. An observation costs a bisect and two
    additions; a hot path may hold the list and update it in place."""

    __slots__ = ("_series", "buckets")

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._series: dict[tuple[str, ...], list[float]] = {}

    def series(self, labels: tuple[str, ...]) -> list[float]:
        """The live list of ``labels`` (created empty): ``len(buckets) + 1`` counts, then the sum."""
        found = self._series.get(labels)
        if found is None:
            found = self._series[labels] = [0.0] * (len(self.buckets) + 2)
        return found

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        """Count one duration of ``seconds`` under ``labels``."""
        series = self._series.get(labels) or self.series(labels)
        series[bisect_left(self.buckets, seconds)] += 1
        series[-1] += seconds

    def count(self, labels: tuple[str, ...]) -> int:
        """How many durations were observed under ``labels``."""
        series = self._series.get(labels)
        return int(sum(series[:-1])) if series is not None else 0

    def merge(self, other: Durations, prefix: tuple[str, ...] = ()) -> None:
        """Add ``other``'s observations (same buckets), each series under ``prefix`` followed by
        its own labels: to sum the histograms of several clients. Raises ValueError for other buckets."""
        if other.buckets != self.buckets:
            raise ValueError("durations with other buckets cannot be merged")
        for labels, series in list(other._series.items()):
            mine = self.series((*prefix, *labels))
            for i, value in enumerate(series):
                mine[i] += value

    def family(self, name: str, text: str, label_names: Sequence[str]) -> HistogramMetricFamily:
        """The prometheus_client histogram family ``name`` (ending in ``_seconds``) of these durations."""
        from prometheus_client.core import HistogramMetricFamily

        histogram = HistogramMetricFamily(name, text, labels=list(label_names))
        bounds = (*map(_le, self.buckets), "+Inf")
        for labels, series in list(self._series.items()):
            total, buckets = 0.0, []
            for bound, count in zip(bounds, series[:-1], strict=True):
                total += count
                buckets.append((bound, total))
            histogram.add_metric(list(labels), buckets, series[-1])
        return histogram


def _le(bound: float) -> str:
    return repr(float(bound))
