"""Plugin registry: one per kind, filled by a decorator (built-ins) or the `slimrecipe.plugins` entry points.

A recipe names a plugin by its registered name only; nothing in a recipe is ever imported, so a recipe
from another team cannot run code that is not already installed here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from .errors import RecipeError

KINDS = ("stage", "model", "dataset", "metric", "exporter")
ENTRY_POINT_GROUP = "slimrecipe.plugins"
BUILTIN_MODULES = (
    "slimrecipe.models.vision",
    "slimrecipe.models.db",
    "slimrecipe.models.ppocr_det",
    "slimrecipe.datasets.digits",
    "slimrecipe.datasets.text_det",
    "slimrecipe.datasets.text_scene",
    "slimrecipe.metrics.classification",
    "slimrecipe.metrics.det",
    "slimrecipe.stages.train",
    "slimrecipe.stages.evaluate",
    "slimrecipe.stages.sensitivity",
    "slimrecipe.stages.prune",
    "slimrecipe.stages.finetune",
    "slimrecipe.stages.qat",
    "slimrecipe.stages.ptq",
    "slimrecipe.stages.export",
    "slimrecipe.exporters",
    "slimrecipe.stages.report",
)


class DuplicatePluginError(Exception):
    pass


@dataclass
class Plugin:
    kind: str
    name: str
    obj: Any
    schema: dict  # JSON Schema of the plugin's own parameters
    module: str
    distribution: str | None = None  # set for plugins that came through an entry point
    doc: str = ""


@dataclass
class Registry:
    kind: str
    _plugins: dict[str, Plugin] = field(default_factory=dict)

    def register(self, name: str, schema: dict | None = None) -> Callable[[Any], Any]:
        def deco(obj):
            if name in self._plugins:
                prev = self._plugins[name]
                raise DuplicatePluginError(
                    f"{self.kind} plugin {name!r} is already registered by {prev.module}; "
                    f"refusing the second registration from {obj.__module__}"
                )
            doc = (obj.__doc__ or "").strip().splitlines()
            self._plugins[name] = Plugin(
                self.kind, name, obj, schema or {"type": "object", "additionalProperties": False},
                obj.__module__, _loading_distribution, doc[0] if doc else "",
            )
            return obj

        return deco

    def get(self, name: str, path: str = "") -> Plugin:
        if name not in self._plugins:
            raise RecipeError(
                f"unknown {self.kind} plugin {name!r}; registered {self.kind}s: {', '.join(self.names()) or '(none)'}",
                path=path,
            )
        return self._plugins[name]

    def names(self) -> list[str]:
        return sorted(self._plugins)

    def __contains__(self, name: str) -> bool:
        return name in self._plugins

    def __iter__(self):
        return iter(self._plugins.values())

    def unregister(self, name: str) -> None:
        self._plugins.pop(name, None)


REGISTRIES: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}
_loading_distribution: str | None = None
_loaded = False


def register(kind: str, name: str, schema: dict | None = None):
    """Decorator: ``@register("stage", "prune", schema={...})``."""
    return REGISTRIES[kind].register(name, schema)


def get(kind: str, name: str, path: str = "") -> Plugin:
    load_plugins()
    return REGISTRIES[kind].get(name, path)


def load_plugins() -> dict[str, Registry]:
    """Import the built-in plugin modules, then every module named by a `slimrecipe.plugins` entry point.

    Plugin modules must not import Paddle at import time: validation loads them all.
    """
    global _loaded, _loading_distribution
    if _loaded:
        return REGISTRIES
    _loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _loading_distribution = ep.dist.name if ep.dist else ep.value
        try:
            ep.load()
        finally:
            _loading_distribution = None
    return REGISTRIES


def plugin_distributions() -> dict[str, str]:
    """Distribution name -> version for every distribution that contributed a plugin."""
    load_plugins()
    out = {}
    for reg in REGISTRIES.values():
        for p in reg:
            dist = p.distribution or "slimrecipe"
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = "unknown"
    return out
