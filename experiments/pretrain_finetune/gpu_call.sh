#!/usr/bin/env bash
# One GPU call for the SST-2 target: the 1,024-wide LSTM (the best fine-tuned model so far,
# 85.83 ± 0.24 on an H100) again, five pretrained seeds that share their initial head
# (`--set init_seed=1`), scored each alone, as one ensemble and as one model soup (`--soups`);
# then, in a second call on the same warm machine, three single networks of the same recipe
# distilled from the five on a transfer set (`students`: task.teachers = the five runs,
# task.transfer_copies=2; on the CPU this beat students without one, 84.13 vs 83.33%).
#
# Here (once):  bash experiments/pretrain_finetune/gpu_call.sh stage
#   copies SST-2 and WikiText-2 into .gpudata/ (ignored by .git/info/exclude), and the wheels the
#   GPU machine lacks into .whl/ (pip download for its Python 3.12, x86-64).
# There, two `run` calls, carry [".whl", ".gpudata"], the second at once after the first (the
# machine stays warm ~30 s and keeps .gpuruns/ between calls; on a fresh one it finds no teachers):
#   bash experiments/pretrain_finetune/gpu_call.sh run                 (timeout_s 540)
#   bash experiments/pretrain_finetune/gpu_call.sh gpu-students 270    (timeout_s: what is left, ≥ 300)
#   results under $OUT/pf: results.json, the table, curves; $OUT/logs.tgz: the runs' logs.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" = stage ]; then
  for d in /.gpudata/ /.whl/ /.gpuruns/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
  mkdir -p .gpudata/sst2 .gpudata/wikitext-2 .whl
  cp ../shared/data/sst2/{train,dev}.tsv .gpudata/sst2/
  cp ../shared/data/wikitext-2/train.txt .gpudata/wikitext-2/
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 omegaconf==2.4.0 tensorboardX==2.6.5 cloudpickle
  du -sh .gpudata .whl
  exit 0
fi

students() {  # DIR SECONDS [override ...]: 3 students of DIR's pretrained SST-2 runs, stopped after SECONDS
  local P=$1 budget=$2 s teachers first
  shift 2
  teachers=$(ls -d "$P"/sst2_lstm_pretrained_seed*/ 2>/dev/null | sed 's:/$::' | paste -sd, -) || true
  first=$(ls -d "$P"/sst2_lstm_pretrained_seed1_*/ 2>/dev/null | head -1 | sed 's:/$::') || true
  [ -n "$teachers" ] && [ -f "$first/summary.json" ] || { echo "students: no finished pretrained runs in $P" >&2; return 1; }
  echo "students of $(echo "$teachers" | tr , '\n' | wc -l) teachers, the recipe of $first"
  for s in 1 2 3; do  # the teachers' recipe (their first run's resolved config), another seed
    timeout -s TERM "$budget" python3 -m nlm_jax train --config "$first/resolved_config.yaml" workdir="$P/student_s$s" \
      seed=$s "task.teachers=[$teachers]" train.progress=false "$@" > "$P/student_s$s.log" 2>&1 &
  done
  wait || true
  for s in 1 2 3; do
    python3 -m nlm_jax eval --workdir "$P/student_s$s" --json > "$P/student_s$s/eval_validation.json" || true
    python3 - "$P/student_s$s" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1] + "/eval_validation.json"))
print(f"{sys.argv[1]}: step {r['step']}, SST-2 dev accuracy {100 * r['accuracy']:.2f}%, loss {r['loss']:.4f}")
PY
  done
}

if [ "${1:-}" = students ]; then  # here, on runs of the runner: students DIR SECONDS [override ...]
  shift
  students "$@"
  exit
fi

usage="usage: $0 stage|run|gpu-students SECONDS|students DIR SECONDS [override ...]"
case "${1:-}" in run|gpu-students) ;; *) echo "$usage" >&2; exit 2 ;; esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-cuda-mps-control -d || true
OUT=${OUT:-/tmp/out}
P=$PWD/.gpuruns/pf  # ignored (.git/info/exclude): kept on the machine between two calls
mkdir -p $P
pack() {  # every run's log and config, one file (few files come back from the machine)
  (cd $P && find . -name metrics.jsonl -o -name resolved_config.yaml -o -name 'eval_*.json' -o -name '*.log' \
    | tar czf $OUT/logs.tgz -T -)
}
if [ "$1" = gpu-students ]; then  # the second call: students of the first call's five runs
  students $P $(( ${2:-270} - 25 )) train.checkpoint_every=1500 task.transfer_copies=2 2>&1 | tail -8 \
    || echo "students: exit $?"
  pack
  exit
fi
python3 -m experiments.pretrain_finetune.run --pairs sst2/lstm --data .gpudata --runs $P --out $OUT/pf \
  --jobs 6 --seeds 5 --scratch-seeds 0 --kill-at 480 --soups \
  --set task.pooling=concat --set init_seed=1 --set train.checkpoint_every=1500 --set train.keep_checkpoints=1 \
  --pretrain-set train.keep_checkpoints=1 --pretrain-set model.dropout=0.4 \
  --pretrain-set tokenizer.vocab_size=40000 --pretrain-set tokenizer.include=$P/sst2_train_text.txt \
  --set model.d_embed=512 --set model.d_hidden=1024 --pretrain-set model.d_embed=512 \
  --pretrain-set model.d_hidden=1024 --pretrain-set train.steps=12000 2>&1 | tail -40 || echo "runner: exit $?"
pack
