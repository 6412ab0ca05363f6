#!/usr/bin/env bash
# merg's GPU check: one script, under 8 minutes on one H100/H200, results under the folder given.
#
#   bash infra/gpu_check.sh OUT_DIR [--quick]
#
# --quick: tiny sizes, to try the mechanics on a CPU before spending GPU time.
# MERG_GPU_CHECK_STEPS="train evaluate": run only these steps.
#
# Installs nothing from the network. Interpreter: $MERG_PYTHON, else .venv/bin/python, else python3.
# On a bare GPU machine (its own Python with torch and CUDA, no network), carry `.gpu/`, made here by
# `.venv/bin/python infra/gpu_bundle.py`: the packages the machine lacks (unpacked into a temp folder on
# PYTHONPATH) and the embedded LLM's config and tokenizer (its weights do not fit the transfer: the
# LLM figures then come from the same architecture at random init — throughput only).
# Steps (each with its own time limit and log OUT_DIR/<step>.log; a failed step does not stop the others):
#   1. the tests marked `gpu`;
#   2. the preprocessing job's encoder stage on the GPU, ImageBind small and huge (random init);
#   3. QLoRA steps with bitsandbytes 4-bit on CUDA under DeepSpeed ZeRO-2 vs HF Trainer vs batch 1;
#   4. evaluation's model part: batched one-pass generation + scoring vs the batch-1 way;
# then one table of GPU figures (OUT_DIR/summary.md): clips/s, tokens/s, examples/s, peak GPU memory
# (torch's peak allocation where the benchmark reports it, else nvidia-smi sampled every 0.5 s).
# Ray and decord are not in the bundle (too large): the Ray job itself is covered by the CPU tests.
set -uo pipefail
OUT=${1:?usage: bash infra/gpu_check.sh OUT_DIR [--quick]}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && rm -f "$OUT/steps.txt"
if [ "${2:-}" = --quick ]; then
  ENCODER=(--sizes small --batch-size 2 --batches 1) TRAIN=(--steps 2 --batch-size 2 --dialogues 4) EVALUATE=(--pairs 4 --batch-size 4)
else
  ENCODER=(--sizes small,huge --batch-size 32 --batches 4) TRAIN=(--steps 20 --batch-size 8) EVALUATE=(--pairs 48 --batch-size 48)
