"""Exercises of notebooks 02 and 03: sharing K/V heads (GQA, MQA) and multi-head latent attention (MLA).

Sources: GQA, Ainslie et al. 2023 (arXiv:2305.13245) §2; MQA, Shazeer 2019 (arXiv:1911.02150); MLA and its
cache, DeepSeek-V2 (arXiv:2405.04434) §2.1.2-2.1.3 eqs 9-19 and Table 1; DeepSeek-V3's sizes (arXiv:2412.19437)
§4.2. The references are written to be read (`ex.show_solution()` prints them).

Letters: B batch, H query heads, Hkv K/V heads, T new tokens, S keys, D per-head width (MLA: without RoPE),
Dr decoupled RoPE width, C latent rank (kv_lora_rank).
"""

from __future__ import annotations

import math

import torch

from ..memory import CacheSpec, bytes_per_token, equivalent_gqa_groups
from ..presets import DEEPSEEK_V3
from .core import Experiment, Implement, Mistake, Predict
from .decoder import randn
from .running import Case


# ----------------------------------------------------------------------------- 02: repeat_kv

def repeat_kv(k: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D): query head h reads K/V head h // n_rep."""
    B, Hkv, S, D = k.shape
    return k[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)  # each K/V head n_rep times in a row


def _repeat_cases() -> list[Case]:
    return [Case("k (1, 2, 3, 4), n_rep=2", (randn(100, 1, 2, 3, 4), 2)),
            Case("k (2, 4, 5, 8), n_rep=3", (randn(101, 2, 4, 5, 8), 3)),
            Case("k (2, 1, 6, 4), n_rep=8 (MQA)", (randn(102, 2, 1, 6, 4), 8)),
            Case("k (1, 4, 2, 8), n_rep=1 (MHA)", (randn(103, 1, 4, 2, 8), 1))]


REPEAT_KV = Implement(
    name="repeat_kv", notebook="02",
    statement="Implement repeat_kv(k, n_rep): K or V (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D) so that query head h "
              "reads K/V head h // n_rep, grouped-query attention's sharing (Ainslie et al., arXiv:2305.13245, §2).",
    hint_text="Insert a group axis after the heads (k[:, :, None]), expand it to n_rep, and merge it with the heads "
              "axis: heads 0..n_rep-1 are copies of K/V head 0. einops: repeat(k, 'b h s d -> b (h g) s d', g=n_rep).",
    reference=repeat_kv, cases=_repeat_cases,
    mistakes=(
        Mistake("K/V heads tiled instead of repeated in place (k.repeat(1, n_rep, 1, 1))", "Then query head h reads "
                "K/V head h % Hkv, not h // n_rep: neighbouring query heads must share a K/V head.",
                lambda k, n_rep: k.repeat(1, n_rep, 1, 1)),
        Mistake("copies along the sequence axis", "Repeat the heads axis (dim 1), not the positions (dim 2).",
                lambda k, n_rep: k.repeat_interleave(n_rep, dim=2)),
        Mistake("n_rep ignored", "The output needs Hkv * n_rep heads, one per query head.", lambda k, n_rep: k)))


LLAMA3_BYTES = Predict(
    name="kv_bytes_gqa_llama3_8b", notebook="02",
    statement="Predict the KV-cache bytes per token of a Llama-3-8B-shaped model: 32 layers, 32 query heads sharing "
              "8 K/V heads of 128 (GQA), bf16.",
    hint_text="Only K/V heads are cached: 2 x layers x K/V heads x head width x bytes. The query heads do not count.",
    value=bytes_per_token(CacheSpec("llama-3-8b", "gqa", 32, 32, 8, 128), "bf16"), unit="bytes per token",
    how="2 x 32 layers x 8 K/V heads x 128 x 2 bytes = 128 KiB, a quarter of MHA's",
    mistakes=(Mistake("every query head counted", "GQA caches the 8 shared K/V heads, not the 32 query heads.",
                      lambda right: right * 4),
              Mistake("keys only", "Values are cached too: a factor 2.", lambda right: right / 2)))


