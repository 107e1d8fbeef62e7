"""DeepSeekMoE against transformers and hand-computed cases (DEEPSEEK_REFERENCE.md §2).

What is asserted:
- parity with transformers' `DeepseekV3MoE` on tiny random configs (random weights and random
  e_score_correction_bias, loaded through the packed-layout loader): same selected experts, same
  weights, same output to 1e-5, for every dispatch, with n_group > 1 and topk_group < n_group,
  norm_topk_prob on and off, routed_scaling_factor != 1; pack(unpack(sd)) gives sd back.
- the four dispatches give the same output and the same gradients; the vectorized and padded ones also
  with skewed routing (idle experts, mostly padding rows) and with no tokens at all.
- the bias changes which expert is picked but not the weight it gets (hand case); group-limited
  routing by top-2 sum (V3) and by max (V2) pick what the hand computation says.
- normalized weights sum to routed_scaling_factor; the softmax path is top-K of softmax.
- update_bias: the overloaded expert's bias drops by γ, the others rise; repeated updates lower MaxVio.
- switch_aux_loss, expert_balance_loss, sequence_balance_loss equal the formulas worked by hand;
  the V3 loss uses the un-biased top-K (eq 18 as printed) unless given topk_idx.
- capacity_drop drops exactly the over-capacity slots (lowest score, or latest position).
- expert_load, max_violation, load_entropy, dropped_fraction on hand cases.
- a CourseModel with ffn="moe" trains a few steps with an aux loss and bias updates, and its active
  parameter count is the total minus (E−K) experts per MoE layer; bad MoE configs raise ValueError.
"""

import math

import pytest
import torch
import transformers  # a test dependency: without it these tests fail at import, they never skip
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from course_lib.config import ModelConfig
from course_lib.layers import SwiGLU
from course_lib.model import CourseModel
from course_lib.moe import (DeepSeekMoE, DISPATCHES, expert_load, load_packed_experts, pack_experts,
                            packed_state_dict, unpack_experts)
from course_lib.balancing import (capacity_drop, dropped_fraction, expert_balance_loss, load_entropy,
                                  max_violation, sequence_balance_loss, switch_aux_loss, update_bias)


def moe_config(**kw) -> ModelConfig:
    base = dict(hidden_size=32, num_attention_heads=4, ffn="moe", n_routed_experts=16, n_shared_experts=2,
                num_experts_per_tok=4, moe_intermediate_size=16, n_group=4, topk_group=2)
    return ModelConfig(**{**base, **kw})


def hand_router(E: int, K: int, **kw) -> DeepSeekMoE:
    """hidden = E and gate.weight = I, so the router logits are the input itself."""
    moe = DeepSeekMoE(moe_config(hidden_size=E, num_attention_heads=1, n_routed_experts=E, num_experts_per_tok=K,
                                 n_shared_experts=0, **{"n_group": 1, "topk_group": 1, "norm_topk_prob": False, **kw}))
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(E))
    return moe


def logit(p) -> torch.Tensor:
    p = torch.tensor(p)
    return torch.log(p / (1 - p))


# ---------------------------------------------------------------- parity with transformers

PARITY_CASES = [  # n_group, topk_group, norm_topk_prob, routed_scaling_factor
    (1, 1, True, 1.0),
    (4, 2, True, 2.5),
    (4, 2, False, 2.5),
    (8, 3, False, 0.5),
    (4, 1, True, 2.5),  # one group of 4 holds exactly K=4 experts
]


