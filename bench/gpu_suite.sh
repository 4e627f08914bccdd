#!/usr/bin/env bash
# Every GPU figure the benchmarks still miss, one part at a time, on one GPU.
#
#   bash bench/gpu_suite.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else /tmp/gpu_suite
#   SUITE_PARTS="throughput_bf16 eval_bf16" bash bench/gpu_suite.sh   # only those parts
#
# Parts (each with its own time limit, so a slow part cannot take the others' figures with it):
#   throughput_f32   bert-base x 16 relations, layers 6..11, batch 32, length 20, stochastic
#                    masks: our step in float32 against the PyTorch reference on the same GPU.
#   throughput_bf16  the same in bfloat16: ours against the strong PyTorch peer
#                    (bench/peer_torch.py), eager and torch.compile-d, in bfloat16 on cuda: step
#                    time, examples/s, peak device memory, the peer's compile time, MFU against
#                    the H100/H200 dense bf16 peak. Takes 3-5 minutes (two compiles of ours'
#                    size and the peer's cold Inductor compile).
#   eval_bf16        evaluation (full model + 16 subnetworks, 512 prompts each) in bfloat16:
#                    ours against the peer, eager and compiled.
#   scale_run        train.py end to end on a random-weight bert-base, 16 relations, 2 epochs
#                    (peak device memory, wall time per phase, bytes written).
#   memory_fits      XLA's memory plan on this GPU's compiler: the relation chunk train.py picks
#                    on 16, 40 and 80 GB GPUs and the planned peak of the step with it.
#   chunk_sweep      what bounding memory costs: the bfloat16 step at relation chunks 1, 2, 4.
# All parts together take longer than one 10-minute command on a lent machine: pick them with
# SUITE_PARTS (the peer's figures: "throughput_bf16 eval_bf16", about 8 minutes).
# A missing Python package (the GPU image has no ml_collections) is installed
# from wheels in .whl/ when that folder exists (bench/README.md says how to fetch them).
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu_suite}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
START=$(date +%s)
PARTS=${SUITE_PARTS:-throughput_f32 throughput_bf16 eval_bf16 scale_run memory_fits chunk_sweep}
part() {  # part NAME SECONDS COMMAND...: runs it with a limit, logs to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s, at $(( $(date +%s) - START ))s)"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT_DIR/$name.log"
  echo "=== $name: exit $rc after $(( $(date +%s) - START ))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv > "$OUT_DIR/gpu.txt" 2>&1
cat "$OUT_DIR/gpu.txt"
$PY -c "import jax, jaxlib, flax, optax, torch; print('jax', jax.__version__, jax.devices(), \
'| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__)"

# SUITE_SIZE=small checks the script itself on a CPU in a few minutes (small model, tiny run).
if [ "${SUITE_SIZE:-base}" = small ]; then
  SHAPE="--size small --relations 4 --batch 8 --length 16 --mode stochastic"
  EVAL="--size small --relations 4 --prompts 64 --batch 32 --length 16"
  SCALE="--size tiny --facts 20"
else
  SHAPE="--size base --relations 16 --batch 32 --length 20 --mode stochastic"
  EVAL="--size base --relations 16 --prompts 512 --batch 128 --length 20"
  SCALE=""
fi
part throughput_f32 130 $PY -m bench.train_throughput $SHAPE --rounds 1 --repeats 20 \
  --baseline-repeats 5 --quiet-wait 0 --peak-tflops 67 --peer none
part throughput_bf16 330 $PY -m bench.train_throughput $SHAPE --dtype bfloat16 --rounds 1 \
  --repeats 20 --no-baseline --peer both --quiet-wait 0 --peak-tflops 989
part eval_bf16 150 $PY -m bench.eval_throughput $EVAL --dtype bfloat16 --rounds 1 \
  --repeats 3 --no-baseline --peer both --quiet-wait 0
part scale_run 170 $PY -m bench.scale_run $SCALE --workdir /tmp/scale_run
cp /tmp/scale_run/scale_run_*.json /tmp/scale_run/rss_*.png "$OUT_DIR"/ 2>/dev/null
part memory_fits 80 $PY -m bench.memory_plan $SHAPE --fits 16 40 80
part chunk_sweep 110 $PY -m bench.chunk_sweep $SHAPE --dtype bfloat16 --chunks 1 2 4 --repeats 10
echo "suite done in $(( $(date +%s) - START ))s"
