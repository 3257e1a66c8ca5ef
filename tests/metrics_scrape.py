"""Read raybary's metrics back from a Ray node's Prometheus endpoint (for tests)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable


def scrape(url: str, *, run: str) -> dict[tuple, float]:
    """The samples of ``url`` (Prometheus text) named ``ray_raybary_*`` and tagged
    ``run=run``, summed over Ray's own labels (node, worker):
    ``{(sample name, *other raybary label values sorted by label): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("ray_raybary_") or s.labels.get("run") != run:
                continue
            own = tuple(s.labels[k] for k in sorted(s.labels)
                        if k in ("status", "outcome", "step", "le"))
            key = (s.name, *own)
            out[key] = out.get(key, 0.0) + s.value
    return out


def wait_for(url: str, run: str, done: Callable[[dict], bool],
             timeout_s: float = 90.0) -> dict[tuple, float]:
    """Scrape ``url`` for run ``run`` until ``done(samples)`` or ``timeout_s``
    (Ray exports a process's metrics every few seconds); returns the last samples."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url, run=run)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1.0)


def node_metrics_url() -> str:
    """``http://IP:PORT/metrics`` of the (first) node of the Ray this process is connected to."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
