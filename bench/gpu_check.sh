#!/usr/bin/env bash
# The repository's GPU claims, checked on one CUDA GPU in at most 10 minutes, from the repository root:
#
#   bash bench/gpu_check.sh                  # the python of .venv if there is one, else the one on the PATH
#   PY=/path/to/python bash bench/gpu_check.sh
#   MAKE_VENV=1 bash bench/gpu_check.sh      # first make .venv and install requirements.txt (not timed)
#
# What it runs: the test suite on the real GPU, and the test of the compiled loop replayed as CUDA graphs,
# which runs only there; train.py --amp from images (bf16); --amp forced to fp16 with its GradScaler,
# through DIY_LSTM's hand-written backward; a run resumed on the GPU against one that was not
# interrupted; torchrun with one process, in DistributedDataParallel over NCCL; --compile reduce-overhead
# with no recompile past Dynamo's limit; extract_features.py, scst, sample.py and evaluate.py on cuda; the
# one-line error of --device cuda where CUDA is hidden; python -m bench.lstm --device cuda. It prints a
# PASS, WARN or FAIL line for each, and exits 0 only if nothing FAILed. Each step's output is in the log
# folder it names at the end.
set -uo pipefail
[ -f train.py ] && [ -f lstm_loops.py ] || { echo "run from the repository root: bash bench/gpu_check.sh"; exit 2; }
if [ "${MAKE_VENV:-0}" = 1 ]; then
    python3 -m venv .venv && .venv/bin/python -m pip install -q -r requirements.txt || exit 2
fi
PY=${PY:-$([ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || command -v python3)}
unset CAPTIONING_FAKE_CUDA  # the real GPU, not the test suite's fake one
W=$(mktemp -d /tmp/gpu_check.XXXXXX); L=$W/log; D=$W/data; mkdir -p "$L"
export TORCHINDUCTOR_CACHE_DIR=$W/inductor PYTHONUNBUFFERED=1
T0=$(date +%s); DEADLINE=$((T0 + 580)); FAILED=0

pass() { echo "PASS  $*"; }
warn() { echo "WARN  $*"; }
fail() { echo "FAIL  $*"; FAILED=1; }
left() { echo $((DEADLINE - $(date +%s))); }
python() { "$PY" "$@"; }
run() {  # run NAME SECONDS python|torchrun ARGS...: output in $L/NAME.out, within what is left of the 10 minutes
    local name=$1 limit=$2 start; start=$(date +%s); shift 2
    local command=("$@")
    case ${command[0]} in
        python) command[0]=$PY;;
        torchrun) command=("$PY" -m torch.distributed.run "${command[@]:1}");;
    esac
    [ "$(left)" -lt "$limit" ] && limit=$(( $(left) - 5 ))
    if [ "$limit" -lt 15 ]; then echo "SKIP  $name (out of time)" | tee "$L/$name.out"; return 124; fi
    timeout -k 5 "$limit" "${command[@]}" > "$L/$name.out" 2>&1; local rc=$?
    echo "      [$name: exit $rc, $(( $(date +%s) - start )) s]"
    [ $rc -ne 0 ] && tail -n 15 "$L/$name.out" | sed 's/^/      | /'
    return $rc
}
says() { grep -q -- "$2" "$L/$1.out"; }  # says NAME TEXT: whether step NAME printed TEXT
check() { "$PY" "$W/check.py" "$@"; }

cat > "$W/check.py" <<'EOF'
"""Reads gpu_check.sh's run folders: trained FOLDER MIN_STEPS [val] [scaler]; same A B; captions A B."""
import json
import math
import sys

import torch


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def trained(folder, min_steps, *want):
    """The run trained at least min_steps steps, its loss fell and stayed finite, and the checkpoint holds
    the GPU's random state (and the fp16 GradScaler's state, with scaler)."""
    c = load(f'{folder}/checkpoint.pt')
    losses = [e['loss'] for e in c['history']['train']]
    assert c['step'] >= int(min_steps), f"{c['step']} steps, expected at least {min_steps}"
    assert losses and all(map(math.isfinite, losses)), 'a NaN or inf training loss'
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.85 * first, f'loss {first:.3f} -> {last:.3f}: not learning'
    val = [round(e['loss'], 4) for e in c['history'].get('val', [])]
    assert 'val' not in want or (val and all(map(math.isfinite, val))), 'no finite validation loss'
    rng = c.get('cuda_rng')
    assert rng and all(s is not None for s in rng), 'no CUDA random state in the checkpoint'
    scale = (c.get('scaler') or {}).get('scale')
    assert 'scaler' not in want or scale is not None, 'the fp16 run saved no GradScaler state'
    print(f"{c['step']} steps, train loss {first:.3f} -> {last:.3f}, val {val}, scale {scale}")


