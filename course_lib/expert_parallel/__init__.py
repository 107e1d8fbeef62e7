"""Expert parallelism on `torch.distributed`: DeepSeekMoE's routed experts spread over processes (notebook 10).

DeepSeek-V3 spreads its 256 routed experts per layer over 64 GPUs on 8 nodes and sends every token to the
GPUs of its experts and back with all-to-all collectives ([V3] arXiv:2412.19437 §3.2). The same code runs
here on gloo between CPU processes and on NCCL between GPUs:

- `sharding`: pure arithmetic: which rank holds which experts, the per-rank split sizes, bytes per token;
- `layer`: `ExpertParallelMoE`, dispatch and combine with autograd-aware all-to-alls;
- `processes`: spawning W processes into one group, with timeouts and no process left behind;
- `jobs`: what the ranks run: `run_parallel`, stragglers, a training run, all-to-all timing;
- `study`: notebook 10's measurements (parity, bytes, node-limited routing, stragglers, the fit);
- `cost`: the latency + bandwidth model, fitted here and applied to DeepSeek-V3's cluster.

`torchrun --nproc-per-node N -m course_lib.expert_parallel` runs the parity and traffic check on N ranks.
"""

from .cost import ClusterEP, alltoall_seconds, deepseek_v3_ep, fit_latency_bandwidth, simulate_nodes_reached
from .jobs import (
    ParallelResult,
    alltoall_times,
    crash_demo,
    parallel_forward_backward,
    run_parallel,
    straggler_steps,
    train_parallel,
    train_steps,
)
from .processes import MemorySampler, check_port, free_port, launch
from .layer import AllToAll, ExpertParallelMoE, run_local_experts
from .sharding import (
    DispatchPlan,
    bytes_per_token,
    check_layout,
    cross_group_bytes,
    dispatch_plan,
    expected_remote_ranks,
    groups_reached,
    rank_group,
    row_bytes,
    traffic_matrix,
)

__all__ = [
    "ClusterEP", "alltoall_seconds", "deepseek_v3_ep", "fit_latency_bandwidth", "simulate_nodes_reached",
    "ParallelResult", "alltoall_times", "crash_demo", "parallel_forward_backward", "run_parallel", "straggler_steps",
    "train_parallel", "train_steps", "MemorySampler", "check_port", "free_port", "launch", "AllToAll", "ExpertParallelMoE",
    "run_local_experts", "DispatchPlan", "bytes_per_token", "check_layout", "dispatch_plan", "expected_remote_ranks",
    "groups_reached", "rank_group", "row_bytes", "traffic_matrix", "cross_group_bytes",
]