def build_pair(n_group, topk_group, norm, scale, seed=0):

    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scale,
        num_hidden_layers=1, num_attention_heads=4, vocab_size=16, experts_implementation="eager")
    torch.manual_seed(seed)
    theirs = DeepseekV3MoE(hf_cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # the packed expert tensors start as torch.empty
            p.normal_(0.0, 0.15)
        theirs.gate.weight.normal_(0.0, 0.3)  # spread the scores so selections are clear-cut
        theirs.gate.e_score_correction_bias.copy_(0.1 * torch.randn(16))
    ours = DeepSeekMoE(moe_config(n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                                  routed_scaling_factor=scale)).eval()
    load_packed_experts(ours, theirs.state_dict())
    return theirs, ours


def sort_by_expert(idx, w):
    idx, order = idx.sort(-1)
    return idx, w.gather(-1, order)


@pytest.mark.parametrize("n_group, topk_group, norm, scale", PARITY_CASES)
@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_parity_with_transformers_deepseek_v3_moe(n_group, topk_group, norm, scale, dispatch):
    theirs, ours = build_pair(n_group, topk_group, norm, scale)
    ours.dispatch = dispatch
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        _, hf_w, hf_idx = theirs.gate(x)
        idx, w = ours.route(x)
        out_theirs, out_ours = theirs(x), ours(x)
    hf_idx, hf_w = sort_by_expert(hf_idx, hf_w)
    idx, w = sort_by_expert(idx, w)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(w, hf_w, atol=1e-6, rtol=0)
    diff = (out_ours - out_theirs).abs().max().item()
    print(f"parity n_group={n_group} topk_group={topk_group} norm={norm} scale={scale} {dispatch}: "
          f"max|diff|={diff:.2e}, max|out|={out_ours.abs().max():.2f}")
    assert diff < 1e-5
    assert out_ours.abs().max() > 1e-2  # not a vacuous comparison of near-zero outputs


def test_parity_case_exercises_the_bias():
    """The random bias must actually change some selections, or the parity test would not test it."""
    _, ours = build_pair(4, 2, True, 2.5)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        with_bias, _ = ours.route(x)
        ours.gate.e_score_correction_bias.zero_()
        without, _ = ours.route(x)
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values)


def test_pack_unpack_round_trip():
    theirs, ours = build_pair(4, 2, True, 2.5)
    sd = theirs.state_dict()
    unpacked = unpack_experts(sd)
    assert "experts.3.gate_proj.weight" in unpacked and "experts.gate_up_proj" not in unpacked
    # gate_proj is the FIRST half of gate_up_proj (DeepseekV3Experts: gate, up = ....chunk(2, dim=-1))
    torch.testing.assert_close(unpacked["experts.3.gate_proj.weight"], sd["experts.gate_up_proj"][3, :16])
    torch.testing.assert_close(unpacked["experts.3.up_proj.weight"], sd["experts.gate_up_proj"][3, 16:])
    repacked = pack_experts(unpacked, 16)
    assert repacked.keys() == sd.keys()
    for k in sd:
        assert torch.equal(repacked[k], sd[k]), k
    ours_packed = packed_state_dict(ours)
    assert all(torch.equal(ours_packed[k], sd[k]) for k in sd)
    prefixed = {f"model.layers.3.mlp.{k}": v for k, v in sd.items()}
    other = DeepSeekMoE(ours.config)
    load_packed_experts(other, prefixed, prefix="model.layers.3.mlp.")
    assert torch.equal(other.experts[5].down_proj.weight, ours.experts[5].down_proj.weight)


# ---------------------------------------------------------------- dispatch


def test_all_dispatches_agree_in_output_and_gradient():
    torch.manual_seed(1)
    moe = DeepSeekMoE(moe_config(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
                                 routed_scaling_factor=2.5))
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.5)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x0 = torch.randn(3, 5, 32)
    results = {}
    for name in DISPATCHES:
        moe.dispatch = name
        moe.zero_grad()
        x = x0.clone().requires_grad_()
        out = moe(x)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        grads = [x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in moe.parameters()]
        results[name] = (out.detach(), grads)
    ref_out, ref_grads = results["vectorized"]
    for name in set(DISPATCHES) - {"vectorized"}:
        out, grads = results[name]
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=0)
    moe.dispatch = "bogus"
    with pytest.raises(ValueError, match="dispatch"):
        moe(x0)


@pytest.mark.parametrize("name", ["vectorized", "padded"])
def test_sorted_dispatches_with_skewed_routing_and_idle_experts(name):
    """Skewed routing: expert 0 takes every token, experts 4-7 none (empty segments; for the padded
    dispatch most buffer rows are padding)."""
    from course_lib.moe import DISPATCH_FNS, dispatch_expert_loop

    dispatch = DISPATCH_FNS[name]

    torch.manual_seed(2)
    experts = nn.ModuleList(SwiGLU(16, 8) for _ in range(8))
    N = 11
    topk_idx = torch.stack([torch.zeros(N, dtype=torch.long), torch.randint(1, 4, (N,))], dim=1)  # (N, 2)
    topk_weight = torch.rand(N, 2, requires_grad=True)
    results = []
    for fn in (dispatch_expert_loop, dispatch):
        experts.zero_grad()
        topk_weight.grad = None
        x = torch.randn(N, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        out = fn(experts, x, topk_idx, topk_weight)
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        grads = [x.grad, topk_weight.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                                              for p in experts.parameters()]
        results.append((out.detach(), grads))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-6, rtol=0)
    assert all(p.grad is None or not p.grad.any() for e in experts[4:] for p in e.parameters())
    empty = dispatch(experts, torch.randn(0, 16), topk_idx[:0], topk_weight[:0])
    assert empty.shape == (0, 16)


