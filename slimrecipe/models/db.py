"""DB text detector plugin `db_mobilenet_v3` (PaddleOCR's det_mv3_db), built from params or a PaddleOCR config.

The Paddle layers live in ``_db_layers``, imported only when a model is built: validating a recipe reads this
module's schema without importing Paddle.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError
from ..paddle_env import paddle
from ..registry import register

CONFIG_PATH = "model.params.paddleocr_config"
FEATURE_STRIDE = 32  # the FPN doubles stride-32 features three times and adds them to finer ones

# Network and loss settings, with the defaults of PaddleOCR's det_mv3_db configuration.
DEFAULT_SETTINGS = {
    "scale": 0.5,
    "disable_se": False,
    "neck_channels": 256,
    "k": 50.0,
    "alpha": 5.0,
    "beta": 10.0,
    "ohem_ratio": 3.0,
    "shrink_loss": "bce",
}
SETTING_PARAMS = tuple(DEFAULT_SETTINGS)

DB_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": {"type": "number", "exclusiveMinimum": 0, "maximum": 4,
                  "description": "backbone width multiplier (PaddleOCR ships 0.35, 0.5, 0.75, 1.0, 1.25); default 0.5"},
        "disable_se": {"type": "boolean",
                       "description": "drop the backbone's squeeze-and-excitation blocks; default false"},
        "neck_channels": {"type": "integer", "minimum": 4, "maximum": 4096, "multipleOf": 4,
                          "description": "FPN channels (each of its 4 branches gets a quarter); default 256"},
        "k": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000,
              "description": "steepness of the differentiable binarization; default 50"},
        "alpha": {"type": "number", "minimum": 0, "maximum": 1000,
                  "description": "weight of the shrink-map loss; default 5"},
        "beta": {"type": "number", "minimum": 0, "maximum": 1000,
                 "description": "weight of the threshold-map L1 loss; default 10"},
        "ohem_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 100,
                       "description": "hardest negatives kept per positive pixel in the shrink-map BCE; default 3"},
        "shrink_loss": {"enum": ["bce", "dice"],
                        "description": "shrink-map loss: balanced BCE with OHEM (the DB paper; default) or Dice "
                                       "(what PaddleOCR's main_loss_type: DiceLoss computes)"},
        "pretrained": {"type": "string", "minLength": 1, "x-file": True,
                       "description": "weights (.pdparams) of the whole detector or of its backbone, with "
                                      "PaddleOCR's parameter names; overrides the config's Global.pretrained_model"},
        "paddleocr_config": {"type": "string", "minLength": 1, "x-file": True,
                             "description": "a PaddleOCR YAML config (det, DB, MobileNetV3 large, DBFPN, DBHead) "
                                            "to build from; excludes the network and loss params above"},
    },
}


@register("model", "db_mobilenet_v3", schema=DB_SCHEMA)
def db_mobilenet_v3(params: dict, data):
    """DB text detector (PaddleOCR det_mv3_db): MobileNetV3-large, DB FPN, DB head; eval output is the probability map."""
    settings, weights, weights_param = resolve_settings(params)
    channels, height, width = data.input_shape
    if height % FEATURE_STRIDE or width % FEATURE_STRIDE:
        raise RecipeError(
            f"the DB detector needs input height and width divisible by {FEATURE_STRIDE}; the dataset gives "
            f"{height}x{width}", path="model")
    from ._db_layers import DBDetector

    model = DBDetector(in_channels=channels, **settings)
    if weights:
        load_weights(model, weights, weights_param)
    return model


def resolve_settings(params: dict) -> tuple[dict, str | None, str]:
    """(network and loss settings, weights file or None, the recipe path that named the weights)."""
    config = params.get("paddleocr_config")
    if config:
        mixed = [key for key in SETTING_PARAMS if key in params]
        if mixed:
            raise RecipeError(f"{mixed[0]!r} cannot be combined with paddleocr_config, whose Architecture and Loss "
                              f"sections set it", path=f"model.params.{mixed[0]}")
        # An explicit `pretrained` replaces the config's weights, which then need not exist.
        settings, weights, weights_key = read_paddleocr_config(config, find_weights=not params.get("pretrained"))
        weights_param = f"{CONFIG_PATH} ({weights_key})"
    else:
        settings = {key: params.get(key, default) for key, default in DEFAULT_SETTINGS.items()}
        weights, weights_param = None, ""
    if params.get("pretrained"):
        weights, weights_param = params["pretrained"], "model.params.pretrained"
    return settings, weights, weights_param


def _refuse(message: str):
    raise RecipeError(message, path=CONFIG_PATH)


def _section(parent: dict, key: str, where: str) -> dict:
    value = parent.get(key)
    if not isinstance(value, dict):
        _refuse(f"{where}{key}: missing, or not a mapping")
    return value


def _expect_name(section: dict, where: str, supported: str):
    if section.get("name") != supported:
        _refuse(f"{where}.name: {section.get('name')!r} is not supported; supported: {supported}")


def _refuse_unknown_keys(section: dict, where: str, known: tuple[str, ...], plugin: str = "db_mobilenet_v3"):
    unknown = sorted(set(section) - set(known) - {"name"})
    if unknown:
        _refuse(f"{where}.{unknown[0]} is not supported by {plugin}; supported keys: {', '.join(known)}")


def _number(section: dict, key: str, where: str, default, *, integer=False, positive=True):
    value = section.get(key, default)
    valid_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, valid_type) or value < 0 or (positive and value == 0):
        kind = ("a positive" if positive else "a non-negative") + (" integer" if integer else " number")
        _refuse(f"{where}.{key}: expected {kind}, got {value!r}")
    return value


def _flag(section: dict, key: str, where: str, default: bool) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        _refuse(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def read_db_architecture(path: str | Path, plugin: str = "db_mobilenet_v3") -> tuple[dict, dict]:
    """A PaddleOCR det config and its ``Architecture`` section, refused (naming the key) unless it builds a DB
    text detector with no input transform."""
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        _refuse(f"cannot read the PaddleOCR config {str(path)!r}: {exc}")
    if not isinstance(config, dict):
        _refuse(f"{str(path)!r} is not a PaddleOCR config (expected a YAML mapping)")
    arch = _section(config, "Architecture", "")
    if arch.get("model_type") != "det":
        _refuse(f"Architecture.model_type: {arch.get('model_type')!r} is not supported; supported: det")
    if arch.get("algorithm") != "DB":
        _refuse(f"Architecture.algorithm: {arch.get('algorithm')!r} is not supported; supported: DB")
    if arch.get("Transform") is not None:
        _refuse("Architecture.Transform is not supported; it must be empty")
    _refuse_unknown_keys(arch, "Architecture", ("model_type", "algorithm", "Transform", "Backbone", "Neck", "Head"),
                         plugin)
    return config, arch


def read_paddleocr_config(path: str | Path, find_weights: bool = True) -> tuple[dict, str | None, str]:
    """Settings of a PaddleOCR det_mv3_db-style config, the weights file it names, and the key that named it.

    Anything this plugin would build differently from PaddleOCR is refused, naming the config key. A missing
    ``Loss`` section gives this plugin's defaults; a ``DBLoss`` section gives PaddleOCR's defaults for the
    keys it leaves out (including ``main_loss_type: DiceLoss``).
    """
    path = Path(path)
    config, arch = read_db_architecture(path)

    backbone = _section(arch, "Backbone", "Architecture.")
    _expect_name(backbone, "Architecture.Backbone", "MobileNetV3")
    _refuse_unknown_keys(backbone, "Architecture.Backbone", ("scale", "model_name", "disable_se", "in_channels"))
    if backbone.get("model_name", "large") != "large":
        _refuse(f"Architecture.Backbone.model_name: {backbone.get('model_name')!r} is not supported; supported: large")
    settings = {
        "scale": _number(backbone, "scale", "Architecture.Backbone", 0.5),
        "disable_se": _flag(backbone, "disable_se", "Architecture.Backbone", False),
    }
    if backbone.get("in_channels", 3) != 3:
        _refuse(f"Architecture.Backbone.in_channels: {backbone['in_channels']!r} is not supported; supported: 3")

    neck = _section(arch, "Neck", "Architecture.")
    _expect_name(neck, "Architecture.Neck", "DBFPN")
    _refuse_unknown_keys(neck, "Architecture.Neck", ("out_channels", "use_asf"))
    if _flag(neck, "use_asf", "Architecture.Neck", False):
        _refuse("Architecture.Neck.use_asf: true is not supported; supported: false")
    settings["neck_channels"] = _number(neck, "out_channels", "Architecture.Neck", 256, integer=True)
    if settings["neck_channels"] % 4:
        _refuse(f"Architecture.Neck.out_channels: {settings['neck_channels']} is not a multiple of 4")

    head = _section(arch, "Head", "Architecture.")
    _expect_name(head, "Architecture.Head", "DBHead")
    _refuse_unknown_keys(head, "Architecture.Head", ("k",))
    settings["k"] = float(_number(head, "k", "Architecture.Head", 50))

    settings.update(_read_loss(config))
    if not find_weights:
        return settings, None, ""
    weights, weights_key = _weights_named_by(config, path)
    return settings, weights, weights_key


def _read_loss(config: dict) -> dict:
    if config.get("Loss") is None:
        return {key: DEFAULT_SETTINGS[key] for key in ("alpha", "beta", "ohem_ratio", "shrink_loss")}
    loss = _section(config, "Loss", "")
    _expect_name(loss, "Loss", "DBLoss")
    _refuse_unknown_keys(loss, "Loss", ("balance_loss", "main_loss_type", "alpha", "beta", "ohem_ratio"))
    if not _flag(loss, "balance_loss", "Loss", True):
        _refuse("Loss.balance_loss: false is not supported; supported: true")
    main_loss = loss.get("main_loss_type", "DiceLoss")
    shrink_losses = {"DiceLoss": "dice", "BCELoss": "bce"}
    if main_loss not in shrink_losses:
        _refuse(f"Loss.main_loss_type: {main_loss!r} is not supported; supported: {', '.join(shrink_losses)}")
    return {
        "alpha": float(_number(loss, "alpha", "Loss", 5, positive=False)),
        "beta": float(_number(loss, "beta", "Loss", 10, positive=False)),
        "ohem_ratio": float(_number(loss, "ohem_ratio", "Loss", 3)),
        "shrink_loss": shrink_losses[main_loss],
    }


def _weights_named_by(config: dict, config_path: Path) -> tuple[str | None, str]:
    """PaddleOCR loads ``Global.checkpoints`` if set, else ``Global.pretrained_model``; both omit ``.pdparams``."""
    settings = config.get("Global") or {}
    if not isinstance(settings, dict):
        _refuse("Global: not a mapping")
    for key in ("checkpoints", "pretrained_model"):
        value = settings.get(key)
        if not value:
            continue
        named = Path(str(value))
        candidates = [named, named.with_name(named.name + ".pdparams")]
        if not named.is_absolute():
            # PaddleOCR resolves these against its working directory; a config moved out of the PaddleOCR tree
            # usually keeps its weights beside it.
            candidates += [config_path.parent / c for c in candidates]
        for candidate in candidates:
            if candidate.is_file():
                return str(candidate), f"Global.{key}"
        _refuse(f"Global.{key}: {str(value)!r} not found (looked for {', '.join(str(c) for c in candidates)}); "
                f"set model.params.pretrained to another weights file, or clear Global.{key}")
    return None, ""


def load_weights(model, path: str, param_path: str) -> dict:
    """Load a PaddleOCR-named state dict (whole detector, or backbone only) into ``model``; refuse any mismatch.

    Returns ``{"loaded": n, "part": "detector" | "backbone"}``.
    """
    p = paddle()
    try:
        state = p.load(str(path))
    except Exception as exc:  # paddle.load raises many types for a file that is not a state dict
        raise RecipeError(f"cannot read weights {str(path)!r}: {exc}", path=param_path) from exc
    if not isinstance(state, dict) or not state:
        raise RecipeError(f"{str(path)!r} holds no state dict", path=param_path)
    own = model.state_dict()
    part, prefix = "detector", ""
    if not all(key in own for key in state):
        if all(f"backbone.{key}" in own for key in state):
            part, prefix = "backbone", "backbone."
        else:
            strangers = [key for key in state if key not in own]
            raise RecipeError(
                f"{len(strangers)} of {len(state)} tensors in {str(path)!r} name no parameter of this detector "
                f"(e.g. {strangers[0]!r}); expected PaddleOCR dygraph names such as "
                f"'backbone.conv.conv.weight' (whole detector) or 'conv.conv.weight' (backbone only)",
                path=param_path)
    mismatched = [
        f"{key}: file {list(value.shape)} vs model {list(own[prefix + key].shape)}"
        for key, value in state.items() if list(value.shape) != list(own[prefix + key].shape)
    ]
    if mismatched:
        raise RecipeError(
            f"{len(mismatched)} tensors in {str(path)!r} have another shape than this detector's (another scale, "
            f"neck_channels or disable_se, or a pruned model?): {'; '.join(mismatched[:3])}", path=param_path)
    model.set_state_dict({prefix + key: value for key, value in state.items()})
    return {"loaded": len(state), "part": part}
