#!/usr/bin/env bash
# Distil the two shipped feature heads (chat, code) on one GPU, side by side: the target first answers
# each head's training prompts (greedy, batched), then the head learns on prompt + answer.
# A 135M target leaves an H200 mostly idle, so the two runs share it.
#
#   deploy/distill-gpu.sh TARGET CHAT_PROMPTS CODE_PROMPTS OUT [GENERATE_MIN] [TRAIN_MIN] [DISTILL_ARGS...]
#
# TARGET: the target (a directory, a .gguf or builtin:smollm2-135m-instruct). CHAT_PROMPTS, CODE_PROMPTS:
# prompt sets or JSONL files, as `draftpick distill --prompts` takes them (the shipped heads: sharegpt and
# stdlib-defs, written to JSONL beforehand when the GPU machine lacks the prompt packages). OUT gets
# chat/ and code/ (drafter directories, with the target's answers in sequences.jsonl) and a log of each run.
# GENERATE_MIN and TRAIN_MIN bound the two phases (default 3 and 3 minutes). DEVICE=cpu runs it anywhere.
# GENERATE=0 trains on the given text as it is (e.g. answers generated earlier, as captured-traffic JSONL).
# DISTILL_ARGS go to both runs after the defaults below, and so override them (a later flag wins), e.g.
# `--loss-on answers --prompt-context 64` to learn only the answers of multi-turn prompts.
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,16p' "$0" >&2
    exit 2
fi
target=$1 chat=$2 code=$3 out=$4 generate_min=${5:-3} train_min=${6:-3}
shift $(( $# < 6 ? $# : 6 ))
mkdir -p "$out"
common=(--target "$target" --device "${DEVICE:-cuda}" --max-items 100000 --held-out 0 --validate-tokens 0
        --generate "${GENERATE:-160}" --generate-batch 256 --generate-minutes "$generate_min" --teacher-dtype bf16
        --minutes "$train_min" --batch 64 --lr 1e-3 --unroll 3 --teacher-cache-gb 8 "$@")
python3 -m deploy.cli distill "${common[@]}" --prompts "$chat" --out "$out/chat" >"$out/chat.log" 2>&1 &
chat_pid=$!
python3 -m deploy.cli distill "${common[@]}" --prompts "$code" --out "$out/code" >"$out/code.log" 2>&1 &
code_pid=$!
status=0
wait $chat_pid || { echo "chat run failed: see $out/chat.log" >&2; status=1; }
wait $code_pid || { echo "code run failed: see $out/code.log" >&2; status=1; }
exit $status
