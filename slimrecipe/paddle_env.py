"""The one place that imports Paddle and PaddleSlim (see STACK.md, trap 1).

``zlib`` must be loaded before ``libpaddle.so``: Paddle exports its own copy of zlib's ``inflate*``
symbols, and a zlib loaded after it binds to that copy and crashes PNG decoding. Every other module
gets Paddle through :func:`paddle` / :func:`paddleslim`, inside the code that needs it, so that
``slimrecipe validate`` and ``--help`` never pay for the import.
"""

from __future__ import annotations

import logging
import os
import warnings
import zlib  # noqa: F401  -- must precede the first `import paddle`

_paddle = None
_slim = None


def paddle():
    global _paddle
    if _paddle is None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        warnings.filterwarnings("ignore", message=".*Setuptools is replacing distutils.*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"paddle\..*")
        try:
            import paddle as _p
        except ModuleNotFoundError as e:
            if e.name != "paddle":
                raise
            from .errors import MissingDependency

            raise MissingDependency(
                "PaddlePaddle is not installed. Install slimrecipe with a Paddle build: "
                "pip install 'slimrecipe[cpu]' (CPU) or 'slimrecipe[gpu]' (CUDA); see the README") from None

        if not _p.is_compiled_with_cuda():
            _p.set_device("cpu")
        _paddle = _p
    return _paddle


def paddleslim():
    global _slim
    if _slim is None:
        paddle()
        warnings.filterwarnings("ignore", message=".*distutils.*")
        try:
            import paddleslim as _s
        except ModuleNotFoundError as e:
            if e.name != "paddleslim":
                raise
            from .errors import MissingDependency

            raise MissingDependency("PaddleSlim is not installed; it is an optional backend for Paddle 2.6 only: "
                                    "pip install 'slimrecipe[paddleslim]'") from None

        _slim = _s
    quiet_paddleslim_loggers()
    return _slim


def quiet_paddleslim_loggers() -> None:
    """paddleslim logs every skipped graph leaf at WARNING; keep a run's output readable."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.startswith("paddle"):
            logger.setLevel(logging.ERROR)


def ensure_dynamic_mode() -> None:
    """QAT's save and a failed pruner can leave Paddle in static mode (STACK.md trap 3)."""
    p = paddle()
    if not p.in_dynamic_mode():
        p.disable_static()


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    paddle().seed(seed)
