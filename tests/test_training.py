"""The shared training loop: an interrupted finetune resumes from its last checkpoint, not from the start."""

from __future__ import annotations

import pytest

from slimrecipe.config import compose, validate
from slimrecipe.run import RunState
from slimrecipe.stages._training import fit

PARAMS = {"steps": 6, "batch_size": 16, "checkpoint_every": 2, "optimizer": {"name": "adam", "lr": 0.001},
          "eval_batch_size": 64}


def make_state(tmp_path):
    recipe = validate(compose(["+recipe=cls_prune", "+profile=smoke"]))
    state = RunState(recipe, tmp_path)
    state.stage_dir = tmp_path / "stage"
    return state


def test_interrupted_fit_resumes_from_its_checkpoint(tmp_path):
    from slimrecipe.paddle_env import paddle

    state = make_state(tmp_path)
    model = state.model
    calls = {"n": 0, "fail_at": 5}
    ce = paddle().nn.functional.cross_entropy

    def counting_loss(outputs, batch):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt
        return ce(outputs, batch[1])

    model.loss = counting_loss
    with pytest.raises(KeyboardInterrupt):
        fit(state, model, PARAMS, out_dir=state.stage_dir, desc="t")
    assert (state.stage_dir / "progress.json").exists()
    calls.update(n=0, fail_at=-1)
    result = fit(state, model, PARAMS, out_dir=state.stage_dir, desc="t")
    assert calls["n"] == 2  # steps 5 and 6 only: steps 1-4 were checkpointed
    assert result["steps"] == 6 and 0 <= result["final_metric"] <= 1


def test_distillation_loss_is_zero_for_identical_outputs():
    from slimrecipe.paddle_env import paddle
    from slimrecipe.stages._training import distillation_loss

    x = paddle().to_tensor([[1.0, 2.0, 3.0]])
    assert float(distillation_loss(x, x, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(x, x * -1, 2.0)) > 0.1
