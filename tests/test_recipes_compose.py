"""Every shipped recipe composes, resolves and validates; the validation errors name the recipe path at fault."""

from __future__ import annotations

import pytest

from slimrecipe.config import compose, list_recipes, validate
from slimrecipe.errors import RecipeError

SHIPPED = [r["name"] for r in list_recipes() if r["shadowed_by"] is None]


def test_there_are_shipped_recipes():
    assert "cls_prune" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_composes_and_validates(name):
    recipe = validate(compose([f"+recipe={name}"]))
    assert recipe["stages"]
    assert "hydra" not in recipe


@pytest.mark.parametrize("name", SHIPPED)
def test_every_listed_recipe_has_a_smoke_profile_that_validates(name, run_cli):
    # through the command, as a user types it: one profile name for every recipe
    out = run_cli("validate", f"+recipe={name}", "+profile=smoke")
    assert out.returncode == 0, out.stderr
    assert f"recipe {name!r} is valid" in out.stdout


def test_smoke_profile_changes_the_recipe(compose_recipe):
    full, smoke = compose_recipe("ocr_det_prune"), compose_recipe("ocr_det_prune", "+profile=smoke")
    assert smoke["dataset"]["params"]["num_train"] < full["dataset"]["params"]["num_train"]
    assert smoke["finetune"]["steps"] < smoke["finetune"]["epochs"] * full["dataset"]["params"]["num_train"]


def test_a_profile_missing_for_a_recipe_is_named(tmp_path, monkeypatch):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "team_only.yaml").write_text("# @package _global_\nname: team_only\n")
    monkeypatch.setenv("SLIMRECIPE_RECIPE_PATH", str(tmp_path))
    with pytest.raises(RecipeError) as info:
        compose(["+recipe=team_only", "+profile=smoke"])
    assert info.value.problems[0].path == "profile"
    assert "no version for recipe 'team_only'" in str(info.value) and "cls_prune" in str(info.value)


def problems_of(overrides: list[str]) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        validate(compose(["+recipe=cls_prune", *overrides]))
    return {p.path: p.message for p in info.value.problems}


# each mistake: (override, recipe path that must be named, a word the message must contain)
MISTAKES = [
    ("prune.target.eval_metric_loss=1.5", "prune.target.eval_metric_loss", "<= 1"),
    ("+prune.target.flops=0.3", "prune.target", "maxProperties"),
    ("model.params.arch=resnet99", "model.params.arch", "resnet18"),
    ("model.name=nope", "model.name", "paddle_vision"),
    ("+model.params.depth=3", "model.params.depth", "allowed keys"),
    ("+prune.taget=1", "prune.taget", "did you mean 'target'"),
    ("seed=-1", "seed", ">= 0"),
    ("dataset.params.size=big", "dataset.params.size", "integer"),
    ("stages=[train,bogus]", "stages[1]", "allowed"),
    ("stages=[train,train]", "stages", "unique"),
    ("stages=[train,prune]", "stages[1]", "needs 'sensitivity'"),
    ("sensitivity.source=file", "sensitivity.file", "expected string"),
    ("sensitivity.ratios=[0.5,1.2]", "sensitivity.ratios[1]", "< 1"),
    ("sensitivity.criterion=random", "sensitivity.criterion", "fpgm"),
    ("model.weights=/nonexistent/w.pdparams", "model.weights", "file not found"),
    ("skip.types=[pointwise]", "skip.types[0]", "depthwise"),
    ("+export.targets.tflite={}", "export.targets.tflite", "paddle_inference"),
    ("finetune.optimizer.lr=0", "finetune.optimizer.lr", "> 0"),
    ("qat.config.weight_bits=99", "qat.config.weight_bits", "99"),
]


@pytest.mark.parametrize("override,path,word", MISTAKES, ids=[m[1] for m in MISTAKES])
def test_a_mistake_names_its_recipe_path(override, path, word):
    problems = problems_of([override])
    assert path in problems, problems
    assert word in problems[path], problems[path]


def test_all_mistakes_are_reported_at_once():
    problems = problems_of(["seed=-1", "model.params.arch=x", "prune.target.eval_metric_loss=2"])
    assert {"seed", "model.params.arch", "prune.target.eval_metric_loss"} <= set(problems)


def test_unknown_recipe_is_a_recipe_error_listing_the_available_ones():
    with pytest.raises(RecipeError) as info:
        compose(["+recipe=does_not_exist"])
    assert "cls_prune" in str(info.value)


def test_broken_interpolation_names_its_key():
    with pytest.raises(RecipeError) as info:
        compose(["+recipe=cls_prune", "name=${nothing.here}"])
    assert info.value.problems[0].path == "name"


def test_recipe_cannot_name_an_import_path():
    # no `_target_` or module path is ever honoured: the plugin name must be a registered one
    problems = problems_of(["model.name=os.system"])
    assert "model.name" in problems
    problems = problems_of(["+model._target_=os.system"])
    assert "model._target_" in problems
