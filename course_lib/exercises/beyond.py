"""Exercises of notebooks 08 and 09: nano-DeepSeek's active parameters and cache, multi-token prediction's loss,
and the accept rules of speculative decoding.

Sources: DeepSeekMoE's active parameters and V3's dense first layers, DeepSeek-V3 (arXiv:2412.19437) §2.1.2 and
§4.2; MTP, the same paper §2.2 eqs 21-25 and §5.4.3 (acceptance of the second token); speculative sampling,
Leviathan et al. 2023 (arXiv:2211.17192) §2.3 and Algorithm 1, and Chen et al. 2023 (arXiv:2302.01318).

Letters: B batch, L tokens of a row, T = L - 1 positions, V vocabulary, D MTP depth, k one depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..memory import bytes_per_token, spec_of
from ..model import CourseModel
from ..presets import DEEPSEEK_V2_LITE, DEEPSEEK_V3, nano_deepseek_config
from ..profiles import get_profile
from .core import Experiment, Implement, Mistake, Predict
from .decoder import randn
from .running import Case


# ----------------------------------------------------------------------------- 08: what a token uses

def active_ffn_parameters(config: ModelConfig, layer_idx: int) -> int:
    """The FFN weights one token uses in layer `layer_idx`: a dense SwiGLU, or K routed + shared experts + router."""
    d = config.hidden_size
    if not config.is_moe_layer(layer_idx):  # dense FFN, e.g. DeepSeek's first layers (first_k_dense_replace)
        return 3 * d * config.intermediate_size
    per_expert = 3 * d * config.moe_intermediate_size  # gate, up, down
    used = (config.num_experts_per_tok + config.n_shared_experts) * per_expert  # K routed + the shared ones
    return used + config.n_routed_experts * d  # the router scores every expert


def _ffn_cases() -> list[Case]:
    nano = nano_deepseek_config(get_profile("cpu"))
    dense = ModelConfig(hidden_size=64, intermediate_size=176)
    return [Case("nano-DeepSeek (cpu), layer 1", (nano, 1)), Case("nano-DeepSeek (cpu), layer 0", (nano, 0)),
            Case("DeepSeek-V3, layer 10", (DEEPSEEK_V3, 10)), Case("DeepSeek-V3, layer 2", (DEEPSEEK_V3, 2)),
            Case("DeepSeek-V2-Lite, layer 5", (DEEPSEEK_V2_LITE, 5)), Case("a dense config, layer 1", (dense, 1))]


def _ffn_all_routed(config, layer_idx):
    if not config.is_moe_layer(layer_idx):
        return active_ffn_parameters(config, layer_idx)
    return active_ffn_parameters(config, layer_idx) + (config.n_routed_experts - config.num_experts_per_tok) * 3 * \
        config.hidden_size * config.moe_intermediate_size


ACTIVE_FFN = Implement(
    name="active_ffn_parameters", notebook="08",
    statement="Implement active_ffn_parameters(config, layer_idx): the FFN parameters one token uses in that layer: "
              "a dense SwiGLU before first_k_dense_replace, else its K routed experts, the shared ones and the router "
              "(DeepSeekMoE, arXiv:2401.06066, §3; DeepSeek-V3, arXiv:2412.19437, §4.2).",
    hint_text="config.is_moe_layer(layer_idx) says which; a SwiGLU of width I has 3 d I weights; the router is an "
              "(E, d) matrix. DeepSeek-V3: 8 routed + 1 shared experts of 2048, 256 x 7168 router.",
    reference=active_ffn_parameters, cases=_ffn_cases,
    mistakes=(
        Mistake("all routed experts counted", "A token runs only its num_experts_per_tok routed experts.", _ffn_all_routed),
        Mistake("the shared experts left out", "Shared experts run for every token.",
                lambda c, i: active_ffn_parameters(c, i) - (3 * c.hidden_size * c.moe_intermediate_size * c.n_shared_experts
                                                            if c.is_moe_layer(i) else 0)),
        Mistake("the router left out", "The router's (E, d) weights score every token.",
                lambda c, i: active_ffn_parameters(c, i) - (c.n_routed_experts * c.hidden_size if c.is_moe_layer(i) else 0)),
        Mistake("the dense first layers ignored", "Layers before first_k_dense_replace keep a dense FFN of width "
                "intermediate_size (config.is_moe_layer).",
                lambda c, i: active_ffn_parameters(c, max(i, c.first_k_dense_replace)) if c.ffn == "moe"
                else active_ffn_parameters(c, i))))


def _nano():
    return nano_deepseek_config(get_profile())


def _nano_cache_bytes() -> float:
    return bytes_per_token(spec_of("nano-deepseek", _nano()), "fp32")


NANO_CACHE = Predict(
    name="nano_kv_bytes", notebook="08",
    statement="Predict nano-DeepSeek's KV-cache bytes per token under your profile (presets.nano_deepseek_config"
              "(profile)), in fp32, before section 4 measures it from the live cache.",
    hint_text="MLA in every layer caches kv_lora_rank + qk_rope_head_dim numbers per token and layer, 4 bytes each.",
    value=_nano_cache_bytes, unit="bytes per token", how="(kv_lora_rank + qk_rope_head_dim) x layers x 4 bytes",
    mistakes=(Mistake("bf16 bytes", "The course's CPU models cache fp32: 4 bytes per number.", lambda right: right / 2),
              Mistake("the RoPE key counted per head", "k^R is shared by all heads.",
                      lambda right: right + (_nano().num_attention_heads - 1) * _nano().qk_rope_head_dim
                      * _nano().num_hidden_layers * 4)))


def _nano_active() -> int:
    return CourseModel(_nano()).num_parameters(active=True)


NANO_ACTIVE = Predict(
    name="nano_active_parameters", notebook="08",
    statement="Predict the parameters nano-DeepSeek uses per token under your profile, then compare with "
              "CourseModel(config).num_parameters(active=True).",
    hint_text="Embedding, lm_head and norms; MLA's projections in every layer; layer 0's dense FFN; in the others "
              "active_ffn_parameters (K routed + shared experts + router).",
    value=_nano_active, unit="parameters",
    how="total parameters minus the (E - K) unused routed experts of every MoE layer",
    mistakes=(Mistake("every parameter counted", "Only K of the E routed experts run for a token.",
                      lambda right: CourseModel(_nano()).num_parameters()),))


def _ablation(m) -> str | None:
    if m["kv_bytes_mha"] < 2 * m["kv_bytes_mla"]:
        return "the MHA variant's cache should be several times the MLA one's"
    if abs(m["accuracy_mha"] - m["accuracy_mla"]) > 0.2:
        return (f"accuracy moved by {abs(m['accuracy_mha'] - m['accuracy_mla']):.2f}: more than the attention variant "
                f"usually changes it at this scale")
    return None


ABLATION = Experiment(
    name="capstone_ablation", notebook="08",
    statement="Build nano-DeepSeek with MHA attention instead of MLA (nano_deepseek_config(profile, attention='mha')), "
              "pretrain both on the same seed, and compare cache bytes per token and held-out accuracy.",
    hint_text="recipes.pretrain_on_task trains a config; capstone.kv_bytes_per_token measures the cache.",
    expected="MLA caches several times fewer bytes per token (4x with the cpu profile) for held-out accuracy within "
             "the spread between seeds of the MHA variant's.",
    required=("kv_bytes_mla", "kv_bytes_mha", "accuracy_mla", "accuracy_mha"), judge=_ablation,
    example={"kv_bytes_mla": 768, "kv_bytes_mha": 3072, "accuracy_mla": 0.41, "accuracy_mha": 0.45},
    against={"kv_bytes_mla": 768, "kv_bytes_mha": 768, "accuracy_mla": 0.41, "accuracy_mha": 0.45})


# ----------------------------------------------------------------------------- 09: the MTP loss

def mtp_loss(main_logits: torch.Tensor, depth_logits: list[torch.Tensor], tokens: torch.Tensor, lam: float = 0.3):
    """L_main + (λ / D) Σ_k L^k (eq 25). main_logits (B, T, V) predict t_{i+1}; depth_logits[k-1] (B, T-k, V) at
    position i predicts t_{i+k+1}; tokens (B, L), T = L - 1."""
    V = main_logits.shape[-1]
    main = F.cross_entropy(main_logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
    mtp = [F.cross_entropy(logits.reshape(-1, V), tokens[:, k + 1:].reshape(-1))  # eq 24: k + 1 tokens ahead
           for k, logits in enumerate(depth_logits, start=1)]
    return main + lam / len(mtp) * sum(mtp)


def _mtp_with(shift=1, per_depth=True, mean_all=False):
    def loss(main_logits, depth_logits, tokens, lam=0.3):
        V, L = main_logits.shape[-1], tokens.shape[1]
        main = F.cross_entropy(main_logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        mtp = [F.cross_entropy(lg.reshape(-1, V), tokens[:, k + shift:L - 1 + shift].reshape(-1))
               for k, lg in enumerate(depth_logits, start=1)]
        if mean_all:
            return (main + sum(mtp)) / (len(mtp) + 1)
        return main + (lam / len(mtp) if per_depth else lam) * sum(mtp)
    return loss


def _mtp_cases() -> list[Case]:
    def case(seed, B, L, V, D, lam=0.3):
        T = L - 1
        tokens = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))
        return Case(f"B={B} L={L} V={V} D={D} λ={lam}", (randn(seed, B, T, V),
                                                         [randn(seed + k, B, T - k, V) for k in range(1, D + 1)], tokens, lam))
    return [case(500, 2, 8, 11, 1), case(510, 3, 10, 7, 2), case(520, 1, 9, 13, 3, 0.1)]


MTP_LOSS = Implement(
    name="mtp_loss", notebook="09",
    statement="Implement mtp_loss(main_logits, depth_logits, tokens, lam=0.3) = L_main + (λ / D) Σ_k L^k_MTP, where "
              "depth k at position i predicts token i + k + 1 (DeepSeek-V3, arXiv:2412.19437, §2.2 eqs 24-25).",
    hint_text="The main targets are tokens[:, 1:]; depth k's are tokens[:, k + 1:] (its logits are k positions "
              "shorter). Cross-entropy each, then weight the mean of the D depth losses by λ.",
    reference=mtp_loss, cases=_mtp_cases, atol=1e-5,
    mistakes=(
        Mistake("depth k's targets one token too early", "Depth k predicts k + 1 tokens ahead (t_{i+k+1}): targets "
                "tokens[:, k + 1:], not tokens[:, k:].", _mtp_with(shift=0)),
        Mistake("λ not divided by the depth D", "Eq 25 weights the SUM of the D losses by λ / D.",
                _mtp_with(per_depth=False)),
        Mistake("the main and MTP losses averaged together", "The main loss keeps weight 1; the MTP losses get "
                "λ / D each.", _mtp_with(mean_all=True))))


# ----------------------------------------------------------------------------- 09: accepting drafts

def speculative_accept(drafts: list[int], greedy: list[int]) -> list[int]:
    """The tokens decided by one greedy verification: the drafts up to the first one the main model disagrees
    with, then the main model's own token there (or after the last draft). greedy has len(drafts) + 1 entries."""
    a = 0
    while a < len(drafts) and drafts[a] == greedy[a]:
        a += 1
    return drafts[:a] + [greedy[a]]


