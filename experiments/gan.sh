#!/usr/bin/env bash
# The tiny adversarial experiment (docs/fidelity.md a.9): the full quick start's tokenizer without and
# with the GAN (disc_start 400, weight 0.4 x adaptive, LeCAM 1e-3, CR 4, official DiffAugment), same steps.
# No DINO weights exist offline: the frozen trunk is a second proxy CNN (seed 1, width 8), never the evaluation
# proxy (seed 0, width 16). Run from the repo root; about 30 min on 2 cores (reuses the full quick start's tokenizer
# and proxy when they exist).
set -euo pipefail
OUT=${OUT:-results/gan}
QS=${QS:-results/quickstart-full}
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }
[ -f "$QS/proxy.pt" ] || run python proxy.py --image_size 32 --steps 600 --out "$QS/proxy.pt"
[ -d "$QS/tokenizer" ] || run python train_tokenizer.py --preset tiny --perceptual_weight 0 \
    --results_dir "$QS/tokenizer" --num_workers 1
run python proxy.py --image_size 32 --steps 600 --seed 1 --width 8 --out "$OUT/disc_proxy.pt"
run python train_tokenizer.py --preset tiny --perceptual_weight 0 --disc proxy --disc_proxy_ckpt "$OUT/disc_proxy.pt" \
    --disc_start 400 --results_dir "$OUT/tokenizer" --num_workers 1
NOGAN=$(ls -d "$QS"/tokenizer/*/ | tail -n 1)
GAN=$(ls -d "$OUT"/tokenizer/*/ | tail -n 1)
P="--feature_net proxy --proxy_ckpt $QS/proxy.pt"
run python evaluate.py recon --ckpt "$NOGAN" --num_images 1000 --lpips 0 $P --out "$OUT/recon_nogan.json"
run python evaluate.py recon --ckpt "$GAN" --num_images 1000 --lpips 0 $P --out "$OUT/recon_gan.json"
cp "$NOGAN/grids/0001300.png" "$OUT/grid_nogan.png"
cp "$GAN/grids/0001300.png" "$OUT/grid_gan.png"
python - "$OUT" "$GAN" <<'PY'
import json, sys
out, gan = sys.argv[1], sys.argv[2]
a, b = (json.load(open(f"{out}/recon_{n}.json")) for n in ("nogan", "gan"))
print("\n| tiny tokenizer, 1300 steps (1000 held-out images, EMA) | no GAN | GAN from step 400 |\n|---|---|---|")
for k, name in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("proxy_rfid", "proxy rFID"),
                ("sharpness_ratio", "sharpness ratio mean|grad rec| / mean|grad real|"),
                ("class_accuracy", "class accuracy of reconstructions")):
    print(f"| {name} | {a[k]:.3f} | {b[k]:.3f} |")
m = [json.loads(l) for l in open(f"{gan}/metrics.jsonl") if '"d_weight"' in l]
print("\n| steps | adaptive weight | logit gap mean(real) - mean(fake) | D hinge | CR |\n|---|---|---|---|---|")
for lo in range(400, 1300, 300):
    w = [r for r in m if lo < r["step"] <= lo + 300]
    mean = lambda k: sum(r[k] for r in w) / len(w)
    print(f"| {lo + 1}-{lo + 300} | {mean('d_weight'):.3f} | {mean('logits_real') - mean('logits_fake'):.3f} | "
          f"{mean('d_hinge'):.3f} | {mean('d_cr'):.4f} |")
PY