def _gqa_outcome(m) -> str | None:
    b = [m[k]["cache_bytes"] for k in ("mha", "gqa", "mqa")]
    if not b[0] > b[1] > b[2]:
        return f"cache bytes per token MHA {b[0]}, GQA {b[1]}, MQA {b[2]}: they should shrink in that order"
    if m["mqa"]["accuracy"] < m["mha"]["accuracy"] - 0.15:
        return (f"MQA lost {m['mha']['accuracy'] - m['mqa']['accuracy']:.2f} of held-out accuracy against MHA, more "
                f"than the few points sharing heads usually costs")
    return None


GQA_EXPERIMENT = Experiment(
    name="gqa_cache_vs_quality", notebook="02",
    statement="Train the baseline with 4, 2 and 1 K/V heads (config.replace(num_key_value_heads=...)) on the same "
              "seed, and measure each one's cache bytes per token and held-out accuracy.",
    hint_text="course_lib.recipes.pretrain_on_task trains a config; cache.nbytes / cache.seq_len after a prefill "
              "gives bytes per token; rollout.evaluate gives accuracy.",
    expected="the cache shrinks by H / Hkv (half with 2 K/V heads, a quarter with 1) while held-out accuracy "
             "moves by a few points at most, within the spread between seeds.",
    required=("mha", "gqa", "mqa"), judge=_gqa_outcome,
    example={"mha": {"cache_bytes": 3072, "accuracy": 0.57}, "gqa": {"cache_bytes": 1536, "accuracy": 0.55},
             "mqa": {"cache_bytes": 768, "accuracy": 0.52}},
    against={"mha": {"cache_bytes": 3072, "accuracy": 0.57}, "gqa": {"cache_bytes": 1536, "accuracy": 0.4},
             "mqa": {"cache_bytes": 768, "accuracy": 0.3}})


# ----------------------------------------------------------------------------- 03: the cache formula

def cache_elements(attention: str, n_h: int, n_g: int, d_h: int, layers: int, d_c: int = 0, d_hR: int = 0) -> int:
    """Cached elements per token over all layers, DeepSeek-V2 Table 1 (n_g: K/V heads; d_c, d_hR: MLA only)."""
    per_layer = {"mha": 2 * n_h * d_h,  # a key and a value per head
                 "gqa": 2 * n_g * d_h,  # per K/V head, shared by n_h / n_g query heads
                 "mqa": 2 * d_h,  # one K/V head for all
                 "mla": d_c + d_hR}[attention]  # the latent c^KV and ONE rope key k^R shared by all heads
    return per_layer * layers


_SPECS = [("mha", 32, 32, 128, 32, 0, 0), ("gqa", 32, 8, 128, 32, 0, 0), ("mqa", 16, 1, 64, 4, 0, 0),
          ("mla", 128, 128, 128, 61, 512, 64), ("mla", 4, 4, 16, 3, 16, 16)]