def _accept_matches_anywhere(drafts, greedy):
    kept = [d for d, g in zip(drafts, greedy) if d == g]
    return kept + [greedy[len(kept)]]


def _accept_keep_draft(drafts, greedy):
    a = len(speculative_accept(drafts, greedy)) - 1
    return drafts[:a + 1] if a < len(drafts) else drafts + [greedy[-1]]


SPEC_ACCEPT = Implement(
    name="speculative_accept", notebook="09",
    statement="Implement speculative_accept(drafts, greedy) -> the new tokens: drafts accepted up to the first "
              "mismatch with the main model's greedy choices, plus the main model's token there (DeepSeek-V3, "
              "arXiv:2412.19437, §5.4.3; Leviathan et al., arXiv:2211.17192).",
    hint_text="greedy[j] is what the main model would emit at draft j's position; count how many drafts match from "
              "the start, keep those, and add greedy[a]: every verification yields at least one token.",
    reference=speculative_accept,
    cases=lambda: [Case("drafts [5, 7], greedy [5, 7, 9] (all accepted)", ([5, 7], [5, 7, 9])),
                   Case("drafts [5, 7], greedy [4, 7, 9] (first rejected)", ([5, 7], [4, 7, 9])),
                   Case("drafts [1, 2, 3], greedy [1, 8, 3, 4]", ([1, 2, 3], [1, 8, 3, 4])),
                   Case("drafts [], greedy [6] (no draft)", ([], [6]))],
    mistakes=(
        Mistake("drafts kept after the first mismatch", "Once a draft is rejected, every later draft was conditioned "
                "on a wrong token: stop at the first mismatch.", _accept_matches_anywhere),
        Mistake("the main model's token forgotten", "The verification forward also gives the main model's own next "
                "token: add greedy[a] after the accepted drafts.",
                lambda drafts, greedy: speculative_accept(drafts, greedy)[:-1]),
        Mistake("the rejected draft kept instead of the main model's token", "At the first mismatch the main model's "
                "token wins: greedy[a], not drafts[a].", _accept_keep_draft)))


