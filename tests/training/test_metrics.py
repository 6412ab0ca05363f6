"""MetricLogger: the step's loss weighs every target token alike; tokens/s over all ranks."""

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
