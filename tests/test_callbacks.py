"""The CPU peak-memory figure belongs to one run, even when a multirun trains several in one process."""

from types import SimpleNamespace

import pytest
import torch

import lra.callbacks as callbacks
from lra.callbacks import PeakMemoryMonitor, process_peak_rss_gb, reset_process_peak_rss

CPU_MODULE = SimpleNamespace(device=torch.device("cpu"))


def test_cpu_peak_restarts_at_train_start():
    if not reset_process_peak_rss():
        pytest.skip("no resettable peak-RSS counter here (Linux /proc/self/clear_refs)")
    earlier_job = bytearray(256 * 2**20)  # what an earlier job of the same process allocated and freed
    peak_with_earlier_job = process_peak_rss_gb()
    del earlier_job

    monitor = PeakMemoryMonitor()
    monitor.on_train_start(None, CPU_MODULE)
    monitor.on_train_end(None, CPU_MODULE)

    assert monitor.summary["peak_mem_kind"] == "process_peak_rss"
    assert monitor.summary["peak_mem_gb"] < peak_with_earlier_job - 0.2
    assert 0 < monitor.summary["rss_at_train_start_gb"] <= monitor.summary["peak_mem_gb"]


def test_cpu_peak_is_labelled_cumulative_where_it_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(callbacks, "reset_process_peak_rss", lambda: False)
    monitor = PeakMemoryMonitor()
    monitor.on_train_start(None, CPU_MODULE)
    monitor.on_train_end(None, CPU_MODULE)
    assert monitor.summary["peak_mem_kind"] == "process_peak_rss_cumulative"
    assert monitor.summary["peak_mem_gb"] > 0
