#!/usr/bin/env bash
# The GPU check of the speed and memory issues, for one call of the device tool (not run by CI: CI has no GPU).
# Every run is nft.py --profile on the random-weight SD3.5-Medium architecture, 512 px, batch 9, on the
# same card in the same call, most important first; each profile lands in $OUT as soon as it is done and
# the table and the PASS/FAIL lines are printed after every run, so a call cut short still reports what it measured.
#   official  fp32 weights + fp16 autocast, reference pass, eager, all-reduce after every backward
#   default   this script's defaults: bf16 base + fp32 LoRA, reference pass (kl_coef 1e-4), compiled
#             per block with a cold compile cache: its first epoch holds the whole compile cost
#   kl0       default without the reference pass (kl_coef 0); reuses default's compiled kernels
#   eager     kl0 without torch.compile: what compile buys, and after how many epochs it pays off
#   vpol      compiled |v_theta - v_old| at equal weights against one optimizer step's change (micro_step, batch 9:
#             default's shapes, so it reuses default's compiled kernels)
#   vae       a bf16-vs-fp32 decode of the real-architecture VAE (random weights: numerics, not quality)
#   ckpt      eager with --gradient_checkpointing: its cost
#   fsdp      --fsdp on random:flux.1-dev over 2 GPUs (eager, kl 0): skipped with a note on one GPU
# Targets (one PASS/FAIL line each): default epoch img/s >= 2x official, kl0 >= 2.5x; default's compile overhead
# (first epoch minus a steady one) <= 120 s; default's peak <= 0.8x official's; default's training MFU >= 45%; vpol
# ratio < 1%; and per run the memory estimate (nft.memory_estimate) beside the measured peak.
# Each run is cut at RUN_TIMEOUT seconds (default 270; killed 15 s later if it ignores the cut) so that one stuck
# compile cannot eat the call; default and kl0 go eager after 180 s of compiling (--compile_budget) and still report.
# Files in $OUT (at most 8 come back): log.txt (card, versions, VAE), profile_<run>.json, vpol.json.
#   here:   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1
#   device: run(command="bash .ci/gpu_check.sh", carry=[".whl"], timeout_s=580)
# MODEL=tiny bash .ci/gpu_check.sh smoke-tests the script on a CPU (fsdp: tiny-flux on 2 gloo ranks); RUNS="official
# kl0" picks runs.
set -uo pipefail
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
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
  [default]="--kl_coef 1e-4 --compile_budget 180"
  [kl0]="--kl_coef 0 --compile_budget 180"
  [eager]="--kl_coef 0 --no-compile"
  [ckpt]="--kl_coef 0 --no-compile --gradient_checkpointing"
)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/log.txt"
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/log.txt"