def speculative_sample_accept(p: torch.Tensor, q: torch.Tensor, draft: int, u: float):
    """Speculative sampling's rule for one draft token drawn from q (V,): accept it when u < p[x] / q[x]; else
    return (False, the distribution to sample the replacement from: max(0, p - q), normalized)."""
    if u < min(1.0, (p[draft] / q[draft]).item()):
        return True, None
    residual = (p - q).clamp(min=0)  # (V,): where the target wants more than the draft gave
    return False, residual / residual.sum()


def _sample_with(ratio="p/q", residual="p-q", normalize=True):
    def rule(p, q, draft, u):
        r = p[draft] / q[draft] if ratio == "p/q" else q[draft] / p[draft]
        if u < min(1.0, r.item()):
            return True, None
        res = {"p-q": (p - q).clamp(min=0), "q-p": (q - p).clamp(min=0), "p": p}[residual]
        return False, res / res.sum() if normalize else res
    return rule


def _sample_cases() -> list[Case]:
    p = torch.tensor([0.1, 0.2, 0.4, 0.3])
    q = torch.tensor([0.4, 0.4, 0.1, 0.1])
    big_p, big_q = randn(530, 32).softmax(-1), randn(531, 32).softmax(-1)
    x = int((big_p / big_q).argmin())
    return [Case("p[x]=0.2, q[x]=0.4, u=0.7 (reject)", (p, q, 1, 0.7)),
            Case("p[x]=0.4, q[x]=0.1, u=0.95 (accept)", (p, q, 2, 0.95)),
            Case("p[x]=0.1, q[x]=0.4, u=0.2 (accept)", (p, q, 0, 0.2)),
            Case("V=32, the least likely draft, u=0.5", (big_p, big_q, x, 0.5))]


