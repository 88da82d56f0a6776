#!/usr/bin/env bash
# MacTok at tiny scale (docs/fidelity.md b.10): does image-token masking keep a KL 1D tokenizer
# from posterior collapse? MacTok-tiny (32 px, 32 tokens x 8 channels, plain ViT decoder, no GAN, no LPIPS),
# 500 steps per run. A pilot sweep of the KL weight without masking picks beta*, the smallest weight where the
# tokenizer collapses; at beta* it compares no masking, MacTok's random masking and the latent-token control; then,
# at a weight that does not collapse, the alignment / semantic-masking add-ons with the proxy classifier as the
# teacher. Linear probe of mu on 2000 held-out images (chance 10%), LNC and VIV (evaluate.py diffusability). Run
# from the repo root; it resumes (what exists is skipped); ~40 min on 2 cores with the latent metrics.
set -euo pipefail
OUT=${OUT:-results/mactok}
TEACHER=${TEACHER:-results/quickstart-full/proxy.pt}
mkdir -p "$OUT"
[ -f "$TEACHER" ] || python proxy.py --image_size 32 --steps 600 --out "$TEACHER"
train() {  # name, extra flags
    local name=$1; shift
    [ -d "$OUT/$name" ] || python train_tokenizer.py --preset MacTok-tiny --perceptual_weight 0 --max_steps 500 \
        --eval_every 500 --eval_images 1000 --log_every 50 --grid_every 500 --ckpt_every 500 --num_workers 1 \
        --results_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
    local run; run=$(ls -d "$OUT/$name"/*/ | tail -n 1)
    [ -f "$OUT/$name-latent.json" ] || python evaluate.py latent --ckpt "$run" --num_images 2000 --gmm_k 1 \
        --out "$OUT/$name-latent.json" > /dev/null 2>&1
    [ -f "$OUT/$name-diff.json" ] || python evaluate.py diffusability --tokenizer_ckpt "$run" --num_val 2000 \
        --num_ifid 500 --tsne_reps 1 --feature_net proxy --proxy_ckpt "$TEACHER" --out "$OUT/$name-diff.json" > /dev/null 2>&1
    echo "+ $name: $*"
}
for b in 3e-5 1e-4 3e-4 1e-3; do train "nomask-kl$b" --kl_weight $b --mask_tokens none --teacher none; done
BSTAR=$(python - "$OUT" <<'PY'
import glob, json, sys
for b in ("3e-5", "1e-4", "3e-4", "1e-3"):
    d = [json.loads(l) for l in open(glob.glob(f"{sys.argv[1]}/nomask-kl{b}/*/metrics.jsonl")[0])][-1]
    if d["eval_active_units"] <= 2 and abs(d["eval_psnr_mu"] - d["eval_psnr_prior"]) < 1:
        print(b); break
else:
    print("1e-3")
PY
)
train "randmask-kl$BSTAR" --kl_weight $BSTAR --mask_tokens image --teacher none
train "latentmask-kl$BSTAR" --kl_weight $BSTAR --mask_tokens latent --mask_ratio_max 0.5 --teacher none
T="--teacher proxy --teacher_proxy_ckpt $TEACHER --kl_weight 3e-5"
train "addon-random" --kl_weight 3e-5 --teacher none
train "addon-local" $T --align local --semantic_mask_prob 0
train "addon-local-semantic" $T --align local --semantic_mask_prob 0.5
train "addon-local-semantic-global" $T --align local,global --semantic_mask_prob 0.5
python - "$OUT" "$BSTAR" <<'PY'
import glob, json, sys
out, bstar = sys.argv[1], sys.argv[2]
def row(name):
    d = [json.loads(l) for l in open(glob.glob(f"{out}/{name}/*/metrics.jsonl")[0])]
    e, tr = d[-1], [r for r in d if "pixel" in r][-1]
    lp = json.load(open(f"{out}/{name}-latent.json"))["linear_probe_accuracy"]
    m = json.load(open(f"{out}/{name}-diff.json"))
    s = m.get("posterior_sample", {})
    return (f"| {name} | {tr['pixel']:.4f} | {e['eval_kl_per_element']:.4f} | {e['eval_active_units']}/{e['eval_num_units']} | "
            f"{e['eval_psnr_mu']:.2f} / {e['eval_psnr_prior']:.2f} | {lp:.3f} | {m['lnc']:.3f} | "
            f"{m['viv_norm']:.3f} / {s.get('viv_norm', float('nan')):.3f} |")
print(f"\nbeta* = {bstar}\n\n| run (500 steps) | train pixel MSE | KL / element | active units | PSNR D(mu) / D(0) | "
      "linear probe | LNC | VIV_norm (mu / sample) |")
print("|---|---|---|---|---|---|---|---|")
names = [f"nomask-kl{b}" for b in ("3e-5", "1e-4", "3e-4", "1e-3")] + [f"randmask-kl{bstar}", f"latentmask-kl{bstar}",
         "addon-random", "addon-local", "addon-local-semantic", "addon-local-semantic-global"]
for n in names:
    print(row(n))
PY