CACHE_ELEMENTS = Implement(
    name="cache_elements", notebook="03",
    statement="Implement cache_elements(attention, n_h, n_g, d_h, layers, d_c=0, d_hR=0): the cached elements per "
              "token for 'mha', 'gqa', 'mqa' and 'mla' (DeepSeek-V2, arXiv:2405.04434, Table 1).",
    hint_text="MHA 2 n_h d_h l; GQA 2 n_g d_h l; MQA 2 d_h l; MLA (d_c + d_h^R) l: the latent plus one RoPE key "
              "that every head shares.",
    reference=cache_elements,
    cases=lambda: [Case(f"{a.upper()} n_h={h} n_g={g} d_h={d} l={l}" + (f" d_c={c} d_hR={r}" if c else ""),
                        (a, h, g, d, l, c, r)) for a, h, g, d, l, c, r in _SPECS],
    mistakes=(
        Mistake("GQA counted with the query heads n_h", "GQA caches its n_g K/V heads only: 2 n_g d_h per layer.",
                lambda a, h, g, d, l, c=0, r=0: cache_elements("mha" if a == "gqa" else a, h, g, d, l, c, r)),
        Mistake("keys only (no factor 2)", "MHA, GQA and MQA cache a value beside every key.",
                lambda a, h, g, d, l, c=0, r=0: cache_elements(a, h, g, d, l, c, r) // (1 if a == "mla" else 2)),
        Mistake("MLA's RoPE key counted per head (d_c + n_h d_h^R)", "The decoupled key k^R_t is shared by all heads "
                "(eq 15): one d_h^R per token and layer.",
                lambda a, h, g, d, l, c=0, r=0: (c + h * r) * l if a == "mla" else cache_elements(a, h, g, d, l, c, r)),
        Mistake("one layer only", "Every layer keeps its own cache: times l.",
                lambda a, h, g, d, l, c=0, r=0: cache_elements(a, h, g, d, 1, c, r))))


V3_BYTES = Predict(
    name="kv_bytes_mla_v3", notebook="03",
    statement="Predict DeepSeek-V3's MLA cache bytes per token in bf16: 61 layers, d_c = 512, d_h^R = 64 "
              "(DeepSeek-V3, arXiv:2412.19437, §4.2; DeepSeek-V2 Table 1).",
    hint_text="Per layer MLA caches d_c + d_h^R elements, whatever the number of heads.",
    value=(DEEPSEEK_V3.kv_lora_rank + DEEPSEEK_V3.qk_rope_head_dim) * DEEPSEEK_V3.num_hidden_layers * 2,
    unit="bytes per token", how="(512 + 64) x 61 layers x 2 bytes = 70,272 bytes (MHA with 128 heads of 128: 4 MiB)",
    mistakes=(Mistake("the RoPE key counted per head", "k^R is one key shared by all 128 heads.",
                      (512 + 128 * 64) * 61 * 2),
              Mistake("the RoPE key left out", "The cache holds c^KV AND the decoupled key k^R.", 512 * 61 * 2),
              Mistake("one layer", "Times 61 layers.", (512 + 64) * 2)))


EQUIVALENT_GROUPS = Predict(
    name="mla_equivalent_gqa_groups", notebook="03",
    statement="With d_c = 4 d_h and d_h^R = d_h / 2, MLA caches as much as GQA with how many groups n_g? "
              "(DeepSeek-V2, arXiv:2405.04434, Table 1 caption).",
    hint_text="Set MLA's (d_c + d_h^R) equal to GQA's 2 n_g d_h and solve for n_g.",
    value=equivalent_gqa_groups(CacheSpec("v2-like", "mla", 1, 8, 8, 128, kv_lora_rank=512, qk_rope_head_dim=64)),
    rel_tol=1e-3, unit="groups", how="(4 d_h + d_h / 2) / (2 d_h) = 4.5 / 2 = 2.25",
    mistakes=(Mistake("GQA's factor 2 forgotten", "GQA caches a key AND a value per group: 2 n_g d_h.", 4.5),))


# ----------------------------------------------------------------------------- 03: MLA's split and absorbed scores

def mla_split(q: torch.Tensor, kv: torch.Tensor, num_heads: int, nope_dim: int, rope_dim: int):
    """Split MLA's projections (eqs 9, 12-15) into (q_nope (B, H, T, D), q_rope (B, H, T, Dr), c_kv (B, T, C),
    k_rope (B, T, Dr)).

    q (B, T, H * (D + Dr)) holds [q^C_h; q^R_h] head after head (q_proj / q_b_proj); kv (B, T, C + Dr) holds
    [c^KV; k^R] (kv_a_proj_with_mqa).
    """
    B, T, _ = q.shape
    q = q.view(B, T, num_heads, nope_dim + rope_dim).transpose(1, 2)  # (B, H, T, D + Dr): heads first
    q_nope, q_rope = q.split([nope_dim, rope_dim], dim=-1)  # (B, H, T, D), (B, H, T, Dr)
    c_kv, k_rope = kv.split([kv.shape[-1] - rope_dim, rope_dim], dim=-1)  # (B, T, C), (B, T, Dr)
    return q_nope, q_rope, c_kv, k_rope


def _split_rope_first(q, kv, num_heads, nope_dim, rope_dim):
    B, T, _ = q.shape
    qh = q.view(B, T, num_heads, nope_dim + rope_dim).transpose(1, 2)
    q_rope, q_nope = qh.split([rope_dim, nope_dim], dim=-1)
    return (q_nope, q_rope, *mla_split(q, kv, num_heads, nope_dim, rope_dim)[2:])


def _split_before_heads(q, kv, num_heads, nope_dim, rope_dim):
    B, T, _ = q.shape
    q_nope, q_rope = q.split([num_heads * nope_dim, num_heads * rope_dim], dim=-1)
    return (q_nope.view(B, T, num_heads, nope_dim).transpose(1, 2), q_rope.view(B, T, num_heads, rope_dim).transpose(1, 2),
            *mla_split(q, kv, num_heads, nope_dim, rope_dim)[2:])


def _split_k_rope_first(q, kv, num_heads, nope_dim, rope_dim):
    k_rope, c_kv = kv.split([rope_dim, kv.shape[-1] - rope_dim], dim=-1)
    return (*mla_split(q, kv, num_heads, nope_dim, rope_dim)[:2], c_kv, k_rope)


def _split_cases() -> list[Case]:
    def case(seed, B, T, H, D, Dr, C):
        return Case(f"B={B} T={T} H={H} D={D} Dr={Dr} C={C}",
                    (randn(seed, B, T, H * (D + Dr)), randn(seed + 1, B, T, C + Dr), H, D, Dr))
    return [case(110, 1, 3, 2, 4, 2, 6), case(120, 2, 5, 4, 16, 8, 32), case(130, 1, 1, 8, 8, 4, 4)]


MLA_SPLIT = Implement(
    name="mla_split", notebook="03",
    statement="Implement mla_split(q, kv, num_heads, nope_dim, rope_dim) -> (q_nope, q_rope, c_kv, k_rope): "
              "MLA's decoupled-RoPE split of the query (per head [q^C; q^R]) and of the compressed KV ([c^KV; k^R]) "
              "(DeepSeek-V2, arXiv:2405.04434, §2.1.3 eqs 14-17).",
    hint_text="Split the heads first: view q as (B, T, H, D + Dr) and move H before T, then split the last axis "
              "[D, Dr]. kv is [c^KV; k^R]: the latent comes first, the shared RoPE key last.",
    reference=mla_split, cases=_split_cases,
    mistakes=(
        Mistake("each head's RoPE part taken first", "Each head's query is [q^C_h; q^R_h]: the content part first, "
                "then the RoPE part (transformers' DeepseekV3Attention splits [qk_nope_head_dim, qk_rope_head_dim]).",
                _split_rope_first),
        Mistake("the query split before the heads", "Split the heads first: q.split([H*D, H*Dr]) would give each head "
                "other heads' channels. View as (B, T, H, D + Dr), then split per head.", _split_before_heads),
        Mistake("k^R taken from the front of kv", "kv_a_proj_with_mqa outputs [c^KV; k^R]: the RoPE key is the last "
                "Dr channels.", _split_k_rope_first)))


def mla_absorbed_scores(q_nope, q_rope, c_kv, k_rope, w_uk):
    """Scaled attention scores (B, H, T, S) of absorbed MLA: (q^C W^UK) c^KV + q^R k^R, over sqrt(D + Dr).

    q_nope (B, H, T, D), q_rope (B, H, T, Dr), c_kv (B, S, C), k_rope (B, S, Dr), w_uk (H, D, C) (eq 10's W^UK).
    """
    q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, C): W^UK absorbed into the query
    scores = torch.einsum("bhtc,bsc->bhts", q_latent, c_kv)  # (B, H, T, S): content part, keys never expanded
    scores = scores + torch.einsum("bhtr,bsr->bhts", q_rope, k_rope)  # (B, H, T, S): RoPE part, one shared key
    return scores / math.sqrt(q_nope.shape[-1] + q_rope.shape[-1])  # eq 18: 1/sqrt(D + Dr)


