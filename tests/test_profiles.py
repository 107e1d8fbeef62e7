import dataclasses
import random

import pytest
import torch

from course_lib import profiles
from course_lib.profiles import PROFILES, get_profile, setup_notebook


def test_course_profile_env_overrides_and_default_follows_cuda(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "gpu")
    assert get_profile().name == "gpu"
    monkeypatch.delenv("COURSE_PROFILE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile().name == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_profile().name == "gpu"
    assert get_profile("cpu").name == "cpu"


def test_unknown_profile_says_which_exist(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "tpu")
    with pytest.raises(ValueError, match=r"unknown profile 'tpu'.*\['cpu', 'gpu'\]"):
        get_profile()


def test_profiles_differ_in_sizes_and_steps_only():
    cpu, gpu = PROFILES["cpu"], PROFILES["gpu"]
    for f in dataclasses.fields(cpu):
        assert isinstance(getattr(cpu, f.name), (int, float, str, dict)), f.name
    assert cpu.baseline_config().attention == gpu.baseline_config().attention == "mha"
    assert gpu.baseline_config().hidden_size > cpu.baseline_config().hidden_size


def test_cpu_baseline_is_the_small_model_the_notebook_promises():
    from course_lib.model import CourseModel

    n = CourseModel(PROFILES["cpu"].baseline_config()).num_parameters()
    assert 0.5e6 < n < 0.8e6


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_mtp_config_is_deeper_and_narrower_at_about_the_baselines_size(name):
    from course_lib.model import CourseModel
    from course_lib.presets import mtp_config

    profile = PROFILES[name]
    base, mtp = profile.baseline_config(), mtp_config(profile)
    assert mtp.num_hidden_layers == 2 * base.num_hidden_layers and mtp.hidden_size < base.hidden_size
    assert mtp.hidden_size % mtp.num_attention_heads == 0 and mtp.intermediate_size % 32 == 0
    ratio = CourseModel(mtp).num_parameters() / CourseModel(base).num_parameters()
    assert 0.9 < ratio < 1.2, ratio


def test_setup_notebook_seeds_everything_and_says_which_device_and_why(capsys, monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    s = setup_notebook(seed=3, profile="cpu")
    a = (random.random(), torch.rand(1).item())
    setup_notebook(seed=3, profile="cpu")
    assert (random.random(), torch.rand(1).item()) == a
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("device=cpu profile=cpu threads=")
    assert lines[1].startswith("  (cpu: the cpu profile's small models run fastest there")
    assert s.threads == torch.get_num_threads() <= profiles.usable_cpus()


def test_device_choice_follows_the_profile_then_cuda_then_mps(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert profiles.pick_device("gpu")[0].type == "cuda"
    assert profiles.pick_device("cpu")[0].type == "cpu"  # the cpu profile stays on the CPU even beside a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert profiles.pick_device("gpu") == (torch.device("mps"), "Apple's MPS is available")
    monkeypatch.setenv("COURSE_DEVICE", "mps")  # the learner opts in
    assert profiles.pick_device("cpu") == (torch.device("mps"), "COURSE_DEVICE asks for it")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no mps"):
        profiles.pick_device("cpu")
    monkeypatch.delenv("COURSE_DEVICE")
    assert profiles.pick_device("gpu")[0].type == "cpu"


class _FakeUsage:
    def __init__(self, maxrss):
        self.ru_maxrss = maxrss


class _FakeResource:
    RUSAGE_SELF = 0

    def __init__(self, maxrss):
        self.maxrss = maxrss

    def getrusage(self, who):
        return _FakeUsage(self.maxrss)


@pytest.mark.parametrize("platform, maxrss, expected", [("linux", 512 * 1024, 512.0),  # KiB on Linux
                                                        ("darwin", 512 * 2**20, 512.0)])  # bytes on macOS
def test_peak_memory_reads_each_platforms_unit(monkeypatch, platform, maxrss, expected):
    monkeypatch.setattr(profiles, "resource", _FakeResource(maxrss))
    monkeypatch.setattr(profiles.sys, "platform", platform)
    assert profiles.peak_memory_mb() == expected


def test_peak_memory_on_windows_asks_the_os(monkeypatch):
    class Psapi:
        def GetProcessMemoryInfo(self, handle, counters_ref, size):
            counters_ref._obj.PeakWorkingSetSize = 300 * 2**20
            return 1

    class Kernel32:
        def GetCurrentProcess(self):
            return -1

    class Windll:
        psapi, kernel32 = Psapi(), Kernel32()

    monkeypatch.setattr(profiles, "resource", None)  # no resource module on Windows
    monkeypatch.setattr(profiles.ctypes, "windll", Windll(), raising=False)
    assert profiles.peak_memory_mb() == 300.0
    monkeypatch.delattr(profiles.ctypes, "windll")
    assert profiles.peak_memory_mb() is None
    assert profiles.memory_report().startswith("peak memory not reported here; CPU time")


def test_memory_report_on_this_machine():
    line = profiles.memory_report("cpu")
    assert line.startswith("peak memory of this kernel ") and " MB; CPU time " in line
    assert 10 < profiles.peak_memory_mb() < 100_000  # a Python process with torch loaded, in MB


def test_exactness_allowance_is_exact_on_cpu_and_counts_whole_sequences():
    from course_lib.profiles import exact_share_needed, same_share

    assert exact_share_needed("cpu") == 1.0 and exact_share_needed(torch.device("cuda", 0)) < 1.0
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
    b = a.clone()
    b[1, 2] = 0  # one token off in one sequence: that whole sequence differs
    assert same_share(a, a) == 1.0 and same_share(a, b) == 0.75 and same_share(a, b[:, :2]) == 0.0
