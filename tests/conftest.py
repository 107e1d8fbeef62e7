import os

import torch

# The unit tests use tiny tensors: one thread is fastest, and never oversubscribes a small CI machine.
torch.set_num_threads(1)
os.environ.setdefault("COURSE_PROFILE", "cpu")
