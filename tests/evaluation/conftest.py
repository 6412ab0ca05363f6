import shutil

import pytest

from tests.conftest import train_config


@pytest.fixture(scope="session")
def tiny_runs(dialogue_store, tiny_llm, tmp_path_factory):
    """Two short runs of the tiny Llama: the text-only baseline and the audio+video model."""
    from training import train

    runs = tmp_path_factory.mktemp("runs")
    for name, modality in (("text", "text"), ("mm", "audio+video")):
        train(train_config(dialogue_store, runs, tiny_llm, name=name, modality=modality, max_steps=2, quantization="none"))
    return runs


@pytest.fixture
def eval_store(dialogue_store, tmp_path):
    """A private copy of the dialogue store, so evaluation results of one test do not leak into another."""
    return shutil.copytree(dialogue_store, tmp_path / "store")