fi
cd "$(dirname "$0")/.."
PY=${MERG_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=$(mktemp -d /tmp/merg-gpu-check.XXXXXX)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
started_all=$(date +%s)
untar() { "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$@"; }

if [ -f .gpu/site.tar.xz ] && [ "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$(cat .gpu/python-version 2>/dev/null)" ]; then
  echo "unpacking .gpu/site.tar.xz into $WORK/site"
  untar .gpu/site.tar.xz "$WORK/site" || exit 2
  export PYTHONPATH=$PWD:$WORK/site${PYTHONPATH#"$PWD"}
fi

"$PY" - > "$OUT/env.json" <<'PYEOF' || { cat "$OUT/env.json"; exit 2; }
import importlib.util, json, sys
from importlib import metadata
needed = ("torch", "lance", "transformers", "peft", "bitsandbytes", "deepspeed", "pydantic", "imagebind", "pytest")
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    print(json.dumps({"error": f"missing: {missing}: run `make install`, point MERG_PYTHON at a venv, or carry .gpu/ (infra/gpu_bundle.py)"}))
    sys.exit(1)
import torch
versions = {}
for dist in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "pylance", "accelerate", "ray"):
    try:
        versions[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        versions[dist] = None
print(json.dumps({"python": sys.version.split()[0], "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "gpus": torch.cuda.device_count(), "versions": versions}, indent=2))
PYEOF
cat "$OUT/env.json"

# The LLM for steps 1, 3, 4: the embedded one if prepared here, else its architecture at random init.
LLM=smollm2-135m-instruct
LLM_NOTE="embedded SmolLM2-135M-Instruct"
if [ -f .gpu/llm.tar.xz ] && ! "$PY" -c 'from infra.config import PathsConfig; from infra.models import resolve_llm; resolve_llm("smollm2-135m-instruct", PathsConfig().model_cache)' 2>/dev/null; then
  untar .gpu/llm.tar.xz "$WORK/llm-files" && "$PY" benchmarks/random_llm.py "$WORK/llm-files" "$WORK/llm-random-init" || exit 2
  LLM=$WORK/llm-random-init
  LLM_NOTE="SmolLM2-135M architecture at random init (throughput only)"
  export MERG_MODEL_CACHE=$WORK/model-cache  # the tests take only its tokenizer
  mkdir -p "$MERG_MODEL_CACHE" && ln -s "$LLM" "$MERG_MODEL_CACHE/SmolLM2-135M-Instruct"
fi
echo "LLM: $LLM_NOTE" | tee "$OUT/llm.txt"

STEPS=${MERG_GPU_CHECK_STEPS:-gpu-tests encoder train evaluate}  # a subset, to rerun one step
step() {  # step NAME SECONDS COMMAND...: run with a time limit, sample GPU memory, record the exit code
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  rm -f "$OUT/$name".*
  local started=$(date +%s)
  (command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/$name.gpumem" 2>/dev/null) &
  local sampler=$!
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  echo "$name rc=$rc $(( $(date +%s) - started ))s" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.log"
}

mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests)
step gpu-tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TESTS[@]}"
step encoder 120 "$PY" benchmarks/preprocess.py --encoder-only "${ENCODER[@]}" --json "$OUT/encoder.json"
step train 240 "$PY" benchmarks/train.py "${TRAIN[@]}" --model "$LLM" --json "$OUT/train.json"
step evaluate 120 "$PY" benchmarks/evaluate.py --generation-only --presets reference "${EVALUATE[@]}" --model "$LLM" --json "$OUT/evaluate.json"

"$PY" - "$OUT" "$LLM_NOTE" <<'PYEOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out, llm = Path(sys.argv[1]), sys.argv[2]
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}
def sampled(name):
    path = out / f"{name}.gpumem"
    values = [int(v) for v in path.read_text().split() if v.isdigit()] if path.is_file() else []
    return f"{max(values):,} MiB (nvidia-smi)" if values else "-"
env, enc, train, ev = load("env"), load("encoder"), load("train"), load("evaluate")
rows = [("GPU", env.get("gpu") or "none", "")]
for size in ("small", "huge"):
    if size in enc:
        rows.append((f"encoder stage, ImageBind {size} (random init), batch {enc['batch_size']}", f"{enc[size]['clips_per_s']:,.1f} clips/s",
                     f"{enc[size]['peak_mb']:,.0f} MB (torch)" if enc[size].get("peak_mb") else sampled("encoder")))
for variant, r in train.items():
    ratio = f" (merg {train['merg']['tokens_per_s'] / r['tokens_per_s']:.2f}x)" if variant != "merg" and "merg" in train else ""
    rows.append((f"QLoRA NF4 + LoRA, {variant}{ratio}", f"{r['tokens_per_s']:,.0f} tokens/s", f"{r['peak_mb']:,.0f} MB (torch)"))
if ev:
    rows.append(("evaluation model part: merg one pass, batched", f"{ev['merg_examples_per_s']:.2f} examples/s", sampled("evaluate")))
    rows.append((f"evaluation model part: reference, batch 1 (merg {ev['ratio']:.2f}x)", f"{ev['reference_examples_per_s']:.2f} examples/s", ""))
print(f"LLM: {llm}\n")
print("| measure | figure | peak GPU memory |\n|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
print()
print((out / "steps.txt").read_text() if (out / "steps.txt").is_file() else "")
PYEOF
echo "gpu check: $(( $(date +%s) - started_all ))s"
rm -rf "$WORK"
