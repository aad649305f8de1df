"""The LMM training engine (transformers' Trainer + callbacks) against plain hand-written loops on a
tiny model: accumulated steps and schedule, early stopping with the best weights restored, and an
interrupted run that resumes from its checkpoint to the same final weights."""

import math
import os

import pytest
import torch

from recbole_mm.trainer.engine import Engine, EngineSettings, warmup_steps

N, DIM = 10, 3


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(N, generator=g)
    return x, y


def _model(dropout=0.0):
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(DIM, 1))


def _order(epoch):
    return torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))


class TinyStage:
    """Mean squared error over the examples; validation scores scripted or minus the training MSE."""

    def __init__(self, model, scores=None, crash_at=None):
        self.model, self.scores, self.crash_at = model, list(scores or []), crash_at
        self.x, self.y = _data()
        self.seen_steps, self.validations, self.counter = [], [], 0

    def loss(self, index, step):
        self.seen_steps.append(step)
        self.counter += 1
        pred = self.model(self.x[index]).squeeze(1)
        return ((pred - self.y[index]) ** 2).mean(), {"examples": len(index)}

    def validate(self):
        if self.crash_at is not None and len(self.validations) == self.crash_at:
            raise KeyboardInterrupt("simulated interruption")
        self.validations.append({k: v.clone() for k, v in self.model.state_dict().items()})
        if self.scores:
            return {"score": self.scores.pop(0)}
        with torch.no_grad():
            return {"score": -float(((self.model(self.x).squeeze(1) - self.y) ** 2).mean())}

    def weights(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_weights(self, weights):
        self.model.load_state_dict(weights)

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]


def _settings(**extra):
    base = dict(name="tiny", batch_size=2, grad_accum=2, epochs=2, max_grad_norm=0.5, schedule="cosine",
                warmup_steps=5, valid_every=2, patience=100, log_every=1, seed=7, show_progress=False)
    return EngineSettings(**{**base, **extra})