table() {
  python3 - "$out" <<'PY'
import json, os, sys
runs = [k for k in ("official", "default", "kl0", "eager", "ckpt", "fsdp") if os.path.exists(f"{sys.argv[1]}/profile_{k}.json")]
p = {k: json.load(open(f"{sys.argv[1]}/profile_{k}.json")) for k in runs}
keys = ("train_samples_per_s", "rollout_images_per_s", "epoch_images_per_s", "train_mfu", "rollout_mfu",
        "peak_memory_gib", "time_decode_s", "time_text_s", "time_reward_s", "time_first_epoch_s", "time_epoch_s",
        "memory_estimate_gib", "compile_time_s", "compiled_graphs", "recompiles_after_first_epoch")
print(f"{'':<22}" + "".join(f"{k:>12}" for k in runs))
for key in keys:
    print(f"{key:<22}" + "".join(f"{p[k].get(key) or 0:>12.4g}" for k in runs))
if "official" in p:
    for key in ("train_samples_per_s", "rollout_images_per_s", "epoch_images_per_s", "peak_memory_gib"):
        print(f"{key + ' / official':<34}" + "".join(f"{k}={p[k][key] / p['official'][key]:.2f}  " for k in runs[1:]))
if "default" in p and "official" in p:
    print(f"default: first epoch {p['default']['time_first_epoch_s']:.0f} s vs official's "
          f"{p['official']['time_first_epoch_s']:.0f} s (default's includes its cold compile)")
if "kl0" in p and "eager" in p:
    extra = p["kl0"]["time_first_epoch_s"] - p["kl0"]["time_epoch_s"]  # a warm cache: see default for cold
    gain = p["eager"]["time_epoch_s"] - p["kl0"]["time_epoch_s"]
    print(f"compile: {extra:.0f} s once, {gain:.2f} s saved per epoch -> pays off after {extra / gain:.0f} epochs"
          if gain > 0 and extra > 0 else f"compile: {extra:.0f} s once, {gain:.2f} s saved per epoch")
if "ckpt" in p and "eager" in p:
    print(f"gradient checkpointing: train time x{p['ckpt']['time_train_s'] / p['eager']['time_train_s']:.2f}, "
          f"peak memory {p['ckpt']['peak_memory_gib']:.1f} vs {p['eager']['peak_memory_gib']:.1f} GiB")


def target(name, ok, text):
    print(f"{'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {name}: {text}")


off = p.get("official")
for run, want in (("default", 2.0), ("kl0", 2.5)):
    x = p[run]["epoch_images_per_s"] / off["epoch_images_per_s"] if run in p and off else None
    target(f"{run} epoch img/s >= {want}x official", None if x is None else x >= want, f"{x:.2f}x" if x else "not measured")
d = p.get("default")
extra = d and d["time_first_epoch_s"] - d["time_epoch_s"]
target("compile overhead <= 120 s", None if not d else extra <= 120, f"default's first epoch {extra:.0f} s over a steady one, "
       f"dynamo compile_time_s {d.get('compile_time_s') or 0:.0f}" if d else "not measured")
x = d["peak_memory_gib"] / off["peak_memory_gib"] if d and off else None
target("peak memory <= 0.8x official", None if x is None else x <= 0.8, f"{x:.2f}x" if x else "not measured")
target("default training MFU >= 45%", None if not d else d["train_mfu"] >= 0.45,
       f"{100 * d['train_mfu']:.1f}%" if d else "not measured")
v = json.load(open(f"{sys.argv[1]}/vpol.json")) if os.path.exists(f"{sys.argv[1]}/vpol.json") else None
target("compiled |v_theta - v_old| at equal weights < 1% of one step's change", v and v["ratio"] < 0.01,
       f"{v['equal']:.3g} vs {v['step']:.3g}: {100 * v['ratio']:.3f}%" if v else "not measured")
for k in runs:
    est, peak = p[k].get("memory_estimate_gib"), p[k]["peak_memory_gib"]
    target(f"{k} memory estimate vs measured peak", None, f"{est or 0:.1f} GiB estimated, {peak:.1f} GiB measured "
           f"(x{(est or 0) / peak:.2f})")
PY
}

