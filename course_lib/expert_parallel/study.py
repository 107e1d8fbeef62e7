"""Notebook 10's measurements, shared with `python -m course_lib.benchmarks ep`: each returns plain numbers.

- `parity_rows`: W processes against one, outputs and every gradient, and bytes per token from the split
  sizes against the formula (the remote rows counted independently, with Python sets);
- `node_limited_rows`: cross-group bytes with unrestricted top-K and with node-limited routing;
- `straggler_summary`: rank loads and step times with skewed routing, with and without aux-loss-free balancing;
- `alltoall_fit`: the all-to-all's latency and bandwidth on this machine, for the cost model.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..moe import DeepSeekMoE
from .cost import alltoall_seconds, fit_latency_bandwidth
from .jobs import alltoall_times, parallel_forward_backward, straggler_steps
from .sharding import bytes_per_token, cross_group_bytes, row_bytes, traffic_matrix


def layer_config(experts: int = 8, top_k: int = 2, hidden: int = 64, width: int = 64, shared: int = 1,
                 n_group: int = 1, topk_group: int = 1) -> ModelConfig:
    """A DeepSeekMoE layer's config with V3's sigmoid router (the other model fields are unused)."""
    return ModelConfig(hidden_size=hidden, num_attention_heads=4, ffn="moe", n_routed_experts=experts,
                       num_experts_per_tok=top_k, moe_intermediate_size=width, n_shared_experts=shared,
                       scoring_func="sigmoid", n_group=n_group, topk_group=topk_group)


def remote_rows(moe: DeepSeekMoE, x: torch.Tensor, world_size: int) -> int:
    """Rows that leave their rank when x (B, T, hidden) is split over W ranks by sequence: for each token, the
    other ranks holding one of its experts, counted with Python sets from the single-process routing."""
    per_rank = moe.config.n_routed_experts // world_size
    rows = 0
    with torch.no_grad():
        for rank, chunk in enumerate(x.tensor_split(world_size)):
            if chunk.numel():
                idx, _ = moe.route(chunk)
                rows += sum(len({int(e) // per_rank for e in token} - {rank}) for token in idx)
    return rows


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def parity_rows(world_sizes=(1, 2, 4), config: ModelConfig | None = None, batch: int = 4, seq: int = 16,
                seed: int = 0, **launch_kw) -> list[dict]:
    """One row per world size: the largest relative error of the output and of any gradient against one process,
    and bytes per token measured from the split sizes and from the formula."""
    config = config or layer_config()
    torch.manual_seed(seed)
    moe = DeepSeekMoE(config)
    x, g = torch.randn(batch, seq, config.hidden_size), torch.randn(batch, seq, config.hidden_size)
    xr = x.clone().requires_grad_(True)
    y = moe(xr)
    (y * g).sum().backward()
    ref = {n: p.grad for n, p in moe.named_parameters() if p.grad is not None} | {"input": xr.grad}
    rows = []
    for W in world_sizes:
        res = parallel_forward_backward(moe, x, W, g, **launch_kw)
        grad_err = max(_max_rel_err(res.grads[k], v) for k, v in ref.items()) if set(res.grads) == set(ref) else 1.0
        m = traffic_matrix(res.send_splits, config.hidden_size, config.num_experts_per_tok)
        rows.append({"world_size": W, "output_err": _max_rel_err(res.output, y.detach()), "grad_err": grad_err,
                     "bytes_measured": sum(map(sum, m)) / x[..., 0].numel(),
                     "bytes_formula": bytes_per_token(remote_rows(moe, x, W), x[..., 0].numel(), config.hidden_size,
                                                      config.num_experts_per_tok),
                     "send_splits": res.send_splits, "peak_mb": res.peak_mb})
    return rows


def node_limited_rows(world_size: int = 4, experts: int = 16, top_k: int = 4, limit: int = 2, tokens: int = 256,
                      seed: int = 0, **launch_kw) -> list[dict]:
    """Unrestricted top-K against node-limited routing (at most `limit` of `world_size` groups, one rank each):
    cross-group bytes per token and the most groups any token reached."""
    rows = []
    x = torch.randn(world_size, tokens // world_size, 64, generator=torch.Generator().manual_seed(seed))
    for name, m in (("unrestricted", world_size), (f"node-limited, M={limit}", limit)):
        config = layer_config(experts=experts, top_k=top_k, n_group=world_size, topk_group=m)
        torch.manual_seed(seed)
        moe = DeepSeekMoE(config)
        res = parallel_forward_backward(moe, x, world_size, **launch_kw)
        matrix = traffic_matrix(res.send_splits, config.hidden_size, top_k)
        with torch.no_grad():
            idx, _ = moe.route(x)
        groups = (idx // (experts // world_size)).sort(-1).values  # (N, K)
        reached = (torch.diff(groups, dim=-1) != 0).sum(-1) + 1  # (N,) distinct groups per token
        rows.append({"routing": name, "limit": m, "cross_group_bytes_per_token": cross_group_bytes(matrix, 1) / x[..., 0].numel(),
                     "max_groups": int(reached.max()), "mean_groups": reached.float().mean().item(),
                     "matrix": matrix})
    return rows


def skewed_layer(config: ModelConfig, boost: float = 0.6, seed: int = 0) -> tuple[DeepSeekMoE, torch.Tensor]:
    """A layer whose router prefers rank 0's experts (the first half) for inputs drawn around `skew`: their
    logits are raised by about `boost`, as a trained router's favourites would be."""
    torch.manual_seed(seed)
    moe = DeepSeekMoE(config)
    skew = torch.nn.functional.normalize(torch.randn(config.hidden_size), dim=0)  # (hidden,) unit vector
    with torch.no_grad():
        moe.gate.weight[: config.n_routed_experts // 2] += boost * skew
    return moe, skew


def straggler_summary(rows: list[list[dict]], last: int | None = None) -> dict:
    """From `straggler_steps`' rows[rank][step], averaged over the last `last` steps: the busiest rank's load over
    the mean, the step's wall time, the busiest and the mean rank's expert CPU time, and the share of expert
    time the other ranks spend waiting for the busiest one (1 − mean / busiest)."""
    steps = len(rows[0])
    window = range(steps - (last or steps), steps)
    load_ratio, step_s, busiest, mean = [], [], [], []
    for s in window:
        loads = [r[s]["load"] for r in rows]
        cpu = [r[s]["expert_cpu_s"] for r in rows]
        load_ratio.append(max(loads) / max(sum(loads) / len(loads), 1e-9))
        step_s.append(max(r[s]["step_s"] for r in rows))
        busiest.append(max(cpu))
        mean.append(sum(cpu) / len(cpu))
    n = len(window)
    return {"load_max_over_mean": sum(load_ratio) / n, "step_ms": 1e3 * sum(step_s) / n,
            "busiest_cpu_ms": 1e3 * sum(busiest) / n, "mean_cpu_ms": 1e3 * sum(mean) / n,
            "waiting": 1 - sum(mean) / sum(busiest),  # share of the ranks' expert time spent waiting for the busiest
            "loads_per_step": [[r[s]["load"] for r in rows] for s in range(steps)]}


def straggler_runs(world_size: int = 2, tokens: int = 1024, steps: int = 24, gamma: float = 0.02,
                   boost: float = 0.6, on_message=None, **launch_kw) -> dict:
    """The skewed layer run with no balancing and with the aux-loss-free bias: {setting: rows[rank][step]}."""
    config = layer_config(experts=8, top_k=2, hidden=128, width=256, shared=0)
    moe, skew = skewed_layer(config, boost)
    return {"no balancing": straggler_steps(moe, world_size, tokens, steps, 0.0, skew, **launch_kw),
            "aux-loss-free bias": straggler_steps(moe, world_size, tokens, steps, gamma, skew,
                                                  on_message=on_message, **launch_kw)}


def alltoall_fit(world_size: int = 2, sizes=(4_096, 65_536, 262_144, 1_048_576), repeats: int = 9,
                 **launch_kw) -> dict:
    """Median all-to-all times for bytes sent to each other rank, and the fitted latency (s) and bandwidth (B/s)."""
    seconds = alltoall_times(world_size, list(sizes), repeats, **launch_kw)
    sent = [s * (world_size - 1) for s in sizes]  # bytes a rank sends to the others
    latency, bandwidth = fit_latency_bandwidth(sent, seconds)
    return {"sizes": sent, "seconds": seconds, "latency_s": latency, "bandwidth": bandwidth}


def predicted_comm_seconds(rows: list[list[dict]], hidden: int, top_k: int, fit: dict, last: int) -> tuple[float, float]:
    """(predicted, measured) seconds a step spends in its three all-to-alls, over the last `last` steps: the
    prediction from the busiest sender's bytes and the fitted model, the measurement from the layer's clocks."""
    steps = len(rows[0])
    pred, meas = [], []
    for s in range(steps - last, steps):
        m = traffic_matrix([r[s]["send_splits"] for r in rows], hidden, top_k)
        d, c = row_bytes(hidden, top_k)
        busiest = max(range(len(rows)), key=lambda i: sum(m[i]))
        out = [rows[busiest][s]["send_splits"][j] for j in range(len(rows)) if j != busiest]
        back = [rows[j][s]["send_splits"][busiest] for j in range(len(rows)) if j != busiest]
        pred.append(alltoall_seconds(0, fit["latency_s"], fit["bandwidth"])
                    + alltoall_seconds(sum(out) * d, fit["latency_s"], fit["bandwidth"])
                    + alltoall_seconds(sum(back) * c, fit["latency_s"], fit["bandwidth"]))
        meas.append(min(r[s]["comm_s"] for r in rows))
    return sum(pred) / last, sum(meas) / last
