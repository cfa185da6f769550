#!/usr/bin/env bash
# Zero-shot composed image retrieval with zscir on FashionIQ, CIRR and CIRCO, CLIP ViT-L/14 (openai weights):
# Stage I (phi on unlabeled images) -> synthetic triplets -> Stage II (composing adapters) -> evaluation.
#
#   bash examples/evaluate_benchmarks.sh                 # the real run (GPU; data folders below)
#   bash examples/evaluate_benchmarks.sh --tiny [DIR]    # the same commands offline on CPU in about a minute:
#                                                        # random-init micro CLIP, shapes-world training data and
#                                                        # tiny folders in the official layouts, written by
#                                                        # zscir.data.benchmarks.fixtures (output in DIR)
#   STAGES=eval MODEL=runs/vitl14/stage2/model bash examples/evaluate_benchmarks.sh   # evaluate an existing model
#
# Settings (environment variables, defaults in brackets):
#   DATA [/data]                          parent of the folders below
#   STAGE1_IMAGES [$DATA/imagenet/train]  unlabeled images for Stage I (ImageNet train, a CC3M image folder, ...)
#   CAPTIONS [$DATA/cc3m/captions.jsonl]  image-caption JSONL for make-triplets ({"image": "rel/path.jpg", "caption": "..."})
#   FASHIONIQ [$DATA/fashioniq]  CIRR [$DATA/cirr]  CIRCO [$DATA/circo]   benchmark roots (layouts below)
#   OUT [runs/vitl14]                     models, triplets, results/DATASET_SPLIT/results.json and submission/*.json
#                                         go here
#   NUM_GPUS [1]                          >1: training runs on that many GPUs of this node
#   LAUNCHER [accelerate]                 accelerate | torchrun (multi-GPU launcher)
#   STAGES [stage1 triplets stage2 eval]  which steps to run; MODEL [$OUT/stage2/model] is what `eval` evaluates
#   EVALS [fashioniq:val cirr:val cirr:test circo:val circo:test]   the DATASET:SPLIT runs of the `eval` step
#   STAGE1_STEPS [2000] STAGE1_BATCH [256] STAGE2_STEPS [1000] STAGE2_BATCH [256] MAX_TRIPLETS [200000]
#   PYTHON [python3]                      the interpreter that has zscir installed
# The step counts and batch sizes are starting points for ViT-L/14, not tuned settings: the published numbers in
# docs/benchmarks.md were not produced by this script, and zscir's own numbers are not measured yet.
#
# Expected folder layouts (as distributed by the data set authors):
#   $FASHIONIQ/captions/cap.{dress,shirt,toptee}.{val,test}.json
#   $FASHIONIQ/image_splits/split.{dress,shirt,toptee}.{val,test}.json
#   $FASHIONIQ/images/<asin>.png                       (.jpg also accepted)
#   $CIRR/captions/cap.rc2.{val,test1}.json            (or $CIRR/cirr/captions/..., the CLIP4Cir/SEARLE layout)
#   $CIRR/image_splits/split.rc2.{val,test1}.json
#   $CIRR/img_raw/{dev,test1}/<name>.png               (NLVR2 images; paths in the split files are relative to img_raw)
#   $CIRCO/annotations/{val,test}.json
#   $CIRCO/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json
#   $CIRCO/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg
#   $STAGE1_IMAGES/**/*.{jpg,png,...}                  (searched recursively; unreadable files are skipped and logged)
#   $CAPTIONS + images relative to its folder
#
# Multi-GPU: the training steps go through `accelerate launch --multi_gpu --num_processes $NUM_GPUS -m zscir ...`
# (or `torchrun --nproc_per_node $NUM_GPUS -m zscir ...`); several nodes: run `accelerate config` once per node,
# or pass --num_machines/--machine_rank/--main_process_ip yourself. Evaluation runs in one process.
# Test-server files: CIRR test -> $OUT/submission/zscir_cirr_recall*.json (upload at https://cirr.cecs.anu.edu.au/),
# CIRCO test -> $OUT/submission/zscir_circo_test.json (https://circo.micc.unifi.it/).
set -euo pipefail

PYTHON=${PYTHON:-python3}
zscir() { "$PYTHON" -m zscir "$@"; }

TINY=0
if [ "${1:-}" = "--tiny" ]; then
    TINY=1
    OUT=${2:-$(mktemp -d -t zscir-eval-XXXXXX)}
fi

if [ "$TINY" = 1 ]; then
    # offline stand-ins: tiny folders in the official layouts (shipped with zscir), a random-init micro CLIP,
    # shapes-world training data
    FASHIONIQ=$OUT/data/fashioniq CIRR=$OUT/data/cirr CIRCO=$OUT/data/circo
    "$PYTHON" -c 'import sys; from zscir.data.benchmarks.fixtures import write_all; write_all(sys.argv[1]);