def test_vectorized_adds_segments_back_bitwise_like_one_scatter_of_all_outputs():
    """dispatch_vectorized adds each expert's segment into y on its own; the same sums in the same order as
    concatenating every output and scattering once, so outputs and all gradients are bitwise equal (the
    trained models of the MoE notebooks depend on that)."""
    from course_lib.moe import dispatch_vectorized

    def one_scatter(experts, x, topk_idx, topk_weight):
        N, K = topk_idx.shape
        order = topk_idx.flatten().argsort(stable=True)
        token = order // K
        counts = torch.bincount(topk_idx.flatten(), minlength=len(experts)).tolist()
        outs = [e(seg) for e, seg in zip(experts, x.index_select(0, token).split(counts)) if seg.shape[0]]
        out = torch.cat(outs) * topk_weight.flatten()[order, None]
        return x.new_zeros(N, x.shape[-1]).index_add_(0, token, out)

    torch.manual_seed(3)
    experts = nn.ModuleList(SwiGLU(32, 24) for _ in range(16))
    N, K = 300, 3
    topk_idx = torch.rand(N, 16).topk(K, dim=-1).indices  # (N, K), distinct experts per token
    topk_idx[:40] = torch.tensor([0, 1, 2])  # a busy expert and idle ones are both likely
    weight0 = torch.rand(N, K)
    x0 = torch.randn(N, 32)
    results = []
    for fn in (one_scatter, dispatch_vectorized):
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), weight0.clone().requires_grad_()
        out = fn(experts, x, topk_idx, w)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        results.append([out.detach(), x.grad, w.grad] + [p.grad for p in experts.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_forward_records_load_and_scores():
    moe = DeepSeekMoE(moe_config())
    moe(torch.randn(2, 5, 32))
    assert moe.last_scores.shape == (2, 5, 16) and moe.last_topk_idx.shape == (2, 5, 4)
    assert moe.last_load.shape == (16,) and moe.last_load.sum() == 2 * 5 * 4
    assert torch.equal(moe.last_load, expert_load(moe.last_topk_idx, 16))


# ---------------------------------------------------------------- router


def test_bias_changes_selection_but_not_weight():
    moe = hand_router(4, 1)
    x = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])  # scores sigmoid(2) > sigmoid(1) > ...
    idx, w = moe.route(x)
    assert idx.tolist() == [[0]] and w.item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    moe.gate.e_score_correction_bias[1] = 0.5  # sigmoid(1) + 0.5 = 1.23 > sigmoid(2) = 0.88
    idx, w = moe.route(x)
    assert idx.tolist() == [[1]]
    assert w.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())  # 0.731, not 1.231


def test_group_limited_routing_hand_case():
    # groups of 2: g0 (0.9, 0.1), g1 (0.62, 0.6), g2 (0.55, 0.5), g3 (0.2, 0.1)
    s = [0.9, 0.1, 0.62, 0.6, 0.55, 0.5, 0.2, 0.1]
    x = logit(s)[None, None]
    unrestricted = hand_router(8, 2)
    assert sorted(unrestricted.route(x)[0][0].tolist()) == [0, 2]
    v3 = hand_router(8, 2, n_group=4, topk_group=2)
    assert v3.gate.group_score == "top2_sum"
    # top-2 sums: g0 1.0, g1 1.22, g2 1.05, g3 0.3 -> groups {1, 2} -> experts {2, 3}: the best expert 0 is excluded
    assert sorted(v3.route(x)[0][0].tolist()) == [2, 3]
    v3.gate.group_score = "max"  # maxima: g0 0.9, g1 0.62 -> groups {0, 1} -> experts {0, 2}
    assert sorted(v3.route(x)[0][0].tolist()) == [0, 2]
    v2 = hand_router(8, 2, n_group=4, topk_group=2, scoring_func="softmax")
    assert v2.gate.group_score == "max"
    v3.gate.group_score = "bogus"
    with pytest.raises(ValueError, match="group_score"):
        v3.route(x)


