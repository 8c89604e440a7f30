"""`slimrecipe replay` re-runs a recorded run and says whether it reproduced; `slimrecipe diff` says what differs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from slimrecipe.cli import main
from slimrecipe.fileio import read_json, sha256_tree, write_json, write_text
from slimrecipe.replay import compare_replay, diff_runs

SMOKE = ["+recipe=cls_prune", "+profile=smoke"]


def _slimrecipe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "slimrecipe", *map(str, args)], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A smoke run that trains (not from the cache, so a replay trains again), evaluates and reports."""
    root = tmp_path_factory.mktemp("recorded")
    out = _slimrecipe(*SMOKE, "stages=[train,evaluate,report]", "train.cache=false", f"hydra.run.dir={root}/run",
                      cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    return root / "run"


@pytest.fixture(scope="module")
def weights_run(tmp_path_factory, recorded):
    """A run whose model.weights is a file outside the run, so snapshot.json records its sha256."""
    root = tmp_path_factory.mktemp("weights")
    weights = root / "baseline.pdparams"
    shutil.copyfile(recorded / "stages" / "1-train" / "model.pdparams", weights)
    out = _slimrecipe(*SMOKE, "stages=[evaluate,report]", f"model.weights={weights}", f"hydra.run.dir={root}/run",
                      cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert read_json(root / "run" / "snapshot.json")["inputs"]["model.weights"]["path"] == str(weights)
    return root / "run", weights


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    """Two runs that differ in the seed only (one sweep, two jobs)."""
    root = tmp_path_factory.mktemp("seeds")
    out = _slimrecipe("-m", *SMOKE, "stages=[evaluate,report]", "seed=1,2", f"hydra.sweep.dir={root}/sweep",
                      cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    return root / "sweep" / "0", root / "sweep" / "1"


# --------------------------------------------------------------------------- replay

def test_replay_reproduces_a_recorded_run(recorded, tmp_path):
    before = sha256_tree(recorded)
    out = _slimrecipe("replay", recorded, "--out", tmp_path / "again", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "matches the record" in out.stdout and "train, evaluate within 1e-06" in out.stdout
    again = tmp_path / "again"
    assert read_json(again / "stages" / "1-train" / "result.json")["cache"] == "miss"  # really trained again
    assert read_json(again / "replay.json")["match"] is True
    assert sha256_tree(recorded) == before  # the record is never written to
    d = diff_runs(recorded, again)
    assert (d["recipe"], d["inputs"], d["environment"], d["plan"], d["metrics"]) == ([], [], [], [], [])


def test_replay_lists_what_it_did_not_reproduce(recorded, tmp_path):
    record = tmp_path / "record"
    shutil.copytree(recorded, record)
    result_file = record / "stages" / "2-evaluate" / "result.json"
    result = read_json(result_file)
    write_json(result_file, {**result, "metric": result["metric"] - 0.25})
    write_json(record / "plan.json", {"params": {"conv1.weight": {"channels_before": 8, "channels_after": 4}}})
    out = _slimrecipe("replay", record, "--out", tmp_path / "again", cwd=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"evaluate.metric: recorded {result['metric'] - 0.25:.6g}, replayed {result['metric']:.6g}" in out.stdout
    assert "plan.json: present in the record, absent in the replay" in out.stdout
    assert "train.metric" not in out.stdout  # what did reproduce is not listed
    assert read_json(tmp_path / "again" / "replay.json")["match"] is False


def test_replay_tolerance_is_absolute_for_metrics_relative_for_counts():
    def run(metric, flops, plan=None):
        return {"plan": plan, "snapshot": {}, "metrics": {"evaluate": {"metric": metric, "flops": flops}}}

    assert compare_replay(run(0.5, 7e5), run(0.5 + 5e-7, 7e5 + 0.5), 1e-6) == []
    assert compare_replay(run(0.5, 7e5), run(0.5 + 5e-6, 7e5 + 2), 1e-6) == [
        "evaluate.metric: recorded 0.5, replayed 0.500005", "evaluate.flops: recorded 700000, replayed 700002"]
    assert compare_replay(run(0.5, 1, {"params": {"c": {"channels_before": 8, "channels_after": 4}}}),
                          run(0.5, 1, {"params": {"c": {"channels_before": 8, "channels_after": 6}}}), 1e-6) == [
        "plan: c: 8->4 channels -> 8->6 channels"]
    # the same counts, other filters removed: still not the recorded plan
    assert compare_replay(
        run(0.5, 1, {"params": {"c": {"channels_before": 4, "channels_after": 2, "removed": [0, 1]}}}),
        run(0.5, 1, {"params": {"c": {"channels_before": 4, "channels_after": 2, "removed": [0, 3]}}}), 1e-6) == [
        "plan: c removed: [0, 1] -> [0, 3]"]


def test_replay_refuses_when_an_input_file_changed(weights_run, tmp_path):
    run, weights = weights_run
    original = weights.read_bytes()
    try:
        weights.write_bytes(original + b"\0")
        out = _slimrecipe("replay", run, "--out", tmp_path / "again", cwd=tmp_path)
    finally:
        weights.write_bytes(original)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "model.weights" in out.stderr and str(weights) in out.stderr and "changed since the run" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "again").exists()


def test_replay_refuses_a_record_whose_hash_or_file_does_not_match(weights_run, tmp_path, capsys):
    run, weights = weights_run
    for tamper, expected in ((lambda rec: rec.update(sha256="0" * 64), "changed since the run"),
                             (lambda rec: rec.update(path=str(tmp_path / "gone.pdparams")), "is gone")):
        copy = tmp_path / f"copy-{expected[:4]}"
        shutil.copytree(run, copy)
        snap = read_json(copy / "snapshot.json")
        tamper(snap["inputs"]["model.weights"])
        write_json(copy / "snapshot.json", snap)
        assert main(["replay", str(copy), "--out", str(tmp_path / "again")]) == 2
        err = capsys.readouterr().err
        assert "model.weights" in err and expected in err and snap["inputs"]["model.weights"]["path"] in err
        assert not (tmp_path / "again").exists()


def test_replay_only_writes_into_a_new_directory(weights_run, tmp_path, capsys):
    run, _ = weights_run
    busy = tmp_path / "busy"
    write_text(busy / "keep.txt", "mine")
    for out in (run, run / "inside", busy):
        assert main(["replay", str(run), "--out", str(out)]) == 2
        assert "--out" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    snap = read_json(unfinished / "snapshot.json")
    del snap["finished"]
    write_json(unfinished / "snapshot.json", snap)
    assert main(["replay", str(unfinished)]) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert main(["replay", str(tmp_path)]) == 2 and "not a slimrecipe run directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- diff

def test_diff_of_runs_differing_in_the_seed_lists_that_key_and_the_metric(seed_runs, capsys):
    a, b = seed_runs
    assert main(["diff", str(a), str(b), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["recipe"] == [{"what": "seed", "a": 1, "b": 2}]
    assert d["inputs"] == [] and d["environment"] == [] and d["plan"] == []
    ma, mb = (read_json(r / "stages" / "1-evaluate" / "result.json")["metric"] for r in (a, b))
    assert d["metrics"] == ([{"what": "evaluate.metric", "a": ma, "b": mb}] if ma != mb else [])
    assert main(["diff", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "recipe keys: 1 difference\n  seed: 1 -> 2\n" in text and "inputs: same" in text
    assert main(["diff", str(a), str(a)]) == 0
    assert "recipe keys: same" in capsys.readouterr().out


def _handmade_run(root, *, seed, inputs, packages, channels_after, metric):
    write_text(root / "recipe.resolved.yaml", yaml.safe_dump(
        {"name": "cls_prune", "seed": seed, "stages": ["evaluate", "prune"], "prune": {"target": {"flops": 0.5}}}))
    write_json(root / "snapshot.json", {"finished": "x", "inputs": inputs, "plugins": {"slimrecipe": "0.1.0"},
                                        "env": {"python": "3.11.7", "platform": "Linux", "packages": packages}})
    write_json(root / "plan.json", {"criterion": "l1_norm", "params": {
        "conv1.weight": {"channels_before": 16, "channels_after": 16, "rule": "skip.first_conv"},
        "conv2.weight": {"channels_before": 32, "channels_after": channels_after, "rule": "kept"}}})
    write_json(root / "stages" / "1-evaluate" / "result.json", {"metric": 0.9, "flops": 1000.0, "seconds": 1.0})
    write_json(root / "stages" / "2-prune" / "result.json", {"metric": metric, "flops": 600.0, "seconds": 2.0})
    return root


def test_diff_lists_inputs_environment_plan_and_metrics(tmp_path):
    a = _handmade_run(tmp_path / "a", seed=0, channels_after=16, metric=0.8, packages={"numpy": "1.26.4"}, inputs={
        "model.weights": {"path": "/w.pdparams", "sha256": "a" * 64},
        "sensitivity.file": {"path": "/s.json", "sha256": "c" * 64}})
    b = _handmade_run(tmp_path / "b", seed=0, channels_after=24, metric=0.8, packages={"numpy": "2.0.0"}, inputs={
        "model.weights": {"path": "/w.pdparams", "sha256": "b" * 64},
        "sensitivity.builtin": {"path": "/t.json", "sha256": "d" * 64}})
    d = diff_runs(a, b)
    assert d["recipe"] == []  # identical recipe keys: nothing listed
    assert [(c["what"], c["change"]) for c in d["inputs"]] == [
        ("model.weights", "hash changed"), ("sensitivity.builtin", "only in B"), ("sensitivity.file", "only in A")]
    assert d["environment"] == [{"what": "env.packages.numpy", "a": "1.26.4", "b": "2.0.0"}]
    assert d["plan"] == [{"what": "conv2.weight", "a": "32->16 channels", "b": "32->24 channels"}]
    assert d["metrics"] == []  # same figures, different seconds: timings are not metrics


def test_diff_text_reads_as_old_to_new(tmp_path, capsys):
    a = _handmade_run(tmp_path / "a", seed=0, channels_after=16, metric=0.8, packages={}, inputs={})
    b = _handmade_run(tmp_path / "b", seed=3, channels_after=16, metric=0.75, packages={}, inputs={})
    assert main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "  seed: 0 -> 3\n" in out and "  prune.metric: 0.8 -> 0.75\n" in out
    assert "plan (channels after pruning): same" in out and "environment: same" in out
    assert main(["diff", str(a)]) == 2
    assert main(["diff", str(a), str(tmp_path)]) == 2
    assert "not a slimrecipe run directory" in capsys.readouterr().err


def test_diff_does_not_import_paddle(tmp_path):
    a = _handmade_run(tmp_path / "a", seed=0, channels_after=16, metric=0.8, packages={}, inputs={})
    probe = ("import sys; from slimrecipe.cli import main; rc = main(['diff', sys.argv[1], sys.argv[1]]); "
             "print('PADDLE' if 'paddle' in sys.modules else 'NOPADDLE'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, str(a)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("NOPADDLE")