print(f"tiny benchmark folders written to {sys.argv[1]}")' "$OUT/data"
    NUM_GPUS=1
    BACKBONE=(--backbone zscir-micro --random-init)
    STAGE1_DATA=(--shapes 256)
    STAGE1_OPTS=(--steps 5 --batch-size 32 --num-tokens 2 --no-progress)
    TRIPLET_DATA=(--shapes 64 --shapes-image-size 32)
    # the micro CLIP has 2 text blocks: adapters on the last one
    STAGE2_OPTS=(--steps 5 --batch-size 16 --adapter-layers 1 --no-progress)
    EVAL_OPTS=(--no-progress --gallery-cache "$OUT/gallery_cache")
    # one split per benchmark keeps it short; the val runs differ only in --split and have no --submission
    DEFAULT_EVALS="fashioniq:val cirr:test circo:test"
else
    DATA=${DATA:-/data}
    STAGE1_IMAGES=${STAGE1_IMAGES:-$DATA/imagenet/train}
    CAPTIONS=${CAPTIONS:-$DATA/cc3m/captions.jsonl}
    FASHIONIQ=${FASHIONIQ:-$DATA/fashioniq} CIRR=${CIRR:-$DATA/cirr} CIRCO=${CIRCO:-$DATA/circo}
    OUT=${OUT:-runs/vitl14}
    NUM_GPUS=${NUM_GPUS:-1}
    BACKBONE=(--backbone ViT-L-14 --pretrained openai)
    STAGE1_DATA=(--images "$STAGE1_IMAGES" --feature-cache "$OUT/stage1_features")
    STAGE1_OPTS=(--steps "${STAGE1_STEPS:-2000}" --batch-size "${STAGE1_BATCH:-256}" --mixed-precision bf16
                 --save-every 500 --resume)
    # caption-edit + caption-pair from the caption corpus; add "--modes llm-edit --text-editor mypkg.llm:edit"
    # to let an LLM write the modifications (see `zscir make-triplets --help`)
    TRIPLET_DATA=(--captions "$CAPTIONS" --modes caption-edit,caption-pair --max "${MAX_TRIPLETS:-200000}")
    STAGE2_OPTS=(--steps "${STAGE2_STEPS:-1000}" --batch-size "${STAGE2_BATCH:-256}" --save-every 500 --resume)
    EVAL_OPTS=()
    DEFAULT_EVALS="fashioniq:val cirr:val cirr:test circo:val circo:test"
fi
LAUNCHER=${LAUNCHER:-accelerate}
STAGES=${STAGES:-stage1 triplets stage2 eval}
EVALS=${EVALS:-$DEFAULT_EVALS}
MODEL=${MODEL:-$OUT/stage2/model}
mkdir -p "$OUT/results"

wants() { [[ " $STAGES " == *" $1 "* ]]; }

train() {  # train SUBCOMMAND ARGS...: one process, or NUM_GPUS processes through accelerate / torchrun
    if [ "$NUM_GPUS" -gt 1 ]; then
        if [ "$LAUNCHER" = torchrun ]; then
            torchrun --nproc_per_node "$NUM_GPUS" -m zscir "$@"
        else
            accelerate launch --multi_gpu --num_processes "$NUM_GPUS" -m zscir "$@"
        fi
    else
        zscir "$@"
    fi
}

if wants stage1; then
    echo "== Stage I: phi-network on unlabeled images"
    train train-stage1 "${STAGE1_DATA[@]}" "${BACKBONE[@]}" --out "$OUT/stage1" "${STAGE1_OPTS[@]}"
fi
if wants triplets; then
    echo "== synthetic triplets"
    zscir make-triplets "${TRIPLET_DATA[@]}" --out "$OUT/triplets" --no-progress
fi
if wants stage2; then
    echo "== Stage II: composing adapters on the triplets"
    train train-stage2 --model "$OUT/stage1/model" --triplets "$OUT/triplets/triplets.jsonl" --out "$OUT/stage2" \
        "${STAGE2_OPTS[@]}"
fi

evaluate() {  # evaluate DATASET SPLIT: print and run the exact `zscir eval` command
    local dataset=$1 split=$2 root
    case $dataset in
        fashioniq) root=$FASHIONIQ ;; cirr) root=$CIRR ;; circo) root=$CIRCO ;;
        *) echo "evaluate_benchmarks.sh: unknown data set '$dataset' in EVALS (fashioniq, cirr, circo)" >&2; exit 1 ;;
    esac
    local cmd=(eval --dataset "$dataset" --root "$root" --split "$split" --model "$MODEL"
               --out "$OUT/results/${dataset}_${split}")
    # test splits have no public ground truth: write the files the evaluation servers take
    if [ "$split" = test ] && [ "$dataset" != fashioniq ]; then cmd+=(--submission "$OUT/submission"); fi
    echo "+ zscir ${cmd[*]}"
    zscir "${cmd[@]}" ${EVAL_OPTS[@]+"${EVAL_OPTS[@]}"}
}

if wants eval; then
    echo "== zero-shot evaluation of $MODEL"
    # FashionIQ: val only (no public test annotations); CIRR and CIRCO: val locally, test via the servers
    for run in $EVALS; do
        evaluate "${run%%:*}" "${run#*:}"
    done
fi
echo "done: results in $OUT/results, submission files in $OUT/submission"
