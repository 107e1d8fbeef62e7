"""KV-cache arithmetic: how many elements and bytes a model keeps per generated token.

Pure arithmetic on a few config numbers (no tensors), so that a notebook or a widget can show why MLA
matters before any tensor exists; DeepSeek's own sizes come from `course_lib.presets`. The formulas are [V2] Table 1 (DeepSeek-V2, §2.1.4):

    MHA   2 n_h d_h l          every query head has its own key and value
    GQA   2 n_g d_h l          n_g key/value heads, each shared by n_h / n_g query heads
    MQA   2 d_h l              one key/value head for all query heads
    MLA   (d_c + d_h^R) l      the latent c_t^KV (d_c) plus one shared RoPE key k_t^R (d_h^R)

Letters: n_h query heads, n_g key/value heads, d_h per-head width, l layers, d_c = kv_lora_rank,
d_h^R = qk_rope_head_dim. "Elements" ignore storage precision, as the paper's table does; bytes
multiply by an element size that may be fractional (6-bit KV quantization is 0.75 bytes/element).

Counted here is what the *absorbed* MLA path caches ([V2] §2.1.2: W^UK folds into W^Q and W^UV into
W^O). The naive path in DeepSeek-V3's `inference/model.py` caches expanded per-head keys and values
instead (n_h (d_h + d_h^R) + n_h d_h = 40,960 elements per layer for V3), i.e. more than MHA.

Sources: [V2] DeepSeek-V2, arXiv:2405.04434; [V3] DeepSeek-V3, arXiv:2412.19437; [LLM] DeepSeek LLM,
arXiv:2401.02954; [code] github.com/deepseek-ai/DeepSeek-V3 `inference/configs/*.json`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .config import ModelConfig, check_kv_heads
from .presets import DEEPSEEK_V2, DEEPSEEK_V2_LITE, DEEPSEEK_V3

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")

# Bytes per stored element. "6bit" is the average the V2 paper reports for its quantized KV cache
# ([V2] §3.2.3: "compress each element in its KV cache into 6 bits on average").
ELEMENT_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "6bit": 0.75,
    "int4": 0.5,
    "4bit": 0.5,
}

ElemBytes = float | int | str  # an element size in bytes, or a name from ELEMENT_BYTES


def _fail(what: str, fix: str) -> None:
    raise ValueError(f"{what}. {fix}")


@dataclass(frozen=True)
class CacheSpec:
    """The few numbers of a model's attention that decide its KV-cache size ([V2] Table 1)."""

    name: str                   # a short label, e.g. "deepseek-v2"
    attention: str              # one of ATTENTION_KINDS; decides which Table 1 row applies
    num_hidden_layers: int      # l: every layer keeps its own cache
    num_attention_heads: int    # n_h: query heads (MHA caches one K and one V per query head)
    num_key_value_heads: int    # n_g: K/V heads; = n_h for MHA, 1 for MQA; not used by MLA's cache
    head_dim: int               # d_h: per-head width (MLA: qk_nope_head_dim = v_head_dim)
    kv_lora_rank: int = 0       # d_c: MLA's cached latent width; 0 for non-MLA
    qk_rope_head_dim: int = 0   # d_h^R: MLA's cached shared RoPE key width; 0 for non-MLA
    source: str = ""            # where the numbers come from (paper section / config.json)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            _fail(f"attention={self.attention!r} is not known", f"Use one of {ATTENTION_KINDS}.")
        for field in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(f"{field}={value!r} must be a positive integer", f"Pass {field}=<a positive integer>.")
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if self.attention == "mla":
            if self.kv_lora_rank <= 0:
                _fail(f"kv_lora_rank={self.kv_lora_rank} must be positive for MLA",
                      "It is the width of the cached latent c_t^KV (DeepSeek-V2/V3 use 512).")
            if self.qk_rope_head_dim < 0:
                _fail(f"qk_rope_head_dim={self.qk_rope_head_dim} is negative",
                      "It is the width of the shared RoPE key k_t^R (DeepSeek-V2/V3 use 64); 0 means none.")
            return
        # Outside MLA these fields would be silently ignored, which hides a wrong `attention` value.
        if self.kv_lora_rank or self.qk_rope_head_dim:
            _fail(f"kv_lora_rank={self.kv_lora_rank} and qk_rope_head_dim={self.qk_rope_head_dim} only apply "
                  f"to MLA, but attention={self.attention!r}",
                  "Set attention='mla', or leave both at 0.")
        check_kv_heads(self.attention, h, kv)


