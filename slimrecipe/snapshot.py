"""What makes a run reproducible: the resolved recipe, the environment, seeds, and hashes of inputs and outputs."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from .config import recipe_dirs
from .errors import RecipeError
from .fileio import read_json, sha256_file, sha256_json, sha256_tree, write_json, write_text
from .registry import plugin_distributions

KEY_PACKAGES = ("paddlepaddle", "paddlepaddle-gpu", "paddleslim", "hydra-core", "omegaconf", "numpy",
                "jsonschema", "paddle2onnx", "onnxruntime", "slimrecipe")


def begin(recipe: dict, run_dir: Path) -> None:
    """Write the resolved recipe and the environment; refuse a directory that holds another recipe's run."""
    from .run import RESOLVED_RECIPE

    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    existing = run_dir / RESOLVED_RECIPE
    if existing.exists():
        if yaml.safe_load(existing.read_text(encoding="utf-8")) != recipe:
            raise RecipeError(f"{run_dir} already holds a run of a different recipe; refusing to overwrite it")
    else:
        write_text(existing, text)
    snap_file = run_dir / "snapshot.json"
    snap = read_json(snap_file) if snap_file.exists() else {}
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    snap.setdefault("started", now)
    snap.setdefault("sessions", []).append({"started": now, "argv": sys.argv})
    snap.update({
        "recipe_name": recipe.get("name"),
        "recipe_sha256": sha256_json(recipe),
        "seed": recipe.get("seed"),
        "seeded": ["python.random", "numpy", "paddle"],
        "env": environment(),
        "recipe_dirs": [git_state(d) for d in recipe_dirs()],
    })
    write_json(snap_file, snap)


def finish(state) -> None:
    """Hash every input and output, record the headline metrics."""
    snap_file = state.run_dir / "snapshot.json"
    snap = read_json(snap_file)
    inputs = {}
    for label, path in sorted(state.inputs.items()):
        p = Path(path)
        inputs[label] = {"path": str(p), "sha256": sha256_file(p) if p.is_file() else None}
    inputs["dataset.manifest"] = {"sha256": sha256_json(state.data.manifest), "manifest": state.data.manifest}
    snap["inputs"] = inputs
    snap["plugins"] = plugin_distributions()
    snap["outputs"] = {k: v for k, v in sha256_tree(state.run_dir).items() if k != "snapshot.json"}
    snap["stages"] = {name: {k: v for k, v in r.items() if k in ("metric", "flops", "params", "seconds")}
                      for name, r in state.results.items()}
    snap["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(snap_file, snap)


def environment() -> dict:
    versions = {}
    for pkg in KEY_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "platform": platform.platform(), "machine": platform.machine(), "processors": os.cpu_count(),
            "packages": versions}


def git_state(directory: Path) -> dict:
    """Commit and dirty state of a recipe directory, when it is inside a git checkout."""
    out = {"path": str(directory), "git": None}
    try:
        inside = subprocess.run(["git", "-C", str(directory), "rev-parse", "--is-inside-work-tree"],
                                capture_output=True, text=True, timeout=10)
        if inside.returncode != 0 and "not a git repository" in inside.stderr:
            return out  # null means exactly this: not a checkout
        commit = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--", "."],
                                capture_output=True, text=True, timeout=10)
        failed = next((r for r in (inside, commit, status) if r.returncode != 0), None)
        if failed is not None:
            out["git"] = {"error": f"`{' '.join(failed.args)}` failed: {failed.stderr.strip()[:300]}"}
        else:
            out["git"] = {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError) as e:
        out["git"] = {"error": f"git could not be run: {e}"}
    return out

