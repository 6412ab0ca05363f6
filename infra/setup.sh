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

# --- system packages: espeak-ng (speech for mini-MELD), ffmpeg (clip muxing); chromium and its
# driver for the browser tests of the report and the explorer (optional: those tests skip without them)
apt_install() {  # apt_install required|optional PACKAGE...
  local kind=$1; shift
  ((${#@})) || return 0
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && sudo=(sudo) || { say "WARNING: missing $kind system packages: $* (install them with your package manager)"; return 0; }
  fi
  command -v apt-get >/dev/null || { say "WARNING: missing $kind system packages: $* (no apt-get here)"; return 0; }
  say "installing $kind system packages: $*"
  if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }; then
    [ "$kind" = optional ] && { say "WARNING: could not install $* (their tests will skip)"; return 0; }
    say "could not install $* with apt-get (see its message above)"; return 1
  fi
}
required=() optional=()
command -v espeak-ng >/dev/null || required+=(espeak-ng)
command -v ffmpeg >/dev/null || required+=(ffmpeg)
command -v chromium >/dev/null || optional+=(chromium)
command -v chromedriver >/dev/null || optional+=(chromium-driver)
apt_install required "${required[@]}"
apt_install optional "${optional[@]}"

# Present is not enough: each tool must start (a half-configured apt install leaves one that dies).
bash infra/check_system.sh tools || { say "fix the tools above, then run make again"; exit 1; }

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

say "checking that every heavy package imports"
bash infra/check_system.sh imports "$VENV/bin/python" || { say "fix the packages above, then run make again"; exit 1; }

say "preparing the embedded default models (offline afterwards)"
"$VENV/bin/merg" models fetch

touch "$VENV/.merg-installed"
say "done: activate with 'source $VENV/bin/activate' or use $VENV/bin/merg"