SPEC_SAMPLE = Implement(
    name="speculative_sample_accept", notebook="09",
    statement="Implement speculative_sample_accept(p, q, draft, u) -> (accepted, residual): accept the draft when "
              "u < p[x] / q[x], else return the distribution norm(max(0, p - q)) to resample from (Leviathan et al., "
              "arXiv:2211.17192, §2.3, Algorithm 1).",
    hint_text="p is the main model's distribution, q the drafter's; min(1, p[x]/q[x]) is the acceptance probability. "
              "On rejection, clamp p - q at 0 and divide by its sum: together they sample exactly from p.",
    reference=speculative_sample_accept, cases=_sample_cases, atol=1e-6,
    mistakes=(
        Mistake("the acceptance ratio inverted (q / p)", "Accept with probability min(1, p(x) / q(x)): target over "
                "draft.", _sample_with(ratio="q/p")),
        Mistake("the residual max(0, q - p)", "Resample where the TARGET wants more than the draft gave: "
                "max(0, p - q).", _sample_with(residual="q-p")),
        Mistake("the residual not normalized", "Divide max(0, p - q) by its sum so it is a distribution.",
                _sample_with(normalize=False)),
        Mistake("a rejected draft resampled from p", "Sampling from p after a rejection over-counts what the draft "
                "already proposed; the residual max(0, p - q) makes the output exactly distributed as p.",
                _sample_with(residual="p"))))


TOKENS_PER_FORWARD = Predict(
    name="tokens_per_forward", notebook="09",
    statement="Two MTP modules draft two tokens; each draft is accepted with probability 0.8 when the one before it "
              "was. Predict the expected tokens decided per main-model forward.",
    hint_text="The main model's own token always comes; the first draft with probability α, the second only if the "
              "first was accepted too (α²).",
    value=1 + 0.8 + 0.8 ** 2, rel_tol=1e-3, unit="tokens per forward", how="1 + 0.8 + 0.8^2 = 2.44",
    mistakes=(Mistake("the second draft counted independently", "The second draft counts only when the first was "
                      "accepted: α², not α.", 2.6),
              Mistake("the main model's token left out", "Every verification also yields the main model's own token.",
                      1.44)))


def _lambda_outcome(m) -> str | None:
    if m["acceptance_high_lambda"] < m["acceptance_low_lambda"] - 0.02:
        return "the draft was accepted less often with the larger λ"
    if m["main_loss_high_lambda"] > 1.15 * m["main_loss_low_lambda"]:
        return "the main model's loss rose by more than 15% with the larger λ"
    return None


LAMBDA_EXPERIMENT = Experiment(
    name="mtp_lambda", notebook="09",
    statement="Train the MTP model with λ = 0.1 and λ = 1.0 (mtp_loss_fn(lam)), then measure the main model's loss "
              "and the draft acceptance rate of self-speculative decoding for each.",
    hint_text="mtp.mtp_loss_fn(lam) is the training loss; speculative_generate(...).acceptance_rate the rate.",
    expected="a larger λ trains the MTP module harder: its drafts are accepted as often or more, while the main "
             "model's own loss changes little.",
    required=("acceptance_low_lambda", "acceptance_high_lambda", "main_loss_low_lambda", "main_loss_high_lambda"),
    judge=_lambda_outcome,
    example={"acceptance_low_lambda": 0.78, "acceptance_high_lambda": 0.86, "main_loss_low_lambda": 0.31,
             "main_loss_high_lambda": 0.32},
    against={"acceptance_low_lambda": 0.86, "acceptance_high_lambda": 0.6, "main_loss_low_lambda": 0.31,
             "main_loss_high_lambda": 0.32})


EXERCISES = [ACTIVE_FFN, NANO_CACHE, NANO_ACTIVE, ABLATION, MTP_LOSS, SPEC_ACCEPT, SPEC_SAMPLE, TOKENS_PER_FORWARD,
             LAMBDA_EXPERIMENT]
