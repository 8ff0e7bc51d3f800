#!/usr/bin/env bash
# The GPU check of the speed issue, for one call of the device tool (not run by CI: CI has no GPU).
# Official-style (fp32 weights + fp16 autocast, reference pass, eager) vs this project's fast path
# (bf16 base + fp32 LoRA, no reference pass, torch.compile), both --profile on the random-weight
# SD3.5-Medium architecture at 512 px, batch 9, on the same card in the same call.
#   here:   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_28_x86_64 -d .whl diffusers importlib_metadata
#   device: run(command="bash .ci/gpu_check.sh", carry=[".whl"], timeout_s=540)
# MODEL=tiny bash .ci/gpu_check.sh smoke-tests the script on a CPU.
set -euo pipefail
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
model="${MODEL:-random:sd3.5-medium}"
size=$([ "$model" = tiny ] && echo 32 || echo 512)
common=(--model "$model" --reward jpeg --profile --resolution "$size" --train_batch_size 9 --sample_batch_size 9
        --num_groups 2 --group_size 9 --overwrite)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt" || true
python3 nft.py "${common[@]}" --mixed_precision fp16 --kl_coef 1e-4 --output_dir /tmp/p_official 2>&1 | grep -v "it/s" | tail -25
python3 nft.py "${common[@]}" --kl_coef 0 --compile --output_dir /tmp/p_fast 2>&1 | grep -v "it/s" | tail -25
cp /tmp/p_official/profile.json "$out/profile_official.json"
cp /tmp/p_fast/profile.json "$out/profile_fast.json"
python3 - "$out" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/profile_{k}.json")) for k in ("official", "fast"))
for k in ("train_samples_per_s", "rollout_images_per_s", "train_mfu", "rollout_mfu", "peak_memory_gib"):
    print(f"{k:<22} official {a[k]:10.4g}   fast {b[k]:10.4g}   ratio {b[k] / a[k]:.2f}")
PY
