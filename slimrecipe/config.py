"""Compose a recipe with Hydra, resolve it to a plain dict, and check it against the assembled JSON Schema.

Every mistake becomes a :class:`~slimrecipe.errors.Problem` that names the dotted recipe path of the key at
fault, what was given and what is allowed; all of them are reported at once.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any

from .errors import Problem, RecipeError

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
SCHEMAS_DIR = PACKAGE_DIR / "schemas"
RECIPE_PATH_ENV = "SLIMRECIPE_RECIPE_PATH"
PLUGIN_SECTIONS = ("model", "dataset", "metric")


# --------------------------------------------------------------------------- recipe directories

def recipe_dirs() -> list[Path]:
    """The built-in recipe tree, then every directory named by SLIMRECIPE_RECIPE_PATH (colon-separated)."""
    extra = [Path(p).expanduser().resolve() for p in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep) if p]
    return [RECIPES_DIR, *extra]


def searchpath_override() -> list[str]:
    extra = recipe_dirs()[1:]
    missing = [d for d in extra if not d.is_dir()]
    if missing:
        raise RecipeError(f"{RECIPE_PATH_ENV} names directories that do not exist: {', '.join(map(str, missing))}")
    return [f"hydra.searchpath=[{','.join('file://' + str(d) for d in extra)}]"] if extra else []


def list_recipes() -> list[dict]:
    """Every recipe under `recipe/` of each recipe directory: name, description, source; shadowed ones marked."""
    import yaml

    seen: dict[str, Path] = {}
    out = []
    for root in recipe_dirs():
        for f in sorted((root / "recipe").rglob("*.yaml")):
            name = f.relative_to(root / "recipe").with_suffix("").as_posix()
            error = None
            try:
                doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
                doc, error = {}, f"cannot read {f}: {' '.join(str(e).split())}"
            out.append({
                "name": name,
                "description": str(doc.get("description", "")).strip() if isinstance(doc, dict) else "",
                "source": str(root),
                "shadowed_by": str(seen[name]) if name in seen else None,
                "error": error,
            })
            seen.setdefault(name, root)
    return out


# --------------------------------------------------------------------------- composition

def expand_profiles(overrides: list[str]) -> list[str]:
    """``+profile=P`` becomes ``+profile=P/R`` when recipe R has its own version of profile P.

    A profile such as ``smoke`` means the same thing for every recipe (its tiny version) but has to set
    recipe-specific keys, so each recipe keeps its version at ``profile/P/R.yaml``; a user types one name.
    """
    recipe = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith("recipe=")), None)
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") == "profile" and recipe and value and "," not in value and "/" not in value:
            groups = [root / "profile" / value for root in recipe_dirs()]
            if any(g.is_dir() for g in groups):
                if not any((g / f"{recipe}.yaml").is_file() for g in groups):
                    have = sorted({f.stem for g in groups if g.is_dir() for f in g.glob("*.yaml")})
                    raise RecipeError(f"profile {value!r} has no version for recipe {recipe!r} "
                                      f"(it has: {', '.join(have) or 'none'})", path="profile")
                o = f"{key}={value}/{recipe}"
        out.append(o)
    return out


def compose(overrides: list[str]) -> dict:
    """Compose `config.yaml` + overrides, resolve every interpolation, return a plain dict (no `hydra` key)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=expand_profiles(list(overrides)) + searchpath_override())
    except (HydraException, OmegaConfBaseException) as e:
        raise RecipeError(_hydra_problem(e)) from None
    finally:
        GlobalHydra.instance().clear()
    return resolve(cfg)


def resolve(cfg) -> dict:
    """OmegaConf config -> plain dict with interpolations resolved; a broken interpolation names its key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise RecipeError(Problem(key, f"cannot resolve: {getattr(e, 'msg', str(e)).splitlines()[0]}")) from None
    data.pop("hydra", None)
    return data


def _hydra_problem(e: Exception) -> Problem:
    msg = str(e).strip()
    key = ""
    # Hydra says "Could not find 'recipe/x'" / "In 'config': Could not find 'model/y'"
    for group in ("recipe", "model", "dataset", "metric", "sensitivity", "skip", "prune", "finetune", "qat",
                  "export", "train", "profile"):
        if f"'{group}/" in msg or f"'{group}'" in msg:
            key = group
            break
    return Problem(key or getattr(e, "full_key", "") or "", msg.replace("\n", " "))


# --------------------------------------------------------------------------- schema

def base_schema() -> dict:
    return json.loads((SCHEMAS_DIR / "recipe.base.json").read_text(encoding="utf-8"))


def assembled_schema() -> dict:
    """The base schema with every registered plugin's parameter schema filled in."""
    from .registry import load_plugins

    regs = load_plugins()
    schema = copy.deepcopy(base_schema())
    props = schema["properties"]
    for section in PLUGIN_SECTIONS:
        names = regs[section].names()
        props[section]["properties"]["name"] = {"enum": names, "description": props[section]["properties"]["name"]["description"]}
        props[section]["allOf"] = [
            {"if": {"properties": {"name": {"const": p.name}}, "required": ["name"]},
             "then": {"properties": {"params": p.schema}}}
            for p in regs[section]
        ]
    stage_names = regs["stage"].names()
    props["stages"]["items"] = {"enum": stage_names}
    for plugin in regs["stage"]:
        if plugin.name in props:
            raise RuntimeError(f"stage plugin {plugin.name!r} clashes with the recipe key of the same name")
        props[plugin.name] = _stage_section_schema(plugin, regs)
    return schema