def test_normalized_weights_sum_to_routed_scaling_factor():
    torch.manual_seed(0)
    moe = DeepSeekMoE(moe_config(routed_scaling_factor=2.5, norm_topk_prob=True))
    _, w = moe.route(torch.randn(3, 6, 32))
    torch.testing.assert_close(w.sum(-1), torch.full((18,), 2.5), atol=1e-6, rtol=0)
    moe = DeepSeekMoE(moe_config(routed_scaling_factor=2.5, norm_topk_prob=False))
    x = torch.randn(3, 6, 32)
    idx, w = moe.route(x)
    torch.testing.assert_close(w, 2.5 * moe.last_scores.reshape(18, 16).gather(1, idx))


def test_softmax_path_is_topk_of_softmax():
    torch.manual_seed(0)
    moe = DeepSeekMoE(moe_config(scoring_func="softmax", norm_topk_prob=False, n_group=1, topk_group=1))
    x = torch.randn(2, 9, 32)
    idx, w = moe.route(x)
    probs = (x.reshape(18, 32) @ moe.gate.weight.T).softmax(-1)
    top = probs.topk(4, dim=-1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(w, top.values)
    torch.testing.assert_close(moe.last_scores.sum(-1), torch.ones(2, 9))


# ---------------------------------------------------------------- balancing

# Four tokens, E=4, K=2. Top-2: t0 {0,1}, t1 {1,2}, t2 {0,2}, t3 {3,0}; argmax: 0, 1, 0, 3.
PROBS = torch.tensor([[0.40, 0.30, 0.20, 0.10],
                      [0.10, 0.50, 0.30, 0.10],
                      [0.60, 0.10, 0.20, 0.10],
                      [0.25, 0.15, 0.10, 0.50]])
# P = column means = (0.3375, 0.2625, 0.2, 0.2); top-2 counts (3, 2, 2, 1)
P = [0.3375, 0.2625, 0.2, 0.2]


def test_switch_aux_loss_hand_value():
    f = [2 / 4, 1 / 4, 0, 1 / 4]  # top-1 fractions
    expected = 0.01 * 4 * sum(fi * pi for fi, pi in zip(f, P))  # α·E·Σ f P = 0.01 · 1.1375
    assert switch_aux_loss(PROBS).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.011375)


def test_v2_expert_balance_loss_hand_value():
    idx = PROBS.topk(2, -1).indices
    f = [4 / (2 * 4) * c for c in (3, 2, 2, 1)]  # N_r/(K_r T)·count = (1.5, 1, 1, 0.5)
    expected = 0.003 * sum(fi * pi for fi, pi in zip(f, P))  # 0.003 · 1.06875
    assert expert_balance_loss(PROBS, idx).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.00320625)
    # perfectly uniform probabilities give exactly α whatever the routing
    uniform = torch.full((4, 4), 0.25)
    assert expert_balance_loss(uniform, idx).item() == pytest.approx(0.003)


def test_v3_sequence_balance_loss_hand_value():
    s = 0.8 * PROBS  # un-normalized sigmoid-like scores; eq 19 normalizes them back to PROBS
    assert sequence_balance_loss(s, k=2).item() == pytest.approx(1e-4 * 1.06875, rel=1e-6)
    # per sequence, then the mean over sequences: the second sequence is uniform (Σ f P = 1)
    batch = torch.stack([s, torch.full((4, 4), 0.3)])
    assert sequence_balance_loss(batch, k=2).item() == pytest.approx(1e-4 * (1.06875 + 1) / 2, rel=1e-6)
    # with the routed (e.g. bias-selected) experts instead of eq 18's un-biased top-K:
    routed = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])  # counts (4, 4, 0, 0) -> f = (2, 2, 0, 0)
    expected = 1e-4 * (2 * 0.3375 + 2 * 0.2625)
    assert sequence_balance_loss(s, k=2, topk_idx=routed).item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_reaches_the_router_weights():
    moe = DeepSeekMoE(moe_config())
    moe(torch.randn(2, 5, 32))
    sequence_balance_loss(moe.last_scores, k=4).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_update_bias_hand_case():
    moe = DeepSeekMoE(moe_config(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1))
    update_bias(moe, torch.tensor([6, 2, 2, 2]), gamma=0.01)  # mean 3: expert 0 overloaded
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    update_bias(moe, torch.tensor([3, 3, 3, 3]), gamma=0.01)  # balanced: no change
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert not moe.gate.e_score_correction_bias.requires_grad


