"""The training loop: AdamW with warm-up and cosine decay, a progress bar, checkpoints and exact resume.

Letters: B batch, T tokens, V vocabulary.

Resume is exact: the batch for step s is drawn from a generator seeded with (seed, s), the learning
rate is a function of s, and a checkpoint holds model, optimizer and step. An interrupted run
resumed from its checkpoint ends with the same weights as an uninterrupted one (tested).
Checkpoints load with `torch.load(..., weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .model import lm_loss
from .progress import progress_bar


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300             # optimizer steps
    batch_size: int = 32         # sequences per step
    lr: float = 3e-3             # peak learning rate (small models like large rates)
    warmup_steps: int = 20       # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 50   # steps between checkpoints (when a path is given)
    seed: int = 0                # seeds the batch order

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive. Pass a positive integer.")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive. Try 1e-3.")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be between 0 and steps={self.steps}.")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0    # the step a checkpoint put us at (0 = fresh start)
    seconds: float = 0.0     # wall time of the steps run in this call
    tokens: int = 0          # training tokens processed in this call


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms or biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def save_checkpoint(path: str, model, optimizer, step: int, losses: list[float], extra: dict | None = None) -> None:
    """Write atomically (temp file, then rename) so a kill mid-write never leaves a broken checkpoint.

    The temp file is per process: two kernels training the same deterministic recipe into the same
    checkpoint (two notebooks run side by side) each write whole files, and the last rename wins.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "losses": list(losses), "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, model, optimizer=None) -> dict:
    """Load weights (and optimizer state) saved by `save_checkpoint`; returns the checkpoint dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt


def train_lm(model, tokens: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig, *,
             checkpoint_path: str | None = None, callback: Callable[[int, float], None] | None = None,
             progress: bool = True, loss_fn: Callable | None = None) -> TrainResult:
    """Train on a fixed set of examples (N, L), sampling `batch_size` rows per step.

    If `checkpoint_path` holds a checkpoint, training resumes from it: re-running a cell after a
    kernel restart continues where it stopped. `callback(step, loss)` runs after every step (live
    plots); raising from it stops training, and the last checkpoint keeps the work done so far.
    """
    if tokens.shape != mask.shape or tokens.dim() != 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must both be (N, L).")
    device = next(model.parameters()).device
    loss_fn = loss_fn or lm_loss
    optimizer = make_optimizer(model, cfg)
    result = TrainResult()
    start = 0
    if checkpoint_path and os.path.exists(checkpoint_path):
        ckpt = load_checkpoint(checkpoint_path, model, optimizer)
        start, result.losses, result.resumed_from = ckpt["step"], list(ckpt["losses"]), ckpt["step"]
    model.train()
    t0 = time.perf_counter()
    bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, tokens.shape[0], (cfg.batch_size,), generator=g)
        batch, batch_mask = tokens[idx].to(device), mask[idx].to(device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        loss = loss_fn(model, batch, batch_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        result.losses.append(loss.item())
        result.tokens += batch.numel()
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        if callback is not None:  # before the checkpoint: what a callback changes (a router bias) is saved too
            callback(step, result.losses[-1])
        if checkpoint_path and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(checkpoint_path, model, optimizer, step + 1, result.losses, {"train_config": asdict(cfg)})
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result
