import os

import pyro
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
