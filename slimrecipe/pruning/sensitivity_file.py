"""Reading sensitivity tables from files: slimrecipe JSON, or PaddleSlim pickles through a restricted unpickler.

A sensitivity file from elsewhere is untrusted input: unpickling runs whatever globals the file names. The
unpickler here allows only PaddleSlim's ``Status`` class (rebuilt as plain data without importing PaddleSlim)
and numeric numpy scalars, and refuses everything else before it can run. This module imports neither Paddle
nor PaddleSlim, so it stays small enough to audit.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import struct
from pathlib import Path

from ..errors import RecipeError

_log = logging.getLogger(__name__)

# The one class a PaddleSlim dygraph sensitivity file may name (FilterPruner.sensitive() pickles it).
PADDLESLIM_STATUS = ("paddleslim.dygraph.prune.filter_pruner", "Status")


class _StatusStandIn:
    """Receives the attributes of a pickled PaddleSlim ``Status`` without importing or running PaddleSlim."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a Status object whose state is not a dict")
        self.state = state


class _DTypeStandIn:
    """A numpy dtype spec, kept as data: only the byte layout of a few numeric scalars is understood."""

    CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
             "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}

    def __init__(self, spec, align=False, copy=False):
        if spec not in self.CODES:
            raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a plain number")
        self.code = self.CODES[spec]
        self.order = "<"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = {"|": "<"}.get(state[1], state[1])


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _DTypeStandIn) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a plain number")
    (value,) = struct.unpack(dtype.order + dtype.code, data)
    return value


def _reconstructor(cls, base, state=None):
    # protocol 0/1 pickles build objects through copyreg._reconstructor; allow it for the stand-in only
    if cls is not _StatusStandIn or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor for something other than PaddleSlim's Status")
    return _StatusStandIn()


def _latin1_bytes(text, encoding="latin1"):
    # protocol 0-2 pickles write bytes (numpy scalars' payload) as _codecs.encode(text, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    PADDLESLIM_STATUS: _StatusStandIn,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _DTypeStandIn,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("_codecs", "encode"): _latin1_bytes,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and PaddleSlim's Status; refuses every other global (a pickle runs what it names)."""

    def __init__(self, data: bytes, source: str, recipe_path: str):
        super().__init__(io.BytesIO(data))
        self.source = source
        self.recipe_path = recipe_path

    def find_class(self, module, name):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise RecipeError(
                f"{self.source} was not loaded: it names the Python global `{module}.{name}`, and unpickling "
                "would run it. A sensitivity file may only hold PaddleSlim's Status object or a plain "
                "{param: {ratio: loss}} dict; regenerate it, or convert it to JSON where it was made.",
                path=self.recipe_path)
        return allowed

    def persistent_load(self, pid):
        raise RecipeError(f"{self.source} was not loaded: it uses persistent ids, which a sensitivity file "
                          "never needs", path=self.recipe_path)


def load_sensitivity_file(path, recipe_path: str = "sensitivity.file", *,
                          prunable: list[dict] | None = None) -> dict[str, dict[float, float]]:
    """Read a sensitivity table: slimrecipe JSON, PaddleSlim's pickled dygraph ``Status`` or its static dict.

    Ratios are rounded to 6 decimals (the static API writes keys like ``0.30000000000000004``). Pickles are
    read by an unpickler that allows only PaddleSlim's ``Status`` class (rebuilt as plain data, without
    importing PaddleSlim) and numeric numpy scalars; anything else is refused before it can run. With
    ``prunable`` (from :func:`prunable_params`), rows are re-keyed to the model's structured names.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"sensitivity file {str(path)!r} does not exist", path=recipe_path)
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":
        import json

        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise RecipeError(f"{path} is not valid JSON ({e})", path=recipe_path) from None
        if isinstance(raw, dict) and isinstance(raw.get("table"), dict):
            raw = raw["table"]
    else:
        try:
            raw = _SafeUnpickler(data, str(path), recipe_path).load()
        except RecipeError:
            raise
        except Exception as e:  # noqa: BLE001 -- a damaged or foreign file, whatever the exception
            raise RecipeError(f"{path} is neither slimrecipe JSON nor a PaddleSlim sensitivity pickle "
                              f"({type(e).__name__}: {e})", path=recipe_path) from None
        if isinstance(raw, _StatusStandIn):
            raw = raw.state.get("sensitivies")
    table = _validate_table(raw, str(path), recipe_path)
    return resolve_table(prunable, table, recipe_path) if prunable is not None else table


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _validate_table(raw, source: str, path: str) -> dict[str, dict[float, float]]:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected {{param: {{ratio: loss}}}}, got {type(raw).__name__}", path=path)
    out = {}
    for param, row in raw.items():
        if not isinstance(param, str) or not param:
            raise RecipeError(f"{source}: parameter names must be strings, got {param!r}", path=path)
        if not isinstance(row, dict):
            raise RecipeError(f"{source}: {param}: expected {{ratio: loss}}, got {type(row).__name__}", path=path)
        clean = {}
        for r, loss in row.items():
            ratio = _number(r)
            if ratio is None or not math.isfinite(ratio) or not 0 < ratio < 1:
                raise RecipeError(f"{source}: {param}: ratio {r!r} is not a number strictly between 0 and 1",
                                  path=path)
            value = _number(loss)
            if value is None or not math.isfinite(value):
                raise RecipeError(f"{source}: {param}: the loss at ratio {r!r} is {loss!r}, not a finite number",
                                  path=path)
            key = round(ratio, 6)
            if key in clean:
                raise RecipeError(f"{source}: {param}: ratio {key:g} appears twice", path=path)
            clean[key] = value
        if clean:  # PaddleSlim writes an empty row for a parameter it was about to measure
            out[param] = dict(sorted(clean.items()))
    if not out:
        raise RecipeError(f"{source} holds no sensitivity measurements", path=path)
    return out




def resolve_table(prunable: list[dict], table: dict, recipe_path: str = "sensitivity.file") -> dict:
    """A sensitivity table keyed by structured names: PaddleSlim's internal names are mapped onto the model.

    Rows for parameters that are not prunable are dropped (a static-API table lists every convolution);
    a table that matches none of the model's prunable parameters is a ``RecipeError``.
    """
    by_internal = {e["param_name"]: e["name"] for e in prunable}
    names = {e["name"] for e in prunable}
    out, unknown = {}, []
    for key, row in table.items():
        name = key if key in names else by_internal.get(key)
        if name is None:
            unknown.append(key)
        else:
            out[name] = row
    if table and not out:
        raise RecipeError(
            f"the sensitivity table names none of this model's prunable parameters (it has {sorted(table)[:3]}"
            f"...; the model's start {[e['name'] for e in prunable[:3]]} ...): it was computed on another model",
            path=recipe_path)
    if unknown:
        _log.warning("sensitivity rows for parameters that are not prunable here were ignored: %s", unknown[:5])
    return out

