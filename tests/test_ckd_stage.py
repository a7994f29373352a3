"""The CKD stage: config, batch schedule, teacher cache, training loop and exact resume.

(Over 400 lines: the cases share the teacher fixture built once per module here.)
"""

from pathlib import Path

import pytest
import torch

from star_train.data.examples import example_batch, fingerprint, load_examples
from star_train.runtime.config import from_dict, load_config
from star_train.runtime.models import load_model, predicting_rows
from star_train.runtime.schedule import BatchSchedule
from star_train.stages import teacher_cache as tc
from star_train.stages.ckd import CKDRunConfig, run_ckd
from star_train.stages.rollouts import RolloutRunConfig
from star_train.stages.simrl import SimRLRunConfig
from train_fixtures import log_lines, tiny_qwen3, weather_records, weights, write_jsonl


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random Qwen3 with a sharpened head (a random init is near-uniform), saved
    as a local Hugging Face folder: the teacher loads through the path route."""
    spec = from_dict(CKDRunConfig, {"data": {"path": "x"}, "teacher": {"model": tiny_qwen3(48, 1, 1)},
                             "student": {"model": {"path": "s"}}}).teacher.model
    teacher = load_model(spec, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(path)
    return str(path)


@pytest.fixture
def run_config(tmp_path, teacher_dir):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, weather_records())
    return lambda **train: from_dict(CKDRunConfig, {
        "data": {"path": str(data), "max_length": 160, "format": "template"},
        "teacher": {"model": {"path": teacher_dir}, "k": 8, "batch_size": 3, "shard_size": 3},
        "student": {"model": tiny_qwen3(32, 1, 2), "gradient_checkpointing": False},
        "ckd": {"student_topm": 8},
        "train": {"out_dir": str(tmp_path / "run"), "lr": 1e-3, "batch_size": 2,
                  "micro_batch_size": 1, "dtype": "float32", "device": "cpu",
                  "save_every": 2, "seed": 3, "loss_normalization": "step_tokens",
                  "lr_schedule": "constant", "warmup_ratio": 0.0, **train}})


# --- config --------------------------------------------------------------------------

def test_config_file_relative_paths_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\npath = "d.jsonl"\n[teacher.model]\npath = "teacher"\n'
                    '[student.model.config]\nhidden_size = 8\n[train]\nlr = 1e-5\n')
    cfg = load_config(CKDRunConfig, path, {"train.batch_size": 8, "train.micro_batch_size": 2})
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert cfg.teacher.model.path == str(tmp_path / "teacher")
    assert cfg.student.model.config == {"hidden_size": 8}
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (1e-5, 8, 1)
    assert (cfg.ckd.tail_coef, cfg.ckd.student_topm, cfg.teacher.k) == (10.0, 100, 100)


def test_an_int_is_accepted_where_a_float_is_expected():
    cfg = from_dict(CKDRunConfig, {"data": {"path": "x"}, "teacher": {"model": {"path": "t"}},
                                   "student": {"model": {"path": "s"}}, "train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("argv, match", [
    (["--config", "{missing}"], "does not exist"),
    (["--config", "{config}", "--set", "train.lr=abc"], "train.lr: expected a number, got 'abc'"),
    (["--config", "{config}", "--set", "train.lrr=1"], "unknown key(s) in [train]: lrr"),
])
def test_cli_reports_user_errors_in_one_line(argv, match, tmp_path, capsys):
    from star_train import cli

    config = tmp_path / "run.toml"
    config.write_text('[data]\npath = "x.jsonl"\n[teacher.model]\npath = "t"\n'
                      '[student.model]\npath = "s"\n')
    argv = [a.format(missing=tmp_path / "nope.toml", config=config) for a in argv]
    assert cli.main(["ckd", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("star-train ckd: error: ") and match in err


def test_shipped_presets_load_by_name_relative_to_the_current_folder(tmp_path, monkeypatch):
    from star_train.runtime.config import preset_names

    monkeypatch.chdir(tmp_path)
    loaders = {"ckd": CKDRunConfig, "simrl": SimRLRunConfig, "rollouts": RolloutRunConfig}
    names = preset_names()
    assert {name.split("-")[0] for name in names} == set(loaders)
    for name in names:
        cfg = load_config(loaders[name.split("-")[0]], name)
        out_dir = cfg.output.out_dir if hasattr(cfg, "output") else cfg.train.out_dir
        assert Path(out_dir).parent.parent == tmp_path and Path(cfg.data.path).is_relative_to(tmp_path)


def test_cli_config_writes_a_preset_out_and_the_copy_loads(tmp_path, capsys):
    from star_train import cli

    assert cli.main(["config"]) == 0
    assert "ckd-qwen3-0.6b" in capsys.readouterr().out.split()
    out = tmp_path / "my.toml"
    assert cli.main(["config", "ckd-qwen3-0.6b", "--out", str(out)]) == 0
    cfg = load_config(CKDRunConfig, out, {"train.lr": 1e-5})
    assert cfg.train.lr == 1e-5 and cfg.train.out_dir == str(tmp_path / "runs" / "ckd-qwen3-0.6b")
    assert cli.main(["config", "ckd-qwen3-0.6b", "--out", str(out)]) == 2  # never overwrites
    assert cli.main(["ckd", "--config", "no-such-preset"]) == 2
    assert "no preset named 'no-such-preset'" in capsys.readouterr().err


@pytest.mark.parametrize("values, match", [
    ({"trian": {}}, "trian"),
    ({"train": {"learning_rate": 1}}, "learning_rate"),
    ({"train": {"batch_size": 6, "micro_batch_size": 4}}, "micro_batch_size"),
    ({"train": {"micro_batch_size": 0}}, "micro_batch_size must be >= 1"),
    ({"ckd": {"kd_ratio": 1.5}}, "kd_ratio"),
    ({"train": {"dtype": "float16"}}, "train.dtype"),
    ({"teacher": {"model": {}}}, "teacher.model"),
    ({"teacher": {"k": 0}}, "teacher.k"),
    ({"train": {"log_every": 0}}, "train.log_every"),
    ({"train": {"weight_decay": -1e-4}}, "train.weight_decay"),
    ({"train": {"lr": "abc"}}, r"train.lr: expected a number, got 'abc' \(str\)"),
    ({"train": {"epochs": 1.5}}, r"train.epochs: expected an integer, got 1.5"),
    ({"train": {"max_steps": True}}, r"train.max_steps: expected an integer, got True"),
    ({"student": {"gradient_checkpointing": "yes"}}, r"student.gradient_checkpointing"),
    ({"teacher": {"model": {"config": 3}}}, r"teacher.model.config: expected a table"),
    ({"ckd": {"tail_coef": -1.0}}, r"ckd.tail_coef must be >= 0"),
    ({"ckd": {"kd_type": "jsd"}}, r"ckd.kd_type must be one of 'fkl', 'rkl', 'akl'"),
    ({"ckd": {"kd_type": "rkl", "tail_bucket": True}}, r"tail_bucket applies to ckd.kd_type = 'fkl'"),
])
def test_config_errors_name_the_key(values, match):
    base = {"data": {"path": "x.jsonl"}, "teacher": {"model": {"path": "t"}},
            "student": {"model": {"path": "s"}}}
    for section, table in values.items():
        base[section] = {**base.get(section, {}), **table}
    with pytest.raises(ValueError, match=match):
        from_dict(CKDRunConfig, base)


# --- schedule --------------------------------------------------------------------------

def test_schedule_covers_each_epoch_once_and_is_deterministic():
    s = BatchSchedule(num_examples=7, batch_size=3, epochs=3, seed=5)
    assert s.total_steps == 7
    stream = [i for step in range(s.total_steps) for i in s.batch(step)]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))
    assert stream[:7] != stream[7:14]  # a fresh permutation per epoch
    again = BatchSchedule(7, 3, 3, seed=5)
    assert [again.batch(st) for st in (6, 0, 3)] == [s.batch(st) for st in (6, 0, 3)]
    with pytest.raises(IndexError, match="step 7"):
        s.batch(7)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSchedule(2, 5, 1, 0)


# --- teacher cache ---------------------------------------------------------------------------

def test_teacher_cache_is_the_full_logits_top_k(run_config, tokenizer, tmp_path):
    cfg = run_config()
    examples = load_examples(cfg.data.path, tokenizer, max_length=cfg.data.max_length)
    assert all(ex.num_targets > 0 for ex in examples)
    teacher = load_model(cfg.teacher.model, torch.float32, torch.device("cpu"))
    directory = tmp_path / "cache"
    tc.build_teacher_cache(teacher, examples, directory, k=5, batch_size=2, shard_size=3,
                           fingerprint=fingerprint(examples), teacher_name="t",
                           pad_id=tokenizer.pad_token_id)
    cache = tc.TeacherCache(directory, fingerprint=fingerprint(examples))
    assert len(cache) == len(examples) and cache.k == 5
    for ex in examples:
        with torch.no_grad():  # independent ground truth: the model's own full logits, fp64
            logits = teacher(ex.input_ids[None].long()).logits[0].double()
        full = logits.log_softmax(-1)[:-1][ex.target_mask[1:]]
        want_logprobs, want_ids = full.topk(5, dim=-1)
        ids, logprobs = cache[ex.index]
        assert ids.shape == (ex.num_targets, 5) == (cache.num_targets(ex.index), 5)
        torch.testing.assert_close(ids, want_ids)
        torch.testing.assert_close(logprobs.double(), want_logprobs, atol=2e-5, rtol=0)


def test_teacher_cache_resumes_missing_shards_and_rejects_other_settings(run_config, tokenizer,
                                                                         tmp_path, monkeypatch):
    cfg = run_config()
    examples = load_examples(cfg.data.path, tokenizer, max_length=cfg.data.max_length)
    teacher = load_model(cfg.teacher.model, torch.float32, torch.device("cpu"))
    kwargs = dict(k=4, batch_size=2, shard_size=3, fingerprint=fingerprint(examples),
                  teacher_name="t", pad_id=tokenizer.pad_token_id)
    directory = tmp_path / "cache"
    tc.build_teacher_cache(teacher, examples, directory, **kwargs)
    before = tc.TeacherCache(directory)
    expected = [before[i] for i in range(len(examples))]
    del before
    (directory / "shard-00001.safetensors").unlink()  # as if killed while writing shard 1
    assert not tc.cache_is_complete(directory)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        tc.TeacherCache(directory)
    seen = []
    real = tc.example_batch
    monkeypatch.setattr(tc, "example_batch", lambda group, pad: seen.extend(e.index for e in group)
                        or real(group, pad))
    tc.build_teacher_cache(teacher, examples, directory, **kwargs)
    assert seen == [3, 4, 5]  # only the missing shard was recomputed
    after = tc.TeacherCache(directory)
    for i, (ids, logprobs) in enumerate(expected):
        assert torch.equal(after[i][0], ids) and torch.equal(after[i][1], logprobs)
    with pytest.raises(ValueError, match="k: 4 -> 6"):
        tc.build_teacher_cache(teacher, examples, directory, **{**kwargs, "k": 6})
    with pytest.raises(ValueError, match="other examples"):
        tc.TeacherCache(directory, fingerprint="something else")


# --- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["step_tokens", "micro_batch"])
def test_first_step_loss_is_the_full_logits_ckd(run_config, tokenizer, normalization):
    """The logged loss of step 1 (before any update) against the CKD formula evaluated on
    the student's and teacher's full logits: checks target alignment end to end. The step's
    loss is the token mean over the step, or (released) the mean of the micro-batches'
    token means (one example per micro-batch here)."""
    cfg = run_config(max_steps=1, batch_size=2, micro_batch_size=1,
                     loss_normalization=normalization)
    run_ckd(cfg, tokenizer=tokenizer, log=lambda *_: None)
    logged = log_lines(cfg.train.out_dir)[0]
    examples = load_examples(cfg.data.path, tokenizer, max_length=cfg.data.max_length)
    teacher = load_model(cfg.teacher.model, torch.float32, torch.device("cpu"))
    student = load_model(cfg.student.model, torch.float32, torch.device("cpu"))
    total, count, means = 0.0, 0, []
    with torch.no_grad():
        for i in logged["examples"]:
            ex = examples[i]
            sel = ex.target_mask[1:]
            p = teacher(ex.input_ids[None].long()).logits[0, :-1][sel].double().log_softmax(-1)
            q = student(ex.input_ids[None].long()).logits[0, :-1][sel].double().log_softmax(-1)
            t_logp, t_ids = p.topk(8, dim=-1)
            fkl = (t_logp.exp() * (t_logp - q.gather(1, t_ids))).sum(-1)
            s_ids = q.topk(8, dim=-1).indices
            mistakes = ~(s_ids[:, :, None] == t_ids[:, None, :]).any(-1)
            penalty = (q.gather(1, s_ids).exp() * mistakes).sum(-1)
            total += (fkl + 10.0 * penalty).sum().item()
            count += sel.sum().item()
            means.append((fkl + 10.0 * penalty).mean().item())
    assert logged["tokens"] == count
    want = total / count if normalization == "step_tokens" else sum(means) / len(means)
    assert logged["loss"] == pytest.approx(want, rel=1e-4)
    assert abs(total / count - sum(means) / len(means)) > 1e-3  # the two really differ


def test_interrupted_run_resumes_exactly(run_config, tokenizer):
    """Killed after step 3 (checkpoint at 2), then restarted: the same weights and the same
    per-step examples as an uninterrupted run, each example once per epoch."""
    quiet = dict(tokenizer=tokenizer, log=lambda *_: None)
    straight = run_config(epochs=2, out_dir=run_config().train.out_dir + "-straight")
    run_ckd(straight, **quiet)

    cfg = run_config(epochs=2)

    def crash(step, report):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ckd(cfg, on_step_end=crash, **quiet)
    assert [line["step"] for line in log_lines(cfg.train.out_dir)] == [1, 2, 3]
    summary = run_ckd(cfg, **quiet)
    assert summary["start_step"] == 2 and summary["steps"] == 7

    a, b = log_lines(straight.train.out_dir), log_lines(cfg.train.out_dir)
    assert [x["step"] for x in b] == list(range(1, 8))
    assert [x["examples"] for x in a] == [x["examples"] for x in b]
    stream = [i for x in b for i in x["examples"]]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:]) == list(range(7))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
    wa = weights(Path(straight.train.out_dir) / "final")
    wb = weights(Path(cfg.train.out_dir) / "final")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    initial = load_model(cfg.student.model, torch.float32, torch.device("cpu")).state_dict()
    assert any(not torch.equal(initial[n], w) for n, w in wb.items())  # training moved them


def test_training_lowers_the_loss(run_config, tokenizer):
    cfg = run_config(epochs=3, lr=1e-2, save_every=100)
    run_ckd(cfg, tokenizer=tokenizer, log=lambda *_: None)
    losses = [x["loss"] for x in log_lines(cfg.train.out_dir)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first


def test_example_batch_and_predicting_rows(tokenizer, run_config, monkeypatch):
    cfg = run_config()
    examples = load_examples(cfg.data.path, tokenizer, max_length=cfg.data.max_length)[:3]
    batch = example_batch(examples, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == max(len(e.input_ids) for e in examples)
    hidden = torch.arange(batch["input_ids"].numel(), dtype=torch.float32).view(
        *batch["input_ids"].shape, 1)
    from star_train.runtime import models
    monkeypatch.setattr(models, "hidden_states", lambda model, ids, mask: (hidden, None, None))
    rows, ids, _, _ = predicting_rows(None, batch, torch.device("cpu"))
    assert torch.equal(ids, batch["input_ids"][:, 1:][batch["target_mask"][:, 1:]])
    assert rows.shape[0] == sum(e.num_targets for e in examples)
    first = examples[0]
    want = (first.target_mask.nonzero().squeeze(1) - 1).float()  # hidden at t-1 predicts t
    torch.testing.assert_close(rows[:first.num_targets, 0], want)


def test_rerun_with_another_teacher_k_does_not_reuse_the_complete_cache(run_config, tokenizer):
    """The cache in out_dir was built with k=8; a rerun of the same out_dir with k=6 (or
    another teacher) must not silently train on the old top-8 cache."""
    quiet = dict(tokenizer=tokenizer, log=lambda *_: None)
    run_ckd(run_config(max_steps=1), **quiet)
    cfg = run_config(max_steps=2)
    cfg.teacher.k = 6
    with pytest.raises(ValueError, match="k: 8 -> 6"):
        run_ckd(cfg, **quiet)
    other = run_config(max_steps=2)
    other.teacher.model.path = other.teacher.model.path + "-copy"
    with pytest.raises(ValueError, match="teacher"):
        run_ckd(other, **quiet)


def test_teacher_is_freed_before_the_student_is_loaded(run_config, tokenizer, monkeypatch):
    """``del teacher`` frees nothing while a reference cycle still reaches the teacher: in
    a fresh process the first model load runs transformers' lazy import, whose traceback
    frames keep ``load_model``'s frame (and so the teacher) in a garbage cycle that only
    a full GC collects (seen with gc disabled: the teacher was alive when the student
    loaded). Modelled here with an explicit cycle; an 8B teacher left on the device
    beside the student is 16 GB."""
    import gc
    import weakref

    from star_train.stages import ckd

    loaded, alive_at_student = [], []
    real = ckd.load_model

    def tracking(spec, dtype, device):
        if loaded:  # the second load is the student
            alive_at_student.append(loaded[0]() is not None)
        model = real(spec, dtype, device)
        if not loaded:
            cycle = {"model": model}
            cycle["self"] = cycle  # garbage as soon as the stage drops the teacher
        loaded.append(weakref.ref(model))
        return model

    from star_train.runtime import trainer

    monkeypatch.setattr(ckd, "load_model", tracking)      # the teacher
    monkeypatch.setattr(trainer, "load_model", tracking)  # the student
    was_enabled = gc.isenabled()
    gc.disable()  # make "the GC did not happen to run" deterministic
    try:
        run_ckd(run_config(max_steps=1), tokenizer=tokenizer, log=lambda *_: None)
    finally:
        if was_enabled:
            gc.enable()
    assert alive_at_student == [False]


def test_resume_with_other_data_settings_is_refused(run_config, tokenizer):
    quiet = dict(tokenizer=tokenizer, log=lambda *_: None)
    run_ckd(run_config(max_steps=2), **quiet)
    with pytest.raises(ValueError, match=r"batch_size: 2 -> 1"):
        run_ckd(run_config(max_steps=3, batch_size=1, micro_batch_size=1), **quiet)


@pytest.mark.parametrize("kd_type", ["rkl", "akl"])
def test_ckd_kd_type_reaches_the_fused_op(run_config, tokenizer, monkeypatch, kd_type):
    import star_kernels as sk
    from star_train.stages import ckd

    seen = []
    real = sk.fused_linear_ckd_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["kd_type"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ckd.sk, "fused_linear_ckd_loss", spy)
    cfg = from_dict(CKDRunConfig, {**_values(run_config(max_steps=1)), "ckd": {
        "student_topm": 8, "kd_type": kd_type}})
    summary = run_ckd(cfg, tokenizer=tokenizer, log=lambda *_: None)
    assert seen and set(seen) == {kd_type} and summary["final_loss"] == summary["final_loss"]


def _values(cfg):
    from star_train.runtime.config import config_to_dict

    return config_to_dict(cfg)


def test_bf16_runs_the_fused_op_under_bf16_autocast(run_config, tokenizer, monkeypatch):
    """Under autocast the trunk's output stays fp32 (fp32 residual stream); the fused op
    runs under the run's autocast, which makes it do its GEMMs in bf16."""
    import star_kernels as sk
    from star_train.stages import ckd

    seen = []
    real = sk.fused_linear_ckd_loss

    def spy(rows, weight, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(rows, weight, *args, **kwargs)

    monkeypatch.setattr(ckd.sk, "fused_linear_ckd_loss", spy)
    run_ckd(run_config(max_steps=1, dtype="bfloat16"), tokenizer=tokenizer, log=lambda *_: None)
    assert seen and set(seen) == {(True, torch.bfloat16)}


def test_answers_end_at_im_end_and_long_answers_are_skipped(run_config, tokenizer):
    cfg = run_config()
    examples = load_examples(cfg.data.path, tokenizer, max_length=cfg.data.max_length)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(int(ex.input_ids[-1]) == im_end == int(ex.labels[-1]) for ex in examples)
    lengths = sorted(int((ex.labels != -100).sum()) for ex in examples)
    cfg.data.max_length = lengths[2]  # the answers of this length or longer no longer fit
    logged = []
    kept = load_examples(cfg.data.path, tokenizer, max_length=cfg.data.max_length, log=logged.append)
    assert len(kept) == sum(n < lengths[2] for n in lengths) < len(examples)
    assert [ex.index for ex in kept] == list(range(len(kept)))
    assert logged and "exceeds data.max_length" in logged[0]


def test_tensorboard_logs_the_same_numbers_as_the_run_log(run_config, tokenizer):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = run_config(max_steps=2, tensorboard=True)
    run_ckd(cfg, tokenizer=tokenizer, log=lambda *_: None)
    events = event_accumulator.EventAccumulator(str(Path(cfg.train.out_dir) / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("ckd/loss")]
    expected = [(x["step"], x["loss"]) for x in log_lines(cfg.train.out_dir)]
    assert [s for s, _ in logged] == [1, 2]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_released_length_walks_the_rl_prompt_stream_and_cycles_the_kd_data(run_config,
                                                                          tokenizer, tmp_path):
    """5 RL prompts x 8 samples / batch 4 = 10 steps over 7 KD examples: each pass over the
    KD data is a fresh permutation, cycled as long as the RL stream lasts."""
    rl = write_jsonl(tmp_path / "rl.jsonl", weather_records()[:5])
    cfg = run_config(batch_size=4, micro_batch_size=2, rl_prompts=str(rl), save_every=100,
                     lr=1e-4)
    summary = run_ckd(cfg, tokenizer=tokenizer, log=lambda *_: None)
    lines = log_lines(cfg.train.out_dir)
    assert summary["steps"] == 10 and [x["step"] for x in lines] == list(range(1, 11))
    stream = [i for x in lines for i in x["examples"]]
    for first in range(0, 35, 7):
        assert sorted(stream[first:first + 7]) == list(range(7))


def test_packed_micro_batches_train_exactly_as_padded_ones(run_config, tokenizer):
    """Padding-free packing (positions restart per example, no attention mask): the same
    target rows, losses, gradient norms and trained weights as right-padded micro-batches."""
    quiet = dict(tokenizer=tokenizer, log=lambda *_: None)
    padded = run_config(max_steps=3, batch_size=4, micro_batch_size=2, lr=1e-2,
                        out_dir=run_config().train.out_dir + "-padded")
    packed = run_config(max_steps=3, batch_size=4, micro_batch_size=2, lr=1e-2, packing=True,
                        out_dir=run_config().train.out_dir + "-packed")
    run_ckd(padded, **quiet)
    run_ckd(packed, **quiet)
    a, b = log_lines(padded.train.out_dir), log_lines(packed.train.out_dir)
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    wa = weights(Path(padded.train.out_dir) / "final")
    wb = weights(Path(packed.train.out_dir) / "final")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)


def test_pack_batch_refuses_a_sequence_that_starts_with_a_target():
    from star_train.data.examples import pack_batch

    ok = pack_batch([(torch.tensor([1, 2, 3]), torch.tensor([False, True, True])),
                     (torch.tensor([4, 5]), torch.tensor([False, True]))])
    assert ok["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and ok["attention_mask"] is None
    with pytest.raises(ValueError, match="first token is a target"):
        pack_batch([(torch.tensor([1, 2]), torch.tensor([True, True]))])