def test_repeated_bias_updates_move_toward_balance():
    torch.manual_seed(0)
    moe = hand_router(4, 1)
    x = torch.randn(1, 128, 4) + torch.tensor([1.5, 0.0, 0.0, 0.0])  # expert 0 favoured
    moe.route(x)
    before = max_violation(moe.last_load)
    for _ in range(60):
        moe.route(x)
        update_bias(moe, gamma=0.02)  # uses moe.last_load
    moe.route(x)
    after = max_violation(moe.last_load)
    assert before > 1.0 and after < 0.25 * before
    assert moe.gate.e_score_correction_bias[0] < 0


def test_capacity_drop_hand_case():
    idx = torch.tensor([[0], [0], [0], [1]])  # expert 0 gets 3 slots; C = ceil(1.0 · 4 / 2) = 2
    w = torch.tensor([[0.9], [0.5], [0.7], [0.6]])
    by_score = capacity_drop(idx, w, num_experts=2)
    assert by_score.flatten().tolist() == [False, True, False, False]  # lowest-weight slot of expert 0
    by_position = capacity_drop(idx, w, num_experts=2, by="position")
    assert by_position.flatten().tolist() == [False, False, True, False]  # latest token of expert 0
    assert dropped_fraction(by_score) == 0.25
    assert not capacity_drop(idx, w, num_experts=2, capacity_factor=1.5).any()  # C = 3
    # K = 2: four tokens, eight slots, E = 4 -> C = 2; expert 0 takes five slots, three are dropped
    idx2 = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])
    w2 = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    d = capacity_drop(idx2, w2, num_experts=4)
    assert d.tolist() == [[True, False], [False, False], [True, False], [False, False]]
    with pytest.raises(ValueError):
        capacity_drop(idx, w, 2, by="random")


def test_expert_load_counts_only_masked_positions():
    topk_idx = torch.tensor([[[0, 1], [2, 3], [0, 2]], [[1, 3], [0, 1], [3, 2]]])  # (B=2, T=3, K=2)
    assert expert_load(topk_idx, 5).tolist() == [3, 3, 3, 3, 0]
    mask = torch.tensor([[True, False, True], [False, False, True]])  # (B, T): real tokens
    assert expert_load(topk_idx, 5, mask).tolist() == [2, 1, 2, 1, 0]
    assert expert_load(topk_idx, 5, torch.zeros(2, 3, dtype=torch.bool)).tolist() == [0] * 5


def test_load_statistics_hand_cases():
    assert expert_load(torch.tensor([[0, 1], [0, 2]]), 4).tolist() == [2, 1, 1, 0]
    assert max_violation(torch.tensor([6, 2, 2, 2])) == pytest.approx(1.0)  # 6 / 3 − 1
    assert max_violation(torch.tensor([3, 3, 3, 3])) == 0.0
    # p = (1/2, 1/6, 1/6, 1/6): H = ½ ln 2 + ½ ln 6 = ½ ln 12
    assert load_entropy(torch.tensor([6, 2, 2, 2])) == pytest.approx(0.5 * math.log(12))
    assert load_entropy(torch.tensor([6, 2, 2, 2]), normalized=True) == pytest.approx(0.5 * math.log(12) / math.log(4))
    assert load_entropy(torch.tensor([3, 3, 3, 3]), normalized=True) == pytest.approx(1.0)
    assert load_entropy(torch.tensor([8, 0, 0, 0])) == 0.0  # 0·log 0 = 0


# ---------------------------------------------------------------- in the model


