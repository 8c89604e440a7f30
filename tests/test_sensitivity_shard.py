"""Sharded sensitivity: `sensitivity.shard=i/n` jobs measure disjoint groups; merged, the one-process table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slimrecipe.cli import main as cli_main
from slimrecipe.fileio import read_json, write_json

STAGES = "stages=[train,sensitivity,prune]"


def run(tmp: Path, name: str, cache: Path, *overrides: str):
    """The smoke cls_prune recipe up to prune, in-process, in ``tmp/name``; returns the run's state."""
    from slimrecipe.config import compose, validate
    from slimrecipe.run import execute

    recipe = validate(compose(["+recipe=cls_prune", "+profile=smoke", STAGES, f"cache_dir={cache}",
                               "sensitivity.plot=false", *overrides]))
    return execute(recipe, tmp / name)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Three shard jobs on one cache, the merging run after them, and a one-process run without the cache."""
    tmp = tmp_path_factory.mktemp("shards")
    cache = tmp / "cache"
    shards = [run(tmp, f"shard{i}", cache, f"sensitivity.shard={i}/3") for i in (1, 2, 3)]
    merged = run(tmp, "merged", cache)
    alone = run(tmp, "alone", cache, "sensitivity.cache=false")  # measures everything itself
    return tmp, cache, shards, merged, alone


def table_of(state) -> dict:
    return read_json(state.run_dir / "sensitivity.json")


def test_shards_are_disjoint_cover_every_group_and_end_the_run(sharded):
    _, _, shards, _, alone = sharded
    every_group = list(table_of(alone)["table"])
    assert len(every_group) >= 3  # three shards, each with work to do
    parts = [table_of(s) for s in shards]
    measured = [set(p["table"]) for p in parts]
    assert all(measured) and sum(len(m) for m in measured) == len(every_group)
    assert set().union(*measured) == set(every_group)
    assert [p["shard"] for p in parts] == ["1/3", "2/3", "3/3"]
    for state in shards:  # a partial table never reaches prune
        assert "end_run" in state.results["sensitivity"] and "prune" not in state.results
        assert not (state.run_dir / "plan.json").exists()
        assert read_json(state.run_dir / "snapshot.json")["finished"]


def test_the_merging_run_measures_nothing_and_equals_the_one_process_table(sharded):
    _, cache, shards, merged, alone = sharded
    assert sum(s.results["sensitivity"]["evaluations"] for s in shards) > 0
    assert merged.results["sensitivity"]["evaluations"] == 0
    assert merged.results["sensitivity"]["cache"] == "merged"
    assert alone.results["sensitivity"]["evaluations"] > 0
    doc, reference = table_of(merged), table_of(alone)
    assert doc["table"] == reference["table"]
    assert list(doc["table"]) == list(reference["table"])  # same keys, in the same (model) order
    assert all(list(doc["table"][g]) == list(reference["table"][g]) for g in doc["table"])
    assert doc["baseline"] == reference["baseline"] and doc["cache_key"] == reference["cache_key"]
    assert "prune" in merged.results and (merged.run_dir / "plan.json").exists()
    assert (cache / "sensitivity" / f"{doc['cache_key']}.json").is_file()


def test_a_run_after_some_shards_measures_only_the_missing_groups(sharded, tmp_path):
    root, cache, _, _, alone = sharded
    partial_cache = tmp_path / "cache"
    shutil.copytree(cache / "baselines", partial_cache / "baselines")  # the same baseline, no tables yet
    first = run(tmp_path, "shard1", partial_cache, "sensitivity.shard=1/2")
    rest = run(tmp_path, "rest", partial_cache)
    reference = table_of(alone)
    assert table_of(rest)["table"] == reference["table"]
    # the baseline plus the second shard's points: what the one-process run needed, less the first shard's points
    first_points = first.results["sensitivity"]["evaluations"] - 1
    assert rest.results["sensitivity"]["evaluations"] == alone.results["sensitivity"]["evaluations"] - first_points
    # and once the full table exists, a shard job takes its slice from it
    again = run(tmp_path, "again", partial_cache, "sensitivity.shard=2/2")
    assert again.results["sensitivity"]["evaluations"] == 0
    assert table_of(again)["table"] == {g: reference["table"][g] for g in list(reference["table"])[1::2]}


def test_sensitivity_merge_command_merges_run_directories(sharded, tmp_path, capsys):
    root, _, shards, _, alone = sharded
    out = tmp_path / "merged.json"
    assert cli_main(["sensitivity-merge", *(str(s.run_dir) for s in shards), "--out", str(out)]) == 0
    assert read_json(out)["table"] == table_of(alone)["table"]

    # a missing shard is named, not papered over
    assert cli_main(["sensitivity-merge", str(shards[0].run_dir), "--out", str(tmp_path / "x.json")]) == 2
    assert "leave" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    # parts of different analyses do not mix
    other = read_json(shards[1].run_dir / "sensitivity.json")
    other["cache_key"] = "0" * 24
    write_json(tmp_path / "other.json", other)
    assert cli_main(["sensitivity-merge", str(shards[0].run_dir), str(tmp_path / "other.json"),
                     "--out", str(tmp_path / "y.json")]) == 2
    assert "different analyses" in capsys.readouterr().err


def test_the_merged_file_drives_a_run_as_a_sensitivity_file(sharded, tmp_path):
    _, cache, shards, merged, _ = sharded
    out = tmp_path / "merged.json"
    assert cli_main(["sensitivity-merge", *(str(s.run_dir) for s in shards), "--out", str(out)]) == 0
    state = run(tmp_path, "from_file", cache, "sensitivity.source=file", f"sensitivity.file={out}")
    assert read_json(state.run_dir / "plan.json")["params"] == read_json(merged.run_dir / "plan.json")["params"]


@pytest.mark.parametrize("shard, message", [
    ("3/2", "1 <= i <= n"), ("0/4", "1 <= i <= n"), ("one/two", "does not match"), ("1-2", "does not match"),
])
def test_a_bad_shard_exits_2_naming_the_key(run_cli, tmp_path, shard, message):
    proc = run_cli("+recipe=cls_prune", "+profile=smoke", f"sensitivity.shard={shard}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "sensitivity.shard" in proc.stderr and message in proc.stderr
    assert not (tmp_path / "outputs").exists()  # refused before any run directory is made


def test_a_shard_of_a_table_that_is_not_computed_is_refused(compose_recipe):
    from slimrecipe.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        compose_recipe("cls_prune", "sensitivity.shard=1/2", "sensitivity.source=builtin",
                       "sensitivity.builtin=resnet18_digits32")
    assert [p.path for p in err.value.problems] == ["sensitivity.shard"]


def test_a_sweep_over_shards_ends_every_job_cleanly(run_cli, tmp_path):
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    proc = run_cli("-m", "+recipe=cls_prune", "+profile=smoke", STAGES, f"cache_dir={cache}",
                   "sensitivity.shard=1/2,2/2", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("the run ends here") == 2
    parts = sorted(p.name for p in (cache / "sensitivity").glob("*.shard-*of2.json"))
    assert [p.split(".", 1)[1] for p in parts] == ["shard-1of2.json", "shard-2of2.json"]
    assert not list(sweep.glob("*/plan.json"))
