"""Multi-token prediction (MTP) and self-speculative decoding ([V3] §2.2, §4.2, §5.4.3).

Letters: B batch, L tokens of a training row, T = L - 1 positions the main model predicts from,
V vocabulary, d hidden width, D MTP depth (number of MTP modules), k one depth (1..D), S cached tokens.

DeepSeek-V3 trains D sequential MTP modules on top of the main model. Module k at position i combines
the previous depth's representation h^{k-1}_i (h^0 = the main model's) with the embedding of the token
k places ahead, runs one transformer block over the sequence, and predicts the token k+1 places ahead
with the shared output head ([V3] eqs 21-23):

    h'^k_i = M_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k}))]       (21)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                 (22)
    P^k_{i+k+1} = OutHead(h^k_i)                                      (23)
    L^k_MTP = CrossEntropy(P^k, t) over the predicted positions       (24)
    L = L_main + (λ / D) Σ_k L^k_MTP                                  (25)

Choices made here, deliberately:
- Concatenation order. Eq (21) prints [h ; emb]. The released V3 weights, transformers' `MtpLayer` and the
  vLLM/SGLang DeepSeek MTP code all compute `eh_proj(cat([enorm(emb), hnorm(h)]))`, i.e. [emb ; h]. For a
  model trained from scratch the two are the same function up to swapping the two column blocks of
  `eh_proj` (M [h; e] = [M_h M_e][h; e] = [M_e M_h][e; h]); we use [emb ; h] so that a state dict of a
  real MTP layer would load without permuting `eh_proj`.
- Output head. V3's MTP layer ships its own `shared_head.norm` and a head that is the main model's
  `lm_head` (README_WEIGHTS.md); transformers calls that norm `post_norm`. We do the same: each module has
  its own final RMSNorm (`post_norm`) and reuses the main model's `lm_head` and `embed_tokens` (shared
  parameters, one copy in the state dict). A per-module norm lets each depth scale its representation
  independently of what the main model's final norm learned.
- h^0 is the main model's last block output *before* its final norm (`CourseModel(..., return_hidden=True)`);
  `hnorm` normalizes it. (transformers and vLLM pass the post-norm state; after `hnorm` the two differ only
  by the main norm's per-channel gain, which `hnorm`'s own weight can learn.)
- Eq (24) divides by T although only T-k terms are summed (as printed). We average over the positions
  whose target is learned, exactly as `course_lib.model.lm_loss` does for the main loss (mask[t] says
  token t+1 is learned), so L_main and L^k are on the same scale.
- Position. Module k's block sees position i where the main model saw position i (its RoPE starts at 0);
  transformers shifts the module's position ids by k. RoPE scores depend only on relative positions, so
  the attention is the same either way.

Self-speculative decoding ([V3] §5.4.3): at inference the MTP modules draft the next tokens and the main
model checks them all in one forward on its KV cache. `speculative_generate` does this greedily for
batch size 1 and returns exactly the tokens of plain cached greedy decoding (`course_lib.generate.generate`
at temperature 0), with the count of drafted and accepted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm
from .model import CourseModel, DecoderLayer
from .generate import Generation


class MTPLayer(nn.Module):
    """One MTP module k ([V3] §2.2, eqs 21-22): norms, projection M_k (`eh_proj`), one transformer block.

    Names follow transformers' `MtpLayer` (`enorm`, `hnorm`, `eh_proj`, `mtp_block`, `post_norm`). The
    embedding and the output head are not here: they are the main model's, shared (see `MTPModel`).
    The block is a `course_lib.model.DecoderLayer` built with layer index num_hidden_layers + k - 1 (as
    V3's MTP layer is `model.layers.61`), so an MLA or MoE config gives an MLA or MoE block.
    """

    def __init__(self, config: ModelConfig, depth: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.depth = depth
        self.enorm = RMSNorm(d, config.rms_norm_eps)  # on Emb(t_{i+k})
        self.hnorm = RMSNorm(d, config.rms_norm_eps)  # on h^{k-1}_i
        self.eh_proj = nn.Linear(2 * d, d, bias=False)  # M_k in R^{d x 2d}
        self.mtp_block = DecoderLayer(config, config.num_hidden_layers + depth - 1)  # TRM_k
        self.post_norm = RMSNorm(d, config.rms_norm_eps)  # V3's shared_head.norm: this module's own

    def new_cache(self):
        """The block attends over earlier positions too, so decoding keeps a cache for it."""
        return self.mtp_block.self_attn.new_cache()

    def forward(self, prev_hidden: torch.Tensor, next_embeds: torch.Tensor, cache=None) -> torch.Tensor:
        """h^k (B, T, d) from h^{k-1} (B, T, d) and Emb(t_{i+k}) (B, T, d), eqs (21)-(22)."""
        return self.from_normed_embeds(prev_hidden, self.enorm(next_embeds), cache)  # (B, T, d)

    def from_normed_embeds(self, prev_hidden: torch.Tensor, normed_embeds: torch.Tensor, cache=None) -> torch.Tensor:
        """`forward` given RMSNorm(Emb(t_{i+k})) (B, T, d) already: a decoder looks these up in a table made once."""
        x = torch.cat([normed_embeds, self.hnorm(prev_hidden)], dim=-1)  # (B, T, 2d): [emb ; h], see module doc
        return self.mtp_block(self.eh_proj(x), cache)  # (B, T, d)


class MTPModel(nn.Module):
    """The course model (`.main`, a CourseModel) plus D sequential MTP modules (`.mtp`), in one module.

    One module, so `train_lm` builds a single optimizer over both and checkpoints both in one state dict.
    `forward` is the main model's, so `generate`, `evaluate_accuracy` and `lm_loss` use the main model
    alone: at inference the MTP modules can be dropped ([V3] §2.2) or used as drafters
    (`speculative_generate`). D is `num_nextn_predict_layers`, transformers' DeepseekV3Config name (V3: 1).
    """

    def __init__(self, config: ModelConfig, num_nextn_predict_layers: int = 1) -> None:
        super().__init__()
        if not isinstance(num_nextn_predict_layers, int) or num_nextn_predict_layers < 1:
            raise ValueError(f"num_nextn_predict_layers={num_nextn_predict_layers!r} must be an integer >= 1 "
                             "(DeepSeek-V3 uses 1). To train without MTP, use a plain CourseModel.")
        self.config = config
        self.main = CourseModel(config)  # built first: with the same seed, the same init as a plain model
        self.mtp = nn.ModuleList(MTPLayer(config, k) for k in range(1, num_nextn_predict_layers + 1))
        self.mtp.apply(CourseModel._init_weights)

    @property
    def num_nextn_predict_layers(self) -> int:
        return len(self.mtp)

    def forward(self, input_ids: torch.Tensor, cache=None, return_hidden: bool = False):
        """The main model's logits (B, T, V) (and last hidden state): MTP plays no part in them."""
        return self.main(input_ids, cache, return_hidden=return_hidden)

    def new_cache(self):
        return self.main.new_cache()

    def mtp_logits(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """OutHead(h^k) (eq 23): module k's own norm, then the shared lm_head. hidden (B, T, d) -> (B, T, V)."""
        return self.main.lm_head(self.mtp[k - 1].post_norm(hidden))

    def forward_all(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher-forced logits of every head on rows tokens (B, L).

        Returns the main logits (B, T, V), T = L - 1, whose position i predicts t_{i+1}, and for each depth k
        the logits (B, T - k, V) whose position i predicts t_{i+k+1}.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, tokens), got shape {tuple(tokens.shape)}.")
        L, D = tokens.shape[1], len(self.mtp)
        if L < D + 2:
            raise ValueError(f"rows of {L} tokens are too short for {D} MTP module(s): depth {D} predicts "
                             f"{D + 1} tokens ahead, so rows need at least {D + 2} tokens.")
        T = L - 1
        logits, hidden = self.main(tokens[:, :-1], return_hidden=True)  # (B, T, V), (B, T, d): h^0
        embeds = self.main.embed_tokens(tokens)  # (B, L, d): the shared embedding
        per_depth = []
        for k, layer in enumerate(self.mtp, start=1):
            hidden = layer(hidden[:, :T - k], embeds[:, k:T])  # (B, T-k, d): h^k_i from h^{k-1}_i and Emb(t_{i+k})
            per_depth.append(self.mtp_logits(hidden, k))  # (B, T-k, V): predicts t_{i+k+1}
        return logits, per_depth


# ----------------------------------------------------------------------------- the loss, eqs (24)-(25)

def mtp_losses(model: MTPModel, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The main next-token loss and L^k_MTP for k = 1..D, each a mean over the learned targets.

    mask (B, L) follows `course_lib.model.lm_loss`: mask[t] says token t+1 is learned. Depth k predicts
    t_{i+k+1} from position i, so its target is learned where mask[i+k] is True.
    """
    if tokens.shape != mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must have the same shape.")
    logits, per_depth = model.forward_all(tokens)
    T = tokens.shape[1] - 1
    m = mask[:, :-1]  # (B, T)
    main = F.cross_entropy(logits[m], tokens[:, 1:][m])
    losses = []
    for k, logits_k in enumerate(per_depth, start=1):
        m_k = mask[:, k:T]  # (B, T-k): the target t_{i+k+1} is learned where mask[i+k] is
        losses.append(F.cross_entropy(logits_k[m_k], tokens[:, k + 1:][m_k]))  # eq (24)
    return main, losses


def mtp_loss(model: MTPModel, tokens: torch.Tensor, mask: torch.Tensor, lam: float = 0.3) -> torch.Tensor:
    """L_main + (λ / D) Σ_k L^k_MTP (eq 25); V3 uses λ = 0.3, then 0.1 for the last third of tokens (§4.2)."""
    main, losses = mtp_losses(model, tokens, mask)
    return main + lam / len(losses) * sum(losses)


def mtp_loss_fn(lam: float = 0.3) -> Callable:
    """A `loss_fn(model, batch, mask)` for `train_lm`: eq (25) with weight λ.

    It keeps each step's main loss in `loss_fn.main_losses` and the mean of the L^k_MTP in
    `loss_fn.mtp_losses` (unweighted), for live plots and for comparing with a model trained without MTP.
    """
    if lam < 0:
        raise ValueError(f"lam={lam} must be >= 0 (DeepSeek-V3 uses 0.3, then 0.1).")

    def loss_fn(model: MTPModel, batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(model, MTPModel):
            raise TypeError(f"mtp_loss_fn needs an MTPModel, got {type(model).__name__}. "
                            "Build the model with MTPModel(config) to train with MTP.")
        main, losses = mtp_losses(model, batch, mask)
        mean_mtp = sum(losses) / len(losses)
        loss_fn.main_losses.append(main.item())
        loss_fn.mtp_losses.append(mean_mtp.item())
        return main + lam * mean_mtp  # = L_main + (λ/D) Σ_k L^k_MTP

    loss_fn.main_losses, loss_fn.mtp_losses = [], []
    return loss_fn


# ----------------------------------------------------------------------------- self-speculative decoding

class SpeculativeDecoder:
    """Greedy self-speculative decoding of one sequence: MTP modules draft, the main model verifies.

    State after every step, for the sequence t_0 .. t_{n-1} decided so far (`tokens`, prompt included):
    - the main model's cache holds positions 0 .. n-2 (t_{n-1} is decided but not yet fed), exactly what
      plain cached greedy decoding holds at that point, and `hidden[0]` holds h^0 for those positions;
    - module k's cache and `hidden[k]` hold positions 0 .. S_k - 1, each computed from h^{k-1}_i and
      Emb(t_{i+k}) of decided tokens only (the last module's `hidden` stays empty: nothing reads it).

    One `step`:
    1. draft: module 1 catches up over positions S_1 .. n-2 (the last one reads Emb(t_{n-1})) and its
       last output proposes d_1 for t_n; module k does the same reading d_{k-1} at the last position,
       proposing d_k for t_{n+k-1};
    2. verify: the main model reads [t_{n-1}, d_1, .., d_m] in one forward at positions n-1 .. n-1+m; its
       argmax at position n-1+j is what plain greedy decoding would emit there. The first a drafts that
       match are accepted, and the main model's own token at the first mismatch (or after the last
       draft) comes for free: a + 1 new tokens per main forward;
    3. roll back: the main cache is cropped to the n + a positions fed with decided tokens; module k's
       entries at positions i > n - 1 + a - k read a rejected draft and are cropped too.

    `propose(logits, k)` picks a draft from module k's logits (greedy); override it to experiment (the
    tests force every draft to be accepted or rejected). Drafts never change the output, only the speed.
    """

    def __init__(self, model: MTPModel, prompt: torch.Tensor, num_draft: int | None = None) -> None:
        if not isinstance(model, MTPModel):
            raise TypeError(f"self-speculative decoding needs an MTPModel, got {type(model).__name__}.")
        if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be (1, tokens) with at least one token, got {tuple(prompt.shape)}: "
                             "speculative decoding here runs one sequence at a time (batch size 1). "
                             "Loop over the prompts, or use course_lib.generate.generate for batches.")
        D = len(model.mtp)
        num_draft = D if num_draft is None else num_draft
        if not isinstance(num_draft, int) or not 1 <= num_draft <= D:
            raise ValueError(f"num_draft={num_draft!r} must be between 1 and the model's {D} MTP module(s).")
        self.model, self.main, self.num_draft = model, model.main, num_draft
        self.device = prompt.device
        self.drafted = self.accepted = self.main_forwards = 0
        with torch.no_grad():
            self.cache = self.main.new_cache()
            self.mtp_caches = [layer.new_cache() for layer in model.mtp[:num_draft]]
            logits, h = self.main(prompt, self.cache, return_hidden=True)  # (1, P, V), (1, P, d)
            # RMSNorm(Emb(v)) of every token v for each module: a row lookup per draft instead of an embedding
            # and a norm (the norm is row by row, so the rows are the same numbers)
            self.normed_embeds = [layer.enorm(self.main.embed_tokens.weight) for layer in model.mtp[:num_draft]]  # (V, d) each
        self.main_forwards += 1
        self.tokens: list[int] = prompt[0].tolist() + [int(logits[0, -1].argmax())]
        self.hidden = [h] + [h.new_zeros(1, 0, h.shape[-1]) for _ in range(num_draft)]  # h^0 .. h^m: (1, S_k, d)

    def propose(self, logits: torch.Tensor, k: int) -> int:
        """The draft token from module k's logits (V,): greedy."""
        return int(logits.argmax())

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)

    @torch.no_grad()
    def draft(self, m: int) -> list[int]:
        """Drafts d_1 .. d_m for t_n .. t_{n+m-1} with modules 1 .. m (each catches up on its cache first)."""
        n, drafts = len(self.tokens), []
        for k in range(1, m + 1):
            layer, cache = self.model.mtp[k - 1], self.mtp_caches[k - 1]
            start = cache.seq_len
            ids = (self.tokens + drafts)[start + k:n - 1 + k]  # Emb(t_{i+k}) for i = start .. n-2; d_{k-1} last
            normed = self.normed_embeds[k - 1][ids][None]  # (1, n-1-start, d): RMSNorm(Emb(t_{i+k}))
            h = layer.from_normed_embeds(self.hidden[k - 1][:, start:n - 1], normed, cache)  # (1, n-1-start, d)
            if k < self.num_draft:  # module k+1 reads h^k; the last module's output is only drafted from
                self.hidden[k] = torch.cat([self.hidden[k], h], dim=1)  # (1, n-1, d)
            drafts.append(self.propose(self.model.mtp_logits(h[:, -1], k)[0], k))
        return drafts

    @torch.no_grad()
    def step(self, max_draft: int | None = None) -> list[int]:
        """Draft, verify, roll back; returns the tokens decided by this step (1 .. m + 1 of them)."""
        m = self.num_draft if max_draft is None else max(0, min(self.num_draft, max_draft))
        n = len(self.tokens)
        drafts = self.draft(m) if m else []
        logits, h = self.main(self._ids([self.tokens[-1]] + drafts), self.cache, return_hidden=True)  # (1, m+1, V), (1, m+1, d)
        self.main_forwards += 1
        greedy = logits[0].argmax(-1).tolist()  # greedy[j]: the main model's choice for t_{n+j}
        a = 0
        while a < m and greedy[a] == drafts[a]:
            a += 1
        self.drafted += m
        self.accepted += a
        # roll back: keep only positions fed with decided tokens (t_{n-1}, d_1 .. d_a)
        self.cache.crop(n + a)
        self.hidden[0] = torch.cat([self.hidden[0], h[:, :a + 1]], dim=1)  # (1, n+a, d)
        for k in range(1, self.num_draft + 1):
            keep = min(self.mtp_caches[k - 1].seq_len, n + a - k)  # position i read t_{i+k}: decided iff i+k <= n-1+a
            self.mtp_caches[k - 1].crop(keep)
            self.hidden[k] = self.hidden[k][:, :keep]
        new = drafts[:a] + [greedy[a]]
        self.tokens += new
        return new


@dataclass
class SpeculativeGeneration(Generation):
    """A `Generation` of one sequence, plus what the speculation did: drafted and accepted draft tokens and
    the number of main-model forwards (plain greedy decoding needs one per token)."""
    drafted: int = 0
    accepted: int = 0
    main_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(1, self.drafted)


def speculative_generate(model: MTPModel, prompt: torch.Tensor, max_new_tokens: int, *,
                         stop_id: int | None = None, num_draft: int | None = None,
                         decoder_cls: type = SpeculativeDecoder) -> SpeculativeGeneration:
    """Greedy self-speculative decoding of one prompt (1, P): the same tokens as
    `generate(model, prompt, max_new_tokens, temperature=0.0, stop_id=stop_id)`, usually with fewer forwards.

    Batch size 1 only: rows of a batch would accept different numbers of drafts and fall out of step.
    Stops after `stop_id`, as `generate` does, and never feeds the model a position plain decoding would not.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    was_training = model.training
    model.eval()
    try:
        dec = decoder_cls(model, prompt, num_draft)
        out = [dec.tokens[-1]]
        finished = out[0] == stop_id
        while not finished and len(out) < max_new_tokens:
            for t in dec.step(max_draft=max_new_tokens - len(out) - 1):  # drafts beyond the budget would be wasted
                out.append(t)
                if t == stop_id:
                    finished = True
                    break
    finally:
        model.train(was_training)
    tokens = torch.tensor([out], dtype=torch.long, device=prompt.device)  # (1, L)
    return SpeculativeGeneration(tokens, torch.ones_like(tokens, dtype=torch.bool),
                                 torch.tensor([finished], device=prompt.device),
                                 drafted=dec.drafted, accepted=dec.accepted, main_forwards=dec.main_forwards)
