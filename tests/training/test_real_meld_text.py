"""The text-only path on MELD's real annotation text: a `--no-media` store, targets, a baseline run, evaluation."""

import pytest

from featurestore.store import Store
from infra.config import EvaluateConfig, MergConfig, PathsConfig, TargetsConfig

from tests.conftest import train_config


@pytest.mark.slow
@pytest.mark.meld_text
def test_text_baseline_on_real_meld_text(meld_text_dir, tiny_llm, tmp_path):
    from evaluation import evaluate
    from infra.config import load_config
    from pipelines.job import run_preprocess
    from training import build_targets, train

    store_root = tmp_path / "store"
    run_preprocess(load_config(None, [f"preprocess.meld_root={meld_text_dir}", f"paths.store={store_root}", "preprocess.no_media=true"]))
    store = Store.open(store_root)
    utterances = store.query(columns=["split", "dialogue_id"]).to_pylist()
    sizes = {s: sum(u["split"] == s for u in utterances) for s in ("train", "dev", "test")}
    assert sizes == {"train": 9989, "dev": 1109, "test": 2610}

    report = build_targets(store, TargetsConfig(kind="next_utterance"), tmp_path)
    # a pair per change of speaker between adjacent lines (same-speaker lines merge into one turn)
    assert report.written == {"train": 6910, "dev": 782, "test": 1765}

    train(train_config(store_root, tmp_path / "runs", tiny_llm, name="text", modality="text", max_steps=2, limit=64, eval_limit=16))
    with pytest.raises(Exception, match="--no-media"):  # a multimodal run needs embeddings the store lacks
        train(train_config(store_root, tmp_path / "runs", tiny_llm, name="mm", modality="audio+video", max_steps=1))
    config = MergConfig(
        paths=PathsConfig(store=store_root),
        evaluate=EvaluateConfig(systems=[{"name": "text", "run": str(tmp_path / "runs" / "text")}], limit=8,
                                emotion_backend="lexicon", bootstrap_samples=20),
    )  # fmt: skip
    assert len(evaluate(config).done) == 1
