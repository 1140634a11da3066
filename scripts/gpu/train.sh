#!/usr/bin/env bash
# Meta-train on Omniglot on a lent GPU machine in slices that each fit one device call,
# resuming the same run from call to call (issue 6's 20-way 1-shot run needs a GPU).
#
# Before the first call, on the CPU machine (.gpu-data/ is git-ignored):
#   mkdir -p .gpu-data && cp DIR/omniglot_28x28.npz .gpu-data/   # 5.6 MB
# Each call (device tool), carrying [".gpu-data", "runs/gpu"]:
#   SECONDS_LIMIT=480 [PRESET=mamlpp] scripts/gpu/train.sh [mamlext train options]
# Training stops after SECONDS_LIMIT; checkpoints are atomic, so the run stays resumable
# from its last one (every --eval-every iterations). The run folder comes back in
# $OUT/run: copy it to runs/gpu before the next call, which then resumes it.
# PRESET picks the run: maml20 (default), the MAML paper's 20-way 1-shot setting; mamlpp,
# MAML++ on 5-way 1-shot as its authors' code computes it (docs/mamlpp.md; 50,000
# iterations). Later options override the preset's.
set -uo pipefail
OUT=${OUT:-gpu-results}
RUN=${RUN:-runs/gpu}
case "${PRESET:-maml20}" in
  maml20) preset=(--ways 20 --shots 1 --meta-batch 16 --inner-steps 5 --step-size 0.1
                  --iterations 60000) ;;
  mamlpp) preset=(--algorithm mamlpp --ways 5 --shots 1) ;;
  *) echo "unknown PRESET ${PRESET}: maml20 or mamlpp" >&2; exit 2 ;;
esac
mkdir -p "$OUT" "$RUN"
exec > >(tee "$OUT/train_log.txt") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # mamlext from the working tree
export TORCH_EXTENSIONS_DIR=$PWD/build/torch_extensions
DEVICE=${DEVICE:-cuda}

nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
resume=()
[ -f "$RUN/checkpoint.pt" ] && resume=(--resume)
timeout --signal=INT "${SECONDS_LIMIT:-480}" python3 -m mamlext train \
  --dataset omniglot --data-root .gpu-data --split-scheme maml "${preset[@]}" \
  --eval-every 500 --device "$DEVICE" --no-progress \
  --out "$RUN" "${resume[@]}" "$@"
echo "exit status $? (124 or 130: stopped by the time limit)"
tail -n 1 "$RUN/metrics.jsonl" 2>/dev/null
grep '"eval"' "$RUN/metrics.jsonl" 2>/dev/null | tail -n 3
cp -r "$RUN" "$OUT/run"
