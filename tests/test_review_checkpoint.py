"""Checkpoints and the run log: tied embeddings (as in the real Qwen3-0.6B) survive a
save/load round trip; a torn last log line does not block a resume."""

import json

import pytest
import torch

from star_train.runtime.checkpoint import append_log, latest_checkpoint, load_checkpoint, save_checkpoint, truncate_log
from star_train.runtime.config import ModelSpec, TrainConfig
from star_train.runtime.models import load_model
from star_train.runtime.trainer import optimizer_and_scheduler


def _tied(seed):
    config = {"vocab_size": 300, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 8, "tie_word_embeddings": True}
    return load_model(ModelSpec(config=config, seed=seed), torch.float32, torch.device("cpu"))


def test_tied_embeddings_round_trip(tmp_path):
    model = _tied(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    optimizer, scheduler = optimizer_and_scheduler(model, TrainConfig(lr=1e-2, warmup_ratio=0.3), 10)
    model.lm_head.weight.sum().backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"extra": 7})

    other = _tied(1)
    opt2, sched2 = optimizer_and_scheduler(other, TrainConfig(lr=1e-2, warmup_ratio=0.3), 10)
    state = load_checkpoint(latest_checkpoint(tmp_path), other, opt2, sched2)
    assert state == {"step": 1, "extra": 7}
    assert other.lm_head.weight is other.model.embed_tokens.weight  # still one tensor
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert sched2.get_last_lr() == scheduler.get_last_lr()


def test_truncate_log_drops_a_torn_last_line(tmp_path):
    """A run killed (or out of disk) while appending a step's line leaves a partial JSON
    line; that step never reached its checkpoint, so resuming drops it."""
    path = tmp_path / "train_log.jsonl"
    for step in (1, 2, 3):
        append_log(path, {"step": step, "loss": 0.5})
    with path.open("a") as f:
        f.write('{"step": 4, "lo')
    truncate_log(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    append_log(path, {"step": 3, "loss": 0.25})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_truncate_log_still_rejects_a_corrupt_line_before_the_end(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        truncate_log(path, 2)


class _RunsCode:
    """Unpickling this calls ``marker.touch()``: what a crafted trainer.pt could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """Resuming from a checkpoint folder someone else made must not execute their code:
    trainer.pt is loaded with weights_only=True (tensors, numbers, lists, dicts only)."""
    model = _tied(0)
    optimizer, scheduler = optimizer_and_scheduler(model, TrainConfig(lr=1e-2), 10)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    marker = tmp_path / "code-ran"
    trainer = torch.load(path / "trainer.pt", weights_only=True)  # ours loads this way
    torch.save({**trainer, "optimizer": _RunsCode(marker)}, path / "trainer.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert not marker.exists()


def test_cosine_schedule_matches_transformers_cosine_with_min_lr():
    """The released runs' schedule (OpenRLHF: transformers' cosine_with_min_lr with 3%
    warm-up and min_lr = 0.1 x lr), checked against transformers' own implementation."""
    from transformers import get_scheduler

    total, cfg = 37, TrainConfig(lr=2e-3)
    ours = optimizer_and_scheduler(_tied(0), cfg, total)
    model = _tied(0)
    theirs_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    theirs = get_scheduler("cosine_with_min_lr", theirs_opt, num_warmup_steps=2,  # ceil(37 * .03)
                           num_training_steps=total, scheduler_specific_kwargs={"min_lr": 2e-4})
    for _ in range(total):
        assert ours[1].get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-12, abs=1e-15)
        ours[0].step()
        ours[1].step()
        theirs_opt.step()
        theirs.step()


def test_adamw_as_released_no_decay_on_biases_and_norms():
    config = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
              "attention_bias": True}
    model = load_model(ModelSpec(config=config), torch.float32, torch.device("cpu"))
    optimizer, _ = optimizer_and_scheduler(model, TrainConfig(weight_decay=0.1), 5)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        # OpenRLHF's name rule: no decay on "bias" and "*norm.weight"
        released = 0.0 if ("bias" in name or "norm.weight" in name) else 0.1
        assert decay[id(p)] == released, name
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
