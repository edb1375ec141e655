#!/usr/bin/env bash
# Build a real llama.cpp `llama-server` and a tiny random-weight model for check.py.
#
#   bash bench/real_llamacpp/build.sh [WORKDIR]     # WORKDIR defaults to ~/.cache/tokentrail-llamacpp
#
# llama.cpp is the commit vendored in the PyPI sdist of llama-cpp-python 0.3.16 (4227c9b,
# Aug 2025), so the source is fetched with pip from the package registry, not from git.
# Builds only the llama-server target (about 6 minutes on 2 cores); each step is skipped when
# its output exists, so a rerun after a failure resumes. Needs cmake, ninja, a C++ compiler and
# python3 with venv. Afterwards it prints the two paths check.py and the test take.
set -euo pipefail

VERSION=0.3.16
WORK=${1:-"$HOME/.cache/tokentrail-llamacpp"}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SRC="$WORK/llama_cpp_python-$VERSION"
LLAMA="$SRC/vendor/llama.cpp"
BUILD="$WORK/build"
SERVER="$BUILD/bin/llama-server"
MODEL="$WORK/tiny.gguf"

step() { printf '== %s\n' "$*" >&2; }

if [ ! -x "$WORK/venv/bin/python" ]; then
    step "a venv for pip and the model's tools"
    python3 -m venv "$WORK/venv"
    # gguf-py's own dependencies (numpy, pyyaml, tqdm), and tokenizers to train the BPE
    "$WORK/venv/bin/pip" install --quiet numpy pyyaml tqdm tokenizers
fi

if [ ! -d "$LLAMA" ]; then
    step "download llama-cpp-python $VERSION sdist"
    "$WORK/venv/bin/pip" download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$WORK/sdist"
    step "extract"
    tar -xzf "$WORK/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
else
    step "source present: $LLAMA"
fi

if [ ! -f "$BUILD/build.ninja" ]; then
    step "configure (cmake)"
    cmake -S "$LLAMA" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON >"$WORK/configure.log"
fi

if [ ! -x "$SERVER" ]; then
    step "build llama-server (log: $WORK/build.log)"
    cmake --build "$BUILD" --target llama-server >"$WORK/build.log"
else
    step "llama-server present: $SERVER"
fi

if [ ! -f "$MODEL" ]; then
    step "make the tiny model"
    PYTHONPATH="$LLAMA/gguf-py" "$WORK/venv/bin/python" "$HERE/make_tiny.py" --out "$MODEL" >&2
else
    step "model present: $MODEL"
fi

cat <<MSG
export TOKENTRAIL_LLAMA_SERVER=$SERVER
export TOKENTRAIL_LLAMA_MODEL=$MODEL
MSG
