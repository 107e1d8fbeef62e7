import os
import random

import numpy as np
import pytest
import torch

# The unit tests use tiny tensors: one thread is fastest, and never oversubscribes a small CI machine.
torch.set_num_threads(1)
os.environ.setdefault("COURSE_PROFILE", "cpu")


@pytest.fixture(autouse=True)
def seeded_and_restored():
    """Every test starts from the same seeded random state, whatever ran before it (or beside it under
    xdist), and leaves torch's, Python's and NumPy's random state and torch's thread count as it found them."""
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state(), torch.get_num_threads())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
    torch.set_rng_state(saved[0])
    random.setstate(saved[1])
    np.random.set_state(saved[2])
    torch.set_num_threads(saved[3])
