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


def test_setup_notebook_seeds_everything_and_prints_one_line(capsys, monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    s = setup_notebook(seed=3, profile="cpu")
    a = (random.random(), torch.rand(1).item())
    setup_notebook(seed=3, profile="cpu")
    assert (random.random(), torch.rand(1).item()) == a
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("device=cpu profile=cpu threads=")
    assert s.threads == torch.get_num_threads() <= profiles.usable_cpus()


def test_device_order_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert profiles.pick_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert profiles.pick_device().type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert profiles.pick_device().type == "cpu"
