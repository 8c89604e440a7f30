"""Compose a recipe with Hydra, resolve it to a plain dict, and check it against the assembled JSON Schema.

Every mistake becomes a :class:`~slimrecipe.errors.Problem` that names the dotted recipe path of the key at
fault, what was given and what is allowed; all of them are reported at once.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Problem, RecipeError

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
SCHEMAS_DIR = PACKAGE_DIR / "schemas"
RECIPE_PATH_ENV = "SLIMRECIPE_RECIPE_PATH"
PLUGIN_SECTIONS = ("model", "dataset", "metric")


# --------------------------------------------------------------------------- recipe directories

PACK_ENTRY_POINT_GROUP = "slimrecipe.recipes"


@dataclass(frozen=True)
class RecipeSource:
    """One directory on the recipe search path, and where it came from."""

    path: Path
    kind: str  # "built-in", "pack" or "path" (SLIMRECIPE_RECIPE_PATH)
    name: str = ""  # the pack's entry point name
    distribution: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "built-in":
            return f"built-in (slimrecipe {self.version or '?'})"
        if self.kind == "pack":
            return f"pack {self.name} ({self.distribution or '?'} {self.version or '?'})"
        return f"{RECIPE_PATH_ENV} {self.path}"


def recipe_sources(problems: list[tuple[str, str]] | None = None) -> list[RecipeSource]:
    """The recipe search path, in Hydra's order (the first directory holding a config wins):
    the built-in tree, then every installed recipe pack (sorted by entry point name), then every
    SLIMRECIPE_RECIPE_PATH directory (colon-separated, in the order given).

    A pack whose directory cannot be found is left out; ``(pack label, problem)`` is appended to ``problems``.
    """
    sources = [RecipeSource(RECIPES_DIR, "built-in", "slimrecipe", "slimrecipe", _dist_version("slimrecipe"))]
    sources += _pack_sources(problems)
    sources += [RecipeSource(Path(p).expanduser().resolve(), "path")
                for p in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep) if p]
    return sources


def recipe_dirs() -> list[Path]:
    """The directories of :func:`recipe_sources`, in the same order."""
    return [s.path for s in recipe_sources()]


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _pack_sources(problems: list[tuple[str, str]] | None) -> list[RecipeSource]:
    """Installed recipe packs: entry points of group `slimrecipe.recipes` naming a module whose directory holds
    a recipe tree (recipe/, model/, ... like slimrecipe/recipes). The module is located, never imported."""
    from importlib import metadata

    found = []
    for ep in sorted(metadata.entry_points(group=PACK_ENTRY_POINT_GROUP),
                     key=lambda e: (e.name, e.dist.name if e.dist else "")):
        dist = ep.dist.name if ep.dist else None
        version = ep.dist.version if ep.dist else None
        directory = _module_dir(ep.module)
        if directory is None or not directory.is_dir():
            if problems is not None:
                problems.append((f"pack {ep.name} ({dist or '?'} {version or '?'})",
                                 f"its `{PACK_ENTRY_POINT_GROUP}` entry point names {ep.value!r}, which is not an "
                                 f"installed package directory"))
            continue
        found.append(RecipeSource(directory, "pack", ep.name, dist, version))
    return found


def _module_dir(module: str) -> Path | None:
    """The directory of an installed package (or of a plain module), found without running any of its code: a
    pack's ``__init__`` may import Paddle, and `validate` and `recipes` must not. The top-level package is asked
    of the import system's finders (editable installs included); below it, directories are looked up."""
    import sys

    top, *rest = module.split(".")
    spec = None
    for finder in sys.meta_path:
        try:
            spec = finder.find_spec(top, None) if hasattr(finder, "find_spec") else None
        except (ImportError, ValueError, AttributeError):
            spec = None
        if spec is not None:
            break
    if spec is None:
        return None
    if spec.submodule_search_locations is None:
        return Path(spec.origin).parent if spec.origin and not rest else None
    locations = [Path(p) for p in spec.submodule_search_locations]
    for part in rest:
        below = [d / part for d in locations if (d / part).is_dir()]
        if not below:
            plain = next((d / f"{part}.py" for d in locations if (d / f"{part}.py").is_file()), None)
            return plain.parent if plain is not None and part == rest[-1] else None
        locations = below
    return locations[0]


def searchpath_override() -> list[str]:
    extra = recipe_sources()[1:]
    missing = [str(s.path) for s in extra if s.kind == "path" and not s.path.is_dir()]
    if missing:
        raise RecipeError(f"{RECIPE_PATH_ENV} names directories that do not exist: {', '.join(missing)}")
    return [f"hydra.searchpath=[{','.join('file://' + str(s.path) for s in extra)}]"] if extra else []


