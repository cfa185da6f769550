#!/usr/bin/env bash
# Train zscir from scratch: Stage I on an unlabeled image folder, synthetic triplets from an image-caption corpus,
# Stage II on those triplets, then a zero-shot evaluation.
#
#   IMAGES=/data/imagenet/train CAPTIONS=/data/cc3m/captions.jsonl \
#   EVAL_DATASET=cirr EVAL_ROOT=/data/cirr bash examples/train_from_scratch.sh
#   bash examples/train_from_scratch.sh --tiny [DIR]    # offline in about a minute: shapes-world image folder,
#                                                       # caption corpus and evaluation set, random-init micro CLIP
#
# Settings (environment variables, defaults in brackets):
#   IMAGES [/data/imagenet/train]        unlabeled images for Stage I (ImageNet train, CC3M images, your photos)
#   CAPTIONS [/data/cc3m/captions.jsonl] image-caption JSONL: {"image": "path relative to the file", "caption": "..."}
#   MODEL_NAME [ViT-L-14] PRETRAINED [openai]   the frozen open_clip backbone
#   TRIPLET_MODES [caption-edit,caption-pair]   make-triplets modes: caption-edit swaps one attribute word of a
#                                        caption (text target); caption-pair pairs two images whose captions differ
#                                        by one word (image target); llm-edit asks your LLM (TEXT_EDITOR below)
#   TEXT_EDITOR []                       module:function for llm-edit, e.g. mypkg.llm:edit, a callable
#                                        caption -> (modification, target caption) or None; adds the llm-edit mode
#   MAX_TRIPLETS [200000]                keep a seeded random subset of at most this many triplets
#   EVAL_DATASET [cirr] EVAL_ROOT [/data/cirr] EVAL_SPLIT [val]   the evaluation (fashioniq, cirr, circo or generic)
#   OUT [runs/from_scratch]              stage1/, triplets/, stage2/ (the final model in stage2/model), results.json
#   NUM_GPUS [1]                         >1: the two training stages run under `accelerate launch` on this node
#   STAGE1_STEPS [2000] STAGE2_STEPS [1000] BATCH [256]   starting points, not tuned settings
#   PYTHON [python3]                     the interpreter that has zscir installed
# Interrupted runs continue where they stopped: both training stages save their full state and run with --resume.
set -euo pipefail

PYTHON=${PYTHON:-python3}
zscir() { "$PYTHON" -m zscir "$@"; }

if [ "${1:-}" = "--tiny" ]; then
    OUT=${2:-$(mktemp -d -t zscir-scratch-XXXXXX)}
    # shapes-world stand-ins for the real data: an image-caption corpus (its images/ folder doubles as the
    # unlabeled Stage-I images) and a held-out evaluation set in the generic CIR format
    zscir shapes captions --out "$OUT/data/corpus" --n 200 --image-size 32 --no-progress
    zscir shapes eval --out "$OUT/data/eval" --n 40 --image-size 32 --no-progress
    IMAGES=$OUT/data/corpus/images CAPTIONS=$OUT/data/corpus/captions.jsonl
    BACKBONE=(--backbone zscir-micro --random-init)
    STAGE1_OPTS=(--steps 5 --batch-size 32 --num-tokens 2 --no-progress)
    # the micro CLIP has 2 text blocks: adapters on the last one
    STAGE2_OPTS=(--steps 5 --batch-size 16 --adapter-layers 1 --no-progress)
    EVAL_DATASET=generic EVAL_ROOT=$OUT/data/eval EVAL_SPLIT=val
    EVAL_OPTS=(--no-progress --no-cache)
    NUM_GPUS=1
else
    IMAGES=${IMAGES:-/data/imagenet/train}
    CAPTIONS=${CAPTIONS:-/data/cc3m/captions.jsonl}
    BACKBONE=(--backbone "${MODEL_NAME:-ViT-L-14}" --pretrained "${PRETRAINED:-openai}")
    STAGE1_OPTS=(--steps "${STAGE1_STEPS:-2000}" --batch-size "${BATCH:-256}" --save-every 500 --resume)
    STAGE2_OPTS=(--steps "${STAGE2_STEPS:-1000}" --batch-size "${BATCH:-256}" --save-every 500 --resume)
    EVAL_DATASET=${EVAL_DATASET:-cirr} EVAL_ROOT=${EVAL_ROOT:-/data/cirr} EVAL_SPLIT=${EVAL_SPLIT:-val}
    EVAL_OPTS=()
    OUT=${OUT:-runs/from_scratch}
    NUM_GPUS=${NUM_GPUS:-1}
fi
MODES=${TRIPLET_MODES:-caption-edit,caption-pair}
TRIPLET_HOOKS=()
if [ -n "${TEXT_EDITOR:-}" ]; then
    MODES="$MODES,llm-edit"
    TRIPLET_HOOKS=(--text-editor "$TEXT_EDITOR")
fi

train() {  # train SUBCOMMAND ARGS...: one process, or NUM_GPUS processes of this node through accelerate
    if [ "$NUM_GPUS" -gt 1 ]; then
        accelerate launch --multi_gpu --num_processes "$NUM_GPUS" -m zscir "$@"
    else
        zscir "$@"
    fi
}

echo "== 1/4 Stage I: phi-network on the unlabeled images in $IMAGES"
train train-stage1 --images "$IMAGES" "${BACKBONE[@]}" --out "$OUT/stage1" "${STAGE1_OPTS[@]}"

echo "== 2/4 synthetic triplets ($MODES) from $CAPTIONS"
zscir make-triplets --captions "$CAPTIONS" --modes "$MODES" --max "${MAX_TRIPLETS:-200000}" \
    --out "$OUT/triplets" --no-progress ${TRIPLET_HOOKS[@]+"${TRIPLET_HOOKS[@]}"}

echo "== 3/4 Stage II: composing adapters on $OUT/triplets/triplets.jsonl"
train train-stage2 --model "$OUT/stage1/model" --triplets "$OUT/triplets/triplets.jsonl" --out "$OUT/stage2" \
    "${STAGE2_OPTS[@]}"

echo "== 4/4 zero-shot evaluation on $EVAL_DATASET ($EVAL_SPLIT)"
zscir eval --dataset "$EVAL_DATASET" --root "$EVAL_ROOT" --split "$EVAL_SPLIT" --model "$OUT/stage2/model" \
    --out "$OUT/results" ${EVAL_OPTS[@]+"${EVAL_OPTS[@]}"}

echo "done: model $OUT/stage2/model (load it with zscir.Composer.from_pretrained), metrics $OUT/results/results.json"
