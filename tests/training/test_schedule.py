import pytest

from infra.config import REPO_ROOT, TrainConfig, load_config
from training.data import Example, epoch_batches
from training.prompt import EncodedExample
from training.schedule import plan_steps

REAL_MELD_TRAIN_PAIRS = 6910  # tests/training/test_real_meld_text.py counts them


@pytest.mark.parametrize("name", ["llama3-8b", "mistral-7b"])
def test_gpu_configs_warm_up_validate_and_save_within_the_run_on_1_4_and_8_gpus(name):
    t = load_config(REPO_ROOT / "configs" / "train" / f"{name}.yaml").train
    plans = {gpus: plan_steps(t, REAL_MELD_TRAIN_PAIRS, gpus) for gpus in (1, 4, 8)}
    assert {gpus: p.total_steps for gpus, p in plans.items()} == {1: 864, 4: 216, 8: 108}
    for gpus, plan in plans.items():
        assert plan.problems() == [], gpus
        assert plan.save_every < plan.total_steps and plan.eval_every < plan.total_steps
        assert plan.validations > t.patience  # early stopping can trigger
        assert plan.warmup_steps <= 0.05 * plan.total_steps + 1
    assert (plans[8].warmup_steps, plans[8].eval_every, plans[8].save_every) == (5, 11, 11)
    assert (plans[1].warmup_steps, plans[1].eval_every, plans[1].save_every) == (43, 86, 86)


def test_settings_in_steps_that_do_not_fit_the_run_are_named():
    """The configs' old settings (warm-up 50, validation and saves every 200 steps) on 8 GPUs: no
    checkpoint or validation before the end, and a warm-up of half the run."""
    t = TrainConfig(batch_size=8, grad_accum=2, epochs=2, warmup_steps=50, eval_every=200, save_every=200, patience=3)
    problems = plan_steps(t, REAL_MELD_TRAIN_PAIRS, 8).problems()
    assert len(problems) == 4 and "no checkpoint before the end" in problems[0]
    assert "no validation before the end" in problems[1] and "cannot stop early" in problems[2]
    assert "46% of the run" in problems[3]
    assert plan_steps(t, REAL_MELD_TRAIN_PAIRS, 1).problems() == []  # 864 steps: they fit one GPU


@pytest.mark.parametrize("pairs, world_size, batch_size", [(6910, 8, 8), (101, 3, 4), (7, 2, 8), (64, 1, 8)])
def test_the_plan_counts_the_batches_the_trainer_takes(pairs, world_size, batch_size):
    examples = [Example(f"k{i}", EncodedExample([0] * (1 + i % 13), [0] * (1 + i % 13), [False] * (1 + i % 13)), None) for i in range(pairs)]
    plan = plan_steps(TrainConfig(batch_size=batch_size), pairs, world_size)
    for rank in range(world_size):
        batches = epoch_batches(examples, batch_size=batch_size, epoch=0, seed=0, rank=rank, world_size=world_size)
        assert len(batches) == plan.batches_per_epoch


def test_fractions_and_steps():
    assert TrainConfig(eval_every=2.0).eval_every == 2 and TrainConfig(eval_every=0.25).eval_every == 0.25
    with pytest.raises(ValueError, match="neither a whole number"):
        TrainConfig(save_every=1.5)
    plan = plan_steps(TrainConfig(max_steps=10, warmup_steps=0.0, eval_every=0.01, save_every=3), 100, 1)
    assert (plan.total_steps, plan.warmup_steps, plan.eval_every, plan.save_every) == (10, 0, 1, 3)
