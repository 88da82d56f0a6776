#!/usr/bin/env bash
# The paper-scale path on one GPU, as-is, offline (no weights are downloaded: frozen networks the checks need are
# random or trained here), sized for about 8 minutes on one H100 (each check has its own time limit). It prints one
# table, a row as each check ends: the check, its status, its time and its numbers. Logs land in --out.
#
#   bash scripts/gpu_check.sh                      # on a machine with one CUDA GPU
#   bash scripts/gpu_check.sh --dry-run            # print the commands only (what CI checks on CPU)
#
# 1. tests/test_cuda.py: the tiny chain in bf16 with torch.compile under torchrun (NCCL), and flash attention
#    through SDPA (the one-process variant of the chain: python -m pytest -q tests/test_cuda.py)
# 2. MAETok-B-128 at 256 px with the DINO GAN on from step 0 (a random DINO file: the paper's discriminator and its
#    cost, no download), 30 steps eager, then compiled (the adaptive weight's layer kept out of the graph)
# 3. AlignTok-L-f16d32's perceptual stage (DINOv2-L trained, L_sp, PatchGAN) for 3 steps, after 1 scratch step
# 4. evaluate.py recon on 64 images of the run of check 2 (proxy features), timed
# 5. bench.py: MFU of MAETok-B-128's paper step (DINOv2-L + SigLIP targets, LPIPS), SiT-XL, LightningDiT-XL,
#    and SiT-XL + MAETok decoder sampling (25 of the 250 SDE steps run, extrapolated)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=results/gpu_check
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "usage: bash scripts/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
TABLE="$OUT/table.txt"
if [ $DRY = 0 ]; then
    mkdir -p "$OUT"
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "error: no CUDA GPU visible (this check is for a GPU machine; --dry-run prints its commands)" >&2; exit 1; }
    $PY -c "import torch; p = torch.cuda.get_device_properties(0); print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs | torch {torch.__version__}')" | tee "$TABLE"
    date -u "+date: %Y-%m-%d %H:%M UTC" | tee -a "$TABLE"
fi
FAILED=0

check() {  # check LIMIT_S NAME COMMAND...: run it (killed past LIMIT_S), log to $OUT/NAME.log, a row in the table
    local limit=$1 name=$2; shift 2
    echo "+ $*"
    [ $DRY = 1 ] && return 0
    local t0=$(date +%s%N)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$(( ($(date +%s%N) - t0) / 100000000 ))
    local status=ok
    [ $rc = 0 ] || { status="FAIL (exit $rc$([ $rc = 124 ] && echo ", over ${limit} s"); see $OUT/$name.log)"; FAILED=1; }
    printf "%-28s %6d.%d s  %s\n" "$name" $((dt / 10)) $((dt % 10)) "$status" | tee -a "$TABLE"
}

run_of() {  # the run folder a results dir holds (a placeholder in a dry run)
    [ $DRY = 1 ] && { echo "$1/RUN"; return 0; }
    ls -d "$1"/*/ 2>/dev/null | head -n 1 || true
}

rate() {  # rate RUN_FOLDER: the img/s of the last logged step
    [ $DRY = 1 ] && return 0
    $PY -c "import json, glob, sys; m = [json.loads(l) for l in open(glob.glob(sys.argv[1] + '/*/metrics.jsonl')[0]) if 'img_per_s' in l]; print(f'    img/s at step {m[-1][\"step\"]}: {m[-1][\"img_per_s\"]:.1f}')" "$1" 2>&1 | tee -a "$TABLE"
}

COMMON=(--num_workers 8 --eval_every -1 --grid_every -1 --perceptual_weight 0 --precision bf16)
check 240 cuda_tests $PY -m pytest -q tests/test_cuda.py -k "torchrun or flash"
check 60 proxy $PY proxy.py --steps 200 --num_workers 4 --out "$OUT/proxy.pt"
check 60 dino_file $PY -c "import sys, torch; from pretrained import DinoViT, ViTConfig; torch.save(DinoViT(ViTConfig(384, 12, 6, patch_size=16, img_size=224, layerscale=False)).state_dict(), sys.argv[1])" "$OUT/dino_random.pth"
MAETOK=(--preset MAETok-B-128 --aux_targets hog --disc dino --dino_ckpt "$OUT/dino_random.pth" --disc_start 0
        --global_batch_size 64
        --max_steps 30 --log_every 10 --builtin_size 2048 --image_size 256 "${COMMON[@]}")
check 120 maetok_gan_eager $PY train_tokenizer.py "${MAETOK[@]}" --results_dir "$OUT/maetok_eager"
rate "$OUT/maetok_eager"
check 240 maetok_gan_compiled $PY train_tokenizer.py "${MAETOK[@]}" --compile --results_dir "$OUT/maetok_compiled"
rate "$OUT/maetok_compiled"
ALIGN=(--preset AlignTok-L-f16d32 --global_batch_size 8 --builtin_size 64 --log_every 1 "${COMMON[@]}")
check 120 aligntok_scratch $PY train_tokenizer.py "${ALIGN[@]}" --stage scratch --disc none --max_steps 1 \
    --results_dir "$OUT/aligntok_scratch"
check 120 aligntok_perceptual $PY train_tokenizer.py "${ALIGN[@]}" --stage perceptual --max_steps 3 \
    --init_from "$(run_of "$OUT/aligntok_scratch")" --results_dir "$OUT/aligntok_perceptual"
rate "$OUT/aligntok_perceptual"
check 60 recon_64 $PY evaluate.py recon --ckpt "$(run_of "$OUT/maetok_eager")" --num_images 64 --batch_size 32 --lpips 0 \
    --feature_net proxy --proxy_ckpt "$OUT/proxy.pt" --out "$OUT/recon.json"
check 240 bench $PY bench.py --only tokenizer,diffusion,sampling --steps 5 --warmup 2 --batch_size 64 \
    --sample_batch 256 --sample_steps 25
if [ $DRY = 0 ]; then
    grep -E "^(peak|tokenizer|diffusion|sampling) " "$OUT/bench.log" | sed 's/^/    /' >> "$TABLE"
    $PY -c "import json; r = json.load(open('$OUT/recon.json')); print(f'    recon on {r[\"num_images\"]} images: PSNR {r[\"psnr\"]:.2f}')" >> "$TABLE" 2>&1
    echo; cat "$TABLE"
fi
exit $FAILED
