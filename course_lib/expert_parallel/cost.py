"""The all-to-all on paper: a latency + bandwidth cost model, fitted on your machine and applied to DeepSeek-V3.

Time of one all-to-all that sends b bytes from each rank: t(b) = α + b / β (α the fixed latency, β the
link bandwidth a rank sees). `fit_latency_bandwidth` fits α and β by least squares to measured times;
`deepseek_v3_ep` applies the model to DeepSeek-V3's published training set-up ([V3] arXiv:2412.19437):
256 routed experts, top-8, hidden 7168, expert width 2048, 1 shared expert, 58 MoE layers of 61 (§4.2);
EP64 over 8 nodes of 8 H800s (§3.1, §3.2); each token sent to at most M = 4 nodes (§2.1.2, §3.2.2);
IB 50 GB/s between nodes, NVLink 160 GB/s inside one (§3.2.2); dispatch in FP8 with one scale per 128
values, combine in BF16 (§3.3.2, §3.3.4). Tokens cross IB once per destination node and fan out over
NVLink there (§3.2.2), so IB bytes per token = nodes reached · hidden · (dispatch + combine bytes per value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..moe import TopkRouter
from .sharding import expected_remote_ranks, groups_reached


def fit_latency_bandwidth(sizes: list[float], seconds: list[float]) -> tuple[float, float]:
    """(α seconds, β bytes/s) of t = α + b/β fitted to measured (bytes, seconds) pairs by least squares on the
    relative error (weights 1/t²), so small messages, where latency dominates, count as much as large ones."""
    w = [1 / t**2 for t in seconds]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, sizes)) / sw
    my = sum(wi * y for wi, y in zip(w, seconds)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, sizes))
    slope = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, sizes, seconds)) / sxx
    return max(my - slope * mx, 0.0), 1 / slope if slope > 0 else float("inf")


def alltoall_seconds(bytes_sent: float, latency_s: float, bandwidth: float) -> float:
    """The model's time for one all-to-all that sends `bytes_sent` bytes from a rank."""
    return latency_s + bytes_sent / bandwidth


@dataclass(frozen=True)
class ClusterEP:
    """DeepSeek-V3's MoE and its expert-parallel layout in training (figures and sections in the module doc)."""

    hidden: int = 7168
    n_routed_experts: int = 256
    top_k: int = 8
    moe_intermediate: int = 2048
    n_shared_experts: int = 1
    moe_layers: int = 58  # 61 layers, the first 3 dense
    nodes: int = 8
    gpus_per_node: int = 8  # EP64
    node_limit: int = 4  # M
    ib_bytes_s: float = 50e9
    nvlink_bytes_s: float = 160e9
    dispatch_bytes_per_value: float = 1 + 4 / 128  # FP8 plus a float32 scale per 128 values
    combine_bytes_per_value: float = 2  # BF16


def simulate_nodes_reached(ep: ClusterEP, node_limited: bool, tokens: int = 4096, seed: int = 0) -> float:
    """Mean number of OTHER nodes a token reaches, routing random tokens through an untrained V3-shaped router
    (nearly uniform scores) with or without node-limited routing; the token's own node is drawn at random."""
    torch.manual_seed(seed)
    config = ModelConfig(hidden_size=256, num_attention_heads=4, ffn="moe", n_routed_experts=ep.n_routed_experts,
                         num_experts_per_tok=ep.top_k, moe_intermediate_size=8, scoring_func="sigmoid",
                         n_group=ep.nodes, topk_group=ep.node_limit if node_limited else ep.nodes)
    with torch.no_grad():
        topk_idx, _, _ = TopkRouter(config)(torch.randn(tokens, config.hidden_size))  # (N, K)
    per_node = ep.n_routed_experts // ep.nodes
    node = topk_idx // per_node  # (N, K)
    own = torch.randint(0, ep.nodes, (tokens, 1))  # (N, 1)
    reached = groups_reached(topk_idx, per_node).float()  # (N,)
    own_hit = (node == own).any(1).float()  # (N,)
    return (reached - own_hit).mean().item()


def deepseek_v3_ep(ep: ClusterEP = ClusterEP()) -> dict:
    """Per token and MoE layer: the nodes reached, IB bytes and time with and without the node limit, the
    routed experts' FLOPs, and the FLOP rate at which computing takes as long as sending (the 1:1 of §3.2.1)."""
    per_value = ep.dispatch_bytes_per_value + ep.combine_bytes_per_value
    flops = (ep.top_k + ep.n_shared_experts) * 3 * 2 * ep.hidden * ep.moe_intermediate  # forward matmuls
    out = {"flops_per_token": flops,
           "uniform_remote_nodes_formula": expected_remote_ranks(ep.n_routed_experts, ep.top_k, ep.nodes)}
    for name, limited in (("unrestricted", False), ("node_limited", True)):
        nodes = simulate_nodes_reached(ep, limited)
        ib_bytes = nodes * ep.hidden * per_value
        seconds = ib_bytes / ep.ib_bytes_s
        out[name] = {"remote_nodes": nodes, "ib_bytes": ib_bytes, "ib_us": seconds * 1e6,
                     "break_even_tflops": flops / seconds / 1e12,
                     "worst_remote_nodes": ep.node_limit if limited else min(ep.top_k, ep.nodes - 1)}
    out["ib_cut"] = 1 - out["node_limited"]["ib_bytes"] / out["unrestricted"]["ib_bytes"]
    out["experts_per_node_free"] = ep.nvlink_bytes_s / ep.ib_bytes_s  # §3.2.2: 3.2 experts per node cost no more
    return out
