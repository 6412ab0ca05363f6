"""The multimodal LLM: a (4-bit, LoRA-adapted) causal LM with projected soft tokens in its prompt.

    llm, tokenizer = load_llm(path, quantization="nf4")
    model = MultimodalLM(attach_lora(llm, LoraSettings()), Projector(ProjectorConfig(1024, 576)))
    out = model(input_ids, attention_mask, labels=labels, media=embeddings, media_mask=mask)

`media_mask` marks, per row, exactly `soft_tokens` positions whose token embeddings are replaced by
the projector's output for that row's embedding. Without a projector (text-only systems) the same
code runs on token embeddings alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.projector import Projector, ProjectorConfig
from training.prompt import IGNORE_INDEX

log = logging.getLogger(__name__)

RUN_INFO = "run.json"
ADAPTER_DIR = "adapter"
PROJECTOR_FILE = "projector.safetensors"
TOKENIZER_DIR = "tokenizer"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_llm(
    path: Path | str, *, quantization: str = "nf4", dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
):  # fmt: skip
    """A causal LM and its tokenizer from a local HF folder; `nf4` = QLoRA's 4-bit NormalFloat with
    double quantisation (bitsandbytes, CUDA or CPU). The tokenizer pads with EOS when it has no pad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = device or torch.device("cpu")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # ZeRO-3 partitions 4-bit weights only when stored in the model dtype
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r} (nf4 or none)")
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if quantization == "none":
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attach_lora(model, lora, *, gradient_checkpointing: bool = False):
    """LoRA adapters (r, alpha, dropout, target modules) on a frozen, possibly 4-bit, model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    keep_4bit_layout(model)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def keep_4bit_layout(model) -> int:
    """Stop bitsandbytes from re-laying out frozen NF4 weights on CPUs with AVX512-BF16; returns the
    number of 4-bit layers. Its first eval-mode, no-grad forward (our validation) converts a layer to a
    CPU packing with bf16 `absmax`, and the next `state_dict()` (a checkpoint) converts it back with a
    freshly re-quantised `absmax` (bitsandbytes 0.50 `_convert_weight_packed_for_cpu[_inverse]`): lossy,
    so a run that validated computes differently from one resumed from a checkpoint, and only on such
    CPUs (AMD EPYC Zen 4, recent Xeons). Training keeps the layout quantisation gave it."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


class MultimodalLM(nn.Module):
    def __init__(self, llm: nn.Module, projector: Projector | None = None):
        super().__init__()
        self.llm = llm
        self.projector = projector

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def embed(
        self, input_ids: torch.Tensor, media: torch.Tensor | None = None, media_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the soft tokens written into the `media_mask` positions."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if self.projector is None or media is None or media_mask is None or not media_mask.any():
            return embeds
        soft = self.projector(media.to(self.projector_dtype))  # (batch, soft_tokens, hidden)
        rows = media_mask.any(dim=1)
        if (media_mask[rows].sum(dim=1) != soft.shape[1]).any():
            raise ValueError(f"every row with media needs exactly {soft.shape[1]} soft-token positions")
        # masked_scatter fills positions in row-major order: row by row, soft token by soft token
        return embeds.masked_scatter(media_mask.unsqueeze(-1), soft[rows].to(embeds.dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def forward(self, input_ids, attention_mask, labels=None, media=None, media_mask=None, **kwargs):
        """With `labels`: `.loss` is the mean NLL of the labelled tokens (`.loss_sum` / `.num_tokens`), and `.logits` exist only at the
        positions that predict one (the reply is a small part of each sequence; full-vocabulary logits
        of every prompt position would dominate memory). Without: the model's usual output."""
        embeds = self.embed(input_ids, media, media_mask)
        if labels is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        predicts = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # position t predicts t + 1
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=predicts, **kwargs)
        out.targets = labels[:, predicts + 1]  # aligned with out.logits
        # the sum and count let callers weigh every token alike across micro-batches and ranks
        out.loss_sum = F.cross_entropy(
            out.logits.float().flatten(0, 1), out.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        out.num_tokens = int((out.targets != IGNORE_INDEX).sum())
        out.loss = out.loss_sum / max(1, out.num_tokens)  # a batch with no target (padding) gives 0, not NaN
        return out

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, media=None, media_mask=None, **kwargs) -> torch.Tensor:
        """New tokens only (batch, new); prompts must be left-padded."""
        embeds = self.embed(input_ids, media, media_mask)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


@dataclass
class RunInfo:
    """What `runs/<name>/run.json` records: enough to rebuild the model and to say where it came from."""

    name: str
    model: str  # the base model folder
    modality: str
    embedding_column: str | None
    quantization: str
    system_prompt: str
    soft_tokens: int
    max_length: int
    projector: dict | None = None  # ProjectorConfig as a dict
    store: str | None = None
    store_version: int | None = None
    store_tag: str | None = None
    targets: str | None = None
    targets_version: int | None = None
    config_hash: str | None = None
    merg_version: str | None = None
    steps: int = 0
    best_val_loss: float | None = None
    extra: dict = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        (Path(folder) / RUN_INFO).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "RunInfo":
        path = Path(folder) / RUN_INFO
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a merg run (no {RUN_INFO}); train one with `merg train`")
        return cls(**json.loads(path.read_text()))


def save_weights(model: MultimodalLM, folder: Path) -> None:
    """The PEFT adapter (loadable by `PeftModel.from_pretrained`) and the projector (safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model.llm, "peft_config"):
        model.llm.save_pretrained(folder / ADAPTER_DIR)
    if model.projector is not None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.projector.state_dict().items()}
        save_file(state, folder / PROJECTOR_FILE)


def load_run(path: Path | str, *, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """A trained run as (MultimodalLM in eval mode, tokenizer, RunInfo)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(path)
    info = RunInfo.load(folder)
    device = device or torch.device("cpu")
    dtype = dtype or resolve_dtype("auto", device)
    llm, tokenizer = load_llm(info.model, quantization=info.quantization, dtype=dtype, device=device)
    if (folder / ADAPTER_DIR).is_dir():
        llm = PeftModel.from_pretrained(llm, folder / ADAPTER_DIR)
    projector = None
    if info.projector is not None:
        projector = Projector(ProjectorConfig(**info.projector))
        projector.load_state_dict(load_file(folder / PROJECTOR_FILE), strict=True)  # raises on key/shape mismatch
        projector.to(device=device, dtype=dtype)
    model = MultimodalLM(llm, projector).eval()
    return model, tokenizer, info