def _stage_section_schema(plugin, regs) -> dict:
    schema = copy.deepcopy(plugin.schema)
    if plugin.name == "export":
        # export.targets.<exporter>: each exporter plugin's own schema
        targets = schema.setdefault("properties", {}).setdefault("targets", {"type": "object"})
        targets["additionalProperties"] = False
        targets["minProperties"] = 1
        targets["properties"] = {p.name: {"type": ["object", "null"], **_strip_type(p.schema)} for p in regs["exporter"]}
    return {"type": ["object", "null"], **_strip_type(schema)} if schema.get("type") == "object" else schema


def _strip_type(schema: dict) -> dict:
    return {k: v for k, v in schema.items() if k != "type"}


# --------------------------------------------------------------------------- defaults

def apply_defaults(schema: dict, params: dict | None) -> dict:
    """``params`` with every key its schema gives a ``default`` for filled in, nested objects included.

    The schema is the one place a default lives: stage and plugin code read filled-in params and keep no
    defaults of their own.
    """
    out = copy.deepcopy(params) if isinstance(params, dict) else {}
    for key, sub in (schema.get("properties") or {}).items():
        if not isinstance(sub, dict):
            continue
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if isinstance(out.get(key), dict) and sub.get("properties"):
            out[key] = apply_defaults(sub, out[key])
        elif key not in out and sub.get("properties") and _is_object_schema(sub):
            filled = apply_defaults(sub, {})
            if filled:
                out[key] = filled
    return out


def _is_object_schema(schema: dict) -> bool:
    t = schema.get("type")
    return t == "object" or (isinstance(t, list) and "object" in t and "null" not in t)


# --------------------------------------------------------------------------- validation

def validate(recipe: dict, *, check_files: bool = True) -> dict:
    """Raise RecipeError listing every problem; return the recipe unchanged when it is valid."""
    from jsonschema import Draft202012Validator, ValidationError, validators

    def x_file(validator, wanted, instance, schema):
        if wanted and check_files and isinstance(instance, str) and not Path(instance).expanduser().exists():
            yield ValidationError(f"file not found: {instance!r}")

    cls = validators.extend(Draft202012Validator, {"x-file": x_file})
    schema = assembled_schema()
    problems = [_problem_from_error(e, schema) for e in _leaf_errors(cls(schema).iter_errors(recipe))]
    problems += _stage_order_problems(recipe)
    if problems:
        unique = list(dict.fromkeys(problems))
        raise RecipeError(sorted(unique, key=lambda p: p.path))
    return recipe


def _leaf_errors(errors):
    for e in errors:
        if e.validator in ("allOf", "anyOf", "oneOf", "if", "then") and e.context:
            yield from _leaf_errors(e.context)
        else:
            yield e


def dotted(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem_from_error(e, schema) -> Problem:
    path = dotted(e.absolute_path)
    v, inst = e.validator, e.instance
    if v == "additionalProperties":
        allowed = sorted((e.schema.get("properties") or {}).keys())
        extra = [k for k in inst if k not in allowed]
        key = extra[0] if extra else "?"
        near = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return Problem(dotted([*e.absolute_path, key]),
                       f"unknown key{hint}; allowed keys here: {', '.join(allowed) or '(none)'}")
    if v == "required":
        missing = e.message.split("'")[1] if "'" in e.message else e.message
        return Problem(dotted([*e.absolute_path, missing]), "required key is missing")
    if v == "enum":
        return Problem(path, f"got {inst!r}; allowed: {', '.join(map(str, e.validator_value))}")
    if v == "const":
        return Problem(path, f"got {inst!r}; must be {e.validator_value!r}")
    if v == "type":
        want = e.validator_value if isinstance(e.validator_value, str) else " or ".join(e.validator_value)
        return Problem(path, f"got {inst!r} ({_json_type(inst)}); expected {want}")
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if v in bounds:
        return Problem(path, f"got {inst!r}; must be {bounds[v]} {e.validator_value}")
    if v in ("minItems", "maxItems", "minProperties", "maxProperties", "minLength"):
        return Problem(path, f"got {inst!r}; {v} is {e.validator_value}")
    if v == "uniqueItems":
        return Problem(path, f"got {inst!r}; entries must be unique")
    if v == "x-file":
        return Problem(path, e.message)
    return Problem(path, e.message)


def _json_type(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(x), type(x).__name__)


# Stages that need an earlier stage's output. Checked here so a recipe fails before any work is done.
STAGE_NEEDS = {
    "prune": ("sensitivity",),
}


def _stage_order_problems(recipe: dict) -> list[Problem]:
    stages = recipe.get("stages")
    if not isinstance(stages, list):
        return []
    problems = []
    for i, name in enumerate(stages):
        for need in STAGE_NEEDS.get(name, ()):
            if need == "sensitivity" and _prune_needs_no_sensitivity(recipe):
                continue
            if need not in stages[:i]:
                problems.append(Problem(f"stages[{i}]", f"stage {name!r} needs {need!r} to run before it"))
    if "ptq" in stages and "qat" in stages:
        problems.append(Problem(f"stages[{stages.index('ptq')}]", "a recipe quantizes with ptq or with qat, not "
                                "both: ptq calibrates a float model, qat trains one with quantization"))
    return problems


def _prune_needs_no_sensitivity(recipe: dict) -> bool:
    target = (recipe.get("prune") or {}).get("target") or {}
    return isinstance(target, dict) and "ratios" in target


def load_and_validate(overrides: list[str], *, check_files: bool = True) -> dict:
    return validate(compose(overrides), check_files=check_files)