def spec_of(name: str, config: ModelConfig, source: str = "") -> CacheSpec:
    """The cache-deciding numbers of a `ModelConfig` (MLA: d_h = qk_nope_head_dim, n_g unused)."""
    if config.attention == "mla":
        return CacheSpec(name, "mla", config.num_hidden_layers, config.num_attention_heads,
                         config.num_attention_heads, config.qk_nope_head_dim, kv_lora_rank=config.kv_lora_rank,
                         qk_rope_head_dim=config.qk_rope_head_dim, source=source)
    return CacheSpec(name, config.attention, config.num_hidden_layers, config.num_attention_heads, config.kv_heads,
                     config.resolved_head_dim, source=source)


def element_bytes(elem_bytes: ElemBytes) -> float:
    """Bytes per element from a number (0.75 for 6 bits) or a name in ELEMENT_BYTES."""
    if isinstance(elem_bytes, str):
        if elem_bytes not in ELEMENT_BYTES:
            _fail(f"element size {elem_bytes!r} is not known", f"Use one of {sorted(ELEMENT_BYTES)} or a number of bytes.")
        return ELEMENT_BYTES[elem_bytes]
    if isinstance(elem_bytes, bool) or not isinstance(elem_bytes, (int, float)) or not elem_bytes > 0:
        _fail(f"element size {elem_bytes!r} must be a positive number of bytes",
              "E.g. 2 for bf16, 0.75 for 6-bit, or a name such as 'bf16'.")
    return float(elem_bytes)


def elements_per_token_per_layer(spec: CacheSpec) -> int:
    """Cached elements for one token in one layer: [V2] Table 1 without the factor l."""
    if spec.attention == "mla":
        return spec.kv_lora_rank + spec.qk_rope_head_dim  # c_t^KV and the shared k_t^R
    return 2 * spec.num_key_value_heads * spec.head_dim  # a key and a value per K/V head (n_g = n_h for MHA, 1 for MQA)


def elements_per_token(spec: CacheSpec) -> int:
    """Cached elements for one token across all layers ([V2] Table 1)."""
    return elements_per_token_per_layer(spec) * spec.num_hidden_layers


def bytes_per_token(spec: CacheSpec, elem_bytes: ElemBytes = "bf16") -> float:
    """Cache bytes for one token across all layers; fractional when elements are under a byte."""
    return elements_per_token(spec) * element_bytes(elem_bytes)


