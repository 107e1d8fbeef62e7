"""Multi-token prediction and self-speculative decoding (course_lib/mtp.py).

What is asserted:
- shapes of every head, and that MTPModel's forward is the main model's alone;
- eqs (21)-(23) rebuilt by hand from the parameters ([emb ; h] order, own norm, shared head) match forward_all;
- the loss equals eq (24)-(25) computed with explicit loops over positions, for D = 1 and 2 and two λ;
- depth k at position i sees tokens up to t_{i+k} and never t_{i+k+1}; depth 2 builds on depth 1's output;
- the MTP loss alone sends gradient into the shared embedding, the shared head and the main blocks;
- a checkpointed, interrupted and resumed MTP training run ends with the same weights;
- speculative greedy decoding returns exactly plain cached greedy decoding's tokens (stop token included)
  on random MHA/MLA/MoE models and on briefly trained MHA and MLA models, for D = 1 and 2;
- after every step the main cache and each MTP cache hold exactly what decoding only decided tokens gives;
- forced acceptance and forced rejection of every draft: same output, the expected number of forwards;
- bad inputs fail with a clear message.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.config import ModelConfig
from course_lib.model import CourseModel
from course_lib.moe import DeepSeekMoE
from course_lib.mtp import (MTPModel, SpeculativeDecoder, mtp_loss, mtp_loss_fn, mtp_losses,
                            speculative_generate)
from course_lib.benchmarks.measure import forced_drafter
from course_lib.tasks import Tokenizer, addition_splits, encode_examples
from course_lib.train import TrainConfig, train_lm
from course_lib.generate import generate
from course_lib.model import lm_loss

V = 24


def tiny(attention="mha", ffn="dense", vocab=V, **kw):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=48, max_position_embeddings=128, attention=attention, ffn=ffn,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    return cfg.replace(**kw) if kw else cfg


def model_for(attention="mha", D=1, seed=0, **kw):
    torch.manual_seed(seed)
    return MTPModel(tiny(attention, **kw), D).eval()


def rows(B=3, L=11, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[:, -1] = False
    return tokens, mask


# ----------------------------------------------------------------------------- module and loss

def test_shapes_and_forward_is_the_main_models():
    m = model_for(D=2)
    tokens, _ = rows(B=2, L=9)
    logits, per_depth = m.forward_all(tokens)
    assert logits.shape == (2, 8, V)
    assert [t.shape for t in per_depth] == [(2, 7, V), (2, 6, V)]
    torch.testing.assert_close(m(tokens), m.main(tokens))
    torch.testing.assert_close(logits, m.main(tokens[:, :-1]))
    h = torch.randn(2, 5, 32)
    assert m.mtp[0](h, torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_same_seed_gives_the_main_model_the_same_init_as_a_plain_model():
    torch.manual_seed(3)
    plain = CourseModel(tiny())
    m = model_for(seed=3)
    for (name, a), b in zip(plain.state_dict().items(), m.main.state_dict().values()):
        assert torch.equal(a, b), name


def test_embedding_and_head_are_shared_not_copied():
    m = model_for(D=2)
    keys = m.state_dict().keys()
    assert not any(k.startswith("mtp.") and ("embed" in k or "lm_head" in k) for k in keys)
    per_layer = {k.split(".", 2)[2].split(".")[0] for k in keys if k.startswith("mtp.0.")}
    assert per_layer == {"enorm", "hnorm", "eh_proj", "mtp_block", "post_norm"}
    extra = sum(p.numel() for p in m.mtp.parameters())
    assert m.mtp[0].eh_proj.weight.shape == (32, 64)
    assert sum(p.numel() for p in m.parameters()) == m.main.num_parameters() + extra


def rms(x, w, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_heads(m, tokens):
    """Eqs (21)-(23) by hand: h'_i = M [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i)], block, own norm, shared head."""
    T = tokens.shape[1] - 1
    h = m.main(tokens[:, :-1], return_hidden=True)[1]
    W_emb, W_head = m.main.embed_tokens.weight, m.main.lm_head.weight
    out = []
    for k, layer in enumerate(m.mtp, start=1):
        e = W_emb[tokens[:, k:T]]  # Emb(t_{i+k}) for i = 0 .. T-k-1
        x = torch.cat([rms(e, layer.enorm.weight), rms(h[:, :T - k], layer.hnorm.weight)], dim=-1)
        h = layer.mtp_block(x @ layer.eh_proj.weight.T)
        out.append(rms(h, layer.post_norm.weight) @ W_head.T)
    return out


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_heads_match_equations_21_to_23_by_hand(attention):
    m = model_for(attention, D=2)
    tokens, _ = rows()
    _, per_depth = m.forward_all(tokens)
    for ours, ref in zip(per_depth, reference_heads(m, tokens)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D,lam", [(1, 0.3), (2, 0.1), (2, 0.3)])
def test_loss_equals_equations_24_25_with_explicit_loops(D, lam):
    m = model_for(D=D)
    tokens, mask = rows(B=3, L=10, seed=D)
    logits, per_depth = m.forward_all(tokens)
    B, L = tokens.shape

    def ce(logits_k, k):
        # depth k (0 = main) at position i predicts t_{i+k+1}; learned where mask[i+k] (mask[t]: t+1 learned)
        terms = [-torch.log_softmax(logits_k[b, i], -1)[tokens[b, i + k + 1]]
                 for b in range(B) for i in range(L - 1 - k) if mask[b, i + k]]
        return sum(terms) / len(terms)

    main = ce(logits, 0)
    per = [ce(lg, k) for k, lg in enumerate(per_depth, start=1)]
    expected = main + lam / D * sum(per)
    got_main, got_per = mtp_losses(m, tokens, mask)
    torch.testing.assert_close(got_main, main)
    torch.testing.assert_close(torch.stack(got_per), torch.stack(per))
    torch.testing.assert_close(mtp_loss(m, tokens, mask, lam), expected)
    fn = mtp_loss_fn(lam)
    torch.testing.assert_close(fn(m, tokens, mask), expected)
    assert fn.main_losses == [pytest.approx(main.item())]
    assert fn.mtp_losses == [pytest.approx(sum(p.item() for p in per) / D)]
    torch.testing.assert_close(got_main, lm_loss(m, tokens, mask))  # the main term is train.lm_loss
    torch.testing.assert_close(mtp_loss(m, tokens, mask, 0.0), lm_loss(m, tokens, mask))


def test_depth_k_sees_up_to_t_i_plus_k_and_depth_2_builds_on_depth_1():
    m = model_for(D=2)
    tokens, _ = rows(B=1, L=12)
    _, (d1, d2) = m.forward_all(tokens)
    i = 3
    for k, ref in ((1, d1), (2, d2)):
        later = tokens.clone()
        later[0, i + k + 1] = (later[0, i + k + 1] + 1) % V  # the target itself: must not leak in
        _, heads = m.forward_all(later)
        torch.testing.assert_close(heads[k - 1][0, :i + 1], ref[0, :i + 1])
        seen = tokens.clone()
        seen[0, i + k] = (seen[0, i + k] + 1) % V  # the token k ahead: module k reads its embedding
        _, heads = m.forward_all(seen)
        assert not torch.allclose(heads[k - 1][0, i], ref[0, i])
    with torch.no_grad():
        m.mtp[0].eh_proj.weight.mul_(2)  # change module 1: depth 2 changes with it (the causal chain)
    _, (e1, e2) = m.forward_all(tokens)
    assert not torch.allclose(e2, d2)
    with torch.no_grad():
        m.mtp[1].eh_proj.weight.mul_(2)  # change module 2: depth 1 does not depend on it
    _, (f1, _) = m.forward_all(tokens)
    torch.testing.assert_close(f1, e1)


def test_mtp_loss_alone_trains_the_shared_embedding_head_and_main_blocks():
    m = model_for(D=2).train()
    tokens, mask = rows()
    _, losses = mtp_losses(m, tokens, mask)
    sum(losses).backward()
    for name, p in [("embed_tokens", m.main.embed_tokens.weight), ("lm_head", m.main.lm_head.weight),
                    ("main block", m.main.layers[0].self_attn.q_proj.weight), ("eh_proj 2", m.mtp[1].eh_proj.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.main.norm.weight.grad is None  # the MTP heads use their own norm, not the main one


def test_moe_and_mla_configs_give_moe_and_mla_mtp_blocks():
    m = model_for("mla", D=1, ffn="moe", first_k_dense_replace=1)
    assert isinstance(m.mtp[0].mtp_block.mlp, DeepSeekMoE)
    assert type(m.mtp[0].mtp_block.self_attn).__name__ == "MultiHeadLatentAttention"
    tokens, mask = rows()
    assert torch.isfinite(mtp_loss(m, tokens, mask))


class Interrupt(Exception):
    pass


def test_checkpointed_mtp_training_resumes_to_the_same_weights(tmp_path):
    tok = Tokenizer()
    tr, _ = addition_splits(48, 4, digits=2, seed=0)
    tokens, mask = encode_examples(tr, tok)
    cfg = TrainConfig(steps=8, batch_size=6, checkpoint_every=3, warmup_steps=2)

    def fresh(seed=0):
        torch.manual_seed(seed)
        return MTPModel(tiny(vocab=tok.vocab_size), 2)

    ref = fresh()
    train_lm(ref, tokens, mask, cfg, loss_fn=mtp_loss_fn(0.3), progress=False)
    path = str(tmp_path / "mtp.pt")

    def stop(step, loss):
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_lm(fresh(), tokens, mask, cfg, checkpoint_path=path, loss_fn=mtp_loss_fn(0.3), callback=stop, progress=False)
    resumed = fresh(seed=7)
    result = train_lm(resumed, tokens, mask, cfg, checkpoint_path=path, loss_fn=mtp_loss_fn(0.3), progress=False)
    assert result.resumed_from == 3
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


# ----------------------------------------------------------------------------- speculative decoding

def assert_same(m, prompt, n, stop_id=None, **kw):
    plain = generate(m, prompt, n, temperature=0.0, stop_id=stop_id)
    spec = speculative_generate(m, prompt, n, stop_id=stop_id, **kw)
    assert spec.tokens.tolist() == plain.tokens.tolist()
    assert spec.finished.tolist() == plain.finished.tolist()
    return spec


@pytest.mark.parametrize("attention,ffn,D", [("mha", "dense", 1), ("mha", "dense", 2), ("mla", "dense", 1),
                                             ("mla", "dense", 2), ("gqa", "moe", 1)])
def test_speculative_equals_plain_greedy_on_random_models(attention, ffn, D):
    extra = {"num_key_value_heads": 1} if attention == "gqa" else {}
    for seed in range(2):
        m = model_for(attention, D=D, seed=seed, ffn=ffn, **extra)
        for p in range(2):
            prompt = torch.randint(0, V, (1, 2 + 5 * p), generator=torch.Generator().manual_seed(10 * seed + p))
            for n in (1, 2, 13):
                assert_same(m, prompt, n)
            assert_same(m, prompt, 24, stop_id=int(prompt[0, -1]))  # a stop token it may or may not emit


@pytest.fixture(scope="module")
def trained():
    """MTP models trained briefly on the addition task (MHA and MLA), so drafts are often right."""
    tok = Tokenizer()
    tr, ev = addition_splits(96, 6, digits=2, seed=0)
    tokens, mask = encode_examples(tr, tok)
    models = {}
    for attention, D in (("mha", 1), ("mha", 2), ("mla", 2)):
        torch.manual_seed(0)
        m = MTPModel(tiny(attention, vocab=tok.vocab_size, num_hidden_layers=1), D)
        train_lm(m, tokens, mask, TrainConfig(steps=30, batch_size=16, lr=1e-2, warmup_steps=5),
                 loss_fn=mtp_loss_fn(0.3), progress=False)
        models[attention, D] = m.eval()
    return tok, ev, models


def test_speculative_equals_plain_greedy_on_trained_models(trained):
    tok, ev, models = trained
    for (attention, D), m in models.items():
        drafted = accepted = 0
        for p in ev:
            prompt = torch.tensor([tok.encode(p.prompt, bos=True)])
            spec = assert_same(m, prompt, 40, stop_id=tok.stop_id)
            drafted, accepted = drafted + spec.drafted, accepted + spec.accepted
        assert 0.1 * drafted < accepted < drafted, (attention, D, accepted, drafted)  # both paths exercised
        assert_same(m, prompt, 5, stop_id=tok.stop_id)  # truncated before the stop token


def plain_cache(main, tokens, P):
    """The main cache of plain greedy decoding once `tokens` are decided: prompt prefill, then one token at a time."""
    cache = main.new_cache()
    with torch.no_grad():
        main(torch.tensor([tokens[:P]]), cache)
        for t in tokens[P:-1]:
            main(torch.tensor([[t]]), cache)
    return cache


def reference_mtp_caches(m, tokens, lengths):
    """Module k's cache built from decided tokens only: positions 0..S_k-1 from h^{k-1}_i and Emb(t_{i+k})."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        h = m.main(ids[:, :-1], return_hidden=True)[1]  # (1, n-1, d)
        caches = []
        for k, (layer, S) in enumerate(zip(m.mtp, lengths), start=1):
            cache = layer.new_cache()
            h = layer(h[:, :S], m.main.embed_tokens(ids[:, k:S + k]), cache)
            caches.append(cache)
    return caches


def cache_tensors(c):
    return [t for t in (getattr(c, "k", None), getattr(c, "v", None), getattr(c, "c_kv", None),
                        getattr(c, "k_rope", None)) if t is not None]


@pytest.mark.parametrize("attention,D", [("mha", 2), ("mla", 2), ("mha", 1)])
def test_rollback_leaves_every_cache_as_decoding_only_decided_tokens(trained, attention, D):
    tok, ev, models = trained
    m = models[attention, D]
    prompt = torch.tensor([tok.encode(ev[0].prompt, bos=True)])
    dec = SpeculativeDecoder(m, prompt)
    rejected = 0
    for _ in range(8):
        new = dec.step()
        rejected += len(new) < D + 1
        n = len(dec.tokens)
        assert dec.cache.seq_len == n - 1 and dec.hidden[0].shape[1] == n - 1
        ref = plain_cache(m.main, dec.tokens, prompt.shape[1])
        for ours, theirs in zip(dec.cache.layers, ref.layers):
            for a, b in zip(cache_tensors(ours), cache_tensors(theirs)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        lengths = [c.seq_len for c in dec.mtp_caches]
        assert all(S <= n - 1 - k for k, S in enumerate(lengths, start=1))  # never a position that read an undecided token
        for ours, theirs in zip(dec.mtp_caches, reference_mtp_caches(m, dec.tokens, lengths)):
            assert ours.seq_len == theirs.seq_len
            for a, b in zip(cache_tensors(ours), cache_tensors(theirs)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert rejected > 0  # some step rolled back


@pytest.mark.parametrize("attention,D", [("mha", 2), ("mla", 2), ("mha", 1)])
def test_drafts_are_what_each_module_predicts_from_the_decided_tokens(trained, attention, D):
    """Every draft logit the decoder sees (made from its table of normed embeddings and its caches) is what
    MTPLayer.forward computes for that position from the decided tokens and earlier drafts, recomputed whole."""
    tok, ev, models = trained
    m = models[attention, D]
    seen = []

    class Recording(SpeculativeDecoder):
        def propose(self, logits, k):
            seen.append((list(self.tokens), k, logits.clone()))
            return super().propose(logits, k)

    prompt = torch.tensor([tok.encode(ev[1].prompt, bos=True)])
    speculative_generate(m, prompt, 30, stop_id=tok.stop_id, decoder_cls=Recording)
    drafts = []
    for tokens, k, logits in seen:
        drafts = [] if k == 1 else drafts
        seq = torch.tensor([tokens + drafts])  # decided tokens, then this step's drafts d_1 .. d_{k-1}
        n = len(tokens)
        with torch.no_grad():
            h = m.main(seq[:, :n - 1], return_hidden=True)[1]  # (1, n-1, d): h^0 of the decided positions
            for j in range(1, k + 1):  # module j at positions 0 .. n-2 reads Emb(t_{i+j})
                h = m.mtp[j - 1](h, m.main.embed_tokens(seq[:, j:n - 1 + j]))  # (1, n-1, d)
            expected = m.mtp_logits(h[:, -1], k)[0]  # (V,)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        drafts.append(int(logits.argmax()))
    assert {k for _, k, _ in seen} == set(range(1, D + 1))


@pytest.mark.parametrize("attention,D", [("mha", 1), ("mla", 2)])
def test_forced_acceptance_and_forced_rejection(attention, D):
    m = model_for(attention, D=D, seed=4)
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(4))
    n = 30
    oracle = prompt[0].tolist() + generate(m, prompt, n).tokens[0].tolist()
    accept = assert_same(m, prompt, n, decoder_cls=forced_drafter(oracle, 1.0))
    assert accept.accepted == accept.drafted > 0 and accept.acceptance_rate == 1.0
    assert accept.main_forwards == 1 + math.ceil((n - 1) / (D + 1))  # prefill, then D+1 tokens per forward
    reject = assert_same(m, prompt, n, decoder_cls=forced_drafter(oracle, 0.0))
    assert reject.accepted == 0 and reject.drafted > 0
    assert reject.main_forwards == n  # prefill, then one token per forward: plain decoding's count


def test_stop_inside_accepted_drafts_ends_the_output_there():
    m = model_for(D=2, seed=5)
    prompt = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(5))
    plain = generate(m, prompt, 30).tokens[0].tolist()
    stop = plain[7]
    oracle = prompt[0].tolist() + plain
    spec = assert_same(m, prompt, 30, stop_id=stop, decoder_cls=forced_drafter(oracle, 1.0))
    assert spec.finished.item() and spec.tokens[0, -1].item() == stop


def test_bad_inputs_fail_with_clear_messages():
    for D in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_nextn_predict_layers"):
            MTPModel(tiny(), D)
    m = model_for(D=1)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(m, torch.zeros(2, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(m, torch.zeros(3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="num_draft"):
        speculative_generate(m, torch.zeros(1, 3, dtype=torch.long), 5, num_draft=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(m, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="MTPModel"):
        speculative_generate(m.main, torch.zeros(1, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="too short"):
        mtp_losses(m, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="lam"):
        mtp_loss_fn(-0.1)
    with pytest.raises(TypeError, match="MTPModel"):
        mtp_loss_fn()(m.main, *rows())


def test_returns_a_generation_and_restores_training_mode():
    m = model_for(D=1).train()
    prompt = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(6))
    spec = speculative_generate(m, prompt, 9)
    assert m.training
    assert spec.to_lists() == [spec.tokens[0].tolist()] and len(spec.to_lists()[0]) == 9
    assert spec.finished.tolist() == [False] and spec.main_forwards == 1 + (9 - 1 - spec.accepted)


@pytest.mark.parametrize("acceptance", [0.0, 0.5, 0.85, 1.0])
def test_forced_drafter_accepts_the_asked_fraction_and_never_changes_the_output(acceptance):
    torch.manual_seed(0)
    model = MTPModel(ModelConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128)).eval()
    prompt = torch.randint(0, 20, (1, 5), generator=torch.Generator().manual_seed(0))
    plain = generate(model, prompt, 40)
    drafter = forced_drafter(prompt[0].tolist() + plain.tokens[0].tolist(), acceptance)
    spec = speculative_generate(model, prompt, 40, decoder_cls=drafter)
    assert spec.tokens.tolist() == plain.tokens.tolist()
    assert spec.drafted > 10 and abs(spec.accepted - acceptance * spec.drafted) <= 0.5 + 1e-9  # round(m · a) of m
    with pytest.raises(ValueError, match="between 0 and 1"):
        forced_drafter([], 1.5)
