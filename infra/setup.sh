#!/usr/bin/env bash
# One-time install of merg into a project virtualenv (.venv). Idempotent: `make` calls it only when
# pyproject.toml or this script changed since the last successful run (stamp file .venv/.merg-installed).
#
# Order matters: torch first (pinned: an unpinned requirement pulls a newer multi-GB build), then the
# packages that need install flags pip cannot express in pyproject.toml, then the project itself.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TORCH_SPEC=${MERG_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- system packages: espeak-ng (speech for mini-MELD), ffmpeg (clip muxing), chromium (report check) -
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing system packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    say "installing system packages with sudo: ${missing[*]}"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "WARNING: missing system packages: ${missing[*]} (install them with your package manager);"
    say "         the mini-MELD generator needs espeak-ng and ffmpeg, the report's browser test chromium."
  fi
fi

# --- virtualenv -------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip

say "installing $TORCH_SPEC"
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH_SPEC
# torchaudio: only its kaldi fbank is used; --no-deps keeps it from replacing torch.
"${PIP[@]}" --no-deps torchaudio==2.11.0
# imagebind-unofficial is the official model code; its declared deps (pytorchvideo) are broken with
# current torchvision and only needed by imagebind.data, which merg does not import.
"${PIP[@]}" --no-deps imagebind-unofficial==0.1.1

say "installing merg and its pinned dependencies"
"${PIP[@]}" -e '.[dev]'

if ! "$VENV/bin/python" -c 'import deepspeed' 2>/dev/null; then
  say "building deepspeed 0.19.8 against the installed torch"
  DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation deepspeed==0.19.8
fi

say "preparing the embedded default models (offline afterwards)"
"$VENV/bin/merg" models fetch

touch "$VENV/.merg-installed"
say "done: activate with 'source $VENV/bin/activate' or use $VENV/bin/merg"