def cache_bytes(spec: CacheSpec, num_tokens: int, batch_size: int = 1, elem_bytes: ElemBytes = "bf16") -> float:
    """Total cache bytes for `batch_size` sequences of `num_tokens` tokens (prompt + generated)."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        _fail(f"num_tokens={num_tokens!r} must be a non-negative integer", "Pass the context length in tokens.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        _fail(f"batch_size={batch_size!r} must be a positive integer", "Pass how many sequences are cached at once.")
    # Every token of every sequence keeps its own entry: linear in both, nothing shared across the batch.
    return bytes_per_token(spec, elem_bytes) * num_tokens * batch_size


def equivalent_gqa_groups(spec: CacheSpec) -> float:
    """The n_g at which GQA with this spec's d_h caches as much as `spec` does.

    [V2] Table 1 caption: with d_c = 4 d_h and d_h^R = d_h / 2, MLA's (d_c + d_h^R) = 9/2 d_h equals
    GQA's 2 n_g d_h at n_g = 2.25. For MHA/GQA/MQA this is simply the number of K/V heads.
    """
    return elements_per_token_per_layer(spec) / (2 * spec.head_dim)


def mha_counterpart(spec: CacheSpec) -> CacheSpec:
    """The same model with plain MHA (one K and V per query head), for "MLA vs MHA" comparisons ([V2] App. D.2)."""
    return CacheSpec(
        name=f"{spec.name} (MHA)",
        attention="mha",
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        head_dim=spec.head_dim,
        source=f"derived from {spec.name}: n_h, d_h and l kept, K/V per query head",
    )


def kv_cache_reduction(base: CacheSpec, new: CacheSpec,
                       elem_bytes_base: ElemBytes = "bf16", elem_bytes_new: ElemBytes = "bf16") -> float:
    """Fraction of `base`'s per-token cache bytes that `new` saves: 1 - bytes(new) / bytes(base).

    With equal element sizes this is the element-count ratio. The [V2] abstract's "reduces the KV
    cache by 93.3%" (vs DeepSeek 67B) needs V2's 6-bit cache ([V2] §3.2.3) against a 16-bit 67B;
    counting elements alone gives about 82.2% (95 layers x 2 x 8 x 128 against 60 x 576).
    """
    return 1.0 - bytes_per_token(new, elem_bytes_new) / bytes_per_token(base, elem_bytes_base)


def table1(spec: CacheSpec, num_groups: int = 8) -> list[dict]:
    """[V2] Table 1 evaluated at `spec`'s sizes: one row per attention kind, elements per token.

    `spec` must be MLA (it supplies d_c and d_h^R); MHA/GQA/MQA rows reuse its n_h, d_h and l.
    """
    if spec.attention != "mla":
        _fail(f"table1 needs an MLA spec, got attention={spec.attention!r}",
              "Pass e.g. PRESETS['deepseek-v2'], which supplies d_c and d_h^R for the MLA row.")
    h, d, l = spec.num_attention_heads, spec.head_dim, spec.num_hidden_layers
    rows = [
        ("MHA", "2 n_h d_h l", 2 * h * d * l),
        (f"GQA (n_g={num_groups})", "2 n_g d_h l", 2 * num_groups * d * l),
        ("MQA", "2 d_h l", 2 * d * l),
        ("MLA", "(d_c + d_h^R) l", elements_per_token(spec)),
    ]
    return [{"attention": kind, "formula": formula, "elements_per_token": n,
             "equivalent_gqa_groups": n / (2 * d * l)} for kind, formula, n in rows]


def compare(specs: Iterable[CacheSpec] | None = None, num_tokens: int = 128 * 1024, batch_size: int = 1,
            elem_bytes: ElemBytes | Mapping[str, ElemBytes] = "bf16", baseline: str | None = None) -> list[dict]:
    """A table (one dict per model) of cache sizes at one context length and batch size.

    `elem_bytes` is one size for all, or a mapping from spec name to size (missing names use bf16), so
    the [V2] headline setting, 67B in bf16 vs V2 in 6 bits, is one call. `reduction_vs_baseline` is
    `kv_cache_reduction(baseline, row)` in bytes; None when no baseline is given.
    """
    specs = list(PRESETS.values()) if specs is None else list(specs)
    by_name = {s.name: s for s in specs}
    if baseline is not None and baseline not in by_name:
        _fail(f"baseline={baseline!r} is not among the compared specs", f"Use one of {sorted(by_name)}.")

    def size(spec: CacheSpec) -> ElemBytes:
        return elem_bytes.get(spec.name, "bf16") if isinstance(elem_bytes, Mapping) else elem_bytes

    rows = []
    for spec in specs:
        total = cache_bytes(spec, num_tokens, batch_size, size(spec))
        rows.append({
            "name": spec.name,
            "attention": spec.attention,
            "layers": spec.num_hidden_layers,
            "elements_per_token_per_layer": elements_per_token_per_layer(spec),
            "elements_per_token": elements_per_token(spec),
            "equivalent_gqa_groups": equivalent_gqa_groups(spec),
            "element_bytes": element_bytes(size(spec)),
            "kib_per_token": bytes_per_token(spec, size(spec)) / 1024,
            "cache_gib": total / 1024**3,
            "reduction_vs_baseline": None if baseline is None else kv_cache_reduction(
                by_name[baseline], spec, size(by_name[baseline]), size(spec)),
            "source": spec.source,
        })
    return rows


# --- Presets. Numbers as in each model's paper / released config.json; only what the cache needs.
PRESETS: dict[str, CacheSpec] = {s.name: s for s in (
    CacheSpec("deepseek-llm-67b", "gqa", num_hidden_layers=95, num_attention_heads=64, num_key_value_heads=8,
              head_dim=128,  # d_model 8192 / 64 heads
              source="[LLM] arXiv 2401.02954 Table 2; deepseek-ai/deepseek-llm-67b-base config.json"),
    spec_of("deepseek-v2", DEEPSEEK_V2, "[V2] §3.1.2; [code] configs/config_236B.json"),
    spec_of("deepseek-v2-lite", DEEPSEEK_V2_LITE, "[V2] App. B.1; [code] configs/config_16B.json"),
    # 61 main layers; the MTP module ([V3] §2.2) is extra and may be dropped at inference.
    spec_of("deepseek-v3", DEEPSEEK_V3, "[V3] §4.2; [code] configs/config_671B.json"),
    CacheSpec("llama-3-8b", "gqa", num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
              head_dim=128,  # hidden_size 4096 / 32 heads
              source="meta-llama/Meta-Llama-3-8B config.json"),
    CacheSpec("llama-3-70b", "gqa", num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
              head_dim=128,  # hidden_size 8192 / 64 heads
              source="meta-llama/Meta-Llama-3-70B config.json"),
    CacheSpec("mistral-7b", "gqa", num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
              head_dim=128,  # hidden_size 4096 / 32 heads
              source="mistralai/Mistral-7B-v0.1 config.json"),
)}


# --- The cache-size explorer: one model, four caches, one GPU -------------------------------------------
# `explore` is the pure function behind `course_lib.widgets.CacheExplorer`: every number the widget draws.

# Total memory of a few GPUs, in GiB as nvidia-smi reports it (rounded), for "does the cache fit?".
# The cache never gets all of it: weights and activations live there too.
GPU_MEMORY_GIB: dict[str, float] = {
    "T4 (16 GB)": 15.0,
    "RTX 4090 (24 GB)": 24.0,
    "A100 (40 GB)": 40.0,
    "A100 / H100 / H800 (80 GB)": 80.0,
    "H200 (141 GB)": 140.0,
    "8x H800 node (640 GB)": 640.0,  # the node [V2] §3.2.3 measured its generation throughput on
}

# Context lengths the explorer's curves are drawn at: 1K, 2K, ..., 1M tokens.
CONTEXT_LENGTHS: tuple[int, ...] = tuple(2 ** k for k in range(10, 21))


def with_attention(spec: CacheSpec, attention: str, num_groups: int = 8) -> CacheSpec:
    """`spec`'s model (its n_h, d_h and l) caching as `attention` does: the explorer's "what if" rows.

    MLA for a model that has none takes V2's proportions, d_c = 4 d_h and d_h^R = d_h / 2 ([V2] Table 1
    caption); GQA uses `num_groups` K/V heads unless the model already is GQA.
    """
    if attention not in ATTENTION_KINDS:
        _fail(f"attention={attention!r} is not known", f"Use one of {ATTENTION_KINDS}.")
    if attention == spec.attention:
        return spec
    h, d = spec.num_attention_heads, spec.head_dim
    kv_heads = {"mha": h, "gqa": num_groups, "mqa": 1, "mla": h}[attention]
    mla = dict(kv_lora_rank=4 * d, qk_rope_head_dim=d // 2) if attention == "mla" else {}
    how = "d_c = 4 d_h, d_h^R = d_h/2 as [V2]" if mla else f"{kv_heads} K/V heads"
    return CacheSpec(name=f"{spec.name} as {attention.upper()}", attention=attention,
                     num_hidden_layers=spec.num_hidden_layers, num_attention_heads=h,
                     num_key_value_heads=kv_heads, head_dim=d, **mla,
                     source=f"derived from {spec.name}: n_h, d_h and l kept, {how}")


def attention_label(spec: CacheSpec) -> str:
    """A short label for a spec's cache: 'MHA', 'GQA (n_g=8)', 'MQA' or 'MLA (d_c=512)'."""
    if spec.attention == "gqa":
        return f"GQA (n_g={spec.num_key_value_heads})"
    if spec.attention == "mla":
        return f"MLA (d_c={spec.kv_lora_rank})"
    return spec.attention.upper()


