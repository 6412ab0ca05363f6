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


@pytest.mark.parametrize("soft_tokens", [0, 2])
def test_one_pass_generation_and_scoring_matches_the_separate_ones(tiny, soft_tokens):
    from evaluation.generate import generate_and_score
    from training.projector import Projector, ProjectorConfig

    model, tokenizer = tiny
    media = None
    if soft_tokens:
        torch.manual_seed(0)
        model = MultimodalLM(model.llm, Projector(ProjectorConfig(8, model.llm.config.hidden_size, soft_tokens))).eval()
        media = np.random.default_rng(0).normal(size=8).astype(np.float32)
    pairs = [Pair(f"k{i}", HISTORY[: 1 + i % 2] * (1 + i), s, ref, media)
             for i, (s, ref) in enumerate([("Ross", "Thank you so much."), ("Joey", "Cool."), ("Monica", "I knew it!")])]  # fmt: skip
    kwargs = dict(system="Be kind.", soft_tokens=soft_tokens, batch_size=3)
    replies, nll, tokens = generate_and_score(model, tokenizer, pairs, PRESETS["default"], max_length=256, **kwargs)
    assert replies == generate_replies(model, tokenizer, pairs, PRESETS["default"], **kwargs)
    ref_nll, ref_tokens = score_references(model, tokenizer, pairs, max_length=256, **kwargs)
    assert tokens.tolist() == ref_tokens.tolist()
    assert nll == pytest.approx(ref_nll, rel=1e-4)


def test_generation_prompt_does_not_depend_on_the_gold_reply(tiny):
    from evaluation.generate import generation_prompt

    _, tokenizer = tiny
    history = [f"Rachel: line number {i} of a long talk." for i in range(12)]
    short, long = (Pair("k", history, "Ross", reply, None) for reply in ("Yes.", "word " * 200))
    kwargs = dict(system="Be kind.", soft_tokens=0, max_length=128, max_new_tokens=16)
    prompt = generation_prompt(tokenizer, short, **kwargs)
    assert prompt.encoded.input_ids == generation_prompt(tokenizer, long, **kwargs).encoded.input_ids
    assert len(prompt.encoded.input_ids) <= 128 - 16  # oldest lines dropped to leave the reply budget
