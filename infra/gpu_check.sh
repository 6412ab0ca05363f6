#!/usr/bin/env bash
# merg's GPU check: one script, under 8 minutes on one H100/H200, results under the folder given.
#
#   bash infra/gpu_check.sh OUT_DIR [--quick]
#
# --quick: tiny sizes, to try the mechanics on a CPU before spending GPU time (CI runs it).
# MERG_GPU_CHECK_STEPS="train evaluate": run only these steps. MERG_GPU_CHECK_SECONDS: the time budget
# (470 s; --quick 1800 s): each step's limit is cut to what is left of it, and a step with none left is skipped.
#
# Installs nothing from the network. Interpreter: $MERG_PYTHON, else .venv/bin/python, else python3.
# On a bare GPU machine (its own Python with torch and CUDA, no network), carry `.gpu/`, made here by
# `.venv/bin/python infra/gpu_bundle.py`: the packages the machine lacks (unpacked into a temp folder on
# PYTHONPATH), the embedded LLM's config and tokenizer, and three 720p clips for the decode rate.
# Steps, most wanted first (each with its own time limit and log OUT_DIR/<step>.log; a failed step does
# not stop the others; OUT_DIR/<step>.json holds its figures):
#   encoder    the preprocessing job's encoder stage, ImageBind-huge (random init) in fp32, bf16 and fp16;
#   decode     CPU decode of every frame of 720p clips on all cores (benchmarks/decode.py);
#   asd        the faithful speaker stage on the GPU (benchmarks/asd.py --device cuda, when it has that option);
#   llm        LLaMA-3-8B's architecture at random init, built on the meta device and written shard by shard
#              (no weights travel; SmolLM2's tokenizer): LLM figures are throughput only;
#   train      QLoRA (NF4 + LoRA on all linear layers, bf16) at that shape: merg vs HF Trainer + PEFT;
#   evaluate   evaluation's model part at that shape: batched one-pass generate-and-score vs batch 1;
#   gpu-tests  the tests marked `gpu`;
# then OUT_DIR/summary.md (infra/gpu_summary.py): each figure beside its goal, met / not met / not measured,
# and full MELD through the job on one 16-core + 1-GPU node estimated from the measured stage rates.
# Peak GPU memory: torch's peak allocation where the benchmark reports it, else nvidia-smi every 0.5 s.
# Ray and decord are not in the bundle (too large): the Ray job itself is covered by the CPU tests.
set -uo pipefail
OUT=${1:?usage: bash infra/gpu_check.sh OUT_DIR [--quick]}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && rm -f "$OUT/steps.txt"
if [ "${2:-}" = --quick ]; then
  QUICK=--quick BUDGET=${MERG_GPU_CHECK_SECONDS:-1800} ARCH=llama3-tiny SLOWER=4  # a CPU: 4x each step's GPU limit
  ENCODER=(--sizes small --dtypes float32,bfloat16 --batch-size 2 --batches 1) DECODE=(--count 1 --clip-seconds 1 --seconds 2)
  ASD=(--device cpu --skip-accuracy --timing-clips 1 --timing-seconds 1) TRAIN=(--steps 2 --batch-size 2 --dialogues 4 --variants merg,hf)
  EVALUATE=(--pairs 4 --batch-size 4)
else
  QUICK="" BUDGET=${MERG_GPU_CHECK_SECONDS:-470} ARCH=llama3-8b SLOWER=1
  ENCODER=(--sizes huge --dtypes float32,bfloat16,float16 --batch-size 32 --batches 4) DECODE=(--seconds 15)
  ASD=(--device cuda --skip-accuracy --timing-clips 8) TRAIN=(--steps 10 --batch-size 16 --variants merg,hf)  # a variant out of memory reruns at half the batch
  EVALUATE=(--pairs 32 --batch-size 32)
