"""The seed-spread sweep: its summary by hand, each study's plumbing on a tiny profile, the JSON it writes."""

import json
from dataclasses import replace

import pytest

from course_lib import spread
from course_lib.profiles import get_profile

TINY = replace(get_profile("cpu"), hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               n_train=16, n_eval=6, pretrain_steps=3, batch_size=4)


def test_summarize_hand_case():
    rows = [{"seed": 0, "model": "A", "acc": 0.5}, {"seed": 1, "model": "A", "acc": 0.7},
            {"seed": 2, "model": "A", "acc": 0.3}, {"seed": 0, "model": "B", "acc": 0.9}]
    got = spread.summarize(rows, "acc")
    assert got["A"] == {"mean": pytest.approx(0.5), "min": 0.3, "max": 0.7, "n": 3, "seeds": [0, 1, 2]}
    assert got["B"]["mean"] == 0.9 and got["B"]["n"] == 1


def test_spread_table_prints_mean_and_range_per_model():
    rows = [{"seed": s, "model": m, "accuracy": a, "held_out_loss": l}
            for s, m, a, l in ((0, "MHA", 0.5, 0.2), (1, "MHA", 0.3, 0.4), (0, "MQA", 0.4, 0.3), (1, "MQA", 0.6, 0.1))]
    table = spread.spread_table(rows, models=["MQA", "MHA"]).splitlines()
    assert table[0].startswith("over seeds [0, 1]") and len(table) == 3
    assert table[1].split()[0] == "MQA" and "50.0% (40.0% to 60.0%)" in table[1] and "0.200 (0.100 to 0.300)" in table[1]
    assert table[2].split()[0] == "MHA" and "40.0% (30.0% to 50.0%)" in table[2]


@pytest.mark.slow
def test_each_study_runs_on_a_tiny_profile():
    attention = spread.attention_rows(TINY, 1)
    assert [r["model"] for r in attention] == ["MHA", "GQA", "MQA", "MLA"] and {r["seed"] for r in attention} == {1}
    assert all(0 <= r["accuracy"] <= 1 and r["held_out_loss"] > 0 for r in attention)
    mtp = spread.mtp_rows(TINY, 0)
    assert [r["model"] for r in mtp] == ["without MTP", "MTP (lambda 0.3)"]
    rl = spread.rl_rows(TINY, 0, grpo_steps=1)
    assert [r["model"] for r in rl] == ["baseline", "nano_deepseek"]
    assert rl[0]["max_vio_before"] is None and rl[1]["max_vio_before"] > 0 and rl[1]["max_vio_after"] > 0


def test_main_writes_every_study_for_every_seed(tmp_path, monkeypatch):
    calls = []

    def fake(profile, seed):
        calls.append(seed)
        return [{"seed": seed, "model": "m", "accuracy": 0.1 * seed}]

    monkeypatch.setattr(spread, "STUDIES", {"attention": fake, "mtp": fake})
    out = tmp_path / "spread.json"
    spread.main(["--seeds", "2", "--profile", "cpu", "--out", str(out), "--studies", "attention", "mtp"])
    data = json.loads(out.read_text())
    assert data["seeds"] == [0, 1] and data["profile"] == "cpu" and calls == [0, 1, 0, 1]
    assert [r["seed"] for r in data["attention"]] == [0, 1] and len(data["mtp"]) == 2
    assert spread.load_spread("cpu", root=tmp_path) is None  # only assets/seed_spread_<profile>.json is read
