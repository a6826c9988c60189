"""Prometheus metrics: counters kept by this process, queue depth read from the ledger."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series: they only double the output


class Metrics:
    """One registry per app, so several apps (tests) never collide."""

    def __init__(self, ledger=None):
        self.registry = CollectorRegistry()
        self.webhooks = Counter("filebot_webhooks_total", "Webhook requests by outcome "
                                "(queued, duplicate, ignored, rejected, invalid, error)",
                                ["outcome"], registry=self.registry)
        self.files = Counter("filebot_files_total", "Files finished, by state (saved, failed) and reason",
                             ["state", "reason"], registry=self.registry)
        self.retries = Counter("filebot_file_retries_total", "Temporary download failures, by reason",
                               ["reason"], registry=self.registry)
        self.bytes = Counter("filebot_saved_bytes_total", "Bytes saved to the download folder",
                             registry=self.registry)
        self.duration = Histogram("filebot_download_seconds", "Time to fetch one file",
                                  buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
                                  registry=self.registry)
        if ledger is not None:
            self.registry.register(_QueueCollector(ledger))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _QueueCollector:
    def __init__(self, ledger):
        self.ledger = ledger

    def collect(self):
        gauge = GaugeMetricFamily("filebot_queue_depth", "Work waiting or in progress in the ledger",
                                  labels=["kind"])
        for kind, n in self.ledger.queue_counts().items():
            gauge.add_metric([kind], n)
        yield gauge
