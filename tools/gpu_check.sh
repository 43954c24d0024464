#!/usr/bin/env bash
# Every CUDA-only path of the trainer, measured in one go on one GPU (about 8 minutes on an H100).
#
#   bash tools/gpu_check.sh --out "$OUT"                  # on the GPU machine (full-size random weights)
#   bash tools/gpu_check.sh --dry-run --out /tmp/gc       # every step on tiny variants on the CPU (CI, ~1 min)
#   bash tools/gpu_check.sh --only lora_cap24,ti2v_cap24 --out "$OUT"     # rerun some steps
#   bash tools/gpu_check.sh --fetch-wheels .whl           # here: wheels of the packages a bare GPU image lacks
#   bash tools/gpu_check.sh --wheels .whl --out "$OUT"    # there: install them into a temp folder first
#   python tools/estimate_error.py OUT_FOLDER              # back here: each bench step's estimate and its error
#
# Each step runs under `timeout` and prints one line, `gpu_check <step> OK|FAIL|SKIP key=value ...`; the
# script goes on after a failed step and ends with a `gpu_check summary` line. Exit 0 only when no step
# FAILed (an optional kernel that is not installed is a SKIP, not a failure). With --out DIR, the lines
# also go to DIR/results.txt and every step's full output to DIR/steps.log, each as soon as the step ends.
# A budget (--budget, default 540 s on the GPU) caps each step's timeout by the time left, so the whole
# run ends inside a 10-minute device command; a step left without time is a FAIL ("no time left").
#
# Steps, in priority order (GPU timeout / expected time on an H100, an estimate until measured / what it
# measures; docs/benchmarks.md maps each line to its target):
#   env           60 s /  5 s  torch, GPU, installed kernels, missing packages
#   parity       180 s / 40 s  our DiT vs diffusers at the T2V-A14B block shape, 2 blocks, fp32 + bf16 +
#                              every installed attention kernel (tools/gpu_parity.py)
#   lora_sdpa    150 s / 45 s  LoRA step of one A14B expert at 832x480x81: s/step, MFU, peak, planner
#   lora_cap24   180 s / 60 s  the same under a 24 GiB cap with the planner's settings; ratio to lora_sdpa
#   ti2v_cap24   200 s / 35 s  TI2V-5B at 1280x704x121 under 24 GiB with the planner's settings
#   fp8           90 s / 10 s  fp8 error at the full A14B Linear shapes, and torch._scaled_mm (tools/fp8_error.py)
#   render       120 s / 15 s  one video through generate_video_wan.py (tiny random set on CUDA)
#   load         180 s / 80 s  loading a 5.3 GiB fp32 checkpoint (T2V-1.3B shapes) as bf16 onto the GPU:
#                              staged through pinned buffers against per-tensor .to(), and the raw read
#                              (tools/benchmark_loading.py --device cuda --staged_host)
#   full_ti2v    150 s / 30 s  full fine-tuning of TI2V-5B at 832x480x81, full_bf16 + fused backward pass
#                              (AdamW8bit when bitsandbytes is installed, else AdamW)
#   lora_cudnn   120 s / 35 s  lora_sdpa with PyTorch's cuDNN attention kernel forced
#   two_experts  180 s / 70 s  both A14B experts, offload_inactive_dit, 24 GiB plan at 832x480x77 (81
#                              frames do not fit by the planner): host RAM
#   lora_compile 240 s / 100 s lora_sdpa with torch.compile of every block
#   lora_flash_attn, lora_flash3, lora_xformers  120 s / 35 s each, SKIP when the package is missing
#
# The dry run uses t2v-tiny / ti2v-tiny at 64x64x9 on the CPU, a 0.2 GiB "cap" (so the planner picks fp8,
# checkpointing and swap; the CPU ignores swap and offload), PyTorch's math SDPA kernel for lora_cudnn and
# the aot_eager compile backend (inductor's C++ build alone takes over a minute on 2 cores).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
OUT="" ONLY="" WHEELS="" FETCH="" BUDGET=""
STEPS="env parity lora_sdpa lora_cap24 ti2v_cap24 fp8 render load full_ti2v lora_cudnn two_experts lora_compile
       lora_flash_attn lora_flash3 lora_xformers"

usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --only) ONLY=${2:?--only needs a comma list of steps}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a folder of .whl files}; shift ;;
        --fetch-wheels) FETCH=${2:?--fetch-wheels needs a folder}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[[ $DRY == 1 || $DRY == 0 ]] || die "GPU_CHECK_DRY_RUN=$DRY: use 1 or 0"
