import numpy as np
import pytest

from evaluation.metrics.emotion import HFEmotion, MeldEmotionClassifier, load_emotion_backend, train_meld_emotion_classifier
from featurestore.schema import EMOTION_ID


@pytest.mark.meld_text
def test_meld_classifier_trains_on_real_text_and_loads(meld_text_dir, tmp_path):
    report = train_meld_emotion_classifier(meld_text_dir, tmp_path / "clf", cs=(1.0,), limit=400)
    assert 0 < report["test"]["weighted_f1"] <= 1 and set(report["test"]["per_class"]) >= {"neutral", "joy"}
    classifier = MeldEmotionClassifier(tmp_path / "clf")
    p = classifier.probs(["I am so happy for you!", "Whatever."])
    assert p.shape == (2, 7) and np.allclose(p.sum(axis=1), 1)


def test_auto_backend_falls_back_to_the_lexicon(tmp_path):
    assert load_emotion_backend("auto", tmp_path).name == "nrc-lexicon"
    with pytest.raises(FileNotFoundError, match="train-emotion-classifier"):
        load_emotion_backend("meld", tmp_path)


def test_hf_classifier_labels_map_onto_meld(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from infra.models import resolve_bertscore_model
    from transformers import AutoTokenizer

    labels = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # the reference's 6-class Twitter model
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        num_labels=6, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve_bertscore_model()).save_pretrained(tmp_path)
    p = HFEmotion(tmp_path).probs(["hello", "I love it"])
    assert np.allclose(p.sum(axis=1), 1, atol=1e-5)  # love folded into joy: nothing lost
    assert (p[:, [EMOTION_ID["neutral"], EMOTION_ID["disgust"]]] == 0).all()  # labels it lacks stay 0
