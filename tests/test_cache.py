"""The shared cache: two processes wanting one entry compute it once, a killed holder blocks nobody, no torn reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimrecipe.cache import cache_entry, lock_holder, locked
from slimrecipe.fileio import read_json

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="entries are locked with fcntl (POSIX)")

SAFETY_TIMEOUT = 120  # seconds; a safety net only: every step waits for a file or a message, not for a time

# One job wanting the entry ENTRY (a directory, result.json its completion marker). When it has to make the entry
# it counts the call in CALLS, writes a first version of model.txt, says "computing" and waits for the file GATE
# before finishing the entry; a job killed there leaves a half-written entry. Every job then reads the entry as a
# user would and checks that its two files belong together.
WORKER = r'''
import os, sys, time
from pathlib import Path
from slimrecipe.cache import cache_entry
from slimrecipe.fileio import read_json, write_json, write_text

entry_dir, calls, gate = (Path(a) for a in sys.argv[1:4])
with cache_entry(entry_dir, marker="result.json") as entry:
    if entry.ready:
        print("reused", flush=True)
    else:
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        write_text(entry_dir / "model.txt", "half")
        print("computing", flush=True)
        while not gate.exists():
            time.sleep(0.01)
        write_text(entry_dir / "model.txt", f"weights of {os.getpid()}")
        write_json(entry.marker, {"model": f"weights of {os.getpid()}"})
        print("made", flush=True)
result = read_json(entry_dir / "result.json")
model = (entry_dir / "model.txt").read_text()
print("complete" if result["model"] == model else f"TORN: result {result} but model.txt {model!r}", flush=True)
'''


class Job:
    """A worker process whose output goes to a file the test can poll without blocking."""

    def __init__(self, tmp: Path, name: str, entry: Path, calls: Path, gate: Path):
        script = tmp / "worker.py"
        if not script.exists():
            script.write_text(WORKER, encoding="utf-8")
        self.out = tmp / f"{name}.out"
        self._out_file = open(self.out, "w")
        self.proc = subprocess.Popen([sys.executable, str(script), str(entry), str(calls), str(gate)],
                                     stdout=self._out_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.out.read_text(encoding="utf-8")

    def wait_for(self, text: str, *, not_after: str | None = None) -> str:
        """Wait until the job says ``text``; fail at once if it says ``not_after`` first."""
        deadline = time.monotonic() + SAFETY_TIMEOUT
        while text not in self.output():
            if not_after and not_after in self.output():
                raise AssertionError(f"the job said {not_after!r} instead of {text!r}:\n{self.output()}")
            if self.proc.poll() is not None and text not in self.output():
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) without saying {text!r}:\n"
                                     f"{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {SAFETY_TIMEOUT}s:\n{self.output()}")
            time.sleep(0.02)
        return self.output()

    def finish(self) -> str:
        self.proc.wait(timeout=SAFETY_TIMEOUT)
        self._out_file.close()
        assert self.proc.returncode == 0, self.output()
        return self.output()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=SAFETY_TIMEOUT)
        self._out_file.close()


@pytest.fixture
def start(tmp_path):
    """``start(name, entry, calls, gate)`` runs a worker; any still running when the test ends is killed."""
    jobs = []

    def _start(name: str, entry: Path, calls: Path, gate: Path) -> Job:
        jobs.append(Job(tmp_path, name, entry, calls, gate))
        return jobs[-1]

    yield _start
    for job in jobs:
        if job.proc.poll() is None:
            job.kill()


def calls_made(calls: Path) -> list[int]:
    return [int(line) for line in calls.read_text().split()] if calls.exists() else []


def test_two_processes_wanting_one_entry_compute_it_once(tmp_path, start):
    entry, calls, gate = tmp_path / "cache" / "baselines" / "k1", tmp_path / "calls", tmp_path / "gate"
    first = start("first", entry, calls, gate)
    first.wait_for("computing")  # holds the lock, the entry half-written
    second = start("second", entry, calls, gate)
    waiting = second.wait_for("waiting for cache entry", not_after="computing")
    assert f"held by PID {first.pid} on " in waiting and "reused" not in waiting
    assert not (entry / "result.json").exists()

    gate.touch()
    assert first.finish().split() == ["computing", "made", "complete"]
    second_out = second.finish()
    assert second_out.splitlines()[-2:] == ["reused", "complete"]  # waited, then read the whole entry
    assert calls_made(calls) == [first.pid]
    assert read_json(entry / "result.json") == {"model": f"weights of {first.pid}"}


def test_a_holder_killed_with_sigkill_blocks_nobody(tmp_path, start):
    entry, calls = tmp_path / "cache" / "data" / "k2", tmp_path / "calls"
    doomed = start("doomed", entry, calls, tmp_path / "never")
    doomed.wait_for("computing")
    (tmp_path / "open").touch()
    waiter = start("waiter", entry, calls, tmp_path / "open")
    assert f"held by PID {doomed.pid} " in waiter.wait_for("waiting for cache entry", not_after="computing")
    assert (entry / "model.txt").read_text() == "half" and not (entry / "result.json").exists()

    doomed.kill()  # the kernel releases its lock; the entry stays half-written, without result.json
    assert waiter.finish().splitlines()[-3:] == ["computing", "made", "complete"]
    assert calls_made(calls) == [doomed.pid, waiter.pid]  # the waiter found the entry incomplete and made it
    assert read_json(entry / "result.json") == {"model": f"weights of {waiter.pid}"}

    # and a job started after the kill finds the entry complete
    late = start("late", entry, calls, tmp_path / "never")
    assert late.finish().split() == ["reused", "complete"]
    assert calls_made(calls) == [doomed.pid, waiter.pid]


def test_a_complete_entry_is_read_without_the_lock(tmp_path):
    entry = tmp_path / "table.json"
    entry.write_text("{}")
    with locked(entry):  # someone holds the lock of an entry that is complete: readers need not wait
        with cache_entry(entry, echo=pytest.fail) as found:
            assert found.ready
    assert lock_holder(entry) == f"PID {os.getpid()} on {os.uname().nodename}"


def test_caching_off_neither_reads_nor_locks(tmp_path):
    entry = tmp_path / "table.json"
    entry.write_text("{}")
    with cache_entry(entry, enabled=False, echo=pytest.fail) as found:
        assert not found.ready
    assert list(tmp_path.iterdir()) == [entry]  # no lock file either


def test_two_runs_training_the_same_baseline_train_it_once(tmp_path):
    """Two `slimrecipe` processes started together on one cache: one trains, the other reuses its baseline."""
    cache = tmp_path / "cache"
    common = ["+recipe=cls_prune", "+profile=smoke", "stages=[train]", f"cache_dir={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "slimrecipe", *common, f"hydra.run.dir={tmp_path / f'run{i}'}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [read_json(tmp_path / f"run{i}" / "stages" / "1-train" / "result.json") for i in range(2)]
    assert sorted(r["cache"] for r in results) == ["hit", "miss"], outputs
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    assert len(list((cache / "baselines").iterdir())) == 2  # the baseline and its (hidden) lock file
