#!/usr/bin/env bash
# Does merg's machine *work*, not just have things installed? Each failure is named with its fix.
#
#   infra/check_system.sh tools           ffmpeg -version and espeak-ng --version must run
#   infra/check_system.sh imports PYTHON  every heavy package must import in PYTHON
#
# A half-configured apt install leaves a binary on PATH that dies at start-up ("error while loading
# shared libraries"); a broken wheel imports with an error deep in a run. Both are caught here, before
# anything else runs. A tool that is absent is only a warning (everything but mini-MELD runs without);
# a tool that is present but broken, or a package that fails to import, exits 1.
set -uo pipefail

say() { printf '\033[1m[check]\033[0m %s\n' "$*"; }

# tool -> its version flag; apt package = tool name
declare -A VERSION_FLAG=([ffmpeg]=-version [espeak-ng]=--version)

check_tools() {
  local broken=0 tool exe err
  for tool in ffmpeg espeak-ng; do
    if ! exe=$(command -v "$tool"); then
      say "WARNING: $tool not found: install it (sudo apt-get install $tool); mini-MELD generation needs it"
      continue
    fi
    if ! err=$("$exe" "${VERSION_FLAG[$tool]}" 2>&1 >/dev/null </dev/null); then
      say "ERROR: $tool cannot run: $exe ${VERSION_FLAG[$tool]} failed: $(printf '%s' "$err" | tail -n 3 | tr '\n' ' ')"
      say "       fix: sudo dpkg --configure -a && sudo apt-get install --reinstall $tool"
      broken=1
    fi
  done
  return $broken
}

# module:distribution (what to reinstall when the import fails)
HEAVY=${MERG_CHECK_MODULES:-"torch:torch torchvision:torchvision torchaudio:torchaudio ray:ray lance:pylance \
pyarrow:pyarrow transformers:transformers peft:peft bitsandbytes:bitsandbytes deepspeed:deepspeed av:av \
decord:decord cv2:opencv-python-headless imagebind:imagebind-unofficial bert_score:bert-score"}

check_imports() {  # one process: the packages share torch, so importing them together is quick
  local py=$1 dist module why failures
  failures=$("$py" - $HEAVY <<'PY'
import importlib, sys
for pair in sys.argv[1:]:
    module, dist = pair.split(":")
    try:
        if module == "imagebind":  # merg loads its model code without the package __init__ (pkg_resources)
            from pipelines.imagebind import _imagebind_model_module
            _imagebind_model_module()
        else:
            importlib.import_module(module)
    except BaseException as exc:  # noqa: BLE001 - a broken wheel can raise anything, even SystemExit
        why = (str(exc).strip().splitlines() or [""])[0]
        print(f"import-failed\t{dist}\t{module}\t{type(exc).__name__}: {why}")  # marked: packages print too
PY
  ) || { say "ERROR: $py cannot run: rm -rf .venv && make install"; return 1; }
  failures=$(grep '^import-failed' <<<"$failures") || return 0
  while IFS=$'\t' read -r _ dist module why; do
    say "ERROR: python package $dist does not import ($module): $why"
    say "       fix: $py -m pip install --force-reinstall --no-deps $dist (same version), or rm -f .venv/.merg-installed && make install"
  done <<<"$failures"
  return 1
}

case "${1:-}" in
  tools) check_tools ;;
  imports) check_imports "${2:?usage: check_system.sh imports PYTHON}" ;;
  *) echo "usage: $0 tools | imports PYTHON" >&2; exit 2 ;;
esac
