"""MetricLogger: the step's loss weighs every target token alike; tokens/s over all ranks."""

import json

import torch

from training.metrics import MetricLogger


def test_metric_logger_weighs_every_token_alike(tmp_path):
    logger = MetricLogger(tmp_path / "metrics.jsonl", torch.device("cpu"), is_main=True)
    logger.add_micro_batch(torch.tensor(1.0), 1, 10)  # one token, loss 1
    logger.add_micro_batch(torch.tensor(9.0), 3, 30)  # three tokens, loss 3 each
    record = logger.end_step(seconds=2.0)
    assert record == {"loss": 2.5, "target_tokens": 4, "real_tokens": 40}  # not (1 + 3) / 2
    assert logger.tokens_per_s == 20.0 and logger.run_tokens_per_s == 20.0
    logger.write(record)
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_a_resumed_run_drops_the_rows_it_replays(tmp_path):
    """issue 27 item 6: rows logged past the restored step (and a row a kill cut short) are dropped when
    the resumed run's logger opens, so the file holds one row per step."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": {s}}}\n' for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    logger = MetricLogger(path, torch.device("cpu"), is_main=True, from_step=2)
    logger.write({"step": 3, "loss": 0.5})
    logger.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert json.loads(path.read_text().splitlines()[-1])["loss"] == 0.5
