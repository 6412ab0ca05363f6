from __future__ import annotations

import pytest

from infra.models import EMBEDDED_LLM, ModelNotFound, embedded_llm_dir, resolve_bertscore_model, resolve_llm
from infra.config import PathsConfig


def test_missing_local_model_names_the_path(tmp_path):
    with pytest.raises(ModelNotFound, match=str(tmp_path / "Meta-Llama-3-8B-Instruct")):
        resolve_llm(str(tmp_path / "Meta-Llama-3-8B-Instruct"), cache=tmp_path)
    with pytest.raises(ModelNotFound, match="merg models fetch"):
        resolve_llm(EMBEDDED_LLM, cache=tmp_path)


def test_embedded_bertscore_model_ships_with_its_package():
    folder = resolve_bertscore_model()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@pytest.mark.slow
def test_embedded_llm_loads_offline_and_generates():
    cache = PathsConfig().model_cache
    if not (embedded_llm_dir(cache) / "config.json").is_file():
        pytest.skip(f"embedded LLM not prepared in {cache}: `make install` runs `merg models fetch`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_llm(EMBEDDED_LLM, cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.model_type == "llama"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip(), "the embedded model should produce text"