def same(a, b):
    """Exit 0 if the two checkpoints' weights are bitwise equal, 3 if within 1e-4, else 1."""
    A, B = load(a), load(b)
    assert A['step'] == B['step'], f"steps {A['step']} and {B['step']}"
    worst, bitwise = 0.0, True
    for part in ('encoder', 'decoder'):
        for name, x in A[part].items():
            if not torch.equal(x, B[part][name]):
                bitwise = False
                worst = max(worst, (x.double() - B[part][name].double()).abs().max().item())
    print(f"resumed against uninterrupted, {A['step']} steps: bitwise {bitwise}, largest difference {worst:.3g}")
    sys.exit(0 if bitwise else 3 if worst < 1e-4 else 1)


def captions(a, b):
    A, B = ({r['file_name']: r['caption'] for r in json.load(open(p))} for p in (a, b))
    print(f'{sum(A[k] == B.get(k) for k in A)} of {len(A)} captions the same on cuda and on the cpu')


try:
    globals()[sys.argv[1]](*sys.argv[2:])
except AssertionError as err:
    sys.exit(f'check failed: {err}')
EOF

echo "== 0. the machine ($W)"
"$PY" - <<'EOF' || { fail "torch sees no usable CUDA GPU"; exit 2; }
import torch
import torch.distributed as dist
assert torch.cuda.is_available(), f'torch {torch.__version__}, built for CUDA {torch.version.cuda}, sees no GPU'
p = torch.cuda.get_device_properties(0)
print(f'torch {torch.__version__} CUDA {torch.version.cuda} cuDNN {torch.backends.cudnn.version()} NCCL '
      f'{dist.is_nccl_available()}; {torch.cuda.device_count()} x {p.name} sm_{p.major}{p.minor} '
      f'{p.total_memory / 2**30:.0f} GiB')
EOF
nvidia-smi --query-gpu=driver_version,memory.used --format=csv,noheader 2>/dev/null | sed 's/^/driver, memory used: /'
command -v cc >/dev/null || command -v gcc >/dev/null || warn "no C compiler: torch.compile (Triton, Inductor) will fail"

# The synthetic set (1,000 training images of 64 pixels, 5 captions each) and its vocabulary, made while
# the benchmark runs.
( python -m synthetic --root "$D" --num_train 1000 --num_val 100 --image_size 64 --seed 0 &&
  python build_vocab.py --caption_path "$D/annotations/captions_train.json" --vocab_path "$D/vocab.json" --threshold 1
) > "$L/data.out" 2>&1 &
DATA=$!

echo "== 1. DIY_LSTM against cuDNN's nn.LSTM (input 256, hidden 512, batch 128; compiled: reduce-overhead)"
if run bench 180 python -m bench.lstm --device cuda --repeats 8; then
    grep '^|' "$L/bench.out"
    read -r plain compiled < <(awk -F'|' '/\(b\) fixed length 20, fwd\+bwd/ {print $6, $7}' "$L/bench.out")
    if [ -z "${compiled:-}" ]; then
        fail "python -m bench.lstm --device cuda printed no row (b)"
    elif awk -v r="$compiled" 'BEGIN {exit !(r <= 1.5)}'; then
        pass "bench.lstm, length 20, forward and backward: DIY / cuDNN ${plain} plain, ${compiled} compiled"
    else
        warn "bench.lstm, length 20, forward and backward: compiled DIY / cuDNN ${compiled}, over 1.5"
    fi
else
    fail "python -m bench.lstm --device cuda"
fi

wait $DATA || { fail "the synthetic set"; tail "$L/data.out"; exit 1; }
TRAIN=(--caption_path "$D/annotations/captions_train.json" --vocab_path "$D/vocab.json")
VAL=(--val_image_dir "$D/val" --val_caption_path "$D/annotations/captions_val.json")

echo "== 2. the test suite on the real GPU (in the background, 8 workers), and the CUDA-graphs test"
( timeout -k 5 $(( $(left) - 20 )) "$PY" -m pytest -n 8 -q -p no:cacheprovider --durations=8 \
    --deselect tests/test_diy_lstm.py::test_compiled_loop_with_cuda_graphs_matches_nn_lstm ) > "$L/pytest.out" 2>&1 &
SUITE=$!
( timeout -k 5 300 "$PY" -m pytest -n 0 -q -p no:cacheprovider -rs \
    tests/test_diy_lstm.py::test_compiled_loop_with_cuda_graphs_matches_nn_lstm ) > "$L/gpu_test.out" 2>&1 &
GPU_TEST=$!