for s in ${ONLY//,/ }; do
    [[ " $(echo $STEPS) " == *" $s "* ]] || die "--only: unknown step '$s'; steps: $(echo $STEPS)"
done
[[ -z $BUDGET || $BUDGET =~ ^[0-9]+$ ]] || die "--budget $BUDGET: give whole seconds"

if [[ -n $FETCH ]]; then  # on a machine with a registry: the wheels of the packages a bare CUDA image lacks
    version() { "$PY" -c "from importlib.metadata import version; print('==' + version('$1'))" 2>/dev/null; }
    mkdir -p "$FETCH" || die "cannot create $FETCH"
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${GPU_CHECK_PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$FETCH" \
        "diffusers$(version diffusers)" "ftfy$(version ftfy)" "wcwidth$(version wcwidth)" \
        imageio-ffmpeg==0.6.0 importlib-metadata
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || die "cannot create a work folder"
trap 'rm -rf "$WORK"' EXIT
if [[ -n $OUT ]]; then
    mkdir -p "$OUT" || die "cannot create --out $OUT"
    : >"$OUT/results.txt" && : >"$OUT/steps.log" || die "cannot write into --out $OUT"
fi
if ((DRY)); then BUDGET=${BUDGET:-600}; MIN_STEP=5; else BUDGET=${BUDGET:-540}; MIN_STEP=20; fi
export PYTHONUNBUFFERED=1
START=$SECONDS

emit() {  # a result line: stdout, the run's results and --out's results.txt
    echo "$1"
    echo "$1" >>"$WORK/results.txt"
    [[ -z $OUT ]] || echo "$1" >>"$OUT/results.txt"
}

selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

decided() {  # step status reason: a line for a step that does not run
    emit "$("$PY" tools/gpu_check.py line "$1" --status "$2" --reason "$3")"
}

# step NAME TIMEOUT KIND [reporter options] -- COMMAND...: run COMMAND under `timeout` with its output in
# the work folder, then print its line (from $WORK/NAME.json, which the command writes).
step() {
    local name=$1 limit=$2 kind=$3 report=()
    shift 3
    while [[ $1 != -- ]]; do report+=("$1"); shift; done
    shift
    selected "$name" || return 0
    local left=$((BUDGET - (SECONDS - START))) log="$WORK/$name.log" t0=$SECONDS rc line
    if ((left < MIN_STEP)); then
        decided "$name" FAIL "no time left of the ${BUDGET} s budget (rerun it with --only $name)"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "+ $*" >"$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    line=$("$PY" tools/gpu_check.py line "$name" "$kind" --rc "$rc" --log "$log" --json "$WORK/$name.json" \
           --seconds $((SECONDS - t0)) --limit "$limit" "${report[@]}" 2>>"$log") ||
        line="gpu_check $name FAIL reason=\"the result line could not be made (see steps.log)\""
    emit "$line"
    [[ -z $OUT ]] || { echo "===== $line"; cat "$log"; echo; } >>"$OUT/steps.log"
}

kernel_step() {  # name backend module: a LoRA step with an optional attention kernel
    selected "$1" || return 0
    if ! "$PY" tools/gpu_check.py has "$3"; then
        decided "$1" SKIP "$3 not installed (optional kernel)"
    elif ((DRY)); then
        decided "$1" SKIP "CUDA-only kernel: not run in the CPU dry run"
    else
        step "$1" 120 bench --target_mfu 0.45 --field "attention=$2" -- "${BENCH[@]}" "${A14B[@]}" \
            --attention "$2" --warmup 1 --steps 1 --json "$WORK/$1.json"
    fi
}

if [[ -n $WHEELS ]]; then  # packages a bare GPU image lacks, installed for this run only
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHEELS"/*.whl >"$WORK/wheels.log" 2>&1; then
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
        emit "gpu_check wheels OK installed=$(ls "$WHEELS"/*.whl | wc -l) from=$WHEELS"
    else
        emit "gpu_check wheels FAIL reason=\"pip could not install $WHEELS/*.whl (see steps.log)\""
        [[ -z $OUT ]] || cat "$WORK/wheels.log" >>"$OUT/steps.log"
    fi
fi

if ((DRY)); then  # tiny variants on the CPU: the same steps, CLIs and result lines
    MODE="dry run (tiny variants, CPU)"
    BENCH=("$PY" tools/benchmark_wan.py --cpu) A14B=() TI2V=(--task ti2v-tiny) TI2V_BIG=(--task ti2v-tiny)
    CAP=0.2 CUDNN=math DEVICE=cpu OPT=AdamW TWO=()
    PARITY=(--task t2v-tiny --width 64 --height 64 --frames 9) FP8=(--task t2v-tiny --tokens 48)
    COMPILE_ENV=(env "TORCH_COMPILE_OVERRIDE_BACKENDS=>=0:aot_eager") COMPILE_NOTE=(--field backend=aot_eager)
    LOAD=(--variant t2v-tiny --device cpu --staged_host --repeats 1)
else
    MODE="GPU (full-size random weights)"
    BENCH=("$PY" tools/benchmark_wan.py) A14B=(--task t2v-A14B) TI2V=(--task ti2v-5B)
    TI2V_BIG=(--task ti2v-5B --width 1280 --height 704 --frames 121)
    CAP=24 CUDNN=cudnn DEVICE=cuda TWO=(--frames 77)
    OPT=$("$PY" tools/gpu_check.py has bitsandbytes && echo AdamW8bit || echo AdamW)
    PARITY=(--task t2v-A14B --blocks 2) FP8=(--task t2v-A14B --tokens 4096)
    COMPILE_ENV=() COMPILE_NOTE=(--field backend=inductor)
    LOAD=(--variant t2v-1.3B --device cuda --staged_host --repeats 3)
fi
emit "# gpu_check: $MODE, budget ${BUDGET} s, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n)"

step env 60 env -- "$PY" tools/gpu_check.py env --json "$WORK/env.json" $( ((DRY)) && echo --dry_run)
step parity 180 parity -- "$PY" tools/gpu_parity.py "${PARITY[@]}" --device "$DEVICE" --attention all \
    --json "$WORK/parity.json"
step lora_sdpa 150 bench --target_mfu 0.45 -- "${BENCH[@]}" "${A14B[@]}" --warmup 1 --steps 2 \
    --json "$WORK/lora_sdpa.json"
step lora_cap24 180 bench --cap "$CAP" --baseline "$WORK/lora_sdpa.json" -- "${BENCH[@]}" "${A14B[@]}" \
    --vram_cap_gb "$CAP" --plan --warmup 1 --steps 1 --json "$WORK/lora_cap24.json"
step ti2v_cap24 200 bench --cap "$CAP" -- "${BENCH[@]}" "${TI2V_BIG[@]}" --vram_cap_gb "$CAP" --plan \
    --warmup 1 --steps 1 --json "$WORK/ti2v_cap24.json"
step fp8 90 fp8 -- "$PY" tools/fp8_error.py "${FP8[@]}" --device "$DEVICE" --json "$WORK/fp8.json"
step render 120 render -- "$PY" tools/gpu_check.py render --device "$DEVICE" --work "$WORK/render" \
    --json "$WORK/render.json"
step load 180 load -- "$PY" tools/benchmark_loading.py "${LOAD[@]}" --dtype fp32 --load_dtype bf16 \
    --dir "$WORK/load" --json "$WORK/load.json"
step full_ti2v 150 bench --field "optimizer=$OPT" -- "${BENCH[@]}" "${TI2V[@]}" --full --full_bf16 \
    --fused_backward_pass --optimizer "$OPT" --warmup 1 --steps 2 --json "$WORK/full_ti2v.json"
step lora_cudnn 120 bench --target_mfu 0.45 --field "sdpa_kernel=$CUDNN" -- "${BENCH[@]}" "${A14B[@]}" \
    --sdpa_kernel "$CUDNN" --warmup 1 --steps 1 --json "$WORK/lora_cudnn.json"
step two_experts 180 bench --cap "$CAP" -- "${BENCH[@]}" "${A14B[@]}" "${TWO[@]}" --two_experts \
    --vram_cap_gb "$CAP" --plan --warmup 1 --steps 1 --json "$WORK/two_experts.json"
step lora_compile 240 bench --target_mfu 0.45 "${COMPILE_NOTE[@]}" -- "${COMPILE_ENV[@]}" "${BENCH[@]}" \
    "${A14B[@]}" --compile --warmup 1 --steps 2 --json "$WORK/lora_compile.json"
kernel_step lora_flash_attn flash_attn flash_attn
kernel_step lora_flash3 flash3 flash_attn_interface
kernel_step lora_xformers xformers xformers

line=$("$PY" tools/gpu_check.py summary "$WORK/results.txt" --seconds $((SECONDS - START)))
code=$?
emit "${line:-gpu_check summary FAIL reason=\"the summary could not be made\"}"
((code == 0 || code == 1)) || code=1
exit $code
