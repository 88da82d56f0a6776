#!/usr/bin/env bash
# AlignTok at tiny scale (docs/fidelity.md c.7): does the semantic-preservation loss keep a fine-tuned
# foundation encoder's semantics? AlignTok-tiny (32 px; the proxy classifier's stages 1-3 as the "foundation
# encoder", an 8 x 8 x 8 latent grid, the small LDM decoder; L1 only: no VGG offline, no GAN to save time).
# Stage 1 (400 steps, encoder frozen) -> stage 2 (400 steps, everything, w_sp 0 and 1) -> stage 3 (300 steps,
# decoder only), against the same network trained from scratch (1100 steps). After each stage: held-out PSNR, the
# linear probe, LNC and VIV of z. Then the stage-3 latents (w_sp 1) and the baseline's feed the tiny LightningDiT:
# proxy gFID and the class accuracy of samples. Run from the repo root.
set -euo pipefail
OUT=${OUT:-results/aligntok}
ENC=${ENC:-results/quickstart-full/proxy.pt}       # the foundation encoder (trained on the built-in data)
EVAL=${EVAL:-$OUT/eval_proxy.pt}              # another proxy (seed 1) measures, so no metric is the encoder itself
mkdir -p "$OUT"
[ -f "$ENC" ] || python proxy.py --image_size 32 --steps 600 --out "$ENC"
[ -f "$EVAL" ] || python proxy.py --image_size 32 --steps 600 --seed 1 --out "$EVAL"
P="--feature_net proxy --proxy_ckpt $EVAL"
train() {  # name, flags
    local name=$1; shift
    [ -d "$OUT/$name" ] || python train_tokenizer.py --num_workers 1 --results_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
    local run; run=$(ls -d "$OUT/$name"/*/ | tail -n 1)
    [ -f "$OUT/$name-recon.json" ] || python evaluate.py recon --ckpt "$run" --num_images 1000 --lpips 0 $P \
        --out "$OUT/$name-recon.json" > /dev/null 2>&1
    [ -f "$OUT/$name-diff.json" ] || python evaluate.py diffusability --tokenizer_ckpt "$run" $P --num_val 1000 \
        --num_ifid 500 --tsne_reps 1 --out "$OUT/$name-diff.json" > /dev/null 2>&1
    echo "+ $name: $*"
}
first() { ls -d "$OUT/$1"/*/ | tail -n 1; }
train stage1 --preset AlignTok-tiny --stage align --encoder_ckpt "$ENC"
train stage2-sp0 --stage perceptual --init_from "$(first stage1)" --sp_weight 0
train stage2-sp1 --stage perceptual --init_from "$(first stage1)" --sp_weight 1
train stage3-sp1 --stage decoder --init_from "$(first stage2-sp1)"
train scratch --preset AlignTok-tiny --stage scratch
[ -f "$OUT/ref_val.npz" ] || python -c "
import numpy as np, data
src = data.BuiltinSource(32, 1000, 'val')
np.savez('$OUT/ref_val.npz', arr_0=np.stack([np.asarray(src.load(i)) for i in range(1000)]), labels=np.array(src.labels))"
for name in stage3-sp1 scratch; do  # the chain: cache -> tiny LightningDiT -> samples -> proxy gFID
    [ -f "$OUT/$name-gen.json" ] && continue
    python cache_latents.py --tokenizer_ckpt "$(first $name)" --cache_path "$OUT/$name-cache" --builtin_size 5000 \
        --num_workers 1 --cache_dtype float16 > /dev/null 2>&1
    python train_diffusion.py --model LightningDiT-tiny --cache_path "$OUT/$name-cache" --results_dir "$OUT/$name-dit" \
        --global_batch_size 64 --lr 1e-3 --max_steps 3600 --ema_decay 0.99 --grid_every -1 --ckpt_every 3600 \
        > /dev/null 2>&1
    python sample.py --ckpt "$(first $name-dit)" --num_samples 500 --batch_size 250 --num_steps 25 --cfg_scale 4 \
        --guide_channels 3 --out "$OUT/$name-samples.npz" > /dev/null 2>&1
    python evaluate.py gen --samples "$OUT/$name-samples.npz" --ref "$OUT/ref_val.npz" $P --out "$OUT/$name-gen.json" \
        > /dev/null 2>&1
done
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| run | PSNR | linear probe | LNC | VIV_norm |\n|---|---|---|---|---|")
for n in ("stage1", "stage2-sp0", "stage2-sp1", "stage3-sp1", "scratch"):
    r, d = (json.load(open(f"{out}/{n}-{k}.json")) for k in ("recon", "diff"))
    print(f"| {n} | {r['psnr']:.2f} | {d['linear_probe_accuracy']:.3f} | {d['lnc']:.3f} | {d['viv_norm']:.3f} |")
for n in ("stage3-sp1", "scratch"):
    if os.path.exists(f"{out}/{n}-gen.json"):
        g = json.load(open(f"{out}/{n}-gen.json"))
        print(f"{n}: proxy gFID (CFG 4 on 3 channels) {g['proxy_fid']:.2f}, class accuracy {g['class_accuracy']:.3f}")
PY
