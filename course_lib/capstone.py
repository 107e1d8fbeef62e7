"""nano-DeepSeek: the course's three ideas in one model, and the report card of notebook 08.

`nano_deepseek_config(profile)` turns the profile's dense MHA baseline into a DeepSeek-style model by
config alone: Multi-head Latent Attention in every layer ([V2] §2.1.2-2.1.3), and in every layer but the
first a DeepSeekMoE FFN ([MoE] §3) with fine-grained routed experts, a shared expert, V3's sigmoid gate with
group-limited routing and auxiliary-loss-free balancing ([V3] §2.1.2); the first layer stays dense, as
`first_k_dense_replace` keeps it in DeepSeek-V2/V3. The MoE's active FFN width equals the baseline's dense
width, so the two models spend about the same compute per token.

Both models follow one recipe, here and in the seed sweep (`python -m course_lib.capstone --seeds 2`):
the same worked examples and pretraining steps (`train.pretrain_on_task`'s data), then the GRPO protocol
of notebook 07 (`grpo_recipe`). The measurements of the report card live here too, so the notebook and
the script measure alike.
"""

from __future__ import annotations

import copy

import torch

from .config import ModelConfig
from .grpo import grpo_recipe  # noqa: F401  (notebook 07's GRPO protocol, which notebook 08 reuses)
from .model import CourseModel
from .moe import LoadTracker, balancing_loss_fn, mean_max_violation, moe_layers

PRESETS = ("nano-deepseek-cpu", "nano-deepseek-gpu")  # one per profile: nano_deepseek_config(get_profile(name))

# V3's balancing ([V3] §2.1.2): the bias update speed γ, and the tiny sequence-wise loss weight α
# (V3 uses γ = 0.001 over 14.8T tokens and α = 1e-4; a few hundred steps need a faster γ, notebook 05).
BIAS_GAMMA = 0.01
SEQUENCE_ALPHA = 1e-4


def nano_deepseek_config(profile, **changes) -> ModelConfig:
    """The profile's nano-DeepSeek: MLA everywhere, DeepSeekMoE after the first layer.

    Sizes follow the baseline (`profile.baseline_config()`), so the two differ only where DeepSeek differs:
    - MLA with twice the baseline's heads and compressed queries (as V2/V3 compress them), the query rank
      chosen so that attention has as many parameters as the baseline's MHA (`_matching_q_rank`; 64 with
      the cpu profile), per-head content widths d_h/2, and a cache of a latent and a decoupled RoPE key each as wide
      as one baseline head d_h: 2 d_h numbers per token and layer, 1/n_h of MHA's 2 n_h d_h (1/4 with the
      cpu profile's 4 heads). DeepSeek's RoPE key is half its head width (64 of 128); here it is twice
      the content width, because this task is positional (column-by-column addition) and at this scale a
      narrower shared RoPE key learned clearly worse (pretraining seed 1: 12-28% held-out accuracy with
      16 channels across latent and head-count variants, 53% with 32);
    - 16 routed experts a quarter of the dense FFN wide, top-3 in 2 of 4 groups, plus 1 shared expert of
      the same width: 4 experts of width d_ff/4 are active, the dense FFN's width d_ff.
    """
    base = profile.baseline_config()
    half = base.resolved_head_dim // 2
    d_h = base.resolved_head_dim
    mla = base.replace(attention="mla", num_attention_heads=2 * base.num_attention_heads,
                       qk_nope_head_dim=half, v_head_dim=half, qk_rope_head_dim=d_h, kv_lora_rank=d_h)
    cfg = mla.replace(
        q_lora_rank=_matching_q_rank(mla, 4 * base.hidden_size * base.num_attention_heads * d_h),
        ffn="moe", n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=1,
        moe_intermediate_size=base.intermediate_size // 4, n_group=4, topk_group=2, scoring_func="sigmoid",
        norm_topk_prob=True, first_k_dense_replace=1)
    return cfg.replace(**changes) if changes else cfg


def _matching_q_rank(mla: ModelConfig, target: int) -> int:
    """The query rank r (a multiple of 8) that gives MLA attention about `target` parameters.

    MLA's projections hold d·r + r·H(D + Dr) (queries through the rank-r bottleneck, W^DQ and W^UQ/W^QR),
    d·(C + Dr) (W^DKV and W^KR), C·H(D + Dv) (W^UK and W^UV) and H·Dv·d (W^O) weights; solve for r.
    """
    d, H = mla.hidden_size, mla.num_attention_heads
    fixed = d * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank * H * (mla.qk_nope_head_dim + mla.v_head_dim) \
        + H * mla.v_head_dim * d
    per_rank = d + H * mla.qk_head_dim
    return max(8, round((target - fixed) / per_rank / 8) * 8)


def train_nano_deepseek(profile, *, seed: int = 0, name: str | None = None, on_load=None, then=None,
                        progress: bool = True, device=None, config: ModelConfig | None = None):
    """Pretrain nano-DeepSeek with the baseline's recipe (`train.pretrain_on_task`: same data, steps and
    schedule), balancing with V3's bias update and sequence-wise loss. Checkpoints under `name` (resumes
    exactly, bias included). Returns (model, TrainResult, LoadTracker, tokenizer, train_problems, eval_problems)."""
    from .train import pretrain_on_task

    torch.manual_seed(seed)
    model = CourseModel(config or nano_deepseek_config(profile))
    tracker = LoadTracker(model, gamma=BIAS_GAMMA, on_load=on_load, then=then)
    model, result, tok, train_problems, eval_problems = pretrain_on_task(
        None, profile, name=name, seed=seed, callback=tracker, progress=progress, device=device, model=model,
        loss_fn=balancing_loss_fn("sequence", SEQUENCE_ALPHA))
    return model, result, tracker, tok, train_problems, eval_problems


