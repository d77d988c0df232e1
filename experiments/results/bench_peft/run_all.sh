#!/bin/bash
# The issue-18 measurements, in order: run alone, from a clean git worktree,
# as `chrt -f 1 experiments/results/bench_peft/run_all.sh` (OUT=folder).
cd "$(git rev-parse --show-toplevel)"
L=${OUT:-/tmp/bench}
mkdir -p $L
for i in 1 2 3; do
  echo "== minilm,flaxbert run $i $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
  python -m experiments.bench peft --sizes=minilm,flaxbert --targets=qv --notorch_compile --reps 6 --json > $L/minilm_$i.jsonl 2> $L/minilm_$i.err
done
echo "== smollm2 $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
python -m experiments.bench peft --sizes=smollm2 --targets=qv,all --notorch_compile --reps 6 --json > $L/smollm2.jsonl 2> $L/smollm2.err
echo "== smollm2_2k $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
python -m experiments.bench peft --sizes=smollm2_2k --targets=qv --notorch_compile --reps 4 --json > $L/smollm2_2k.jsonl 2> $L/smollm2_2k.err
echo "== bf16 $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
python -m experiments.bench peft --sizes=minilm,smollm2 --targets=qv --dtypes=bfloat16 --notorch_compile --reps 6 --json > $L/bf16.jsonl 2> $L/bf16.err
echo "== done $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== profile minilm $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
python -m lorajax.cli.profile --config configs/rt_minilm_lora.py --batch_sizes 32 --steps 8 --where --out $L/prof_minilm > $L/prof_minilm.log 2>&1
echo "== profile smollm2 $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
python -m lorajax.cli.profile --config configs/shakespeare_smollm2_lora.py --batch_sizes 8 --steps 5 --where --out $L/prof_smol > $L/prof_smol.log 2>&1
echo "== profile smollm2 chunked $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
python -m lorajax.cli.profile --config configs/shakespeare_smollm2_lora.py --batch_sizes 8 --steps 5 --where --config.loss_chunk=512 --config.attn_chunk=128 --out $L/prof_smol_chunked > $L/prof_smol_chunked.log 2>&1
echo "== all done $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