def test_course_model_with_moe_trains_and_counts_active_parameters():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn="moe",
                      n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
                      n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=64)
    model = CourseModel(cfg)
    assert isinstance(model.layers[0].mlp, SwiGLU) and isinstance(model.layers[1].mlp, DeepSeekMoE)
    per_expert = 3 * 32 * 16
    assert model.num_parameters(active=True) == model.num_parameters() - (8 - 2) * per_expert
    assert model.num_parameters(active=True) < model.num_parameters()

    ids = torch.randint(0, 32, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, DeepSeekMoE)]
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
        aux = sum(sequence_balance_loss(m.last_scores, k=2) for m in moes)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        for m in moes:
            update_bias(m, gamma=1e-3)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert moes[0].gate.e_score_correction_bias.abs().sum() > 0


@pytest.mark.parametrize("bad", [dict(n_group=3), dict(topk_group=5), dict(num_experts_per_tok=17),
                                 dict(scoring_func="relu"), dict(n_group=8, topk_group=1),
                                 dict(moe_intermediate_size=0)])
def test_bad_moe_config_raises(bad):
    with pytest.raises(ValueError):
        moe_config(**bad)
    fields = dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    # ffn="dense" does not check the MoE fields; DeepSeekMoE must
    dense = ModelConfig(hidden_size=32, num_attention_heads=4, **{**fields, **bad})
    with pytest.raises(ValueError):
        DeepSeekMoE(dense)


# ---------------------------------------------------------------- training with balancing (notebook 05's helpers)

from course_lib.balancing import (BALANCING, CapacityLimit, LoadTracker, apply_capacity, aux_loss,
                                  balancing_loss_fn, layer_loads, mean_max_violation, moe_layers,
                                  router_probs)
from course_lib.moe import TopkRouter, dispatch_expert_loop
from course_lib.train import TrainConfig, train_lm
from course_lib.model import lm_loss  # noqa: E402


def tiny_moe_model(**kw) -> CourseModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn="moe",
                      n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
                      n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=64, **kw)
    return CourseModel(cfg)


def test_moe_layers_in_forward_order():
    model = tiny_moe_model()
    assert moe_layers(model) == [model.layers[1].mlp, model.layers[2].mlp]
    assert moe_layers(CourseModel(ModelConfig(vocab_size=32, hidden_size=32, num_attention_heads=4))) == []
    with pytest.raises(ValueError):
        LoadTracker(CourseModel(ModelConfig(vocab_size=32, hidden_size=32, num_attention_heads=4)))