def _hand_loop(model, settings, lr):
    """Reference: the same order, micro-batches weighted by their share of the step, clipping,
    SGD (not scale-invariant as Adam, so a wrong weighting shows), and the warmup + cosine (or
    linear) factor written out by hand."""
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    bs, accum = settings.batch_size, settings.grad_accum
    per_epoch = math.ceil(N / (bs * accum))
    total = per_epoch * settings.epochs
    warm = min(settings.warmup_steps, max(1, total // 10))

    def factor(step):
        if step < warm:
            return step / warm
        progress = (step - warm) / max(1, total - warm)
        if settings.schedule == "linear":
            return max(0.0, 1 - progress)
        return 0.5 * (1 + math.cos(math.pi * progress))

    step = 0
    torch.manual_seed(settings.seed)
    for epoch in range(settings.epochs):
        order = _order(epoch)
        for start in range(0, N, bs * accum):
            chunk = order[start:start + bs * accum]
            for group in opt.param_groups:
                group["lr"] = lr * factor(step)
            for micro in chunk.split(bs):
                pred = model(x[micro]).squeeze(1)
                (((pred - y[micro]) ** 2).mean() * len(micro) / len(chunk)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            opt.step()
            opt.zero_grad()
            step += 1
    return total


@pytest.mark.parametrize("schedule,clip", [("cosine", 100.0), ("linear", 0.3)])
def test_engine_matches_a_hand_loop_with_accumulation_clipping_and_schedule(tmp_path, schedule, clip):
    # clip 100 never clips (the accumulation weights show); 0.3 always does
    settings = _settings(schedule=schedule, max_grad_norm=clip)
    model = _model()
    stage = TinyStage(model)
    engine = Engine(stage, model, settings, torch.optim.SGD(model.parameters(), lr=0.05), str(tmp_path))
    result = engine.fit(N, _order)
    # 10 examples in micro-batches of 2, 2 per step: 3 steps per epoch, the last with one micro-batch
    assert result.total_steps == result.steps == 6
    assert stage.seen_steps == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    reference = _model()
    assert _hand_loop(reference, settings, lr=0.05) == 6
    # the scored (validated) weights: the best of steps 0, 2, 4, 6 is what the engine keeps
    final_scores = [h["score"] for h in result.history]
    assert [h["step"] for h in result.history] == [0, 2, 4, 6]
    assert result.best == max(final_scores)
    # validation at step 6 saw exactly the hand loop's weights; the kept ones are the best validated
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(stage.validations[-1][name], value, rtol=1e-5, atol=1e-6)
    best_at = final_scores.index(result.best)
    for name, value in stage.validations[best_at].items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    assert all("loss" in h for h in result.history[1:]) and "loss" not in result.history[0]


def test_warmup_is_capped_at_a_tenth_of_the_steps():
    assert warmup_steps(100, 64) == 6 and warmup_steps(8, 640) == 8 and warmup_steps(5, 6) == 1


def test_early_stopping_after_patience_validations_restores_the_best_weights(tmp_path):
    model = _model()
    # validations at steps 0, 1, 2, 3: best at step 1, then two without improvement -> stop at 3
    stage = TinyStage(model, scores=[0.1, 0.5, 0.4, 0.3, 0.9, 0.9])
    engine = Engine(stage, model, _settings(valid_every=1, patience=2), torch.optim.AdamW(model.parameters(), lr=0.05),
                    str(tmp_path))
    result = engine.fit(N, _order)
    assert result.steps == 3 and result.total_steps == 6 and result.best == 0.5
    assert [h["step"] for h in result.history] == [0, 1, 2, 3]
    for name, value in stage.validations[1].items():  # the weights validated at step 1
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in stage.validations[3].items())


def test_keep_last_trains_every_step_and_keeps_the_last_weights(tmp_path):
    model = _model()
    stage = TinyStage(model, scores=[0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # "best" would be step 0
    engine = Engine(stage, model, _settings(valid_every=1, patience=1, keep_best=False),
                    torch.optim.AdamW(model.parameters(), lr=0.05), str(tmp_path))
    result = engine.fit(N, _order)
    assert result.steps == result.total_steps == 6 and result.best == 0.9
    assert [h["step"] for h in result.history] == [0, 1, 2, 3, 4, 5, 6]
    for name, value in stage.validations[6].items():  # the weights validated after the last step
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


class _Tracker:
    def __init__(self):
        self.calls = []

    def log(self, step, **scalars):
        self.calls.append((step, scalars))


def test_tracker_gets_loss_lr_extras_and_validations(tmp_path):
    model = _model()
    tracker = _Tracker()
    engine = Engine(TinyStage(model), model, _settings(valid_prefix="valid_"),
                    torch.optim.AdamW(model.parameters(), lr=0.05), str(tmp_path), tracker=tracker)
    engine.fit(N, _order)
    steps = [(s, c) for s, c in tracker.calls if "loss" in c]
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[0][1]["lr"] == 0.0 or steps[0][1]["lr"] > 0  # a number
    assert steps[2][1]["examples"] == 2  # the step's last micro-batch
    assert [s for s, c in tracker.calls if "valid_score" in c] == [0, 2, 4, 6]


def _run(tmp_path, crash_at=None, resume=False, model=None):
    model = model or _model(dropout=0.3)
    stage = TinyStage(model, crash_at=crash_at)
    engine = Engine(stage, model, _settings(checkpoints=True, save_total_limit=2),
                    torch.optim.AdamW(model.parameters(), lr=0.05), str(tmp_path))
    return engine.fit(N, _order, resume=resume), stage, model


def test_interrupted_run_resumes_to_the_same_weights_and_checkpoints_load_weights_only(tmp_path):
    whole, _, straight = _run(tmp_path / "straight", resume=True)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", crash_at=2)  # validations at 0 and 2 done, crash in step 4's
    folder = tmp_path / "cut" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["checkpoint-2"]
    resumed, stage, model = _run(tmp_path / "cut", resume=True)
    assert resumed.resumed_at == 2 and resumed.steps == 6
    assert min(stage.seen_steps) == 2  # steps 0-1 were not run again
    assert stage.counter == 10  # the stage's own state came back from the checkpoint
    assert [h["step"] for h in resumed.history] == [0, 2, 4, 6]
    for a, b in zip(resumed.history, whole.history):
        assert a["step"] == b["step"] and a["score"] == pytest.approx(b["score"], abs=1e-6)
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    # bounded, pickle-free checkpoints: every file loads with weights_only=True
    kept = sorted(os.listdir(folder))
    assert len(kept) == 2 and kept[-1] == "checkpoint-6"
    from transformers.trainer_pt_utils import safe_globals

    assert sorted(os.listdir(folder / kept[-1])) == ["model.safetensors", "optimizer.pt", "rng_state.pth",
                                                     "scheduler.pt", "stage_state.pth", "trainer_state.json"]
    for name in os.listdir(folder / kept[-1]):
        if name.endswith((".pt", ".pth")):
            with safe_globals():  # rng_state.pth holds numpy's RNG state (transformers' own allowlist)
                torch.load(folder / kept[-1] / name, weights_only=True)
    for name in ("optimizer.pt", "scheduler.pt", "stage_state.pth"):
        torch.load(folder / kept[-1] / name, weights_only=True)  # no allowlist needed at all


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


def _peft(r, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _Net()
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], init_lora_weights=False))
    return model


def test_adapter_round_trip_in_peft_format_and_one_line_errors(tmp_path):
    from recbole_mm.errors import CheckpointError
    from recbole_mm.trainer.ranker_training import load_adapter, save_adapter

    trained, fresh = _peft(2, seed=1), _peft(2, seed=2)
    lora = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" in n}
    assert any(not torch.equal(lora[n], p) for n, p in fresh.named_parameters() if n in lora)
    folder = save_adapter(trained, str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    assert not os.path.exists(folder + ".part")
    load_adapter(fresh, folder)
    for name, param in fresh.named_parameters():
        if name in lora:
            torch.testing.assert_close(param.detach(), lora[name], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"adapter .* does not fit this ranker .*size mismatch") as err:
        load_adapter(_peft(4, seed=3), folder)  # another LoRA rank
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"has no adapter_config.json .* delete its stage folder"):
        load_adapter(fresh, str(tmp_path / "nowhere"))
