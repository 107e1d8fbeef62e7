"""Decoding on the KV cache: greedy and nucleus sampling, batched over prompts of equal length.

Letters: B batch, T prompt tokens, V vocabulary, L generated tokens.

`generate` prefills a batch of prompts once and then feeds one token per step on the model's cache
(notebook 01 proves it equal to recomputing the whole sequence); with `use_cache=False` it recomputes,
the slow baseline. The course's attention has no padding mask, so prompts of different lengths never
share a batch: `by_length` groups them, for `generate_texts` here and for GRPO's rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def by_length(sequences: list) -> dict[int, list[int]]:
    """Indices of `sequences` grouped by length, in order of first appearance: {length: [i, ...]}."""
    groups: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        groups.setdefault(len(seq), []).append(i)
    return groups


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
    for idxs in by_length(encoded).values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s:s + batch_size]
            batch = torch.tensor([encoded[i] for i in chunk], device=device)
            gen = generate(model, batch, max_new_tokens, stop_id=tok.stop_id, pad_id=tok.pad_id, **kwargs)
            for i, ids, fin in zip(chunk, gen.to_lists(), gen.finished.tolist()):
                texts[i], finished[i] = tok.decode(ids), fin
    return texts, finished  # type: ignore[return-value]
