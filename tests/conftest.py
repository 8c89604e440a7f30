"""Shared fixtures: a private cache directory per test session, and recipe composition helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("slimrecipe-cache")
    old = os.environ.get("SLIMRECIPE_CACHE_DIR")
    os.environ["SLIMRECIPE_CACHE_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SLIMRECIPE_CACHE_DIR", None)
    else:
        os.environ["SLIMRECIPE_CACHE_DIR"] = old


def _run_cli(*args, cwd=None, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "slimrecipe", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_cli():
    """Run the `slimrecipe` command in a subprocess, as a user would."""
    return _run_cli


@pytest.fixture
def compose_recipe():
    """Compose and validate a shipped recipe with overrides, as the command would: ``compose_recipe(name, *o)``."""
    from slimrecipe.config import compose, validate

    def _compose(name: str, *overrides: str, check_files: bool = True) -> dict:
        return validate(compose([f"+recipe={name}", *overrides]), check_files=check_files)

    return _compose


@pytest.fixture(scope="session")
def train_briefly():
    """``train_briefly(model, sample, steps, batch_size)``: Adam (lr 0.01) on cross-entropy for ``steps`` batches
    drawn by ``sample(n) -> (x, y)``; leaves the model in eval mode. Tests use it for small trained models."""
    def train(model, sample, steps: int, batch_size: int):
        from slimrecipe.paddle_env import paddle

        p = paddle()
        opt = p.optimizer.Adam(learning_rate=0.01, parameters=model.parameters())
        model.train()
        for _ in range(steps):
            x, y = sample(batch_size)
            loss = p.nn.functional.cross_entropy(model(p.to_tensor(x)), p.to_tensor(y))
            loss.backward()
            opt.step()
            opt.clear_grad()
        model.eval()
        return model

    return train


@pytest.fixture(scope="session")
def trained_tiny_cnn(train_briefly):
    """tiny_cnn [16, 32, 64] (3x3 convs without bias, each followed by BatchNorm; a linear head) trained briefly on
    a synthetic 10-class task: its ``state`` dict and two more ``batches`` (x, y) of 128 from the same task."""
    from slimrecipe.models.vision import tiny_cnn
    from slimrecipe.paddle_env import paddle

    paddle().seed(0)
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(10, 3, 16, 16)).astype("float32")

    def batch(n):
        y = rng.integers(0, 10, n)
        return (protos[y] + 0.8 * rng.normal(size=(n, 3, 16, 16))).astype("float32"), y

    data = SimpleNamespace(input_shape=[3, 16, 16], num_classes=10)
    model = train_briefly(tiny_cnn({"channels": [16, 32, 64]}, data), batch, steps=25, batch_size=64)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return SimpleNamespace(state=state, batches=[batch(128), batch(128)])
