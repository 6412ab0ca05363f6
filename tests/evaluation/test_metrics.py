"""Each metric against values worked out by hand on tiny inputs."""

import math

import numpy as np
import pytest
import torch

from evaluation.metrics import bootstrap_ci, distinct_n, mean_distinct_n, perplexity, sentiment_alignment, word_tokens
from evaluation.metrics.bertscore import official_baseline, rescale
from evaluation.metrics.emotion import LexiconEmotion, emotion_alignment
from evaluation.metrics.perplexity import token_nll
from featurestore.schema import EMOTION_ID


def test_distinct_counts_repeated_ngrams_once():
    replies = ["I am sad. I am sad", "you are happy"]
    # words: i am sad i am sad | you are happy -> 9 unigrams, 6 distinct; bigrams 5 + 2 = 7, distinct 3 + 2 = 5
    assert distinct_n(replies, 1) == pytest.approx(6 / 9)
    assert distinct_n(replies, 2) == pytest.approx(5 / 7)
    # per reply: (3/6 + 3/3) / 2 and (3/5 + 2/2) / 2
    assert mean_distinct_n(replies, 1) == pytest.approx((0.5 + 1) / 2)
    assert mean_distinct_n(replies, 2) == pytest.approx((3 / 5 + 1) / 2)
    assert distinct_n(["", "ok"], 2) == 0.0 and word_tokens("Don’t GO!") == ["don't", "go"]


def test_perplexity_is_token_weighted_over_the_corpus():
    # two examples: 2 tokens with NLL 1 + 1, one token with NLL 4 -> exp(6 / 3), not the mean of exp's
    assert perplexity([2.0, 4.0], [2, 1]) == pytest.approx(math.exp(2.0))
    assert math.isnan(perplexity([], []))


def test_token_nll_counts_only_labelled_positions():
    logits = torch.zeros(1, 4, 5)
    logits[0, 1, 3] = math.log(4)  # p(token 3) = 4 / 8 = 0.5 at position 1
    labels = torch.tensor([[-100, -100, 3, -100]])  # only position 2 is labelled (predicted from position 1)
    nll, count = token_nll(logits, labels)
    assert count.item() == 1 and nll.item() == pytest.approx(math.log(2))


def test_bertscore_rescaling_arithmetic():
    assert official_baseline("roberta-large", 17) == pytest.approx((0.83150584, 0.8314941, 0.83122575))
    assert rescale(np.array([0.8312, 1.0]), 0.8312) == pytest.approx([0.0, 1.0])
    assert rescale(np.array([0.9]), 0.8312) == pytest.approx([(0.9 - 0.8312) / (1 - 0.8312)])


def test_sentiment_alignment():
    assert sentiment_alignment(np.array([0.5, 1.0]), np.array([0.5, -1.0])) == pytest.approx([1.0, -1.0])


def test_emotion_alignment_is_cosine():
    p = np.array([[1.0, 0, 0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0, 0]])
    q = np.array([[1.0, 0, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0]])
    assert emotion_alignment(p, q) == pytest.approx([1.0, 1 / math.sqrt(2)])


def test_lexicon_maps_onto_meld_labels_with_neutral_fallback():
    p = LexiconEmotion().probs(["I am so happy", "the table is there", ""])
    assert p.shape == (3, 7) and np.allclose(p.sum(axis=1), 1)
    assert p[0, EMOTION_ID["joy"]] > 0.5
    assert p[1, EMOTION_ID["neutral"]] == 1.0 and p[2, EMOTION_ID["neutral"]] == 1.0


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(0).normal(size=200)
    a = bootstrap_ci(len(x), lambda i: x[i].mean(), seed=3)
    assert a == bootstrap_ci(len(x), lambda i: x[i].mean(), seed=3)
    assert a != bootstrap_ci(len(x), lambda i: x[i].mean(), seed=4)
    assert a[0] < x.mean() < a[1]


def test_bertscore_with_the_embedded_model():
    from evaluation.metrics.bertscore import BertScorer

    scorer = BertScorer()
    scores = scorer(["I am so sorry to hear that.", "pizza"], ["I am so sorry to hear that.", "I am so sorry."])
    assert scores.f1[0] == pytest.approx(1.0, abs=1e-4) and scores.f1[1] < scores.f1[0]
    assert not scores.rescaled and "not rescaled" in scores.description


def test_blank_reply_scores_zero_bertscore_without_failing_the_batch():
    """bert-score 0.3.13 (Tiiiger/bert_score, bert_score/utils.py ~l.190 `sent_encode`) calls
    `build_inputs_with_special_tokens` on an empty string, which transformers 5's fast tokenizers lack:
    blank replies are scored 0 by definition and never reach it."""
    from evaluation.metrics.bertscore import BertScorer

    scores = BertScorer()(["", "  ", "I am so sorry."], ["I am so sorry.", "I am so sorry.", "I am so sorry."])
    assert list(scores.f1[:2]) == [0.0, 0.0] and list(scores.precision[:2]) == [0.0, 0.0]
    assert scores.f1[2] == pytest.approx(1.0, abs=1e-4) and "blank reply scores 0" in scores.description


def test_per_reply_distinct_excludes_replies_without_ngrams():
    from evaluation.metrics.distinct import reply_distinct_n

    per_reply = reply_distinct_n(["yes", "no no", ""], 2)
    assert np.isnan(per_reply[0]) and per_reply[1] == 1.0 and np.isnan(per_reply[2])
    assert mean_distinct_n(["yes", "a b a b"], 2) == pytest.approx(2 / 3)  # "yes" neither counts nor drags to 0


def test_copy_statistics_count_history_copies_prompt_scaffold_and_blanks():
    from evaluation.metrics.copying import copy_statistics

    history = ["Rachel: I got the job at the museum!", "Ross: No way, that is amazing."]
    replies = ["Rachel: I got the job at the museum!", "Dialogue: Ross said hi", "", "Congratulations, Rachel!"]
    stats = copy_statistics(replies, [history] * 4)
    assert stats == dict(copy_share=0.25, scaffold_share=0.25, empty_share=0.25, distinct_replies=4)
