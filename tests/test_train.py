import os

import pytest
import torch

from course_lib.config import ModelConfig
from course_lib.model import CourseModel
from course_lib.tasks import Tokenizer, addition_splits, encode_examples
from course_lib.train import TrainConfig, load_checkpoint, train_lm
from course_lib.rollout import evaluate


class Interrupt(Exception):
    pass


def setup(seed=0):
    tok = Tokenizer()
    tr, _ = addition_splits(64, 8, digits=2, seed=0)
    tokens, mask = encode_examples(tr, tok)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    return CourseModel(cfg), tokens, mask


def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path):
    cfg = TrainConfig(steps=12, batch_size=8, checkpoint_every=4, warmup_steps=3)
    ref, tokens, mask = setup()
    ref_result = train_lm(ref, tokens, mask, cfg, progress=False)

    path = str(tmp_path / "ckpt.pt")
    first, _, _ = setup()

    def stop_at_7(step, loss):
        if step == 6:
            raise Interrupt  # like a kernel restart after step 7: the checkpoint from step 4 survives

    with pytest.raises(Interrupt):
        train_lm(first, tokens, mask, cfg, checkpoint_path=path, callback=stop_at_7, progress=False)
    resumed, _, _ = setup(seed=123)  # a fresh kernel: different initial weights, all replaced by the checkpoint
    result = train_lm(resumed, tokens, mask, cfg, checkpoint_path=path, progress=False)
    assert result.resumed_from == 4
    assert len(result.losses) == 12
    assert result.losses == pytest.approx(ref_result.losses, abs=1e-6)
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_checkpoint_loads_with_weights_only_and_no_temp_file_left(tmp_path):
    m, tokens, mask = setup()
    path = str(tmp_path / "sub" / "ckpt.pt")
    train_lm(m, tokens, mask, TrainConfig(steps=3, batch_size=4, warmup_steps=1), checkpoint_path=path, progress=False)
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["losses"]) == 3
    fresh, _, _ = setup(seed=9)
    load_checkpoint(path, fresh)
    x = tokens[:2]
    torch.testing.assert_close(fresh(x), m(x))


def test_training_lowers_the_loss_on_the_task():
    m, tokens, mask = setup()
    result = train_lm(m, tokens, mask, TrainConfig(steps=60, batch_size=16, lr=3e-3), progress=False)
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5


def test_learning_rate_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3)
    assert cfg.lr_at(99) == pytest.approx(1e-4, rel=0.01)
    assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(10, 99))


@pytest.mark.parametrize("changes, message", [(dict(steps=0), "steps=0 must be positive"),
                                              (dict(lr=-1.0), "lr=-1.0 must be positive"),
                                              (dict(steps=5, warmup_steps=9), "warmup_steps=9")])
def test_bad_train_config(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_evaluate_scores_a_perfect_and_a_broken_model():
    tok = Tokenizer()
    _, ev = addition_splits(8, 6, digits=2, seed=0)

    class Oracle(torch.nn.Module):
        """Emits the reference completion: accuracy must be 1."""
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.answers = {tuple(tok.encode(p.prompt, bos=True)): tok.encode(p.completion) for p in ev}

        def new_cache(self):
            return None

        def forward(self, ids, cache=None):
            B, T = ids.shape
            logits = torch.full((B, T, tok.vocab_size), -1e9)
            for b in range(B):
                row = ids[b].tolist()
                for prompt, comp in self.answers.items():
                    if tuple(row[:len(prompt)]) == prompt and len(row) - len(prompt) < len(comp):
                        logits[b, -1, comp[len(row) - len(prompt)]] = 0.0
            return logits

    perfect = evaluate(Oracle(), tok, ev, max_new_tokens=40, use_cache=False)
    assert (perfect.accuracy, perfect.format_rate, perfect.truncation_rate) == (1.0, 1.0, 0.0)
    untrained, _, _ = setup()
    assert evaluate(untrained, tok, ev, max_new_tokens=10).accuracy == 0.0


def test_resume_is_exact_when_the_callback_moves_the_router_bias(tmp_path):
    # LoadTracker changes the aux-loss-free bias after each step; the checkpoint must hold that change,
    # else a run resumed from a checkpoint routes differently from an uninterrupted one.
    from course_lib.balancing import LoadTracker, moe_layers

    def moe_setup(seed=0):
        model, tokens, mask = setup(seed)
        cfg = model.config.replace(ffn="moe", num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=16, first_k_dense_replace=1)
        torch.manual_seed(seed)
        return CourseModel(cfg), tokens, mask

    cfg = TrainConfig(steps=8, batch_size=8, checkpoint_every=4, warmup_steps=2)
    ref, tokens, mask = moe_setup()
    train_lm(ref, tokens, mask, cfg, callback=LoadTracker(ref, gamma=0.05), progress=False)
    path = str(tmp_path / "moe.pt")
    first, _, _ = moe_setup()
    tracker = LoadTracker(first, gamma=0.05)

    def stop_after_4(step, loss):
        tracker(step, loss)
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_lm(first, tokens, mask, cfg, checkpoint_path=path, callback=stop_after_4, progress=False)
    resumed, _, _ = moe_setup(seed=7)
    train_lm(resumed, tokens, mask, cfg, checkpoint_path=path, callback=LoadTracker(resumed, gamma=0.05), progress=False)
    bias = [m.gate.e_score_correction_bias for m in moe_layers(ref)]
    assert any(b.abs().sum() > 0 for b in bias), "the tracker never moved the bias: the test checks nothing"
    for a, b in zip(bias, (m.gate.e_score_correction_bias for m in moe_layers(resumed))):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
