#!/usr/bin/env bash
# merg's GPU check: one script, under 8 minutes on one H100, results under the folder given.
#
#   bash infra/gpu_check.sh OUT_DIR
#
# Installs nothing from the network: it uses $MERG_PYTHON, else .venv/bin/python, else python3, and
# stops with a list of what is missing if that interpreter lacks merg's stack. Steps (each with its
# own time limit, each logged to OUT_DIR/<step>.log, a failed step does not stop the others):
#   1. the tests marked `gpu`;
#   2. the preprocessing job with its encoder pool on the GPU, ImageBind small and huge (random init);
#   3. QLoRA steps with bitsandbytes 4-bit on CUDA under DeepSpeed ZeRO-2 (benchmarks/train.py);
#   4. a batched evaluation cell vs the reference way (benchmarks/evaluate.py);
# then one table of GPU figures (OUT_DIR/summary.md): clips/s, tokens/s, examples/s, peak GPU memory
# (sampled with nvidia-smi every 0.5 s during each step).
set -uo pipefail
OUT=${1:?usage: bash infra/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${MERG_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

"$PY" - > "$OUT/env.json" <<'PYEOF' || { cat "$OUT/env.json"; exit 2; }
import importlib, json, sys
missing = [m for m in ("torch", "ray", "lance", "transformers", "peft", "bitsandbytes", "deepspeed", "decord", "bert_score")
           if importlib.util.find_spec(m) is None]
if missing:
    print(json.dumps({"error": f"missing: {missing}; build the venv with `make install` (or point MERG_PYTHON at one)"}))
    sys.exit(1)
import torch
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "gpus": torch.cuda.device_count()}, indent=2))
PYEOF
cat "$OUT/env.json"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, sample GPU memory, record the exit code
  local name=$1 limit=$2; shift 2
  local started=$(date +%s)
  (command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/$name.gpumem" 2>/dev/null) &
  local sampler=$!
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  echo "$name rc=$rc $(( $(date +%s) - started ))s" | tee -a "$OUT/steps.txt"
}

step gpu-tests 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider -x
step preprocess 150 "$PY" benchmarks/preprocess.py --pool-only --dialogues 25 --sizes small,huge --batch-size 32 --json "$OUT/preprocess.json"
step train 100 "$PY" benchmarks/train.py --steps 10 --batch-size 8 --json "$OUT/train.json"
step evaluate 80 "$PY" benchmarks/evaluate.py --pairs 64 --batch-size 32 --json "$OUT/evaluate.json"

"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}
def peak(name):
    path = out / f"{name}.gpumem"
    values = [int(v) for v in path.read_text().split()] if path.is_file() else []
    return f"{max(values):,} MiB" if values else "-"
env, pre, train, ev = load("env"), load("preprocess"), load("train"), load("evaluate")
rows = [("GPU", env.get("gpu") or "none", "")]
for size in ("small", "huge"):
    if size in pre:
        rows.append((f"preprocess, ImageBind {size} (random init)", f"{pre[size]['clips_per_s']:.2f} clips/s", peak("preprocess")))
for variant, r in train.items():
    rows.append((f"QLoRA NF4 + ZeRO-2, {variant}", f"{r['tokens_per_s']:,.0f} tokens/s", f"{r['peak_mb']:,.0f} MB (torch)"))
if ev:
    rows.append(("evaluation cell, merg sweep", f"{ev['merg_examples_per_s']:.2f} examples/s", peak("evaluate")))
    rows.append(("evaluation, reference way (batch 1)", f"{ev['reference_examples_per_s']:.2f} examples/s", ""))
print("| measure | figure | peak GPU memory |\n|---|---|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
print()
print((out / "steps.txt").read_text() if (out / "steps.txt").is_file() else "")
PYEOF
