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


@pytest.fixture
def meta_default():
    """torch's default device is ``meta`` inside the test; restored whatever happens. Real tensors
    stay on the CPU, so a factory call that forgets its device fails as it would on a GPU."""
    from gaugeflow.groups import get_group

    # the groups' lru-cached generator matrices are created by a factory call on first use
    # and moved with .to(device) afterwards (correct on a GPU); build them on the CPU first
    # so that the cache does not keep meta tensors for the rest of the session
    for g in ("u1", "su2", "su3"):
        get_group(g).generators()
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)
    assert torch.get_default_device() == previous