def list_recipes() -> list[dict]:
    """Every recipe under `recipe/` of each recipe directory, in search-path order: name, description, where it
    comes from (directory, pack and version); the ones another directory's recipe of the same name hides are
    marked ``shadowed_by`` (the first on the search path wins), the winner lists what it ``shadows``."""
    import yaml

    problems: list[tuple[str, str]] = []
    sources = recipe_sources(problems)
    winners: dict[str, dict] = {}
    out = []
    for src in sources:
        for f in sorted((src.path / "recipe").rglob("*.yaml")):
            name = f.relative_to(src.path / "recipe").with_suffix("").as_posix()
            error = None
            try:
                doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
                doc, error = {}, f"cannot read {f}: {' '.join(str(e).split())}"
            winner = winners.get(name)
            row = {
                "name": name,
                "description": str(doc.get("description", "")).strip() if isinstance(doc, dict) else "",
                "source": str(src.path),
                "origin": src.label,
                "kind": src.kind,
                "pack": src.name if src.kind == "pack" else None,
                "distribution": src.distribution,
                "version": src.version,
                "validated_on": doc.get("validated_on") if isinstance(doc, dict) else None,
                "shadowed_by": winner["origin"] if winner else None,
                "shadows": [],
                "error": error,
            }
            if winner:
                winner["shadows"].append(src.label)
            else:
                winners[name] = row
            out.append(row)
    out += [{"name": f"({label})", "description": "", "source": "", "origin": label, "kind": "pack", "pack": None,
             "distribution": None, "version": None, "validated_on": None, "shadowed_by": None, "shadows": [],
             "error": message} for label, message in problems]
    return out


# --------------------------------------------------------------------------- what a recipe was validated on

def environment_warnings(recipe: dict) -> list[str]:
    """Where this environment or the composed recipe differs from the recipe's ``validated_on`` record.

    Package versions come from the installed distributions' metadata (no Paddle import). A declared version
    matches every release it is a prefix of: "3.3" matches 3.3.1, "3.3.1" only 3.3.1. ``model`` is the model
    plugin's name, or a part of the `model` section ({name: paddle_vision, params: {arch: resnet18}}) that must
    still hold.
    """
    claims = recipe.get("validated_on")
    if not isinstance(claims, dict):
        return []
    expected = _expectation_text(claims)
    out = []
    wanted = dict(claims.get("packages") or {})
    if claims.get("paddle") is not None:
        wanted["paddle"] = claims["paddle"]
    for package, version in wanted.items():
        names = ("paddlepaddle", "paddlepaddle-gpu") if package in ("paddle", "paddlepaddle") else (package,)
        installed = next((v for v in map(_dist_version, names) if v), None)
        if installed is None:
            out.append(f"validated_on.{package}: validated with {package} {version}, which is not installed here")
        elif not _version_matches(str(version), installed):
            out.append(f"validated_on.{package}: validated with {package} {version}, installed is {installed}")
    if claims.get("python") is not None:
        import platform

        if not _version_matches(str(claims["python"]), platform.python_version()):
            out.append(f"validated_on.python: validated with Python {claims['python']}, running "
                       f"{platform.python_version()}")
    model = recipe.get("model") if isinstance(recipe.get("model"), dict) else {}
    claimed = claims.get("model")
    if isinstance(claimed, str):
        claimed = {"name": claimed}
    for key, value in _flat(claimed if isinstance(claimed, dict) else {}).items():
        now = _flat(model).get(key)
        if now != value:
            out.append(f"validated_on.model: validated with model.{key} {value!r}, this recipe now has {now!r}")
    if out and expected:
        out.append(f"the figures it was validated with ({expected}) may not hold here")
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _version_matches(declared: str, installed: str) -> bool:
    want = declared.strip().split(".")
    have = installed.strip().split("+")[0].split(".")
    return have[: len(want)] == want


def _expectation_text(claims: dict) -> str:
    parts = [f"{k} {v}" for k, v in (claims.get("metric") or {}).items()]
    parts += [f"{k} latency {v} ms" for k, v in (claims.get("latency_ms") or {}).items()]
    return ", ".join(parts)


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
        if key.lstrip("+") == "profile" and recipe and "," in recipe and value and "/" not in value:
            raise RecipeError(f"+profile={value} picks each recipe's own version of the profile, so it cannot go "
                              f"with a sweep over recipes ({recipe}): sweep one recipe at a time, or name the "
                              f"versions (+profile={value}/RECIPE)", path="profile")
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
    problems += _sensitivity_shard_problems(recipe)
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


def _sensitivity_shard_problems(recipe: dict) -> list[Problem]:
    from .stages.sensitivity import recipe_problems

    return recipe_problems(recipe)


def _prune_needs_no_sensitivity(recipe: dict) -> bool:
    target = (recipe.get("prune") or {}).get("target") or {}
    return isinstance(target, dict) and "ratios" in target


def load_and_validate(overrides: list[str], *, check_files: bool = True) -> dict:
    return validate(compose(overrides), check_files=check_files)