vae_check() {  # decode the same latents with the real-architecture VAE in fp32 and in bf16
  timeout -k 15 "${RUN_TIMEOUT:-270}" python3 - "$model" "$size" <<'PY' | tee -a "$out/log.txt"
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

vpol_check() {  # one micro-step at equal weights, one AdamW step, one more micro-step: the compiled policy gap
  timeout -k 15 "${RUN_TIMEOUT:-270}" python3 - "$model" "$size" "$out" <<'PY'
import json, sys, torch, nft
model, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
args = nft.parse_args(["--model", model, "--kl_coef", "0", "--sample_batch_size", "9", "--mixed_precision", "auto"])
dtype, autocast = nft.precision(args, device)
pipe = nft.load_pipeline(model, dtype, device).to(device)
torch.manual_seed(0)
params, old = nft.add_adapters(pipe.transformer, args)
with torch.no_grad():  # theta = theta_old, both non-zero
    for n, p in params.items():
        p.normal_(std=0.02)
        old[n].copy_(p)
nft.compile_blocks(pipe.transformer, **({} if device.type == "cuda" else {"backend": "aot_eager"}))
g = torch.Generator().manual_seed(0)
x0 = torch.randn(9, *nft.latent_shape(pipe, size), generator=g).to(device)  # default's batch: its kernels
eps = torch.randn(2, *x0.shape, generator=g).to(device)
sig = nft.schedule(pipe, 10, size)[torch.randint(10, (2, 9), generator=g)].float().to(device)
prompts = ["a photo of a cat", "a red car", "a blue bird"] * 3
cond = nft.encode_prompts(pipe, prompts, args.max_sequence_length, device)
run, pol = nft.Run(args, 0, 1, device, pipe=pipe, autocast=autocast), nft.Policies(params, old, {}, None)
r = torch.linspace(0, 1, 9, device=device)
mb = nft.Batch(torch.arange(9), prompts, cond, x0, r, torch.ones(9, device=device))
step = lambda: float(nft.micro_step(run, pol, mb, sig, eps, 1.0)[2]) / 2
equal = step()
opt = torch.optim.AdamW(params.values(), lr=3e-4)
opt.step()
opt.zero_grad()
moved = step()
res = dict(equal=equal, step=moved, ratio=equal / moved)
json.dump(res, open(f"{out}/vpol.json", "w"))
print(f"compiled |v_theta - v_old|: {equal:.3g} at equal weights, {moved:.3g} after one AdamW step (lr 3e-4): {100 * equal / moved:.3f}%")
PY
}

fsdp_run() {  # --fsdp over 2 ranks: random:flux.1-dev on 2 GPUs, tiny-flux on 2 gloo ranks for the CPU smoke test
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$model" != tiny ] && [ "$gpus" -lt 2 ]; then
    echo "=== fsdp: skipped, $gpus GPU(s) here; it needs 2 (torchrun --nproc_per_node 2 nft.py --model random:flux.1-dev --fsdp)"
    return
  fi
  fmodel=$([ "$model" = tiny ] && echo tiny-flux || echo random:flux.1-dev)
  rm -f /tmp/p_fsdp/profile.json
  start=$SECONDS
  OMP_NUM_THREADS=1 timeout -k 15 "${RUN_TIMEOUT:-270}" python3 -m torch.distributed.run --standalone --nproc_per_node 2 nft.py \
    --model "$fmodel" \
    --reward jpeg --profile --resolution "$size" --train_batch_size 9 --sample_batch_size 9 --num_groups 2 --group_size 9 \
    --num_steps 6 --kl_coef 0 --no-compile --fsdp --overwrite --output_dir /tmp/p_fsdp 2>&1 | grep -v "it/s\]" | tail -4
  echo "=== fsdp: $((SECONDS - start)) s wall"
  cp /tmp/p_fsdp/profile.json "$out/profile_fsdp.json" && table
}

for run in ${RUNS:-official default kl0 eager vpol ckpt vae fsdp}; do
  if [ "$run" = vae ]; then vae_check; continue; fi
  if [ "$run" = vpol ]; then echo "=== vpol"; vpol_check; table; continue; fi
  if [ "$run" = fsdp ]; then fsdp_run; continue; fi
  echo "=== $run: ${flags[$run]}"
  # shellcheck disable=SC2086
  start=$SECONDS
  rm -f "/tmp/p_$run/profile.json"  # a run cut short must not report an older one
  timeout -k 15 "${RUN_TIMEOUT:-270}" python3 nft.py "${common[@]}" ${flags[$run]} --output_dir "/tmp/p_$run" 2>&1 \
    | grep -v "it/s\]" | tail -4
  echo "=== $run: $((SECONDS - start)) s wall (process start to exit)"
  cp "/tmp/p_$run/profile.json" "$out/profile_$run.json" && table
done