def _absorbed_with(rope=True, scale="both"):
    def scores_fn(q_nope, q_rope, c_kv, k_rope, w_uk):
        s = torch.einsum("bhtd,hdc,bsc->bhts", q_nope, w_uk, c_kv)
        if rope:
            s = s + torch.einsum("bhtr,bsr->bhts", q_rope, k_rope)
        width = {"both": q_nope.shape[-1] + q_rope.shape[-1], "nope": q_nope.shape[-1], "latent": c_kv.shape[-1]}[scale]
        return s / math.sqrt(width)
    return scores_fn


def _absorbed_cases() -> list[Case]:
    def case(seed, B, H, T, S, D, Dr, C):
        return Case(f"B={B} H={H} T={T} S={S} D={D} Dr={Dr} C={C}",
                    (randn(seed, B, H, T, D), randn(seed + 1, B, H, T, Dr), randn(seed + 2, B, S, C),
                     randn(seed + 3, B, S, Dr), randn(seed + 4, H, D, C, scale=C ** -0.5)))
    return [case(140, 1, 2, 3, 5, 4, 2, 8), case(150, 2, 4, 1, 9, 16, 8, 32), case(160, 1, 1, 2, 2, 8, 8, 4)]


MLA_ABSORBED = Implement(
    name="mla_absorbed_scores", notebook="03",
    statement="Implement mla_absorbed_scores(q_nope, q_rope, c_kv, k_rope, w_uk): scores (B, H, T, S) with W^UK "
              "absorbed into the query, plus the decoupled RoPE term, over sqrt(D + Dr) (DeepSeek-V2, "
              "arXiv:2405.04434, §2.1.2-2.1.3 eqs 10, 16-18).",
    hint_text="q^T k^C = q^T (W^UK c) = (W^UK^T q)^T c: einsum q_nope with w_uk over D to get a (B, H, T, C) latent "
              "query, score it against c_kv, add q_rope . k_rope, and divide by sqrt(D + Dr).",
    reference=mla_absorbed_scores, cases=_absorbed_cases, atol=1e-4,
    mistakes=(
        Mistake("the RoPE term left out", "Eq 16-17 concatenate [q^C; q^R] and [k^C; k^R]: add q^R . k^R to the "
                "content scores.", _absorbed_with(rope=False)),
        Mistake("scaled by 1/sqrt(D), the content width only", "Eq 18 divides by sqrt(D + Dr), the full query/key "
                "width with the RoPE part.", _absorbed_with(scale="nope")),
        Mistake("scaled by 1/sqrt(C), the latent width", "The latent is not the key width: divide by sqrt(D + Dr).",
                _absorbed_with(scale="latent"))))


