#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script that prints its figures (bench/RESULTS.md records them).
#
#   bench/gpu.sh OUT_DIR STAGE...
#
#   data    CIFAR-10 records from the image folders of $DEEPCNN_JPEG (a .tar.gz, train/<class>/*.jpg and
#           test/<class>/*.jpg) through src/convert.py, and the same images as the peer's train.pt/test.pt
#   search  hparams_search=recipe_optuna, 20,000 steps a trial, $SEARCH_JOBS trials at a time on the one
#           GPU, stopped after $SEARCH_SECONDS; then the best settings trained on all 50,000 images, seeds 0-2,
#           and the recipe's own settings beside them
#   fast    experiment=fast on all 50,000 images, seeds 0-2: accuracy and wall time (bench/time_to_accuracy.py)
#   resnet  He et al.'s table: experiment=resnet at depths $RESNET_DEPTHS (default 20 56 110, 110 with the
#           paper's warm-up) at its 64k steps, all at once on the one GPU, stopped after $RESNET_SECONDS;
#           prints each finished run's test error beside the paper's
#   peer    the record holder as published ($PEER: airbench94_muon.py), $PEER_RUNS runs after its warm-up
#   tests   the quick part of the test suite
#
# Needs deepcnn's packages with the sweep and cluster extras (the search runs trials in parallel through
# the joblib launcher); the peer needs torchvision and Triton, and its max-autotune compilation alone
# took over two minutes on an H200.
#
# $SEARCH_OVERRIDES adds overrides to every search trial and tuned run (a dry run on a CPU:
# SEARCH_OVERRIDES="trainer.max_steps=20 trainer=cpu").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
WORK=${WORK:-/tmp/deepcnn-gpu}
export DEEPCNN_DATA=$WORK/cifar
PY=${PYTHON:-python3}
SEARCH_JOBS=${SEARCH_JOBS:-12}
SEARCH_SECONDS=${SEARCH_SECONDS:-300}
SEARCH_OVERRIDES=${SEARCH_OVERRIDES:-}
PEER_RUNS=${PEER_RUNS:-5}
RESNET_DEPTHS=${RESNET_DEPTHS:-20 56 110}
RESNET_SECONDS=${RESNET_SECONDS:-1800}
mkdir -p "$WORK"

stage_data() {
    [ -f "$DEEPCNN_DATA/test_batch.bin" ] && return
    rm -rf "$WORK/jpeg" && mkdir -p "$WORK/jpeg" && tar xzf "$DEEPCNN_JPEG" -C "$WORK/jpeg"
    $PY src/convert.py input="$WORK/jpeg" output="$DEEPCNN_DATA" hydra.run.dir="$WORK/convert"
    $PY bench/airbench_data.py "$DEEPCNN_DATA" "$WORK/peer/cifar10"
}

stage_search() {
    local dir=$WORK/search started=$SECONDS
    # A new process group, so that the parallel trials can be stopped with the search.
    setsid $PY src/train.py -m hparams_search=recipe_optuna hydra.sweep.dir="$dir" \
        hydra/launcher=joblib hydra.launcher.n_jobs="$SEARCH_JOBS" hydra.sweeper.n_jobs="$SEARCH_JOBS" \
        hydra.sweeper.n_trials=$((SEARCH_JOBS * 8)) $SEARCH_OVERRIDES >"$OUT/search.log" 2>&1 &
    local search=$!
    while kill -0 $search 2>/dev/null && ((SECONDS - started < SEARCH_SECONDS)); do sleep 2; done
    kill -TERM -- -$search 2>/dev/null && sleep 15
    kill -KILL -- -$search 2>/dev/null
    echo "search: $((SECONDS - started)) s"
    $PY src/summarize.py dir="$dir" hydra.run.dir="$WORK/summarize" | tee "$OUT/search_summary.md"
    local best
    best=$($PY -c "import optuna, sys; optuna.logging.set_verbosity(optuna.logging.ERROR)
trial = optuna.load_study(study_name='search', storage='sqlite:///$dir/study.db').best_trial
print(' '.join(f'{k}={v}' for k, v in trial.params.items()))")
    echo "best on validation: $best"
    tar czf "$OUT/search.tar.gz" -C "$WORK" --exclude='*.ckpt' --exclude='events.out.*' search
    [ -n "$best" ] || return
    started=$SECONDS
    for seed in 0 1 2; do
        $PY src/train.py experiment=recipe $best data.val_size=0 seed=$seed $SEARCH_OVERRIDES \
            hydra.run.dir="$WORK/tuned/seed$seed" >/dev/null 2>&1 &
    done
    # The preset's own settings beside them, for comparison.
    $PY src/train.py experiment=recipe data.val_size=0 seed=0 $SEARCH_OVERRIDES \
        hydra.run.dir="$WORK/tuned/defaults" >/dev/null 2>&1 &
    wait
    echo "trained on all 50,000, 4 at a time: $((SECONDS - started)) s"
    for run in seed0 seed1 seed2 defaults; do
        $PY -c "import json; r = json.load(open('$WORK/tuned/$run/results.json'))
print(f\"$run: {r['status']}, test {100 * r['test_accuracy']:.2f}%, {r['steps']} steps, {r['images_per_second']:,.0f} images/s\")"
    done
    tar czf "$OUT/tuned.tar.gz" -C "$WORK" --exclude='*.ckpt' --exclude='events.out.*' tuned
}

stage_fast() {
    $PY bench/time_to_accuracy.py --seeds 0 1 2
}

stage_resnet() {
    local started=$SECONDS depth warmup
    declare -A paper=([20]=8.75 [32]=7.51 [44]=7.17 [56]=6.97 [110]=6.43)
    for depth in $RESNET_DEPTHS; do
        warmup=""
        ((depth >= 110)) && warmup="scheduler.warmup_steps=400"
        $PY src/train.py experiment=resnet model.depth="$depth" $warmup hydra.run.dir="$WORK/resnet/$depth" \
            >"$OUT/resnet$depth.log" 2>&1 &
    done
    while [ -n "$(jobs -r)" ] && ((SECONDS - started < RESNET_SECONDS)); do sleep 5; done
    kill $(jobs -p) 2>/dev/null
    echo "resnet: $((SECONDS - started)) s"
    for depth in $RESNET_DEPTHS; do
        $PY -c "import json, os; p = '$WORK/resnet/$depth/results.json'
r = json.load(open(p)) if os.path.exists(p) else None
print(f'ResNet-$depth: ' + (f\"test error {100 * (1 - r['test_accuracy']):.2f}% (paper ${paper[$depth]:-?}%), \"
      f\"{r['steps']} steps, {r['train_seconds']:.0f} s, {r['parameters']:,} parameters\" if r else 'not finished'))"
    done
}

stage_peer() {
    local peer=$WORK/peer
    mkdir -p "$peer"
    sed "s/for run in range(200)/for run in range($PEER_RUNS)/" "$PEER" >"$peer/airbench94_muon.py"
    (cd "$peer" && $PY airbench94_muon.py) >"$OUT/peer.log" 2>&1
    grep -E "eval|Mean|Error" "$OUT/peer.log"
}

stage_tests() {
    $PY -m pytest tests -m 'not slow' -q -x -p no:cacheprovider 2>&1 | tail -n 15
}

for stage in "$@"; do
    echo "== $stage ($(date -u +%H:%M:%S), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no GPU))"
    "stage_$stage"
done
