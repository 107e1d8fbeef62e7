"""Training and sampling: a loop with a progress bar, checkpoints and resume; batched generation on the KV cache.

Letters: B batch, T tokens, V vocabulary, L generated tokens.

Resume is exact: the batch for step s is drawn from a generator seeded with (seed, s), the learning
rate is a function of s, and a checkpoint holds model, optimizer and step. An interrupted run
resumed from its checkpoint ends with the same weights as an uninterrupted one (tested).
Checkpoints load with `torch.load(..., weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


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


def lm_loss(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where mask is True."""
    logits = model(tokens[:, :-1])  # (B, T-1, V)
    targets = tokens[:, 1:]  # (B, T-1)
    m = mask[:, :-1]  # (B, T-1): mask[t] says token t+1 is learned
    return F.cross_entropy(logits[m], targets[m])


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
    import time

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
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
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


# ----------------------------------------------------------------------------- sampling

@dataclass
class Generation:
    """Completions of a batch: tokens (B, L) right-padded with pad_id, mask (B, L) True on real
    tokens, finished (B,) True where the stop token was produced (False = truncated at max_new_tokens)."""
    tokens: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor

    def to_lists(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask)]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, stop_id: int | None = None, pad_id: int = 0, use_cache: bool = True,
             generator: torch.Generator | None = None) -> Generation:
    """Continue a batch of equal-length prompts (B, T) by up to max_new_tokens tokens.

    With use_cache the prompt is prefilled once and each new token costs one single-token forward
    on the KV cache; without it every step recomputes the whole sequence (the slow baseline).
    A row stops after emitting `stop_id`; the batch stops when every row has.
    """
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be (batch, tokens), got {tuple(prompt.shape)}; use prompt[None] for one.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}.")
    was_training = model.training
    model.eval()
    B = prompt.shape[0]
    cache = model.new_cache() if use_cache else None
    seq = prompt
    logits = model(prompt, cache)[:, -1]  # (B, V)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    n = 0
    for n in range(1, max_new_tokens + 1):
        nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, n - 1] = nxt
        if stop_id is not None:
            finished |= (nxt == stop_id) & ~done
            done |= nxt == stop_id
            if bool(done.all()):
                break
        if n == max_new_tokens:
            break
        if use_cache:
            logits = model(nxt[:, None], cache)[:, -1]  # (B, V): one token in, one position appended
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)  # (B, T+n)
            logits = model(seq)[:, -1]  # (B, V): the whole sequence again
    out = out[:, :n]
    mask = torch.ones_like(out, dtype=torch.bool)
    if stop_id is not None:
        # True up to and including each row's stop token
        after_stop = (out == stop_id).long().cumsum(1) - (out == stop_id).long() > 0
        mask = ~after_stop
    model.train(was_training)
    return Generation(out, mask, finished)


def generate_texts(model, tok, prompts: list[str], max_new_tokens: int, *, batch_size: int = 64,
                   **kwargs) -> tuple[list[str], list[bool]]:
    """Complete text prompts (any lengths): prompts of equal token length are batched together.
    Returns the completions' text and whether each finished (produced the stop token)."""
    device = next(model.parameters()).device
    encoded = [tok.encode(p, bos=True) for p in prompts]
    texts: list[str | None] = [None] * len(prompts)
    finished: list[bool] = [False] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for idxs in by_len.values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s:s + batch_size]
            batch = torch.tensor([encoded[i] for i in chunk], device=device)
            gen = generate(model, batch, max_new_tokens, stop_id=tok.stop_id, pad_id=tok.pad_id, **kwargs)
            for i, ids, fin in zip(chunk, gen.to_lists(), gen.finished.tolist()):
                texts[i], finished[i] = tok.decode(ids), fin
    return texts, finished  # type: ignore[return-value]


def evaluate_accuracy(model, tok, problems, max_new_tokens: int, score: Callable | None = None,
                      **kwargs) -> float:
    """Fraction of problems whose greedy completion scores 1 (default: the strict accuracy reward)."""
    if score is None:
        from .rewards import accuracy_reward as score
    texts, _ = generate_texts(model, tok, [p.prompt for p in problems], max_new_tokens, **kwargs)
    return sum(score(t, p.target) for t, p in zip(texts, problems)) / max(1, len(problems))


def pretrain_on_task(config, profile, *, name: str | None = None, steps: int | None = None, seed: int = 0,
                     callback: Callable[[int, float], None] | None = None, progress: bool = True, device=None,
                     model=None, loss_fn: Callable | None = None):
    """Build a CourseModel from `config` and train it on the profile's addition examples.

    The shared recipe of every notebook that needs a trained model (notebook 00's baseline, the
    GQA/MLA/MoE variants, nano-DeepSeek): same data, same steps, same seed, so results compare fairly.
    With a `name` it checkpoints to `checkpoint_path(name)` and resumes or reloads from there. Pass a
    prebuilt `model` (then `config` is ignored) when the callback needs it, e.g. an MoE load tracker,
    and `loss_fn` to add terms to the next-token loss (`train_lm`'s).
    Returns (model, TrainResult, tokenizer, train_problems, eval_problems).
    """
    from .model import CourseModel
    from .profiles import checkpoint_path
    from .tasks import Tokenizer, addition_splits, encode_examples

    tok = Tokenizer()
    train_problems, eval_problems = addition_splits(profile.n_train, profile.n_eval, digits=profile.digits, seed=0)
    tokens, mask = encode_examples(train_problems, tok)
    if model is None:
        torch.manual_seed(seed)
        model = CourseModel(config)
    if device is not None:
        model = model.to(device)
    steps = steps or profile.pretrain_steps
    cfg = TrainConfig(steps=steps, batch_size=profile.batch_size, lr=profile.lr, seed=seed,
                      warmup_steps=min(TrainConfig.warmup_steps, steps))
    result = train_lm(model, tokens, mask, cfg, checkpoint_path=checkpoint_path(name) if name else None,
                      callback=callback, progress=progress, loss_fn=loss_fn)
    return model, result, tok, train_problems, eval_problems
