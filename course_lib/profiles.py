"""Profiles: the sizes and step counts a notebook runs with, and the one-line notebook set-up.

`cpu` is the default without CUDA and what CI runs (minutes per notebook on 2 cores, peak memory
that fits Binder's ~2 GB); `gpu` is the default with CUDA (a larger model, longer training).
`COURSE_PROFILE=cpu|gpu` overrides the automatic choice. A profile changes sizes and step counts
only: every notebook runs the same code under both.
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

try:
    import resource
except ImportError:  # Windows has no resource module: peak_memory_mb asks the OS through ctypes instead
    resource = None

from .config import ModelConfig
from .tasks import Tokenizer


@dataclass(frozen=True)
class Profile:
    name: str
    hidden_size: int            # baseline model width
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int      # dense SwiGLU width
    max_position_embeddings: int
    digits: int                 # addition operands have up to this many digits
    n_train: int                # fixed worked examples the model pretrains on
    n_eval: int                 # held-out problems for accuracy
    pretrain_steps: int
    batch_size: int
    lr: float
    decode_tokens: int = 256    # tokens generated when timing decode speed
    extra: dict = field(default_factory=dict)  # per-notebook knobs (sizes and steps only)

    def baseline_config(self, **changes) -> ModelConfig:
        """The notebook-00 baseline: dense MHA decoder sized by this profile."""
        tok = Tokenizer()
        cfg = ModelConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, hidden_size=self.hidden_size,
                          num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                          intermediate_size=self.intermediate_size,
                          max_position_embeddings=self.max_position_embeddings)
        return cfg.replace(**changes) if changes else cfg


PROFILES = {
    # ~0.6M parameters, 300 steps of 64 on 256 examples: about a minute on 2 CPU cores.
    "cpu": Profile("cpu", hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=352,
                   max_position_embeddings=512, digits=3, n_train=256, n_eval=200,
                   pretrain_steps=300, batch_size=64, lr=3e-3),
    # ~4.8M parameters and 4x the data and steps: a few minutes on a T4.
    "gpu": Profile("gpu", hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=688,
                   max_position_embeddings=512, digits=3, n_train=1024, n_eval=500,
                   pretrain_steps=1200, batch_size=64, lr=2e-3),
}


def get_profile(name: str | None = None) -> Profile:
    """The named profile, else $COURSE_PROFILE, else gpu when CUDA is available and cpu otherwise."""
    name = name or os.environ.get("COURSE_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}. Set COURSE_PROFILE to one of {sorted(PROFILES)}.")
    return PROFILES[name]


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(profile: str = "gpu") -> tuple[torch.device, str]:
    """The device a notebook runs on, and why: $COURSE_DEVICE if set; the CPU under the `cpu` profile (its
    models are so small that a GPU's or Apple's MPS kernel launches and syncs cost more than they compute);
    else CUDA, then MPS, then the CPU."""
    asked = os.environ.get("COURSE_DEVICE")
    if asked:
        device = torch.device(asked)  # raises on a name torch does not know
        if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not _mps_available()):
            raise ValueError(f"COURSE_DEVICE={asked!r} but this machine has no {device.type}. "
                             "Unset COURSE_DEVICE, or set it to cpu.")
        return device, "COURSE_DEVICE asks for it"
    if profile == "cpu":
        return torch.device("cpu"), "the cpu profile's small models run fastest there; COURSE_DEVICE=cuda or mps opts in"
    if torch.cuda.is_available():
        return torch.device("cuda"), "CUDA is available"
    if _mps_available():
        return torch.device("mps"), "Apple's MPS is available"
    return torch.device("cpu"), "no CUDA or MPS here"


# How many greedy decodes two exact-in-principle paths (cached vs uncached, absorbed vs naive MLA, batched vs
# one by one) must agree on. On a CPU both paths run the same float32 kernels in the same order: identical
# tokens. On CUDA or MPS the paths multiply matrices of different shapes (one new row against a whole
# sequence), whose kernels may sum in another order; a near-tie argmax can then flip, and that sequence follows
# its own path from there. The share below for those devices is an allowance, not a measurement.
EXACT_SHARE = {"cpu": 1.0, "cuda": 0.95, "mps": 0.95}


def same_share(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of rows (sequences) of two (N, T) token tensors that are identical."""
    if a.shape != b.shape:
        return 0.0
    return (a == b).all(dim=-1).float().mean().item()


