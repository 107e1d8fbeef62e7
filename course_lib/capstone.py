"""nano-DeepSeek's report card (notebook 08): what is measured on each model, and the table it fills.

Notebook 08 trains the dense baseline and nano-DeepSeek with one recipe (`course_lib.recipes`) and measures
both with the functions here: cache bytes read off a live cache, held-out expert imbalance (MaxVio of [LF],
Wang et al. 2024, arXiv:2408.15664), training and decode speed. `results_table` turns the card into the
markdown table the notebook prints and the README shows.
"""

from __future__ import annotations

import copy

import torch

from .balancing import mean_max_violation, moe_layers
from .generate import generate
from .model import CourseModel, lm_loss
from .moe import expert_load
from .train import TrainConfig, make_optimizer


@torch.no_grad()
def kv_bytes_per_token(model: CourseModel, prompt: torch.Tensor) -> float:
    """Bytes the live cache holds per token after prefilling `prompt` (B, T), per sequence."""
    cache = model.new_cache()
    model.eval()
    model(prompt, cache)
    return cache.nbytes / (cache.seq_len * prompt.shape[0])


@torch.no_grad()
def held_out_max_violation(model: CourseModel, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """MaxVio ([LF]: max load / mean load − 1) of each MoE layer on held-out text (N, T), averaged over layers,
    counting only the positions where `mask` (N, T) is True (the examples' own tokens, not padding)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layer: held_out_max_violation needs a model built with ffn='moe'.")
    model.eval()
    model(tokens)
    return mean_max_violation(torch.stack([expert_load(m.last_topk_idx, len(m.experts), mask) for m in layers]))
def training_step_fn(model: CourseModel, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int, lr: float,
                     loss_fn=None):
    """A function that runs one optimizer step on a private copy of `model` (the original is untouched)."""
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
    if context + new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"context {context} + {new_tokens} new tokens exceeds max_position_embeddings="
                         f"{model.config.max_position_embeddings}: use a shorter context.")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab_floor, model.config.vocab_size, (batch, context), generator=g).to(device)
    return lambda: generate(model, prompt, new_tokens, use_cache=True)


# (key in each model's entry, label, how to format the value); every key must be in the card
ROWS = (
    ("parameters", "parameters (total)", "{:,}"),
    ("active_parameters", "parameters active per token", "{:,}"),
    ("kv_cache_bytes_per_token", "KV cache per token (bytes, from the live cache)", "{:,.0f}"),
    ("train_tokens_per_s", "training tokens/s", "{:,.0f}"),
    ("decode_tokens_per_s_short", "decode tokens/s, short context", "{:,.0f}"),
    ("decode_tokens_per_s_long", "decode tokens/s, long context", "{:,.0f}"),
    ("accuracy_before_grpo", "held-out accuracy before GRPO", "{:.1%}"),
    ("accuracy_after_grpo", "held-out accuracy after GRPO", "{:.1%}"),
    ("format_rate_after_grpo", "format rate after GRPO", "{:.1%}"),
    ("max_vio_before_grpo", "expert load imbalance before GRPO (MaxVio, held-out)", "{:.2f}"),
    ("max_vio_after_grpo", "expert load imbalance after GRPO (MaxVio, held-out)", "{:.2f}"),
)
MODELS = (("baseline", "dense MHA baseline"), ("nano_deepseek", "nano-DeepSeek"))
# Which of the card's "devices" measured a row: training runs where the notebook trains, decoding is timed on a
# CPU copy (as in notebook 00), accuracy is evaluated where the model lives. Rows not named are counts.
MEASURED_ON = {"train_tokens_per_s": "train", "decode_tokens_per_s_short": "decode",
               "decode_tokens_per_s_long": "decode", "accuracy_before_grpo": "model", "accuracy_after_grpo": "model",
               "format_rate_after_grpo": "model", "max_vio_before_grpo": "model", "max_vio_after_grpo": "model"}


def _cell(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def results_table(card: dict) -> str:
    """The README's results block for a report card: a markdown table plus one line on how it was measured."""
    missing = [f"{m}.{k}" for m, _ in MODELS for k, _, _ in ROWS if k not in card.get("models", {}).get(m, {})]
    if missing:
        raise ValueError(f"the report card lacks {missing}: re-run notebook 08 to write a complete card.")
    lines = ["| | " + " | ".join(label for _, label in MODELS) + " |", "|---|" + "---:|" * len(MODELS)]
    devices = card.get("devices", {})
    for key, label, fmt in ROWS:
        if MEASURED_ON.get(key) in devices:
            label = f"{label} [{devices[MEASURED_ON[key]]}]"
        lines.append(f"| {label} | " + " | ".join(_cell(card["models"][m][key], fmt) for m, _ in MODELS) + " |")
    ctx = card.get("contexts", {})
    lines.append("")
    lines.append(f"Measured in one run of notebook 08 under the `{card['profile']}` profile "
                 f"({card.get('machine', 'unknown machine')}, torch {card.get('torch', '?')}); decode at "
                 f"{ctx.get('short', '?')} and {ctx.get('long', '?')} tokens of context, batch {ctx.get('batch', '?')}. "
                 f"Both models: the same {card.get('pretrain_steps', '?')} pretraining steps on the same worked "
                 f"examples, then {card.get('grpo_steps', '?')} GRPO steps (notebook 07's protocol), seed "
                 f"{card.get('seed', '?')}."
                 + (" In brackets: the device each row was measured on." if devices else ""))
    return "\n".join(lines)
