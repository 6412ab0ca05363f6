import logging
import math

import numpy as np
import pytest
import torch

from evaluation.generate import PRESETS, Pair, first_sentence, generate_replies, score_references, score_without_context
from training.mllm import MultimodalLM, load_llm
from training.prompt import PromptTooLong, encode_prompt

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


def test_reference_scoring_counts_reply_and_end_of_turn(tiny):
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


def test_llama3_reference_perplexity_is_exp_of_the_training_loss(llama3_tiny_llm, dialogue_store):
    """`merg evaluate`'s perplexity scores the gold reply as training learns it: its text + `<|eot_id|>`,
    LLaMA-3-Instruct's end of turn (meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json
    "chat_template"), not + its EOS `<|end_of_text|>`. So on the same pairs it is exp of the training
    loss (token-weighted over the pairs, as the trainer's validation sums it)."""
    from evaluation.evaluate import load_pairs
    from evaluation.generate import generate_and_score
    from featurestore.store import Store
    from infra.config import EvaluateConfig, TrainConfig
    from training.data import collate, load_examples

    llm, tokenizer = load_llm(llama3_tiny_llm, quantization="none")
    model = MultimodalLM(llm).eval()
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tokenizer.eos_token_id
    store = Store.open(dialogue_store)
    train = TrainConfig(model=str(llama3_tiny_llm), modality="text", max_length=256)
    examples = load_examples(store, train, "test", tokenizer)
    assert all(e.encoded.labels[-1] == eot for e in examples)
    with torch.no_grad():
        training = model(**collate(examples, tokenizer.pad_token_id))
    pairs, _, _ = load_pairs(store, EvaluateConfig(max_length=256), "test", "text")
    assert len(pairs) == len(examples) > 1
    _, nll, tokens = generate_and_score(model, tokenizer, pairs, PRESETS["reference"], system=train.system_prompt,
                                        soft_tokens=0, max_length=256, batch_size=4)  # fmt: skip
    assert int(tokens.sum()) == training.num_tokens
    assert math.exp(nll.sum() / tokens.sum()) == pytest.approx(math.exp(training.loss.item()), rel=1e-4)


def test_every_generation_path_fits_an_over_long_history_oldest_lines_first(tiny, caplog):
    """The prompt keeps the newest lines that leave the reply budget within max_length (training's
    rule, training.prompt.fit_history), the log counts the prompts that lost lines, and a last line
    that alone leaves no room is refused in one line."""
    from evaluation.generate import generate_and_score, generation_prompt, generation_prompts

    model, tokenizer = tiny
    history = [f"Rachel: this is line {i} of a very long dialogue." for i in range(1000)]  # ~50,000 characters
    long, short = Pair("k0", history, "Ross", "Yes.", None), Pair("k1", history[-1:], "Ross", "No.", None)
    kwargs = dict(system="Be kind.", soft_tokens=0, max_length=128)
    prompt = generation_prompt(tokenizer, long, max_new_tokens=40, **kwargs).encoded
    dropped = prompt.history_dropped
    assert len(prompt.input_ids) <= 128 - 40 and 0 < dropped < 999
    assert prompt.input_ids == encode_prompt(tokenizer, history[dropped:], "Ross", system="Be kind.")[0]
    assert len(encode_prompt(tokenizer, history[dropped - 1 :], "Ross", system="Be kind.")[0]) > 128 - 40  # none more fits

    with caplog.at_level(logging.INFO, logger="evaluation.generate"):
        replies = generate_replies(model, tokenizer, [long, short], PRESETS["default"], batch_size=2, **kwargs)
        assert replies == generate_and_score(model, tokenizer, [long, short], PRESETS["default"], batch_size=2, **kwargs)[0]
    assert caplog.text.count("1 of 2 prompts lost their oldest history lines to fit max_length 128") == 2
    # without max_length, the model's positions (the tiny Llama's 512) are the limit
    unbounded = generation_prompts(model, tokenizer, [long], system="Be kind.", soft_tokens=0, max_length=None, max_new_tokens=40)
    assert 128 < len(unbounded[0]) <= 512 - 40

    too_long = Pair("k2", history[:3] + ["Rachel: " + "word " * 200], "Ross", "", None)
    for generate in (generate_replies, generate_and_score):
        with pytest.raises(PromptTooLong, match="even the last history line alone makes a"):
            generate(model, tokenizer, [too_long], PRESETS["default"], **kwargs)
