#!/usr/bin/env bash
# The whole chain on the built-in data, on CPU: tokenizer -> proxy classifier -> latent cache -> tiny SiT -> samples
# -> metrics table, each stage's time printed as it ends (docs/benchmarks.md has the measured times and tables).
#   bash quickstart.sh          about 5 minutes on 2 cores of a recent Xeon: the tiny tokenizer as a plain
#                               autoencoder (no masking: MAETok's AE baseline), a short denoiser at a high lr
#   bash quickstart.sh --full   about 18 minutes: the tiny MAETok (mask modeling, HOG target), 3600 denoiser steps
# Everything lands in $OUT (default results/quickstart, or results/quickstart-full). LPIPS needs the VGG16 ImageNet
# weights, which an offline machine cannot download: the perceptual loss and the LPIPS metric are off here.
set -euo pipefail
case "${1:-}" in
    "") FULL=0 ;;
    --full) FULL=1 ;;
    *) echo "usage: bash quickstart.sh [--full] (got '$1')" >&2; exit 2 ;;
esac
if [ "$FULL" = 1 ]; then
    OUT=${OUT:-results/quickstart-full}
    # the tiny preset's own recipe: the paper's objective, mask modeling (ratio 0.4-0.6) with the pixel and HOG
    # targets, batch 32, lr 2e-3, warmup 100, 1300 steps, EMA 0.99 (tokenizer.RECIPES)
    TOK_FLAGS=(--preset tiny --diffusability_every 1300)
    PROXY_STEPS=600
    CACHE_IMAGES=5000
    # SiT-tiny at lr 1e-3 for 3600 steps of batch 64
    DIT_FLAGS=(--lr 1e-3 --max_steps 3600 --grid_every 3600 --ckpt_every 3600)
    SAMPLE_STEPS=25
    LATENT_FLAGS=(--gmm_k 1,2,4,8,16,32,64)  # the latent report's GMM curve (32 s of the metrics stage)
else
    OUT=${OUT:-results/quickstart}
    # the same network without masking or the HOG target (MAETok's plain-AE baseline) for 550 steps: about 25 dB
    # held-out PSNR, against the masked run's 25.5 after 1300 steps (docs/benchmarks.md)
    TOK_FLAGS=(--preset tiny --aux_targets "" --mask_ratio 0 --mask_ratio_min 0 --max_steps 550 --eval_every 550
               --grid_every 550 --ckpt_every 550 --diffusability_every 550)
    PROXY_STEPS=300
    CACHE_IMAGES=4000
    # 800 steps at lr 4e-3 (warmup 150, gradients clipped at norm 1): the lr that learns most in this budget; no
    # grid of its own (the samples stage draws it)
    DIT_FLAGS=(--lr 4e-3 --warmup_steps 150 --grad_clip 1.0 --max_steps 800 --grid_every -1 --ckpt_every 800)
    SAMPLE_STEPS=10  # as good as 25 for this denoiser's class accuracy and proxy gFID (docs/benchmarks.md)
    LATENT_FLAGS=(--gmm_k 1)  # a single Gaussian: the linear probe is what the table reads
fi
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }
T0=$(date +%s%N); TS=$T0; TIMES=""
stage() {  # stage NAME: close the previous stage's clock (printed as it goes, and in the table at the end)
    local now=$(date +%s%N)
    [ -n "${CUR:-}" ] && { local dt=$(( (now - TS) / 100000000 )); TIMES+="| ${CUR} | $((dt / 10)).$((dt % 10)) s |\n";
                           echo "== ${CUR}: $((dt / 10)).$((dt % 10)) s"; }
    CUR=$1; TS=$now
}

