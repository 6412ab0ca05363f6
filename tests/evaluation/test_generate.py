import numpy as np
import pytest
import torch

from evaluation.generate import PRESETS, Pair, first_sentence, generate_replies, score_references, score_without_context
from training.mllm import MultimodalLM, load_llm

HISTORY = ["Ross: I got the job!", "Rachel: That is wonderful news."]


@pytest.fixture(scope="module")
def tiny(tiny_llm):
    llm, tokenizer = load_llm(tiny_llm, quantization="none")
    return MultimodalLM(llm).eval(), tokenizer


@pytest.mark.parametrize("text, first", [("Oh no! That is bad.", "Oh no!"), ("no end", "no end"), (" Wow. ", "Wow.")])
def test_first_sentence(text, first):
    assert first_sentence(text) == first


def test_left_padded_batches_generate_what_single_prompts_do(tiny):
    model, tokenizer = tiny
    short = Pair("test/dia0_utt0", HISTORY[-1:], "Ross", "Thanks.", None)
    long = Pair("test/dia0_utt1", HISTORY * 4, "Monica", "Yay!", None)
    kwargs = dict(system="Be kind.", soft_tokens=0, batch_size=2)
    together = generate_replies(model, tokenizer, [short, long], PRESETS["default"], **kwargs)
    alone = [generate_replies(model, tokenizer, [p], PRESETS["default"], **kwargs)[0] for p in (short, long)]
    assert together == alone and all(isinstance(r, str) for r in together)
    capped = generate_replies(model, tokenizer, [short], PRESETS["reference"], **kwargs)[0]
    assert len(tokenizer(capped, add_special_tokens=False)["input_ids"]) <= 26


def test_reference_scoring_counts_reply_and_eos(tiny):
    model, tokenizer = tiny
    pairs = [Pair("k0", HISTORY, "Ross", "Thank you so much.", None), Pair("k1", HISTORY[:1], "Joey", "Cool.", None)]
    nll, tokens = score_references(model, tokenizer, pairs, system="s", soft_tokens=0, max_length=128, batch_size=2)
    expected = [len(tokenizer(p.reference, add_special_tokens=False)["input_ids"]) + 1 for p in pairs]
    assert tokens.tolist() == expected and (nll > 0).all()
    # batching must not change a pair's score
    alone, _ = score_references(model, tokenizer, pairs[1:], system="s", soft_tokens=0, max_length=128)
    assert alone[0] == pytest.approx(nll[1], rel=1e-4)


def test_context_free_scoring(tiny):
    model, tokenizer = tiny
    nll, tokens = score_without_context(model, tokenizer, ["Hello there", ""])
    assert tokens.tolist() == [len(tokenizer("Hello there", add_special_tokens=False)["input_ids"]), 0]
    assert nll[1] == 0 and np.isfinite(nll).all()
