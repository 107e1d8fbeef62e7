"""`torchrun --nproc-per-node N -m course_lib.expert_parallel`: the parity and traffic check on N ranks.

torchrun starts the N processes and sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (on a cluster, add
--nnodes and --rdzv-endpoint as usual). Every rank builds the same seeded DeepSeekMoE, keeps its share of the
routed experts, routes its own tokens through the all-to-alls, and compares its output with the whole layer
run locally on the same tokens; rank 0 prints the largest difference and the bytes per token measured from
the split sizes against the formula. NCCL on GPUs (one per rank, LOCAL_RANK), gloo otherwise. Exit status 1
when the output differs by more than 1e-5 or the bytes differ from the formula.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..moe import DeepSeekMoE
from .layer import ExpertParallelMoE
from .processes import COLLECTIVE_TIMEOUT_S
from .sharding import bytes_per_token, check_layout, dispatch_plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m course_lib.expert_parallel",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16, help="routed experts (a multiple of the world size)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    ap.add_argument("--groups", type=int, default=1, help="router groups (nodes); 1 turns node-limited routing off")
    ap.add_argument("--topk-groups", type=int, default=1, help="groups a token may reach (M)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error("run me under torchrun, e.g. torchrun --nproc-per-node 2 -m course_lib.expert_parallel "
                 "(a notebook uses course_lib.expert_parallel.run_parallel instead)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    check_layout(args.experts, int(os.environ["WORLD_SIZE"]), args.groups)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        config = ModelConfig(hidden_size=args.hidden, num_attention_heads=4, ffn="moe", n_routed_experts=args.experts,
                             num_experts_per_tok=args.top_k, moe_intermediate_size=args.hidden, n_shared_experts=1,
                             scoring_func="sigmoid", n_group=args.groups, topk_group=args.topk_groups)
        torch.manual_seed(0)
        moe = DeepSeekMoE(config).to(device)  # the same weights on every rank
        layer = ExpertParallelMoE(moe)
        x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank + 1)).to(device)
        with torch.no_grad():
            diff = (layer(x) - moe(x)).abs().max()
            idx, _ = moe.route(x)
        plan = dispatch_plan(idx, layer.experts_per_rank, world)
        counts = torch.tensor([sum(layer.last_send_splits) - layer.last_send_splits[rank],
                               sum(plan.send_splits) - plan.send_splits[rank]], dtype=torch.int64, device=device)
        dist.all_reduce(counts)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        tokens = args.tokens * world
        measured, formula = (bytes_per_token(int(c), tokens, args.hidden, args.top_k) for c in counts)
        ok = diff.item() <= 1e-5 and measured == formula
        if rank == 0:
            print(f"{world} ranks on {'NCCL' if cuda else 'gloo'}, {args.experts} experts "
                  f"({layer.experts_per_rank} per rank), top-{args.top_k}, {tokens} tokens")
            print(f"largest difference from the whole layer: {diff.item():.2e}")
            print(f"bytes per token per layer: measured {measured:,.1f}, formula {formula:,.1f}")
            print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
