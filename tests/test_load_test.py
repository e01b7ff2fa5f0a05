"""benchmarks/load_test.py's GPU-memory accounting (the load run itself needs a GPU)."""

import os
import subprocess
import sys

from benchmarks import load_test


def test_server_memory_counts_only_its_own_process_group(monkeypatch):
    me = os.getpid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        listing = f"{me}, 1000\n{child.pid}, 2500\n999999, 700\nnot a row\n"
        monkeypatch.setattr(load_test.subprocess, "run",
                            lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=listing, stderr=""))
        # The child leads its own group: only its 2500 MiB are the "server's"; a vanished pid is skipped.
        assert load_test.process_group_memory_mib(child.pid) == 2500
        assert load_test.process_group_memory_mib(os.getpgid(me)) == 1000
        monkeypatch.setattr(load_test.subprocess, "run",
                            lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout="", stderr=""))
        assert load_test.process_group_memory_mib(child.pid) is None  # nothing listed: no claim
    finally:
        child.kill()
        child.wait()


def test_sampler_prefers_server_samples_when_it_has_them():
    m = load_test.MemorySampler()
    m.samples = [(0, "warm", 9000, 3000), (1, "load", 9500, 3100), (2, "after", 9100, None)]
    assert m.scope() == "server" and m.of("load", "server") == [3100] and m.of("after", "server") == []
    m.samples = [(0, "warm", 9000, None), (1, "load", 9500, None)]
    assert m.scope() == "gpu" and m.of("load", m.scope()) == [9500]
