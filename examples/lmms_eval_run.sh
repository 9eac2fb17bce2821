#!/usr/bin/env bash
# vtprune as an lmms-eval model: one process, then two data-parallel processes, on the bundled offline task.
#
#   pip install -c constraints.txt -e ".[eval]" && pip uninstall -y torchvision   # see README "Set-up notes"
#   bash examples/lmms_eval_run.sh [model dir, hub id or vtprune:llava] [method] [keep]
#
# Results: demo_out/lmms_eval/<run>/<model>/<date>_results.json. Pruning statistics are in its "throughput" block
# (avg_vtprune_visual_tokens_before / _after / _per_layer, avg_vtprune_prefill_ms, ...), per sample in the
# samples JSONL ("token_counts" -> "vtprune", with the full PruneConfig), and in the log ("vtprune run: {...}").
# lmms-eval exits 0 even when evaluation fails: check the results file, not the exit code.
set -euo pipefail

MODEL=${1:-vtprune:llava}   # vtprune:llava / vtprune:qwen2_vl: the shipped demo models
METHOD=${2:-divprune}
KEEP=${3:-64}
PY=${PY:-python}
OUT=${OUT:-demo_out/lmms_eval}   # demo_out/ is git-ignored
TASKS=${TASKS:-vtprune_synth224}   # the held-out split at the demo LLaVA's 224 px (vtprune_synth448: Qwen2-VL)
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
# CPU runs: one thread per process (two processes share the cores; oversubscribed OpenMP threads are ~50x slower)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    MULTI=(--multi_gpu)  # on a CPU-only machine this is what makes accelerate start N processes (gloo group)
else
    MULTI=()
fi

# base: the lmms-eval class wrapped (default per family: llava -> llava_hf, others -> vtprune_hf)
ARGS="pretrained=$MODEL,method=$METHOD,keep=$KEEP"   # method=none: the same model unpruned (sweep baseline)

# one process
"$PY" -m lmms_eval --model vtprune --model_args "$ARGS" \
    --tasks "$TASKS" --include_path evals/tasks --limit ${LIMIT:-10} \
    --output_path "$OUT/one_process" --log_samples

# two data-parallel processes: same metric. `python -m accelerate.commands.launch` is `accelerate launch`
# without the console script, which imports timm (broken when torchvision is absent).
"$PY" -m accelerate.commands.launch "${MULTI[@]}" --num_processes 2 --num_machines 1 \
    --mixed_precision no --dynamo_backend no --main_process_port "${PORT:-29533}" \
    -m lmms_eval --model vtprune --model_args "$ARGS" \
    --tasks "$TASKS" --include_path evals/tasks --limit ${LIMIT:-10} \
    --output_path "$OUT/two_processes" --log_samples

# A whole stage list instead of method/keep (one JSON value; quote the whole argument):
#   --model_args 'pretrained=DIR,stages=[{"method":"divprune","keep":64}],seed=0'