# ----------------------------------------------------------------------------- measurements

@torch.no_grad()
def kv_bytes_per_token(model: CourseModel, prompt: torch.Tensor) -> float:
    """Bytes the live cache holds per token after prefilling `prompt` (B, T), per sequence."""
    cache = model.new_cache()
    model.eval()
    model(prompt, cache)
    return cache.nbytes / (cache.seq_len * prompt.shape[0])


@torch.no_grad()
def routed_load(model: CourseModel, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-slots per routed expert for every MoE layer (L, E) on `tokens` (N, T), counting only the
    positions where `mask` (N, T) is True (the examples' own tokens, not padding)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layer: routed_load needs a model built with ffn='moe'.")
    model.eval()
    model(tokens)
    keep = mask.reshape(-1)  # (N*T,)
    loads = []
    for m in layers:
        idx = m.last_topk_idx.reshape(-1, m.last_topk_idx.shape[-1])[keep]  # (kept, K)
        loads.append(torch.bincount(idx.reshape(-1), minlength=len(m.experts)))
    return torch.stack(loads)  # (L, E)


def held_out_max_violation(model: CourseModel, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """MaxVio ([LF]: max load / mean load − 1) of each MoE layer on held-out text, averaged over layers."""
    return mean_max_violation(routed_load(model, tokens, mask))


def training_step_fn(model: CourseModel, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int, lr: float,
                     loss_fn=None):
    """A function that runs one optimizer step on a private copy of `model` (the original is untouched)."""
    from .train import TrainConfig, lm_loss, make_optimizer

    twin = copy.deepcopy(model).train()
    opt = make_optimizer(twin, TrainConfig(steps=1, batch_size=batch_size, lr=lr, warmup_steps=0))
    loss_fn = loss_fn or lm_loss
    g = torch.Generator().manual_seed(0)
    device = next(twin.parameters()).device

    def step() -> None:
        idx = torch.randint(0, tokens.shape[0], (batch_size,), generator=g)
        loss = loss_fn(twin, tokens[idx].to(device), mask[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def decode_fn(model: CourseModel, context: int, new_tokens: int, batch: int = 1, vocab_floor: int = 4):
    """A function that greedily decodes `new_tokens` after a `context`-token prompt of fixed random
    tokens, on the KV cache, never stopping early: what decode speed at that context length measures."""
    from .train import generate

    if context + new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"context {context} + {new_tokens} new tokens exceeds max_position_embeddings="
                         f"{model.config.max_position_embeddings}: use a shorter context.")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab_floor, model.config.vocab_size, (batch, context), generator=g).to(device)
    return lambda: generate(model, prompt, new_tokens, use_cache=True)



# ----------------------------------------------------------------------------- seed sweep (a script)

def seed_sweep(seeds, profile: str | None = None, progress: bool = False,
               models: tuple[str, ...] = ("baseline", "nano_deepseek"), on_row=None) -> list[dict]:
    """For each seed, each of `models` through the whole recipe: pretrain, measure, GRPO, measure.
    Returns one row per seed and model with held-out accuracy and format rate before and after GRPO;
    `on_row(row)` sees each row as soon as it is measured."""
    from .grpo import evaluate_policy, train_grpo
    from .profiles import get_profile
    from .train import pretrain_on_task

    prof = get_profile(profile)
    rows = []
    for seed in seeds:
        for name in models:
            if name == "baseline":
                model, _, tok, _, eval_problems = pretrain_on_task(prof.baseline_config(), prof, seed=seed, progress=progress)
            elif name == "nano_deepseek":
                model, _, _, tok, _, eval_problems = train_nano_deepseek(prof, seed=seed, progress=progress)
            else:
                raise ValueError(f"unknown model {name!r}: use 'baseline' or 'nano_deepseek'.")
            before, _ = evaluate_policy(model, tok, eval_problems, 64)
            cfg, pool, reward = grpo_recipe(prof, eval_problems, seed)
            result = train_grpo(model, tok, pool, cfg, reward_fn=reward, progress=progress)
            after, _ = evaluate_policy(model, tok, eval_problems, 64)
            rows.append({"seed": seed, "model": name, "accuracy_before": before["accuracy"],
                         "accuracy_after": after["accuracy"], "format_after": after["format_rate"],
                         "grpo_seconds": result.seconds})
            if on_row is not None:
                on_row(rows[-1])
    return rows


if __name__ == "__main__":  # python -m course_lib.capstone --seeds 2
    import argparse

    parser = argparse.ArgumentParser(description="nano-DeepSeek vs the dense baseline, whole recipe, one run per seed.")
    parser.add_argument("--seeds", type=int, default=2, help="how many seeds (0, 1, ...)")
    parser.add_argument("--first-seed", type=int, default=0, help="start the seeds here")
    parser.add_argument("--profile", default=None, help="cpu or gpu (default: $COURSE_PROFILE, else by device)")
    parser.add_argument("--models", nargs="+", default=["baseline", "nano_deepseek"], help="which models to run")
    args = parser.parse_args()
    print(f"{'seed':>4} {'model':<14} {'acc before':>10} {'acc after':>10} {'format after':>13} {'GRPO s':>7}")
    seeds = range(args.first_seed, args.first_seed + args.seeds)

    def show(row: dict) -> None:
        print(f"{row['seed']:>4} {row['model']:<14} {row['accuracy_before']:>10.1%} {row['accuracy_after']:>10.1%} "
              f"{row['format_after']:>13.1%} {row['grpo_seconds']:>7.0f}", flush=True)

    seed_sweep(seeds, args.profile, progress=False, models=tuple(args.models), on_row=show)