echo "== 3. feature caches on cuda (pooled for the fc decoder, grids for attention)"
FEAT=(--image_dir "$D/train" --caption_path "$D/annotations/captions_train.json" --backbone smallcnn --weights none --image_size 64 --crop_size 64 --num_workers 4 --device cuda)
if run feat_fc 90 python extract_features.py "${FEAT[@]}" --output_dir "$W/feat_fc" \
   && run feat_grid 90 python extract_features.py "${FEAT[@]}" --output_dir "$W/feat_grid" --decoder attention \
   && says feat_fc '^device: cuda:0 (.*), dtype: float32, stored as float16'; then
    pass "extract_features.py --device cuda, pooled and grids: $(head -1 "$L/feat_fc.out")"
else
    fail "extract_features.py --device cuda"
fi

# --compile reduce-overhead with --amp, in the background: 2 epochs from the cache, validated on images.
( run compiled 300 python train.py --features "$W/feat_fc" "${TRAIN[@]}" "${VAL[@]}" --model_path "$W/compiled" \
    --batch_size 128 --num_epochs 2 --num_workers 2 --log_step 4 --amp --compile reduce-overhead --device cuda
) > "$L/compiled.status" 2>&1 &
COMPILED=$!

echo "== 4. train.py --amp on cuda from images: smallcnn trained too, 2 epochs of 157 steps, validation, TensorBoard"
if run fc_amp 150 python train.py --image_dir "$D/train" "${TRAIN[@]}" "${VAL[@]}" --model_path "$W/fc_amp" \
        --backbone smallcnn --weights none --train_backbone --bn_momentum 0.1 --image_size 64 --crop_size 64 \
        --no_flip --hidden_size 256 --forget_bias 1 --grad_clip 5 --batch_size 32 --learning_rate 3e-3 \
        --num_epochs 2 --num_workers 4 --log_step 10 --amp --device cuda \
   && says fc_amp '^device: cuda:0 (.*), dtype: bfloat16 autocast (--amp)' && check trained "$W/fc_amp" 300 val; then
    pass "train.py --amp (bf16) on cuda: $(head -1 "$L/fc_amp.out")"
else
    fail "train.py --amp (bf16) on cuda"
fi

echo "== 5. --amp as fp16 with a GradScaler (the GPUs before bf16), forced here, through DIY_LSTM's hand-written backward"
FP16='import sys, torch, train, training; training.amp_dtype = lambda device: torch.float16; train.main(sys.argv[1:])'
if run fp16 120 python -c "$FP16" --features "$W/feat_fc" "${TRAIN[@]}" --model_path "$W/fp16" --batch_size 32 \
        --num_epochs 1 --num_workers 2 --log_step 5 --learning_rate 3e-3 --amp --tensorboard none --device cuda \
   && says fp16 'dtype: float16 autocast with gradient scaling (--amp' && check trained "$W/fp16" 150 scaler; then
    pass "--amp as fp16 with a GradScaler on cuda"
else
    fail "--amp as fp16 with a GradScaler on cuda"
fi

echo "== 6. resume on cuda: 2 epochs at once against 1 and --resume (attention: dropout draws on the GPU)"
ATT=(--features "$W/feat_grid" --decoder attention --caption_path "$D/annotations/captions_train.json" --vocab_path "$D/vocab.json" --embed_size 64 --hidden_size 128 --attention_size 64 --batch_size 32 --num_workers 0 --log_step 5 --tensorboard none --seed 1 --device cuda)
if run att_whole 90 python train.py "${ATT[@]}" --model_path "$W/whole" --num_epochs 2 \
   && run att_first 60 python train.py "${ATT[@]}" --model_path "$W/split" --num_epochs 1 \
   && run att_resumed 60 python train.py "${ATT[@]}" --model_path "$W/split" --num_epochs 2 --resume \
   && says att_resumed 'resuming from'; then
    check same "$W/whole/checkpoint.pt" "$W/split/checkpoint.pt"
    case $? in
        0) pass "resume on cuda: the weights of the uninterrupted run, bitwise";;
        3) warn "resume on cuda: within 1e-4 of the uninterrupted run, not bitwise (CUDA's atomic adds?)";;
        *) fail "resume on cuda differs from the uninterrupted run";;
    esac
else
    fail "the attention runs for the resume check"
fi

echo "== 7. torchrun with one process: a process group over NCCL, DistributedDataParallel, the cache's backbone left out"
if run torchrun1 120 torchrun --standalone --nproc_per_node=1 train.py --features "$W/feat_fc" "${TRAIN[@]}" \
        "${VAL[@]}" --model_path "$W/ddp" --batch_size 32 --num_epochs 2 --num_workers 2 --log_step 5 \
        --tensorboard none --amp --device cuda \
   && says torchrun1 'torchrun: 1 process, the model in DistributedDataParallel over nccl' \
   && says torchrun1 'epoch 2: validation loss' && check trained "$W/ddp" 150 val; then
    pass "torchrun --nproc_per_node=1 train.py --device cuda: DDP over NCCL, validation on images"
