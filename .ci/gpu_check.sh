#!/usr/bin/env bash
# The GPU check of the speed issue, for one call of the device tool (not run by CI: CI has no GPU).
# Every run is nft.py --profile on the random-weight SD3.5-Medium architecture, 512 px, batch 9, on the
# same card in the same call, most important first; each profile lands in $OUT as soon as it is done and
# the ratio table is printed after every run, so a call cut short still reports what it measured.
#   official  fp32 weights + fp16 autocast, reference pass, eager, all-reduce after every backward
#   default   this script's defaults: bf16 base + fp32 LoRA, reference pass (kl_coef 1e-4), compiled
#             per block with a cold compile cache: its first epoch holds the whole compile cost
#   kl0       default without the reference pass (kl_coef 0); reuses default's compiled kernels
#   eager     kl0 without torch.compile: what compile buys, and after how many epochs it pays off
#   vae       a bf16-vs-fp32 decode of the real-architecture VAE (random weights: numerics, not quality)
#   ckpt      eager with --gradient_checkpointing: its cost (last: the first five fit in 8 minutes)
# Each run is cut at RUN_TIMEOUT seconds (default 270) so that one stuck compile cannot eat the call.
#   here:   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_28_x86_64 -d .whl diffusers importlib_metadata
#   device: run(command="bash .ci/gpu_check.sh", carry=[".whl"], timeout_s=580)
# MODEL=tiny bash .ci/gpu_check.sh smoke-tests the script on a CPU; RUNS="official kl0" picks runs.
set -uo pipefail
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
cache=/tmp/gpu_check_inductor  # one inductor cache for all runs; emptied so `default` compiles cold
rm -rf "$cache"
export TORCHINDUCTOR_CACHE_DIR="$cache"
model="${MODEL:-random:sd3.5-medium}"
size=$([ "$model" = tiny ] && echo 32 || echo 512)
common=(--model "$model" --reward jpeg --profile --resolution "$size" --train_batch_size 9 --sample_batch_size 9
        --num_groups 2 --group_size 9 --num_steps 10 --overwrite)
declare -A flags=(
  [official]="--mixed_precision fp16 --kl_coef 1e-4 --no-compile --grad_sync micro_step"
  [default]="--kl_coef 1e-4"
  [kl0]="--kl_coef 0"
  [eager]="--kl_coef 0 --no-compile"
  [ckpt]="--kl_coef 0 --no-compile --gradient_checkpointing"
)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"

table() {
  python3 - "$out" <<'PY'
import json, os, sys
runs = [k for k in ("official", "default", "kl0", "eager", "ckpt") if os.path.exists(f"{sys.argv[1]}/profile_{k}.json")]
p = {k: json.load(open(f"{sys.argv[1]}/profile_{k}.json")) for k in runs}
keys = ("train_samples_per_s", "rollout_images_per_s", "epoch_images_per_s", "train_mfu", "rollout_mfu",
        "peak_memory_gib", "time_decode_s", "time_text_s", "time_reward_s", "time_first_epoch_s", "time_epoch_s",
        "compiled_graphs", "recompiles_after_first_epoch")
print(f"{'':<22}" + "".join(f"{k:>12}" for k in runs))
for key in keys:
    print(f"{key:<22}" + "".join(f"{p[k].get(key, float('nan')):>12.4g}" for k in runs))
if "official" in p:
    for key in ("train_samples_per_s", "rollout_images_per_s", "epoch_images_per_s", "peak_memory_gib"):
        print(f"{key + ' / official':<34}" + "".join(f"{k}={p[k][key] / p['official'][key]:.2f}  " for k in runs[1:]))
if "default" in p and "official" in p:
    print(f"default: first epoch {p['default']['time_first_epoch_s']:.0f} s vs official's "
          f"{p['official']['time_first_epoch_s']:.0f} s (the cold compile's extra time)")
if "kl0" in p and "eager" in p:
    extra = p["kl0"]["time_first_epoch_s"] - p["kl0"]["time_epoch_s"]  # a warm cache: see default for cold
    gain = p["eager"]["time_epoch_s"] - p["kl0"]["time_epoch_s"]
    print(f"compile: {extra:.0f} s once, {gain:.2f} s saved per epoch -> pays off after {extra / gain:.0f} epochs"
          if gain > 0 else f"compile: {extra:.0f} s once, no saving per epoch at this size")
if "ckpt" in p and "eager" in p:
    print(f"gradient checkpointing: train time x{p['ckpt']['time_train_s'] / p['eager']['time_train_s']:.2f}, "
          f"peak memory {p['ckpt']['peak_memory_gib']:.1f} vs {p['eager']['peak_memory_gib']:.1f} GiB")
PY
}

vae_check() {  # decode the same latents with the real-architecture VAE in fp32 and in bf16
  python3 - "$model" "$size" <<'PY' | tee "$out/vae_bf16.txt"
import sys, time, torch, nft
model, size = sys.argv[1], int(sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = nft.load_pipeline(model, torch.float32, device).to(device)
x0 = torch.randn(9, pipe.vae.config.latent_channels, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device)
res = {}
for dtype in (torch.float32, torch.bfloat16):
    pipe.vae.to(dtype)
    nft.decode(pipe, x0)
    t = nft.clock(torch.device(device))
    res[dtype] = (nft.decode(pipe, x0), nft.clock(torch.device(device)) - t)
(a, ta), (b, tb) = res[torch.float32], res[torch.bfloat16]
d = (a - b).abs() * 255
print(f"VAE decode of 9 latents at {size} px: bf16 vs fp32 |diff| mean {d.mean():.3f}/255 max {d.max():.2f}/255, "
      f"{(d > 1).float().mean() * 100:.2f}% of values off by > 1/255; fp32 {ta:.3f} s, bf16 {tb:.3f} s (x{ta / tb:.2f})")
PY
}

for run in ${RUNS:-official default kl0 eager vae ckpt}; do
  if [ "$run" = vae ]; then vae_check; continue; fi
  echo "=== $run: ${flags[$run]}"
  # shellcheck disable=SC2086
  start=$SECONDS
  rm -f "/tmp/p_$run/profile.json"  # a run cut short must not report an older one
  timeout "${RUN_TIMEOUT:-270}" python3 nft.py "${common[@]}" ${flags[$run]} --output_dir "/tmp/p_$run" 2>&1 \
    | grep -v "it/s\]" | tail -4
  echo "=== $run: $((SECONDS - start)) s wall (process start to exit)"
  cp "/tmp/p_$run/profile.json" "$out/profile_$run.json" && table
done
