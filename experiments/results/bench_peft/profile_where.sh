#!/bin/bash
# "Where the time goes" for the issue-18 rows, with lorajax.profiling.op_time
# reading each op to its `end:` event and sharing concurrent instants (after
# 9462a4f). Run alone from a clean worktree:
#   chrt -f 1 experiments/results/bench_peft/profile_where.sh   (OUT=folder)
cd "$(git rev-parse --show-toplevel)"
L=${OUT:-/tmp/where}
ONLY=${ONLY:-}
mkdir -p $L
p() {  # name, then profile flags
  n=$1; shift
  [ -n "$ONLY" ] && [[ ! " $ONLY " =~ " $n " ]] && return
  echo "== $n $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
  python -m lorajax.cli.profile --where --out $L/$n "$@" > $L/$n.log 2>&1
}
p minilm_32x128 --config configs/rt_minilm_lora.py --batch_sizes 32 --steps 8 --config.data.max_len=128
p minilm_32x128_nodropout --config configs/rt_minilm_lora.py --batch_sizes 32 --steps 8 --config.data.max_len=128 --config.model.dropout=0.0
p minilm_32x48 --config configs/rt_minilm_lora.py --batch_sizes 32 --steps 8
p smollm2_8x256 --config configs/shakespeare_smollm2_lora.py --batch_sizes 8 --steps 5 --config.data.max_len=256
p smollm2_8x256_chunked --config configs/shakespeare_smollm2_lora.py --batch_sizes 8 --steps 5 --config.data.max_len=256 --config.loss_chunk=512 --config.attn_chunk=128
echo "== done $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
