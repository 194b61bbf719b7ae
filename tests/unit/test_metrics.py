"""The Prometheus collector renders a published broker view into the text format."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry

from taskmesh.histogram import Histogram
from taskmesh.metrics import BrokerCollector

SNAPSHOT = {
    "counters": {"submitted": 12, "done": 9, "failed": 2, "requeued": 3, "workers_lost": 1},
    "queues": [
        {
            "name": "cpu",
            "pending": 4,
            "delayed": 1,
            "running": 2,
            "done": 9,
            "failed": 2,
            "submitted": 12,
            "requeued": 3,
        }
    ],
    "workers_alive": 2,
    "workers": [{"name": "w1", "busy": 2, "concurrency": 4}],
    "broker": {"uptime_s": 42.0},
}


def _scrape(collector: BrokerCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def test_nothing_is_reported_before_the_first_publish() -> None:
    assert "taskmesh_" not in _scrape(BrokerCollector())


def test_counters_gauges_and_histograms_are_exported() -> None:
    collector = BrokerCollector()
    run = Histogram()
    for seconds in (0.0007, 0.0007, 0.02):
        run.observe(seconds)
    collector.publish(SNAPSHOT, {"run": run})
    text = _scrape(collector)
    assert "taskmesh_tasks_submitted_total 12.0" in text
    assert "taskmesh_tasks_requeued_total 3.0" in text
    assert 'taskmesh_queue_tasks{queue="cpu",state="pending"} 4.0' in text
    assert 'taskmesh_queue_tasks_finished_total{queue="cpu",result="failed"} 2.0' in text
    assert 'taskmesh_queue_tasks_submitted_total{queue="cpu"} 12.0' in text
    assert 'taskmesh_queue_tasks_requeued_total{queue="cpu"} 3.0' in text
    assert "taskmesh_workers_alive 2.0" in text
    assert 'taskmesh_worker_slots{use="busy",worker="w1"} 2.0' in text
    assert 'taskmesh_task_run_seconds_bucket{le="0.001"} 2.0' in text
    assert 'taskmesh_task_run_seconds_bucket{le="+Inf"} 3.0' in text
    assert "taskmesh_task_run_seconds_count 3.0" in text


def test_a_published_view_is_a_copy() -> None:
    collector = BrokerCollector()
    run = Histogram()
    collector.publish(SNAPSHOT, {"run": run})
    run.observe(1.0)  # the live histogram moves on; the scrape shows what was published
    assert "taskmesh_task_run_seconds_count 0.0" in _scrape(collector)


def test_the_metrics_server_lets_go_of_its_port_when_stopped() -> None:
    """A broker embedded in a longer-lived process stops its metrics server with it."""
    import socket
    import urllib.request

    from taskmesh.metrics import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = serve(BrokerCollector(), port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
    stop()
    with socket.socket() as again:
        # the scrape's connection may linger in TIME_WAIT: only a listener would stop this
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
