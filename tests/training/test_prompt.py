import pytest

from tests.conftest import llama3_like_tokenizer
from training.prompt import IGNORE_INDEX, MEDIA_MARKER, encode_example, encode_prompt, user_message

HISTORY = ["Ross: We were on a break!", "Rachel: You slept with someone else."]


def test_loss_only_on_target_and_end_of_turn(tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    ex = encode_example(tokenizer, HISTORY, "Ross", "I am so sorry.", system="Be kind.", soft_tokens=0)
    labelled = [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX]
    assert labelled == list(range(labelled[0], len(ex.input_ids)))  # one contiguous span at the end
    assert ex.input_ids[-1] == tokenizer.eos_token_id and ex.labels[-1] == tokenizer.eos_token_id
    target = tokenizer.decode([ex.input_ids[i] for i in labelled], skip_special_tokens=True)
    assert target == "I am so sorry."
    prompt = tokenizer.decode(ex.input_ids[: labelled[0]])
    assert "Be kind." in prompt and "Rachel: You slept" in prompt and prompt.rstrip().endswith("assistant")
    assert not any(ex.media_mask)


def test_soft_tokens_sit_in_the_user_message(tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    ids, mask = encode_prompt(tokenizer, HISTORY, "Ross", system="Be kind.", soft_tokens=3)
    positions = [i for i, m in enumerate(mask) if m]
    assert len(positions) == 3 and positions == list(range(positions[0], positions[0] + 3))
    before = tokenizer.decode(ids[: positions[0]])
    after = tokenizer.decode(ids[positions[-1] + 1 :])
    assert before.endswith("How the last line sounded and looked: ") and "You slept" in before
    assert after.startswith("\nReply as Ross.")
    assert MEDIA_MARKER not in tokenizer.decode(ids)
    assert MEDIA_MARKER not in user_message(HISTORY, "Ross", with_media=False)


def test_long_history_drops_oldest_lines_first(tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    history = [f"Joey: line number {i} " + "blah " * 10 for i in range(30)]
    ex = encode_example(tokenizer, history, "Chandler", "Could it BE any longer?", system="s", max_length=120)
    text = tokenizer.decode(ex.input_ids)
    assert len(ex.input_ids) <= 120
    assert "line number 29" in text and "line number 0 " not in text
    assert ex.input_ids[-1] == tokenizer.eos_token_id


def test_plain_prompt_without_chat_template(tiny_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    tokenizer.chat_template = None
    ex = encode_example(tokenizer, HISTORY, "Ross", "Sorry.", system="Be kind.", soft_tokens=1)
    assert "Assistant:" in tokenizer.decode(ex.input_ids) and sum(ex.media_mask) == 1


def test_template_without_system_role_gets_it_folded_into_the_user_turn(tiny_llm):
    from transformers import AutoTokenizer

    from training.prompt import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "[INST] {{ m['content'] }} [/INST]{% endfor %}"
    )
    assert render_prompt(tokenizer, "Be kind.", "Hello") == "[INST] Be kind.\n\nHello [/INST]"


def test_reply_ends_with_the_templates_end_of_turn_not_eos_llama3(tiny_llm):
    """A LLaMA-3-style template ends an assistant turn with <|eot_id|>, which is not the tokenizer's EOS
    (meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json, chat_template and eos_token)."""
    from training.prompt import end_of_turn_ids

    tokenizer = llama3_like_tokenizer(tiny_llm)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_ids(tokenizer) == (eot,) and eot != tokenizer.eos_token_id
    for max_length in (400, 0):  # whole, and a reply cut to fit
        max_length = max_length or len(encode_example(tokenizer, HISTORY, "Ross", None, system="s")) + 3
        ex = encode_example(tokenizer, HISTORY, "Ross", "I am so sorry, truly.", system="s", max_length=max_length)
        assert ex.input_ids[-1] == eot and ex.labels[-1] == eot and tokenizer.eos_token_id not in ex.input_ids


def test_chatml_end_of_turn_is_im_end_and_generation_stops_on_every_stop_id(tiny_llm):
    from transformers import AutoTokenizer, GenerationConfig

    from training.prompt import end_of_turn_ids, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)  # SmolLM2's ChatML template
    assert end_of_turn_ids(tokenizer) == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    llama3 = llama3_like_tokenizer(tiny_llm)
    eot, end_of_text = llama3.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert set(stop_token_ids(llama3)) == {eot, end_of_text}
    assert set(stop_token_ids(llama3, GenerationConfig(eos_token_id=[7, eot]))) == {eot, end_of_text, 7}


def test_fit_history_keeps_the_newest_lines_that_fit_and_refuses_only_when_the_last_cannot():
    """The one fitting rule of training, evaluation, reply and the teacher: the fewest oldest lines
    dropped (what dropping them one by one finds), the reply's tokens kept free of max_length."""
    from training.prompt import PromptTooLong, fit_history

    history = [f"line {i} " + "x" * (i * 7 % 11) for i in range(60)]
    calls = []

    def encode(lines):  # one token per character
        calls.append(len(lines))
        return "".join(lines)

    for budget in range(0, 700, 9):
        one_by_one = next((k for k in range(len(history)) if len(encode(history[k:])) <= budget), None)
        expected = None if one_by_one is None else (encode(history[one_by_one:]), one_by_one)
        calls.clear()
        if expected is None:
            with pytest.raises(PromptTooLong, match=f"over the {budget} tokens that max_length {budget + 5} leaves after the reply's 5"):
                fit_history(history, encode, budget + 5, 5)
        else:
            assert fit_history(history, encode, budget + 5, 5) == expected
        assert len(calls) <= 2 + 6  # the whole history, the last line, a binary search over 60 lines
    assert fit_history([], lambda lines: "", 10, 5) == ("", 0)


def test_training_keeps_the_last_line_and_cuts_the_reply_when_the_line_alone_leaves_too_little(tiny_llm):
    from transformers import AutoTokenizer

    from training.prompt import PromptTooLong, fit_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    history = ["Joey: hi.", "Monica: " + "so many words " * 12]
    last_only = len(fit_prompt(tokenizer, history[-1:], "Ross", system="s", max_length=10**4, reply_tokens=0))
    ex = encode_example(tokenizer, history, "Ross", "A long reply of many words " * 5, system="s", max_length=last_only + 4)
    assert ex.history_dropped == 1 and len(ex.input_ids) == last_only + 4
    assert ex.input_ids[-1] == tokenizer.eos_token_id and sum(label != IGNORE_INDEX for label in ex.labels) == 4
    with pytest.raises(PromptTooLong):  # not even the end of turn fits after the last line
        encode_example(tokenizer, history, "Ross", "Sure.", system="s", max_length=last_only)
