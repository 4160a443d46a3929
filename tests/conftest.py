import os

import pytest
import torch

# tests are small: more threads only add overhead on the 2-core CI machines
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
