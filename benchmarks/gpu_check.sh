#!/usr/bin/env bash
# Every GPU check, on one NVIDIA GPU in two calls of about 2 and 8 minutes. Two, because the lent machine
# takes at most 64 MiB a call and has no network, while the SmolLM2 GGUF (98 MB) and the wheels its image
# lacks (faiss-cpu, datasets, gguf) are more; benchmarks/gpu_payload.sh splits them into .gpu/a and .gpu/b:
#   bash benchmarks/gpu_payload.sh               # here, once
#   OUT=/tmp/out bash benchmarks/gpu_check.sh smoke   # call 1, carrying .gpu/a: the CUDA path in bfloat16 on a
#                                                     # tiny Llama (fit, build, query, eval)
#   OUT=/tmp/out bash benchmarks/gpu_check.sh real    # call 2, carrying .gpu/b, on the same warm machine:
#                                                     # SmolLM2-135M in bf16 (fp32 factors), 2,000 then 20,000
#                                                     # rows, then the tiny Llama in float32
# On a GPU machine that has the package, gguf and network, `bash benchmarks/gpu_check.sh all` runs both.
# Writes $OUT/gpu/ (at most 8 files: results JSON, logs, nvidia-smi, versions).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT/gpu"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of this script where there is no GPU
export PYTHONUNBUFFERED=1
if [ "${INSTALL_WHEELS:-1}" = 1 ] && ls .gpu/a/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/a/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
TINY=benchmarks/.cache/gpu_smoke/tiny_llama
SMALL=(--model "$TINY" --n-train 300 --n-fit 60 --k2 10 --n-text-queries 4 --n-fact-queries 4 --budget 16K)
quiet() { tr '\r' '\n' | grep -v -E "(it/s|s/it)\]$" || true; }
bench() {  # NAME SECONDS ARGS...: one bench_real run, its log kept whether it ends, fails or runs out of time
    local name=$1 limit=$2
    shift 2
    set +e
    timeout "$limit" "$PY" -m benchmarks.bench_real --device "$DEVICE" --out "$OUT/gpu/$name.json" "$@" 2>&1 | quiet > "$OUT/gpu/$name.log"
    local rc=${PIPESTATUS[0]}
    set -e
    echo "== $name: exit $rc" | tee -a "$OUT/gpu/$name.log"
    grep -v -E '^ +("|[][{}0-9-])|^[{}]' "$OUT/gpu/$name.log" | tail -n 24  # the summaries and any traceback, not the JSON
}

smoke() {
    nvidia-smi > "$OUT/gpu/nvidia-smi.txt" 2>&1 || true
    "$PY" - <<'PY' | tee "$OUT/gpu/env.txt"
import datasets, faiss, pyarrow, torch, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "datasets", datasets.__version__, "pyarrow", pyarrow.__version__)
print("faiss", faiss.__version__, "gpus", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
PY
    PYTHONPATH=tests:$PWD${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "
from tiny import tiny_model, word_tokenizer
t = word_tokenizer(); m = tiny_model('llama', width=64, layers=2, vocab=len(t))
m.save_pretrained('$TINY'); t.save_pretrained('$TINY')"
    bench smoke_bfloat16 120 "${SMALL[@]}" --dtype bfloat16 --factor-share 0.75 --cache benchmarks/.cache/gpu_smoke/bf16
}

real() {
    local cache=benchmarks/.cache/real_gpu
    mkdir -p "$cache"
    if [ -d .gpu/b ]; then
        if [ ! -f .gpu/a/smollm2.gguf.xz.0 ]; then echo "NO PART A: the machine was not the warm one of call 1"; exit 3; fi
        unxz() { "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)"; }
        cat .gpu/a/smollm2.gguf.xz.0 .gpu/b/smollm2.gguf.xz.1 | unxz > "$cache/smollm2.gguf"
        (cd "$cache" && sha256sum -c "$OLDPWD/.gpu/b/smollm2.gguf.sha256")
        for f in .gpu/b/corpus*.jsonl.xz; do unxz < "$f" > "$cache/$(basename "${f%.xz}")"; done
    fi
    local gguf=()
    [ -f "$cache/smollm2.gguf" ] && gguf=(--gguf "$cache/smollm2.gguf")
    local common=("${gguf[@]}" --dtype bfloat16 --n-fit 400 --budget 64K --factor-share 0.75 --truncate --token-budget 16384 --cache "$cache")
    bench real_2000 ${REAL_2000_SECONDS:-170} "${common[@]}" --n-train 2000 --k2 200
    bench real_20000 ${REAL_20000_SECONDS:-280} "${common[@]}" --n-train 20000 --k1 5000 --k2 200
    if [ -f "$TINY/config.json" ]; then
        bench smoke_float32 ${SMOKE_FP32_SECONDS:-60} "${SMALL[@]}" --dtype float32 --cache benchmarks/.cache/gpu_smoke/f32
    fi
}

case ${1:-all} in
    smoke) smoke ;;
    real) real ;;
    all) smoke; real ;;
    *) echo "usage: gpu_check.sh smoke|real|all" >&2; exit 2 ;;
esac