def explore(spec: CacheSpec, attention: str | None = None, num_tokens: int = 32 * 1024, batch_size: int = 1,
            elem_bytes: ElemBytes = "bf16", gpu_gib: float = 80.0, num_groups: int = 8) -> dict:
    """The cache of `spec`'s model under each attention kind, against a GPU's memory.

    Returns a dict of plain numbers:
    - `rows`: one dict per kind (MHA, GQA, MQA, MLA; `with_attention`) with elements and bytes per
      token, the cache of `batch_size` sequences of `num_tokens` tokens (`cache_gib`), its share of the
      GPU (`gpu_fraction`, may exceed 1), whether it fits, the most tokens (summed over the batch) the
      GPU could cache, and the saving against MHA;
    - `selected`: the row of `attention` (default: the model's own);
    - `context_lengths` and `curves` (kind -> cache GiB at each length, same batch): the growth lines.
    """
    attention = attention or spec.attention
    if not gpu_gib > 0:
        _fail(f"gpu_gib={gpu_gib!r} must be positive", f"Pass the GPU's memory in GiB, e.g. {GPU_MEMORY_GIB}.")
    gpu_bytes = gpu_gib * 1024**3
    specs = {kind: with_attention(spec, kind, num_groups) for kind in ATTENTION_KINDS}
    mha_bytes = bytes_per_token(specs["mha"], elem_bytes)
    rows = []
    for kind, s in specs.items():
        per_token = bytes_per_token(s, elem_bytes)
        total = cache_bytes(s, num_tokens, batch_size, elem_bytes)
        rows.append({
            "attention": kind, "label": attention_label(s), "name": s.name, "selected": kind == attention,
            "elements_per_token": elements_per_token(s), "bytes_per_token": per_token,
            "kib_per_token": per_token / 1024, "cache_gib": total / 1024**3,
            "gpu_fraction": total / gpu_bytes, "fits": total <= gpu_bytes,
            "max_tokens_in_gpu": int(gpu_bytes // per_token), "reduction_vs_mha": 1 - per_token / mha_bytes,
        })
    curves = {kind: [cache_bytes(s, n, batch_size, elem_bytes) / 1024**3 for n in CONTEXT_LENGTHS]
              for kind, s in specs.items()}
    selected = next(r for r in rows if r["selected"])
    return {"model": spec.name, "num_tokens": num_tokens, "batch_size": batch_size,
            "element_bytes": element_bytes(elem_bytes), "gpu_gib": gpu_gib, "rows": rows, "selected": selected,
            "context_lengths": list(CONTEXT_LENGTHS), "curves": curves}
