#!/usr/bin/env bash
# Every GPU check in one call (under 8 minutes on one H200): the CUDA path of fit, build and query, bf16 model
# weights with fp32 factors, FAISS on the GPU where installed (RaBitQ itself scans on the CPU), and the
# real-model benchmark at a size a GPU affords. Writes $OUT/gpu/ (results JSON, log, nvidia-smi).
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT/gpu"
nvidia-smi > "$OUT/gpu/nvidia-smi.txt" 2>&1 || true
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, transformers, faiss, gradindex" 2>/dev/null; then
    "$PY" -m pip install -q -e . gguf 2>&1 | tail -2
fi
"$PY" - <<'PY' | tee "$OUT/gpu/env.txt"
import torch, faiss
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("faiss", faiss.__version__, "gpus", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
PY
# The real model in bf16 on CUDA, 20,000 sequences, factors on 2,000 (float32 factors from the bf16 model), stage 2 on low-rank factors.
timeout 460 "$PY" -m benchmarks.bench_real --device cuda --dtype bfloat16 --n-train 20000 --n-fit 2000 --k2 50 \
    --token-budget 16384 --budget 64K --factor-share 0.75 --cache benchmarks/.cache/real_gpu --out "$OUT/gpu/real_model_cuda_bf16.json" \
    2>&1 | tr '\r' '\n' | grep -v "it/s]$" | tail -60 > "$OUT/gpu/real_model.log" || echo "benchmark stopped: $?" >> "$OUT/gpu/real_model.log"
tail -5 "$OUT/gpu/real_model.log"