def exact_share_needed(device) -> float:
    """`EXACT_SHARE` for a device: 1.0 (every sequence identical) on a CPU."""
    return EXACT_SHARE.get(torch.device(device).type, 0.95)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def usable_cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def notebook_threads() -> int:
    """torch threads for the course's small models: half the usable cores, at least one, at most eight
    (see `setup_notebook`)."""
    return max(1, min(usable_cpus() // 2, 8))


@dataclass(frozen=True)
class NotebookSetup:
    device: torch.device
    profile: Profile
    threads: int
    seed: int


def setup_notebook(seed: int = 0, profile: str | None = None, quiet: bool = False) -> NotebookSetup:
    """Seed everything, pick the profile and the device (`pick_device`, which says why), size torch's thread pool.

    The course's models are small: their matrices gain little from many threads, and threads that
    outnumber free cores (a container reporting the host's CPUs, a busy laptop) make them many times
    slower. So torch gets half the usable cores, at least one and at most eight, which also leaves a
    core for JupyterLab and the widgets.
    """
    seed_everything(seed)
    prof = get_profile(profile)
    device, why = pick_device(prof.name)
    threads = notebook_threads()
    torch.set_num_threads(threads)
    if not quiet:
        print(f"device={device.type} profile={prof.name} threads={threads} torch={torch.__version__.split('+')[0]} seed={seed}")
        print(f"  ({device.type}: {why})")
    return NotebookSetup(device, prof, threads, seed)


def checkpoint_path(name: str, suffix: str = ".pt", profile: str | None = None) -> str:
    """Where a notebook keeps `name` for the current profile: $COURSE_CHECKPOINT_DIR, else ./checkpoints.

    Per profile, so a gpu-sized checkpoint is never loaded into a cpu-sized model. The folder is
    ignored by git and survives kernel restarts, which is what lets long cells resume.
    """
    folder = os.environ.get("COURSE_CHECKPOINT_DIR", "checkpoints")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}_{get_profile(profile).name}{suffix}")


# ----------------------------------------------------------------------------- what a kernel used

class _ProcessMemoryCounters(ctypes.Structure):
    """Windows' PROCESS_MEMORY_COUNTERS (psapi.h), for `GetProcessMemoryInfo`."""
    _fields_ = [("cb", ctypes.c_ulong), ("PageFaultCount", ctypes.c_ulong)] + [
        (name, ctypes.c_size_t) for name in ("PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                                             "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage",
                                             "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]


def peak_memory_mb() -> float | None:
    """This process's peak resident memory in MB (2^20 bytes), on Linux, macOS and Windows; None if unknown.

    `getrusage`'s ru_maxrss is in KiB on Linux but in bytes on macOS; Windows has no `resource` module and
    reports the peak working set through `GetProcessMemoryInfo`.
    """
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    windll = getattr(ctypes, "windll", None)
    if windll is None:
        return None
    counters = _ProcessMemoryCounters()
    counters.cb = ctypes.sizeof(counters)
    if not windll.psapi.GetProcessMemoryInfo(windll.kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
        return None
    return counters.PeakWorkingSetSize / 2**20


def memory_report(device: torch.device | str = "cpu") -> str:
    """One line for a notebook's last cell: peak memory of this process and, on a GPU, of the device, and the
    process's CPU time."""
    peak = peak_memory_mb()
    parts = [f"peak memory of this kernel {peak:,.0f} MB" if peak is not None else "peak memory not reported here"]
    if torch.device(device).type == "cuda":
        parts.append(f"GPU peak {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MB allocated by torch")
    parts.append(f"CPU time {time.process_time():,.0f} s")
    return "; ".join(parts)