# 1. tokenizer (tiny preset, 32 px, 32 tokens x 8 channels); LPIPS off (no VGG weights offline); the diffusability
#    monitor (LNC, linear probe, VIV_norm of the latents) logged once, at the last step
stage tokenizer
run python train_tokenizer.py "${TOK_FLAGS[@]}" --perceptual_weight 0 --results_dir "$OUT/tokenizer" --num_workers 1
TOK=$(ls -d "$OUT"/tokenizer/*/ | tail -n 1)
# 2. the proxy feature network (FID / precision / recall / class accuracy at this scale; never an Inception FID)
stage proxy
run python proxy.py --image_size 32 --steps "$PROXY_STEPS" --out "$OUT/proxy.pt"
# 3. latent cache: 4K (--full: 5K) built-in images, each with and without horizontal flip (float16 storage, as the
#    tables were measured; the default is float32)
stage cache
run python cache_latents.py --tokenizer_ckpt "$TOK" --cache_path "$OUT/cache" --builtin_size "$CACHE_IMAGES" \
    --num_workers 1 --cache_dtype float16
# 4. the denoiser (tiny SiT, 128 wide x 6 layers, on the 32 x 8 latent tokens), with LightningDiT's logit-normal t
#    (better than SiT's uniform t at this size: docs/benchmarks.md)
stage denoiser
run python train_diffusion.py --model tiny --cache_path "$OUT/cache" --results_dir "$OUT/diffusion" \
    --global_batch_size 64 --time_dist logit_normal --ema_decay 0.99 --log_every 100 --grid_cfg 4.0 --grid_steps 25 \
    "${DIT_FLAGS[@]}"
DIF=$(ls -d "$OUT"/diffusion/*/ | tail -n 1)
# 5. samples (Euler steps: 10, --full 25): a grid (rows = classes, columns = seeds) and 500 samples without and with CFG.
#    CFG 4 is the scale with the lowest proxy gFID at this size (docs/benchmarks.md)
stage samples
run python sample.py --ckpt "$DIF" --classes 0,1,2,3,4,5,6,7,8,9 --seeds 0,1,2,3,4,5,6,7 --cfg_scale 4.0 \
    --num_steps "$SAMPLE_STEPS" --out "$OUT/samples_cfg4.png"
run python sample.py --ckpt "$DIF" --num_samples 500 --batch_size 250 --num_steps "$SAMPLE_STEPS" --out "$OUT/samples_cfg1.npz"
run python sample.py --ckpt "$DIF" --num_samples 500 --batch_size 250 --num_steps "$SAMPLE_STEPS" --cfg_scale 4.0 \
    --out "$OUT/samples_cfg4.npz"
# 6. metrics: reference = 1000 held-out built-in images (proxy features; LPIPS off, see above)
stage metrics
run python -c "
import numpy as np, data
src = data.BuiltinSource(32, 1000, 'val')
np.savez('$OUT/ref_val.npz', arr_0=np.stack([np.asarray(src.load(i)) for i in range(1000)]), labels=np.array(src.labels))"
P="--feature_net proxy --proxy_ckpt $OUT/proxy.pt"
run python evaluate.py recon --ckpt "$TOK" --num_images 1000 --lpips 0 $P --out "$OUT/recon.json"
run python evaluate.py gen --samples "$OUT/samples_cfg1.npz" --ref "$OUT/ref_val.npz" $P --out "$OUT/gen_cfg1.json"
run python evaluate.py gen --samples "$OUT/samples_cfg4.npz" --ref "$OUT/ref_val.npz" $P --out "$OUT/gen_cfg4.json"
run python evaluate.py latent --cache_path "$OUT/cache" --num_images "$CACHE_IMAGES" "${LATENT_FLAGS[@]}" \
    --out "$OUT/latent.json"
python - "$OUT" "$FULL" <<'EOF'
import json, sys
d = sys.argv[1]
r, g1, g4, lat = (json.load(open(f"{d}/{n}.json")) for n in ("recon", "gen_cfg1", "gen_cfg4", "latent"))
import torch
proxy_acc = torch.load(f"{d}/proxy.pt", weights_only=True)["val_accuracy"]
rows = [("PSNR (dB)", r["psnr"]), ("SSIM", r["ssim"]), ("proxy rFID", r["proxy_rfid"]),
        ("proxy gFID, no CFG", g1["proxy_fid"]), ("proxy gFID, CFG 4.0", g4["proxy_fid"]),
        ("class accuracy of samples, no CFG", g1["class_accuracy"]),
        ("class accuracy of samples, CFG 4.0", g4["class_accuracy"]),
        ("class accuracy of their reconstructions (the tokenizer's ceiling)", r["class_accuracy"]),
        ("class accuracy of real held-out images (proxy ceiling)", proxy_acc),
        ("linear-probe accuracy of latents", lat["linear_probe_accuracy"])]
print(f"\n| metric (tiny quick start{', --full' if sys.argv[2] == '1' else ''}) | value |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v:.3f} |")
EOF
stage done
printf "\n| stage | time |\n|---|---|\n${TIMES}| total | $(( ($(date +%s%N) - T0) / 1000000000 )) s |\n"
