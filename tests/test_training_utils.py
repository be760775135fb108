"""diffusers.training_utils on today's stack: EMAModel steps where its release checks for DeepSpeed through
transformers (0.17 on), which transformers 5 moved from ``transformers.deepspeed`` to
``transformers.integrations.deepspeed`` (patch 0002 at 0.17-0.30; upstream's own code from 0.31)."""
import inspect

import pytest
import torch

from diffusers import training_utils


def test_ema_model_steps_with_todays_transformers():
    pytest.importorskip("transformers")
    if "deepspeed" not in inspect.getsource(training_utils.EMAModel.step):
        pytest.skip("this release's EMAModel.step has no DeepSpeed check (before 0.17)")
    model = torch.nn.Linear(3, 2)
    ema = training_utils.EMAModel(model.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.step(model.parameters())  # the first step: decay 0, the shadow takes the weights as they are
    assert torch.equal(ema.shadow_params[0], model.weight)
    assert torch.equal(ema.shadow_params[1], model.bias)
