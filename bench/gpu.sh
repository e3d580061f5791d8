#!/usr/bin/env bash
# GPU benchmark on one H200 (or any one GPU), no network, no hub: random-init Llama ~1B and ~3B,
# full fine-tuning (bf16, FSDP2 one rank, sdpa, activation checkpointing on/off) and LoRA;
# tokens/s, MFU and max_memory_allocated per case. Under 8 minutes (cases past --budget-s are skipped).
#   bash bench/gpu.sh                 # writes $OUT/gpu.json (or bench/results/gpu.json)
#   bash bench/gpu.sh --only 0,3      # a subset of cases (indices into CASES in gpu_bench.py)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
OUT_JSON="${OUT:-bench/results}/gpu.json"
PY=${PY:-python}   # e.g. PY=.venv/bin/python bash bench/gpu.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
timeout 470 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    bench/gpu_bench.py --out "$OUT_JSON" --budget-s 400 "$@"
rc=$?
echo "gpu.sh: rc $rc, results in $OUT_JSON"
exit $rc