else
    fail "torchrun --nproc_per_node=1 train.py --device cuda"
fi

echo "== 8. scst, sample.py and evaluate.py on cuda; --device cuda with the GPU hidden"
CK=$W/fc_amp/checkpoint.pt
if run scst 90 python train.py --scst --init_from "$CK" --image_dir "$D/train" "${TRAIN[@]}" --model_path "$W/scst" \
        --batch_size 32 --num_epochs 1 --scst_minutes 0.5 --num_workers 2 --device cuda \
   && says scst '^device: cuda:0 (' && [ -f "$W/scst/checkpoint.pt" ]; then
    pass "train.py --scst --device cuda"
else
    fail "train.py --scst --device cuda"
fi
if run sample_cuda 60 python sample.py --checkpoint "$CK" --image png/example.png "$D/val" --beam_size 3 \
        --json "$W/cuda.json" --device cuda \
   && run sample_cpu 60 python sample.py --checkpoint "$CK" --image png/example.png "$D/val" --beam_size 3 \
        --json "$W/cpu.json" --device cpu \
   && says sample_cuda '^device: cuda:0 ('; then
    pass "sample.py --device cuda, beam 3: $(check captions "$W/cuda.json" "$W/cpu.json")"
else
    fail "sample.py --device cuda --beam_size 3"
fi
if run sample_n 60 python sample.py --checkpoint "$CK" --image png/example.png --sample 3 --block_trigrams --device cuda \
   && run gates 60 python sample.py --checkpoint "$CK" --image png/example.png --gates "$W/gates.png" --device cuda \
   && run attention 60 python sample.py --checkpoint "$W/whole/checkpoint.pt" --image png/example.png \
        --attention "$W/attention.png" --beam_size 3 --device cuda; then
    pass "sample.py --sample, --gates and --attention on cuda"
else
    fail "sample.py --sample, --gates or --attention on cuda"
fi
if run evaluate 90 python evaluate.py --checkpoint "$CK" --image_dir "$D/val" \
        --caption_path "$D/annotations/captions_val.json" --results_path "$W/results.json" --beam_size 3 --device cuda; then
    pass "evaluate.py --device cuda: $(grep '^| ' "$L/evaluate.out" | tr -s ' ' | tr '\n' ' ')"
else
    fail "evaluate.py --device cuda"
fi
CUDA_VISIBLE_DEVICES='' run hidden 60 python train.py --image_dir "$D/train" "${TRAIN[@]}" --model_path "$W/hidden" \
    --backbone smallcnn --weights none --image_size 64 --crop_size 64 --num_epochs 1 --device cuda
errors=$(grep -c '^error: ' "$L/hidden.out")
if [ "$errors" = 1 ] && says hidden '^error: --device cuda cannot run: .*; NVIDIA driver: [0-9]' \
   && ! says hidden Traceback && [ ! -f "$W/hidden/checkpoint.pt" ]; then
    pass "--device cuda with the GPU hidden: one line, $(grep -o 'NVIDIA driver: [^;]*' "$L/hidden.out")"
else
    fail "--device cuda with the GPU hidden is not one error line naming the driver"
fi

echo "== 9. the background steps"
wait $COMPILED; cat "$L/compiled.status"
recompiles=$(grep -c 'Recompiling function' "$L/compiled.out")
if grep -q 'exit 0' "$L/compiled.status" && says compiled 'epoch 2: validation loss' \
   && check trained "$W/compiled" 75 val; then
    if says compiled '^warning: --compile'; then
        fail "--compile reduce-overhead passed the recompile limit: $(grep '^warning: --compile' "$L/compiled.out")"
    else
        pass "--compile reduce-overhead --amp on cuda, within the recompile limit ($recompiles recompiles logged)"
    fi
else
    fail "train.py --compile reduce-overhead on cuda"
fi
wait $GPU_TEST
if grep -q '1 passed' "$L/gpu_test.out"; then
    pass "test_compiled_loop_with_cuda_graphs_matches_nn_lstm ran on the GPU and passed"
else
    fail "the CUDA-graphs test was skipped or failed: $(tail -1 "$L/gpu_test.out")"
fi
wait $SUITE; rc=$?
summary=$(grep -E '(passed|failed|error)' "$L/pytest.out" | tail -1)
grep -E '^(FAILED|ERROR) ' "$L/pytest.out" | head -20 | sed 's/^/      | /'
case $rc in
    0) pass "the test suite on the real GPU: $summary";;
    124|137) fail "the test suite did not finish in time: $summary";;
    *) fail "the test suite on the real GPU: $summary";;
esac

echo "== done in $(( $(date +%s) - T0 )) s; logs in $L"
exit $FAILED