def _rank_outcome(m) -> str | None:
    ranks, cache, acc = list(m["ranks"]), list(m["cache_bytes"]), list(m["accuracy"])
    if not len(ranks) == len(cache) == len(acc) >= 2:
        return "give at least two ranks, with one cache size and one accuracy for each"
    order = sorted(range(len(ranks)), key=ranks.__getitem__)
    per_rank = [(cache[j] - cache[i]) / (ranks[j] - ranks[i]) for i, j in zip(order, order[1:])]
    if min(per_rank) <= 0 or max(per_rank) > 1.01 * min(per_rank):
        return "cache bytes per token should grow by the same amount for every extra latent dimension"
    if acc[order[-1]] < acc[order[0]] - 0.05:
        return (f"accuracy fell from {acc[order[0]]:.2f} at rank {ranks[order[0]]} to {acc[order[-1]]:.2f} at rank "
                f"{ranks[order[-1]]}: a larger latent should not do clearly worse")
    return None


LATENT_RANK = Experiment(
    name="latent_rank", notebook="03",
    statement="Train notebook 03's MLA model with kv_lora_rank at a quarter, half and twice its value "
              "(config.replace(kv_lora_rank=...)); measure cache bytes per token and held-out accuracy.",
    hint_text="presets.mla_config(profile) is the model; pretrain_on_task trains it; cache.nbytes / cache.seq_len "
              "after a prefill gives bytes per token.",
    expected="cache bytes per token grow linearly with d_c (d_c + d_h^R per layer); held-out accuracy rises with "
             "the rank while the latent is too small to hold what the heads need, then flattens.",
    required=("ranks", "cache_bytes", "accuracy"), judge=_rank_outcome,
    example={"ranks": [4, 8, 16, 32], "cache_bytes": [240, 288, 384, 576], "accuracy": [0.31, 0.44, 0.52, 0.55]},
    against={"ranks": [4, 8, 16], "cache_bytes": [240, 288, 480], "accuracy": [0.31, 0.44, 0.52]})


EXERCISES = [REPEAT_KV, LLAMA3_BYTES, GQA_EXPERIMENT, CACHE_ELEMENTS, V3_BYTES, EQUIVALENT_GROUPS, MLA_SPLIT,
             MLA_ABSORBED, LATENT_RANK]
