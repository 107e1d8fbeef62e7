"""Balancing counts real tokens only: padding appended to a batch changes no routing statistic, no auxiliary
loss, no bias update and no capacity decision (DeepSeek trains on packed sequences, so its loads are real)."""

import pytest
import torch

from course_lib.balancing import (LoadTracker, apply_capacity, aux_loss, capacity_drop, dropped_fraction,
                                  mean_max_violation, moe_layers, update_bias)
from course_lib.config import ModelConfig
from course_lib.model import CourseModel

PAD = 0


def padded_model(**kw) -> CourseModel:
    cfg = ModelConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      ffn="moe", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2,
                      topk_group=1, first_k_dense_replace=0, pad_token_id=PAD, **kw)
    torch.manual_seed(0)
    return CourseModel(cfg)


def batches():
    ids = torch.randint(1, 32, (3, 9), generator=torch.Generator().manual_seed(1))  # (B, T): no padding
    ids[1, 6:] = PAD  # one row already right-padded, as encode_examples pads
    longer = torch.cat([ids, torch.full((3, 5), PAD)], dim=1)  # (B, T + 5): more padding at the end
    more_rows = torch.cat([longer, torch.full((2, 14), PAD)])  # (B + 2, T + 5): and two rows of padding only
    return ids, longer, more_rows


def stats(model: CourseModel, ids: torch.Tensor, gamma: float = 0.1) -> dict:
    model.train()
    model(ids)
    layers = moe_layers(model)
    out = {"load": [m.last_load.tolist() for m in layers],
           "max_vio": mean_max_violation(torch.stack([m.last_load for m in layers]))}
    for method in ("switch", "expert", "sequence"):
        out[method] = [aux_loss(m, method, 1.0).item() for m in layers]
    out["bias"] = [update_bias(m, gamma=gamma).clone().tolist() for m in layers]
    return out


def test_padding_changes_no_statistic_loss_or_bias_update():
    ids, longer, more_rows = batches()
    reference = stats(padded_model(), ids)
    for bigger in (longer, more_rows):
        got = stats(padded_model(), bigger)
        assert got["load"] == reference["load"] and got["bias"] == reference["bias"]
        assert got["max_vio"] == pytest.approx(reference["max_vio"])
        for method in ("switch", "expert", "sequence"):
            assert got[method] == pytest.approx(reference[method], rel=1e-5), method
    # without the mask the padding would count: the loads of the longer batch then hold its pad slots too
    unmasked = padded_model()
    unmasked.config = unmasked.config.replace(pad_token_id=None)
    unmasked(longer)
    assert sum(moe_layers(unmasked)[0].last_load.tolist()) == longer.numel() * 2
    assert sum(reference["load"][0]) == int((ids != PAD).sum()) * 2


def test_load_tracker_counts_real_tokens_only():
    ids, longer, _ = batches()
    trackers = []
    for batch in (ids, longer):
        model = padded_model()
        tracker = LoadTracker(model, gamma=0.01)
        model(batch)
        tracker(0, 1.0)
        trackers.append(tracker)
    assert torch.equal(trackers[0].loads[0], trackers[1].loads[0])
    assert trackers[0].max_vio == trackers[1].max_vio and trackers[0].entropy == trackers[1].entropy


def test_capacity_never_spends_a_slot_on_padding():
    # 4 tokens, the last two padding, all wanting expert 0 then expert 1; capacity factor 1: C = ceil(2·2/4) = 1
    topk_idx = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    weight = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.9, 0.1], [0.8, 0.2]])  # the pads hold the best scores
    mask = torch.tensor([True, True, False, False])
    dropped = capacity_drop(topk_idx, weight, 4, 1.0, "score", mask)
    assert dropped.tolist() == [[True, False], [False, True], [True, True], [True, True]]  # pads: no slot
    assert dropped_fraction(dropped, mask) == 0.5
    unmasked = capacity_drop(topk_idx, weight, 4, 1.0, "score")  # C = 2: the pads take expert 0's two slots
    assert unmasked[2:, 0].tolist() == [False, False] and unmasked[:2, 0].tolist() == [True, True]


def test_capacity_limit_in_a_model_ignores_padding():
    ids, longer, _ = batches()
    drops = []
    for batch in (ids, longer):
        model = padded_model()
        limits = apply_capacity(model, capacity_factor=1.0)
        model.train()
        model(batch)
        real = (batch != PAD).reshape(-1)
        drops.append([c.last_dropped[real].tolist() for c in limits])
        assert all(c.last_dropped[~real].all() for c in limits)  # padding holds no slot
    assert drops[0] == drops[1]  # the real tokens' fate does not depend on how much padding follows