def test_router_probs_are_distributions():
    sig = DeepSeekMoE(moe_config())
    sig(torch.randn(2, 5, 32))
    torch.testing.assert_close(router_probs(sig).sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(router_probs(sig), sig.last_scores / sig.last_scores.sum(-1, keepdim=True))
    soft = DeepSeekMoE(moe_config(scoring_func="softmax"))
    soft(torch.randn(2, 5, 32))
    assert router_probs(soft) is soft.last_scores


def test_aux_losses_are_the_library_formulas_on_the_last_forward():
    moe = DeepSeekMoE(moe_config())
    moe(torch.randn(3, 7, 32))
    probs = moe.last_scores / moe.last_scores.sum(-1, keepdim=True)
    torch.testing.assert_close(aux_loss(moe, "switch", 0.01), switch_aux_loss(probs, 0.01))
    torch.testing.assert_close(aux_loss(moe, "expert", 0.01), expert_balance_loss(probs, moe.last_topk_idx, 0.01))
    torch.testing.assert_close(aux_loss(moe, "sequence", 0.01),
                               sequence_balance_loss(moe.last_scores, 4, 0.01, topk_idx=moe.last_topk_idx))
    # On a sigmoid router, V2's expert-level loss on normalized scores is V3's sequence-wise loss.
    torch.testing.assert_close(aux_loss(moe, "expert", 0.01), aux_loss(moe, "sequence", 0.01))
    with pytest.raises(ValueError):
        aux_loss(moe, "aux_free", 0.01)


def test_balancing_loss_fn_adds_the_aux_loss_of_every_moe_layer():
    model = tiny_moe_model()
    ids = torch.randint(0, 32, (4, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    for method in ("none", "aux_free", "capacity"):
        torch.testing.assert_close(balancing_loss_fn(method)(model, ids, mask), lm_loss(model, ids, mask))
    fn = balancing_loss_fn("switch", alpha=0.5)
    total = fn(model, ids, mask)
    expected = lm_loss(model, ids, mask) + sum(aux_loss(m, "switch", 0.5) for m in moe_layers(model))
    torch.testing.assert_close(total, expected)
    assert fn.lm_losses == [pytest.approx(lm_loss(model, ids, mask).item())]  # the LM part alone
    assert set(BALANCING) >= {"none", "switch", "expert", "sequence", "aux_free", "capacity"}
    with pytest.raises(ValueError):
        balancing_loss_fn("bogus")


def test_capacity_limit_zeroes_dropped_weights_in_training_only():
    moe = DeepSeekMoE(moe_config(n_group=1, topk_group=1))
    moe.dispatch = "expert_loop"
    x = torch.randn(2, 16, 32) + 2 * torch.randn(32)  # a shared offset skews the routing
    moe.eval()
    reference = moe(x)
    limit = CapacityLimit(moe.gate, capacity_factor=0.5)
    torch.testing.assert_close(moe(x), reference)  # eval: nothing dropped
    moe.train()
    y = moe(x)
    dropped = limit.last_dropped
    assert dropped.any() and dropped_fraction(dropped) >= 0.5  # C = ceil(0.5 · 128 / 16) = 4 slots per expert
    flat = x.reshape(-1, 32)
    topk_idx, topk_weight, _ = TopkRouter.forward(moe.gate, flat)  # the router without its hook
    routed = dispatch_expert_loop(moe.experts, flat, topk_idx, topk_weight.masked_fill(dropped, 0.0))
    torch.testing.assert_close(y, (routed + moe.shared_experts(flat)).reshape(x.shape))
    assert torch.equal(moe.last_load, expert_load(topk_idx, 16))  # the load is what the router asked for
    limit.remove()
    torch.testing.assert_close(moe(x), reference)


def test_load_tracker_records_loads_and_applies_the_bias_update():
    model = tiny_moe_model()
    seen = []
    tracker = LoadTracker(model, gamma=0.01, on_load=lambda step, loads: seen.append(step))
    ids = torch.randint(0, 32, (4, 12))
    model(ids)
    loads = layer_loads(model)  # (L, E)
    assert loads.shape == (2, 8) and loads.sum(-1).tolist() == [4 * 12 * 2] * 2
    tracker(0, 1.5)
    assert torch.equal(tracker.loads[0], loads) and tracker.losses == [1.5] and seen == [0]
    assert tracker.max_vio[0] == pytest.approx(mean_max_violation(loads))
    for m, load in zip(moe_layers(model), loads):
        expected = 0.01 * torch.sign(load.float().mean() - load.float())
        torch.testing.assert_close(m.gate.e_score_correction_bias, expected)
    assert tracker.final(last=1)["max_vio"] == tracker.max_vio[0]


def test_mean_max_violation_hand_case():
    loads = torch.tensor([[6, 2, 2, 2], [3, 3, 3, 3]])  # MaxVio 1.0 and 0.0
    assert mean_max_violation(loads) == pytest.approx(0.5)
    assert mean_max_violation(torch.tensor([6, 2, 2, 2])) == pytest.approx(1.0)


def test_train_lm_with_tracker_balances_and_capacity_reports_drops():
    ids = torch.randint(3, 32, (64, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=1)
    model = tiny_moe_model()
    tracker = LoadTracker(model, gamma=1e-3, capacity=apply_capacity(model, 1.0))
    train_lm(model, ids, mask, cfg, progress=False, loss_fn=balancing_loss_fn("sequence", 1e-4), callback=tracker)
    assert tracker.steps == list(range(6)) and len(tracker.dropped) == 6 and len(tracker.losses) == 6
    assert all(0.0 <= d < 1.0 for d in tracker.dropped)
    assert all(m.gate.e_score_correction_bias.abs().sum() > 0 for m in moe_layers(model))


def test_a_batch_without_tokens_routes_to_nothing():
    """A rank of expert parallelism (or a filtered batch) can hold no tokens: the layer returns an empty
    output of the right shape, counts no load, and backward runs."""
    import torch

    from course_lib.moe import DeepSeekMoE
    from course_lib.presets import nano_deepseek_config
    from course_lib.profiles import get_profile

    cfg = nano_deepseek_config(get_profile("cpu"))
    layer = DeepSeekMoE(cfg)
    for shape in ((0, 5), (2, 0)):
        x = torch.zeros(*shape, cfg.hidden_size, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and layer.last_load.sum().item() == 0
        assert layer.last_topk_idx.shape == (*shape, cfg.num_experts_per_tok)