fi
cd "$(dirname "$0")/.."
PY=${MERG_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=$(mktemp -d /tmp/merg-gpu-check.XXXXXX)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
started_all=$(date +%s) && deadline=$(( started_all + BUDGET ))
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

# The LLM's tokenizer: the embedded one's if prepared here, else the bundle's (then SmolLM2's architecture at
# random init stands in for the embedded model in the tests marked gpu).
LLM_SOURCE=$("$PY" -c 'from infra.config import PathsConfig; from infra.models import resolve_llm; print(resolve_llm("smollm2-135m-instruct", PathsConfig().model_cache))' 2>/dev/null)
if [ -z "$LLM_SOURCE" ] && [ -f .gpu/llm.tar.xz ]; then
  untar .gpu/llm.tar.xz "$WORK/llm-files" && "$PY" benchmarks/random_llm.py "$WORK/llm-files" "$WORK/llm-random-init" || exit 2
  LLM_SOURCE=$WORK/llm-files
  export MERG_MODEL_CACHE=$WORK/model-cache  # the tests take only its tokenizer
  mkdir -p "$MERG_MODEL_CACHE" && ln -s "$WORK/llm-random-init" "$MERG_MODEL_CACHE/SmolLM2-135M-Instruct"
fi
LLM=$WORK/llm-$ARCH
LLM_NOTE="$ARCH architecture (benchmarks/random_llm.py) at random init with SmolLM2's tokenizer: throughput only"
[ -d .gpu/clips ] && DECODE+=(--clips .gpu/clips)

STEPS=${MERG_GPU_CHECK_STEPS:-encoder decode asd llm train evaluate gpu-tests}  # a subset, to rerun some
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
skip() {  # skip NAME REASON: record why a step did not run (its log's last line is the summary's reason)
  rm -f "$OUT/$1".*
  echo "skipped: $2" | tee "$OUT/$1.log"
  echo "$1 rc=skipped 0s" >> "$OUT/steps.txt"
}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, sample GPU memory, record the exit code
  local name=$1 limit=$(( $2 * SLOWER )) left=$(( deadline - $(date +%s) )); shift 2
  wanted "$name" || return 0
  (( left < limit )) && limit=$left
  (( limit >= 10 )) || { skip "$name" "the check's ${BUDGET} s were spent"; return 0; }
  rm -f "$OUT/$name".*
  local started=$(date +%s)
  (command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/$name.gpumem" 2>/dev/null) &
  local sampler=$!
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  (( rc == 124 )) && echo "timed out after ${limit} s" >> "$OUT/$name.log"
  echo "$name rc=$rc $(( $(date +%s) - started ))s" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.log"
}

step encoder 80 "$PY" benchmarks/preprocess.py --encoder-only "${ENCODER[@]}" --json "$OUT/encoder.json"
step decode 30 "$PY" benchmarks/decode.py "${DECODE[@]}" --json "$OUT/decode.json"
if ! wanted asd; then :
elif "$PY" benchmarks/asd.py --help 2>/dev/null | grep -q -- --device; then
  step asd 70 "$PY" benchmarks/asd.py "${ASD[@]}" --json "$OUT/asd.json"
else
  skip asd "benchmarks/asd.py --help shows no --device option (the speaker benchmark of issue 13 is not here, or does not import)"
fi
if [ -n "$LLM_SOURCE" ]; then
  step llm 60 "$PY" benchmarks/random_llm.py "$LLM_SOURCE" "$LLM" --arch "$ARCH"
elif wanted llm; then
  skip llm "no tokenizer: neither the embedded LLM nor .gpu/llm.tar.xz (infra/gpu_bundle.py) is here"
fi
step train 150 "$PY" benchmarks/train.py "${TRAIN[@]}" --model "$LLM" --json "$OUT/train.json"
step evaluate 80 "$PY" benchmarks/evaluate.py --generation-only --presets reference "${EVALUATE[@]}" --model "$LLM" --json "$OUT/evaluate.json"
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests)
step gpu-tests 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TESTS[@]}"

"$PY" -m infra.gpu_summary "$OUT" "$LLM_NOTE" $QUICK | tee "$OUT/summary.md"
echo "gpu check: $(( $(date +%s) - started_all ))s"
rm -rf "$WORK"
