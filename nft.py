"""DiffusionNFT in one file: online RL for flow-matching text-to-image models on the forward process.

Paper: "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (Zheng et al. 2025, arXiv 2509.16117).
Official code: github.com/NVlabs/DiffusionNFT.

One epoch: sample images with the frozen *old* policy and any solver, score them, turn rewards into an optimality
weight r in [0, 1], then train the LoRA velocity v_theta with a flow-matching loss on freshly noised copies of the
clean images. Each sample pulls the implicit positive policy v+ = beta*v_theta + (1-beta)*v_old toward it with weight
r, and the negative one v- = (1+beta)*v_old - beta*v_theta with weight 1 - r: pulling v- toward a bad sample pushes
v_theta away from it. No likelihoods, no stored trajectories, no CFG needed.

    python nft.py --model tiny --reward color                          # the CPU demo, a few minutes
    torchrun --nproc_per_node=8 nft.py --reward geneval --prompts DiffusionNFT/dataset   # the official recipe
    python nft.py --eval_only --lora runs/stable-diffusion-3.5-medium-geneval/checkpoints/checkpoint-01000

Reading order: the config (Args, PRESETS); the math, pure functions with their equations; then the algorithm:
train() is the paper's Algorithm 1, a call per step of it, followed by every function those steps call that carries
the algorithm (prompt draw, rollout, scoring, the loss pass, optimizer step and gradient sync, old-policy update,
policy swap, each model family's velocity). A reader who only wants the algorithm may stop at the "plumbing"
banner, line 831: below it are setup, loading, checkpoints, evaluation, logging, the command line and the
built-in models.

Convention (diffusers / SD3 rectified flow): sigma in [0, 1], sigma = 1 is pure noise,
xt = (1 - sigma)*x0 + sigma*eps (the paper's x_t, t = sigma), and the transformer predicts v = eps - x0.
SD3.5, FLUX.1 and Qwen-Image all fit this: a Family says how prompts are encoded, how the transformer gives v for
(x, sigma, prompt), the rollout schedule and the LoRA targets; the loop never asks which family it runs.

Where this file deliberately differs from the official code (the README's table gives them in more detail):
 1. bf16 frozen base + fp32 LoRA under bf16 autocast (official: fp32 weights, fp16 autocast, GradScaler;
    --mixed_precision fp16 has them, with GradScaler's loss-scale rule).
 2. Rollout timesteps stay floats, as in training (official casts them to integers in rollouts).
 3. The reference pass runs only when kl_coef > 0 (the same loss when kl_coef == 0, one pass fewer).
 4. Resume is exact: trainable + old LoRA, EMA, optimizer, step, epoch; every random draw is a function of
    (seed, epoch, rank), so nothing else needs saving (official reloads EMA into both adapters, drops EMA and
    optimizer state and restarts the RNG).
 5. The official CFG > 1 training branch is broken; here guidance affects rollouts and evaluation, and the loss uses
    the conditional velocity unless --train_guided trains the guided one.
 6. The LoRA is saved in the diffusers layout (`pipe.load_lora_weights` reads it), not peft's.
 7. GenEval's partial reward appends 0.0 only for a failed position check (official: 0.0 then 1.0).
 8. Gradients are all-reduced once per optimizer step by hand (or reduce-scattered by FSDP2), not by DDP.
 9. Samples with a NaN/inf reward or rollout latent are dropped from the update with a warning.
10. An epoch draws distinct prompts, grouped by index (official: each rollout batch draws afresh, so a prompt can
    fill two groups, which its stat tracker merges by text).
11. GenEval on transformers' Mask2Former and CLIP (official: mmdetection's, open_clip's); scorers and the decode they
    score run in fp32 (--reward_precision bf16 for speed).
12. OCR on rapidocr's PP-OCRv4 with its Chinese-English dictionary (official: PaddleOCR's English one).
13. HPSv2.1 and ImageReward on transformers' modules; ImageReward scores each (prompt, image) pair (official: an N x N
    matrix's diagonal); --init_lora folds the file's alpha/r into lora_B (official: loads a peft folder as is).
"""
import argparse
import atexit
import contextlib
import dataclasses
import datetime
import difflib
import errno
import functools
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

INDUCTOR_CACHE_GIVEN = "TORCHINDUCTOR_CACHE_DIR" in os.environ  # by the user: importing torch._dynamo sets it later
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import rewards


class UserError(Exception):
    """A bad flag, file or state: printed as one line, no traceback."""


# --------------------------------------------------------------------------- config
@dataclass
class Args:  # each comment is the flag's --help
    # model and data
    model: str = "stabilityai/stable-diffusion-3.5-medium"  # The base model: a hub id, a local folder or a built-in.
    reward: str = "geneval"  # The reward: a name or a weighted sum "name:w,name:w"; a name also picks its preset.
    preset: str = ""  # The official recipe to start from; empty picks the reward's preset when it has one.
    prompts: str = ""  # Training prompts: a .txt, a .jsonl or the official dataset/ folder; empty: built-in.
    eval_prompts: str = ""  # Evaluation prompts, same formats; empty: a --prompts folder's test file, else built-in.
    init_lora: str = ""  # Start theta and theta_old from this LoRA file or folder (official train.lora_path).
    output_dir: str = ""  # The run's folder (config, metrics, grids, checkpoints/); empty: runs/<model>-<reward>.
    overwrite: bool = False  # Replace a previous run in --output_dir instead of refusing to start.
    seed: int = 42  # The seed that every random draw derives from, with the epoch and the rank.
    # rollout
    resolution: int = 512  # The image size in pixels; a multiple of 16.
    num_steps: int = 10  # The number of solver steps of each rollout.
    solver: str = "dpm2"  # The rollout solver; NFT trains on clean images only, so any solver works.
    eta: float = 0.7  # The noise level of the "sde" solver (0 makes it Euler).
    guidance_scale: float = 1.0  # True CFG of rollouts and evaluation, by the family's pipeline rule; 1 is none.
    negative_prompt: str = None  # The negative prompt of CFG; unset: " " for Qwen-Image, "" for SD3 and FLUX.1.
    embedded_guidance_scale: float = 3.5  # FLUX.1-dev's distilled guidance input (FluxPipeline's guidance_scale).
    train_guided: bool = False  # Train the guided velocity the rollouts used (2x the training forwards).
    max_sequence_length: int = 128  # Text tokens per prompt (T5's: SD3's CLIP adds 77; Qwen2.5-VL's).
    sample_batch_size: int = 9  # Images per forward pass in rollouts and no-grad passes, per GPU.
    # NFT
    group_size: int = 24  # Images per prompt in an epoch; advantages compare images of the same prompt.
    num_groups: int = 48  # The number of prompts per epoch, over all ranks.
    beta: float = 1.0  # The NFT mixing coefficient beta in (0, 1] of v+ and v- (official config.beta).
    kl_coef: float = 1e-4  # The weight of mean (v_theta - v_ref)^2 (official config.train.beta); 0 skips v_ref.
    adv_clip: float = 5.0  # A is clipped to +-adv_clip, r = A/adv_clip/2 + 0.5, and the loss x adv_clip.
    global_std: bool = True  # Normalise advantages by the epoch's reward std (--no-global_std: each group's).
    timestep_fraction: float = 0.99  # T = max(1, int(num_steps x this)) rollout sigmas trained per sample.
    old_flat: int = 0  # Optimizer steps before the old policy lags: until then d = 0 (fully on-policy).
    old_rate: float = 0.001  # The old policy's decay after --old_flat: d = min(old_rate x (step - flat), old_max).
    old_max: float = 0.5  # The largest decay d of theta_old <- d x theta_old + (1 - d) x theta.
    ema_max_decay: float = 0.9  # The largest EMA decay, min((1 + step)/(10 + step), this), of evaluation weights.
    # optimization
    learning_rate: float = 3e-4  # The AdamW learning rate of the LoRA (constant, no schedule).
    adam_beta1: float = 0.9  # AdamW's first-moment decay beta1.
    adam_beta2: float = 0.999  # AdamW's second-moment decay beta2.
    adam_weight_decay: float = 1e-4  # AdamW's decoupled weight decay.
    adam_epsilon: float = 1e-8  # AdamW's epsilon added to the denominator.
    max_grad_norm: float = 1.0  # The gradient-norm clip applied before each optimizer step.
    train_batch_size: int = 9  # The training micro-batch per GPU; gradients accumulate over micro-batches.
    steps_per_epoch: int = 1  # The number of optimizer steps per epoch (the official OCR recipe uses 2).
    num_epochs: int = 1000  # Epochs to train; one is a rollout, rewards and --steps_per_epoch optimizer steps.
    rank: int = 32  # The LoRA rank, the adapters' inner dimension.
    lora_alpha: int = 64  # The LoRA alpha; the adapter is scaled by alpha/rank.
    lora_targets: str = "official"  # The layers with LoRA: "official", "official+proj_out" or a comma list.
    mixed_precision: str = "auto"  # The precision: auto, bf16, fp16 (official-style fp32 + fp16 autocast) or no.
    reward_precision: str = "fp32"  # The precision of the reward models and their decode: fp32 or bf16.
    # evaluation, logging, checkpoints
    eval_every: int = 10  # Evaluate the EMA weights every this many epochs and save a grid; 0 never evaluates.
    eval_num_steps: int = 40  # The number of Euler steps of evaluation images, as the paper evaluates.
    eval_images_per_prompt: int = 0  # Images per evaluation prompt; 0: the benchmark's count, 1 in training.
    eval_max_prompts: int = 0  # Evaluate only this many prompts, spread evenly over the set; 0 evaluates all.
    eval_reward: str = ""  # Rewards scored beside --reward in every evaluation, not trained on (a spec).
    eval_only: bool = False  # Evaluate the base model or --lora with the paper's protocol instead of training.
    lora: str = ""  # With --eval_only: the LoRA to evaluate (file, folder or hub repo); empty: the base model.
    save_every: int = 10  # Save a checkpoint every this many epochs (and after the last one).
    checkpoints_total_limit: int = 3  # The number of newest checkpoints kept (0 keeps all).
    resume_from: str = ""  # Continue a run: "latest" (its newest checkpoint, or a new run) or a checkpoint folder.
    max_nonfinite_steps: int = 3  # Stop the run after this many skipped (non-finite) optimizer steps in a row.
    reward_timeout: float = 600.0  # Stop the run when one reward call takes longer than this many seconds.
    wandb: bool = False  # Also log every epoch's metrics to Weights & Biases (pip install wandb).
    wandb_project: str = "diffusion-nft"  # The Weights & Biases project the run is logged to (with --wandb).
    wandb_run_name: str = ""  # The Weights & Biases run name; empty uses the --output_dir folder's name.
    # speed
    compile: bool = None  # Compile each transformer block; unset: on with a GPU, off on a CPU.
    gradient_checkpointing: bool = False  # Recompute activations in the backward pass: less memory, more compute.
    grad_sync: str = "step"  # When to all-reduce gradients: "step" or "micro_step" (after every backward).
    offload_text_encoders: bool = False  # Keep the text encoders on the CPU except while encoding prompts.
    fsdp: bool = False  # Shard the transformer and its LoRA over the ranks, per block (FSDP2); launch with torchrun.
    compile_budget: float = 600.0  # Seconds of compiling after which the run goes eager (as on a later recompile).
    memory_check: bool = True  # Stop before loading when memory_estimate says the run will not fit the GPU.
    profile: bool = False  # Time 3 epochs (phases, throughput, MFU, memory), write profile.json, and stop.


# Official recipes (config/nft.py), applied before command-line flags. All: SD3.5-M, 512 px, 8 GPUs.
PRESETS = {
    "geneval": dict(reward="geneval", beta=1.0, old_flat=0, old_rate=0.001, old_max=0.5),
    "ocr": dict(reward="ocr", beta=0.1, old_flat=75, old_rate=0.0075, old_max=0.999, steps_per_epoch=2),
    "pickscore": dict(reward="pickscore", beta=1.0),
    "hpsv2": dict(reward="hpsv2", beta=1.0),
    "multi": dict(reward="pickscore:1,hpsv2:1,clipscore:1", beta=0.1, num_steps=25),
    # the CPU demo: a 2-layer random SD3 at 32 px learns the colour reward in a few minutes on 2 cores (evaluating 8
    # prompts at most: GenEval's or OCR's whole test set would take an hour on a CPU)
    "tiny": dict(resolution=32, num_steps=10, solver="euler", group_size=8, num_groups=4,
                 sample_batch_size=32, train_batch_size=16, max_sequence_length=16, kl_coef=0.0,
                 learning_rate=1e-2, lora_targets="official+proj_out", num_epochs=150,
                 eval_every=50, save_every=50, eval_num_steps=10, eval_images_per_prompt=4, eval_max_prompts=8),
    # the CPU demo on tiny-flux / tiny-qwenimage, after "tiny": they learn the colour reward in about a minute
    **dict.fromkeys(["tiny-flux", "tiny-qwenimage"], dict(num_epochs=60, eval_every=20, save_every=20)),
    # FLUX.1 and Qwen-Image (applied for those --model families): no DiffusionNFT recipe exists, so the nearest
    # published one, Flow-GRPO's (config/grpo.py pickscore_flux / pickscore_qwenimage), with NFT's CFG-free rollouts,
    # and the pipeline's text length (FLUX does not mask T5 padding: train, evaluate and deploy at one length)
    "flux": dict(num_steps=6, eval_num_steps=28, rank=64, lora_alpha=128, max_sequence_length=512),
    "qwenimage": dict(num_steps=10, eval_num_steps=50, rank=64, lora_alpha=128, max_sequence_length=512),
}


OFFICIAL_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


# --------------------------------------------------------------------------- math (pure functions)
def add_noise(x0, eps, sigma):
    """Forward (noising) process of rectified flow: xt = (1 - sigma) * x0 + sigma * eps.

    x0, eps: (B, ...); sigma: (B,) or a float, broadcast per sample. sigma = 1 is pure noise.
    """
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    sigma = sigma.reshape(-1, *[1] * (x0.ndim - 1)) if sigma.ndim else sigma
    return (1 - sigma) * x0 + sigma * eps


def nft_loss(v_theta, v_old, x0, xt, sigma, r, beta):
    """Negative-aware flow-matching loss of DiffusionNFT (paper Eq. 8-9), per sample.

        v+ = beta*v_theta + (1-beta)*v_old          x0+ = xt - sigma*v+
        v- = (1+beta)*v_old - beta*v_theta          x0- = xt - sigma*v-
        L+- = mean (x0+- - x0)^2 / w+-,   w+- = max(mean |x0+- - x0|, 1e-5)  (no grad, float64; means over C, H, W)
        loss = (r*L+ + (1-r)*L-) / beta                                             -> shape (B,)

    Since x0+- - x0 = sigma*(eps - x0 - v+-), it is velocity matching weighted by sigma; dividing by w (the mean
    |error|, no grad) makes it grow like sigma*|velocity error|, not its square. At theta = theta_old (v+ = v- = v_old)
    its gradient is (2r - 1) * grad L(v_old), the /beta cancelling beta in dv+-/dv_theta; with r = adv_to_r(A) and the
    trainer's factor adv_clip that is A * grad L: advantage-weighted flow matching, for any beta (|A| <= adv_clip).
    The trainer minimizes adv_clip * mean_B(mask*loss) + kl_coef * mean((v_theta - v_ref)^2) (micro_step).
    v_theta: (B, C, H, W) or (B, C, F, H, W) with grad, fp32 (sigma is cast to its dtype); v_old: same, no grad;
    sigma, r: (B,) or floats; beta: (0, 1].
    """
    v_old, r = v_old.detach(), torch.as_tensor(r, device=x0.device).reshape(-1).double()  # (B, 1) is (B,) too
    s = torch.as_tensor(sigma, device=x0.device).reshape(-1, *[1] * (x0.ndim - 1)).to(v_theta.dtype)
    dims = tuple(range(1, x0.ndim))
    losses = []
    for v in (beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta):
        err = xt - s * v - x0
        with torch.no_grad():  # float64: the mean of tiny bf16-scale errors must not round to zero
            w = err.double().abs().mean(dims, keepdim=True).clamp(min=1e-5)
        losses.append((err.double() ** 2 / w).mean(dims))
    return ((r * losses[0] + (1 - r) * losses[1]) / beta).float()


def cfg(v, v_neg, scale):
    """Classifier-free guidance: v_neg + scale*(v - v_neg), v the conditional velocity, v_neg the negative prompt's."""
    return v_neg + scale * (v - v_neg)


def adv_to_r(adv, adv_clip):
    """Optimality weight r = clamp(clip(A, +-adv_clip) / adv_clip / 2 + 0.5, 0, 1): A = 0 -> 0.5, +adv_clip -> 1,
    -adv_clip -> 0. adv_clip > 0."""
    return (adv.clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)


def group_advantages(R, group_ids, global_std=True):
    """A = (R - mean of R over the same prompt) / (std + 1e-4).

    std is the population std of all rewards of the epoch (global_std=True, official) or of the group.
    R: (N,) rewards, float, finite (score drops NaN/inf first: one NaN would spread to every A), N >= 1; group_ids: (N,)
    int, equal ids = same prompt. Returns (N,) float.
    """
    R = R.double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(int(inv.max()) + 1, dtype=R.dtype).index_add_(0, inv, torch.ones_like(R))
    mean = torch.zeros_like(count).index_add_(0, inv, R) / count
    centered = R - mean[inv]
    if global_std:
        std = R.std(unbiased=False)
    else:
        std = (torch.zeros_like(count).index_add_(0, inv, centered ** 2) / count).sqrt()[inv]
    return (centered / (std + 1e-4)).float()


def old_decay(step, flat, rate, max_decay):
    """Old-policy soft-update coefficient d: theta_old <- d*theta_old + (1-d)*theta after each epoch.

    d = 0 while step < flat (fully on-policy), then min(rate * (step - flat), max_decay); step: optimizer steps taken.
    """
    return 0.0 if step < flat else min(rate * (step - flat), max_decay)


def ema_decay(step, max_decay=0.9):
    """EMA decay of the evaluation/saved LoRA: min((1 + step) / (10 + step), max_decay)."""
    return min((1 + step) / (10 + step), max_decay)


def soft_update_(target, source, decay):
    """target <- decay*target + (1 - decay)*source, in place, per tensor of two dicts with the same keys: theta_old
    following theta (old_decay) and the EMA of theta (ema_decay)."""
    with torch.no_grad():
        for n, t in source.items():
            target[n].mul_(decay).add_(t.detach(), alpha=1 - decay)


def sigma_to_timestep(sigma):
    """SD3's transformer is conditioned on timestep = 1000*sigma, kept a float (no rounding)."""
    return 1000.0 * sigma


def euler(velocity_fn, x, sigmas, generator=None, eta=0.0):
    """x <- x + (sigma_next - sigma) * v(x, sigma). Same as diffusers' FlowMatchEulerDiscreteScheduler."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s) * velocity_fn(x, s)
    return x


def dpm2(velocity_fn, x, sigmas, generator=None, eta=0.0):
    """DPM-Solver++(2M), data prediction, alpha = 1 - sigma, lambda = log(alpha/sigma), h = lambda' - lambda (' : at the
    next sigma).

    First order:  x <- (s'/s)*x - a'*(e^-h - 1)*m,  m = x0_pred = x - s*v
    Second order: m replaced by m + (m - m_prev) / (2*r0), r0 = h_prev / h. First order at the first step, at the second
    when sigmas[0] = 1 (lambda(1) = -inf, so h_prev is infinite and the correction vanishes), and at the last step
    to sigma = 0.
    """
    m_prev, h_prev = None, None
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        m = x - s * velocity_fn(x, s)
        if s_next == 0:  # the final first-order step to sigma = 0 lands exactly on the prediction
            return m
        a, a_next = 1 - s, 1 - s_next
        exp_neg_h = a * s_next / (s * a_next)  # e^-h without evaluating lambda(1) = -inf
        h = -math.log(exp_neg_h) if exp_neg_h > 0 else math.inf
        d = m
        if m_prev is not None and math.isfinite(h_prev) and math.isfinite(h):
            d = m + (m - m_prev) * h / (2 * h_prev)
        x = (s_next / s) * x - a_next * (exp_neg_h - 1) * d
        m_prev, h_prev = m, h
    return x


def sde(velocity_fn, x, sigmas, generator=None, eta=0.7):
    """Flow-GRPO's marginal-preserving SDE; eta = 0 is Euler. With dt = s' - s < 0:
    std = eta*sqrt(s/(1-s)) (with sigmas[1] in place of s in the denominator when s = 1),
    mean = x*(1 + std^2*dt/(2s)) + v*(1 + std^2*(1-s)/(2s))*dt,   x <- mean + std*sqrt(-dt)*z.
    """
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        v, dt = velocity_fn(x, s), s_next - s
        # as Flow-GRPO: at s = 1 only the denominator takes sigmas[1]
        std = eta * math.sqrt(s / (1 - (s if s < 1 else sigmas[1].item())))
        mean = x * (1 + std ** 2 * dt / (2 * s)) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + std * math.sqrt(-dt) * z
    return x


SOLVERS = {"euler": euler, "dpm2": dpm2, "sde": sde}  # a new solver: this signature, sigmas a 1-D float64 CPU tensor


def solve(velocity_fn, x, sigmas, solver="dpm2", generator=None, eta=0.7):
    """Integrate dx/dsigma = v(x, sigma) from sigmas[0] to sigmas[-1] with a solver from SOLVERS."""
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}" + _closest(solver, SOLVERS))
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64, device="cpu")  # read as Python floats: no device sync
    return SOLVERS[solver](velocity_fn, x, sigmas, generator=generator, eta=eta)


def sd3_sigmas(num_steps, shift=3.0):
    """SD3's inference schedule (FlowMatchEulerDiscreteScheduler.set_timesteps), num_steps + 1 values
    ending in 0. 10 steps at shift 3: 1.0, 0.9601, ..., 0.2780, 0.0089, 0."""
    sigma_min = shift * 1e-3 / (1 + (shift - 1) * 1e-3)  # the scheduler's smallest training sigma
    s = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
    return torch.cat([shift * s / (1 + (shift - 1) * s), torch.zeros(1, dtype=torch.float64)])


def shifted_sigmas(config, num_steps, image_seq_len):
    """The schedule FluxPipeline and QwenImagePipeline hand FlowMatchEulerDiscreteScheduler: t = linspace(1,
    1/num_steps, num_steps) and mu linear in the image tokens (calculate_shift), then per the scheduler config
        use_dynamic_shifting:  sigma = e^mu / (e^mu + 1/t - 1)   (time_shift_type "exponential")
                               sigma = mu / (mu + 1/t - 1)       ("linear")
        else:                  sigma = shift*t / (1 + (shift - 1)*t)
        shift_terminal:        1 - sigma stretched so the last sigma is shift_terminal (Qwen-Image: 0.02)
    and a final 0 (one step: [1, 0], the scheduler's NaN avoided). float64 (the scheduler computes in float32: they
    agree to ~1e-7)."""
    c = {"shift": 1.0, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
         "time_shift_type": "exponential", **config}
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if c.get("use_dynamic_shifting"):
        slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        mu = c["base_shift"] + slope * (image_seq_len - c["base_image_seq_len"])
        s = (math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if c["time_shift_type"] == "exponential"
             else mu / (mu + (1 / t - 1)))
    else:
        s = c["shift"] * t / (1 + (c["shift"] - 1) * t)
    if c.get("shift_terminal") and s[-1] < 1:  # one step starts and stays at 1 (the scheduler: 0/0, NaN)
        s = 1 - (1 - s) / ((1 - s[-1]) / (1 - c["shift_terminal"]))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


# --------------------------------------------------------------------------- the algorithm (the paper's Algorithm 1)
def train(args):
    """DiffusionNFT, the paper's Algorithm 1. Every epoch:
      1. draw num_groups prompts x group_size images (this rank's share) and encode them;
      2. roll out clean images x0 with the old policy v_old and any solver: no grad, no trajectory kept;
      3. score them: rewards R -> per-prompt advantages A -> optimality weights r in [0, 1];
      4. NFT update: noise x0 afresh at T = max(1, int(num_steps * timestep_fraction)) of the rollout's sigmas and
         descend the negative-aware loss r*L+ + (1 - r)*L- (nft_loss), steps_per_epoch optimizer steps (after each,
         the EMA of theta, for evaluation, follows);
      5. the old policy follows: theta_old <- d*theta_old + (1 - d)*theta;
      6. log, evaluate, checkpoint.
    """
    run, pol, start_epoch = start_run(args)  # ranks, prompts, model, LoRA policies, optimizer, resumed state
    if run is None:  # the run to resume is complete
        return
    history = []
    for epoch in range(start_epoch, args.num_epochs):
        log = dict(epoch=epoch)
        if args.eval_every and epoch == 0:  # the base model (or --init_lora), for the before/after comparison
            evaluate_ema(run, pol, 0, log, "_before")
            start = "the --init_lora LoRA" if args.init_lora else "the base model"
            print0(f"{start}'s eval reward: {log['eval_reward_mean_before']:.4f}")
        timer = PhaseTimer(log, run.device)
        batch = encode_batch(run, epoch)  # 1. prompts
        timer("text")
        futures = rollout(run, pol, batch, epoch, log)  # 2. x0 from the old policy
        timer("rollout", less=log["time_decode"])
        score(run, batch, futures, epoch, log)  # 3. R -> A -> r
        timer("reward")
        nft_update(run, pol, batch, epoch, log)  # 4. the NFT loss on freshly noised x0
        log["old_decay"] = update_old_policy(pol, args)  # 5. theta_old follows theta
        timer("train")
        end_epoch(run, pol, epoch, log)  # 6. log, evaluate, checkpoint
        history.append(log)
    end_run(run, history)


@dataclass
class Policies:
    """The LoRA weights NFT keeps, dicts keyed by the trainable parameter names, and the optimizer. theta lives in the
    transformer (the adapter's parameters); theta_old (rollouts) and the EMA (evaluation, saving) are copied in when
    used (`policy`). Under --fsdp every tensor is this rank's shard."""
    theta: dict
    old: dict
    ema: dict
    opt: torch.optim.Optimizer
    step: int = 0  # optimizer steps taken
    bad_steps: int = 0  # non-finite optimizer steps in a row
    loss_scale: float = None  # fp16: the backward's loss scale, by GradScaler's rule (take_step); None: unscaled
    scale_steps: int = 0  # fp16: steps with finite gradients since the loss scale last changed


@dataclass
class Batch:
    """This rank's share of an epoch. Filled in order: prompts (step 1), clean latents x0 (step 2), and the
    optimality weights r with the mask of finite rewards (step 3)."""
    ids: torch.Tensor  # (N,) prompt index of each image
    prompts: list
    cond: dict  # the prompt conditioning of rollout and loss alike: (N, ...) tensors (SD3: embeds, pooled)
    x0: torch.Tensor = None  # (N, C, h, w) the rollout's clean latents
    r: torch.Tensor = None  # (N,) optimality weight in [0, 1]
    mask: torch.Tensor = None  # (N,) 1 where the reward is finite
    trainable: bool = True  # some finite reward on some rank

    def rows(self, s):
        """The images s (a slice) of this batch."""
        return Batch(self.ids[s], self.prompts[s], rows(self.cond, s),  # rows(): the function below, not this one
                     self.x0[s], self.r[s], self.mask[s])


def epoch_prompt_indices(num_prompts, num_groups, group_size, seed, epoch):
    """The epoch's prompt index for every image, identical on all ranks: num_groups prompts drawn without replacement
    (cycling if the set is small: the groups of a repeated prompt then merge), each repeated group_size times, then
    shuffled so a group spreads over ranks. A function of (seed, epoch) alone, so resume needs no sampler state."""
    g = rng(seed, epoch, "prompts")
    picks = torch.cat([torch.randperm(num_prompts, generator=g) for _ in range(-(-num_groups // num_prompts))])
    ids = picks[:num_groups].repeat_interleave(group_size)
    return ids[torch.randperm(len(ids), generator=g)]


def encode_batch(run, epoch):
    """Step 1: this rank's slice of the epoch's prompt draw (the same on every rank), and its embeddings."""
    args, n = run.args, run.per_rank
    ids = epoch_prompt_indices(len(run.train_records), args.num_groups, args.group_size, args.seed, epoch)
    ids = ids[run.process_index * n:(run.process_index + 1) * n]
    prompts = [run.train_records[i]["prompt"] for i in ids.tolist()]
    return Batch(ids, prompts, encode_prompts(run.pipe, prompts, args.max_sequence_length, run.device,
                                              args.embedded_guidance_scale))


def rollout(run, pol, batch, epoch, log):
    """Step 2: sample batch.x0 with the old policy, sample_batch_size images at a time, and hand each batch's decoded
    images to the reward thread, so scoring overlaps the next batch's sampling. Only x0, the embeddings and the sigma
    schedule are kept. Returns the reward futures; log gets the decode time."""
    args, device = run.args, run.device
    g = rng(args.seed, epoch, run.process_index, "rollout")
    noise_gen, shape = device_rng(g, device), latent_shape(run.pipe, args.resolution)
    x0, futures, log["time_decode"] = [], [], 0.0
    with policy(pol.theta, pol.old):
        for b in tqdm(range(0, run.per_rank, args.sample_batch_size), desc=f"epoch {epoch} rollout", **run.bar):
            s = slice(b, b + args.sample_batch_size)
            noise = torch.randn((len(batch.prompts[s]), *shape), generator=noise_gen, device=device)
            x0.append(sample(run, noise, rows(batch.cond, s), run.sigmas, args.solver, device_rng(g, device)))
            t = clock(device)
            images = decode(run.pipe, x0[-1])
            log["time_decode"] += clock(device) - t
            futures.append(run.pool.submit(run.reward_fn, images, batch.prompts[s],
                                           [run.train_records[i] for i in batch.ids[s].tolist()]))
    batch.x0 = torch.cat(x0)
    return futures


@torch.no_grad()
def sample(run, x, cond, sigmas, solver, generator=None):
    """Integrate noise x (sigma = 1) to clean latents x0 with the transformer's active policy, guided by
    --guidance_scale as the family's pipeline does (guided_velocity with the negative prompt's conditioning), in
    rollouts and evaluation alike. generator feeds the noise of stochastic solvers."""
    def v_fn(x, sigma):
        return guided_velocity(run.pipe.transformer, x, sigma, cond, run.negative, run.args.guidance_scale)
    with run.autocast():  # one context for all steps: autocast casts the fp32 LoRA to bf16 once, not every step
        return solve(v_fn, x, sigmas, solver, generator=generator, eta=run.args.eta)


def score(run, batch, futures, epoch, log):
    """Step 3: gather every rank's rewards, A = group_advantages (by prompt index, over all ranks), r = adv_to_r.
    Samples with a NaN/inf reward or latent get mask 0 and x0 = 0 (a NaN image would make even its masked loss NaN)."""
    args, device, n = run.args, run.device, run.per_rank
    lo, hi = run.process_index * n, (run.process_index + 1) * n
    results = [f.result() for f in tqdm(futures, desc=f"epoch {epoch} reward", **run.bar)]
    R = torch.cat([scores for scores, _ in results]).double()
    # a diverged rollout counts as unscored even where its reward is finite (JPEG and OCR score NaN pixels as black)
    diverged = ~torch.isfinite(batch.x0).flatten(1).all(1).cpu()
    R[diverged] = math.nan
    comps = gather_components(results, diverged, device)  # every rank's, for the log
    all_R, all_ids = gather(R.to(device)).cpu(), gather(batch.ids.to(device)).cpu()
    ok = torch.isfinite(all_R)
    if not ok.all():
        print0(f"warning: epoch {epoch}: {int((~ok).sum())} of {len(ok)} samples have a NaN/inf reward or latent; "
               "they are dropped from the update")
    batch.trainable = bool(ok.any())
    if not batch.trainable:
        print0(f"epoch {epoch}: every reward is non-finite; skipping the update (check the reward model)")
    adv = torch.zeros_like(all_R, dtype=torch.float32)
    if batch.trainable:
        adv[ok] = group_advantages(all_R[ok], all_ids[ok], args.global_std)
    strict = comps["geneval/strict"][ok] if "geneval/strict" in comps else None
    tags = [run.train_records[i].get("tag", "?") for i in all_ids[ok].tolist()]
    log.update(rollout_stats(all_R[ok], all_ids[ok], strict, tags))
    batch.mask = ok[lo:hi].float().to(device)
    batch.x0 = torch.where(batch.mask.view(-1, 1, 1, 1) > 0, batch.x0, 0.0)
    batch.r = adv_to_r(adv[lo:hi], args.adv_clip).to(device)
    spread = float(all_R[ok].std(unbiased=False)) if batch.trainable else float("nan")  # none finite: null, no warning
    log.update(reward_mean=float(all_R[ok].mean()), reward_std=spread,
               **{f"reward_{k}": float(v.nanmean()) for k, v in comps.items()},  # a NaN: unscored, left out
               r_mean=float(adv_to_r(adv, args.adv_clip).mean()),  # every rank's; a dropped sample counts 0.5
               dropped=int((~ok).sum()))


def nft_update(run, pol, batch, epoch, log):
    """Step 4: every sample is trained at T of the rollout's own sigmas (run.sigmas, the family's schedule: a fresh
    random T of its first num_steps, never the final 0, per sample and epoch, as officially) with fresh noise per visit
    (one image at one sigma); micro-batches of train_batch_size accumulate gradients, and every (micro-batches per
    epoch) / steps_per_epoch of them make one optimizer step (validate checks that they divide). Logs the mean loss, KL
    and |v_theta - v_old| of all ranks."""
    args, device, T = run.args, run.device, run.T
    micro = run.per_rank // args.train_batch_size  # micro-batches per epoch on this rank
    per_step = micro // args.steps_per_epoch
    g = rng(args.seed, epoch, run.process_index, "train")
    visits = torch.stack([torch.randperm(args.num_steps, generator=g)[:T] for _ in range(run.per_rank)])
    sigma, noise_gen = run.sigmas.float().to(device)[visits.to(device)], device_rng(g, device)  # (per_rank, T)
    stats = torch.full((3,), 0.0 if batch.trainable else math.nan, device=device)  # no update: no loss (null)
    for _ in range(0 if batch.trainable else args.steps_per_epoch):  # no finite reward: each step is a bad one
        take_step(run, pol, epoch, log, problem="no finite reward")
    for m in tqdm(range(micro if batch.trainable else 0), desc=f"epoch {epoch} train", **run.bar):
        s, last = slice(m * args.train_batch_size, (m + 1) * args.train_batch_size), (m + 1) % per_step == 0
        eps = torch.randn((T, *batch.x0[s].shape), generator=noise_gen, device=device)
        stats += micro_step(run, pol, batch.rows(s), sigma[s].t(), eps, (pol.loss_scale or 1.0) / (per_step * T), last)
        if last:
            take_step(run, pol, epoch, log)
    stats = gather(stats).view(-1, 3).mean(0)  # every rank's: each made as many visits
    log.update(step=pol.step, **dict(zip(["loss", "kl", "dv_old"], (stats / (micro * T)).tolist())))
    if pol.loss_scale:  # fp16: the scale the next step's backward runs at (halved after an overflow)
        log["loss_scale"] = pol.loss_scale


def micro_step(run, pol, mb, sigma, eps, scale, last=True):
    """One micro-batch mb (a Batch of B clean latents x0, their conditioning, r and mask), each visited at T sigmas
    (sigma: (T, B), eps: (T, B, C, h, w)). The no-grad v_old (theta_old copied into the LoRA, `policy`) and, when
    kl_coef > 0, v_ref (lora_B = 0) of all T*B visits run sample_batch_size at a time; then per timestep v_theta with
    grad and the backward of (adv_clip * nft_loss + kl_coef * KL) * scale, scale = 1 / (micro-batches per optimizer step
    * T) averaging the accumulated gradient (times fp16's loss scale, which optimizer_step divides out). --train_guided:
    v_old, v_ref and v_theta are the guided velocities the rollouts used, so the old policy in the loss is the one that
    sampled. last: this micro-batch ends an optimizer step, so --fsdp's last backward reduce-scatters the gradients
    (--grad_sync micro_step: every backward syncs, as the official DDP). Returns the summed (loss, kl,
    |v_theta - v_old|) over the T timesteps, on the device (no sync)."""
    args, transformer, x0 = run.args, run.pipe.transformer, mb.x0
    T, B = sigma.shape
    guidance = args.guidance_scale if args.train_guided else 1.0  # 1: the conditional velocity, one pass (the paper's)
    xt = add_noise(x0.expand(T, *x0.shape).flatten(0, 1), eps.flatten(0, 1), sigma.flatten())
    cond = {k: v.repeat(T, *[1] * (v.dim() - 1)) for k, v in mb.cond.items()}  # visit-major, as xt
    v_fn = lambda i: guided_velocity(transformer, xt[i], sigma.flatten()[i], rows(cond, i), run.negative,  # noqa
                                     guidance)
    c, frozen = args.sample_batch_size, {}
    for name, weights in [("old", pol.old)] + ([("ref", None)] if args.kl_coef > 0 else []):
        # one autocast per policy: it caches the LoRA's bf16 cast across the chunks, and must not outlive the swap
        with policy(pol.theta, weights), torch.no_grad(), run.autocast():
            frozen[name] = torch.cat([v_fn(slice(i, i + c)) for i in range(0, T * B, c)])
    stats = torch.zeros(3, device=x0.device)
    every = args.grad_sync == "micro_step"  # sync after every backward, as DDP without no_sync: the official style
    for j in range(T):
        k = slice(j * B, (j + 1) * B)
        with run.autocast():
            v_theta = v_fn(k)
        loss = args.adv_clip * (nft_loss(v_theta, frozen["old"][k], x0, xt[k], sigma[j], mb.r, args.beta)
                                * mb.mask).mean()
        kl = torch.zeros((), device=x0.device)
        if args.kl_coef > 0:
            # the KL of two SDE steps of equal noise is proportional to it (official: "kl_loss")
            kl = (((v_theta - frozen["ref"][k]) ** 2).mean(tuple(range(1, v_theta.ndim))) * mb.mask).mean()
        if args.fsdp:  # FSDP reduce-scatters what has accumulated in a backward that syncs: once per step, by default
            transformer.set_requires_gradient_sync(every or last and j == T - 1)
        ((loss + args.kl_coef * kl) * scale).backward()
        if every and not args.fsdp:
            average_gradients(pol.theta)
        stats += torch.stack([loss.detach(), kl.detach(), (v_theta.detach() - frozen["old"][k]).abs().mean()])
    return stats


def take_step(run, pol, epoch, log, problem=None):
    """One optimizer step on the accumulated gradients (optimizer_step), then the EMA of theta follows with decay
    ema_decay(step). A step with a NaN/inf gradient, one that made a weight NaN/inf, and each step of an epoch without a
    finite reward (`problem` given) is skipped or undone; max_nonfinite_steps of them in a row stop the run with the
    last good checkpoint intact. fp16 (a loss_scale) as GradScaler: a NaN/inf gradient (an overflow of the scaled
    backward) halves the scale and skips the step, not counted toward max_nonfinite_steps while the scale is above 1;
    FP16_GROWTH_INTERVAL steps with finite gradients in a row double it."""
    args, backward = run.args, problem is None  # a given problem: the epoch ran no backward
    sync = args.grad_sync == "step" and not args.fsdp  # --fsdp: FSDP's backward reduce-scattered them
    grad_norm, problem = (None, problem) if problem else optimizer_step(pol.theta, pol.opt, args.max_grad_norm, sync,
                                                                        pol.loss_scale or 1.0)
    if pol.loss_scale and backward:
        overflow = problem == NONFINITE_GRADIENT
        pol.scale_steps = 0 if overflow else pol.scale_steps + 1
        if pol.scale_steps == FP16_GROWTH_INTERVAL:
            pol.loss_scale, pol.scale_steps = 2 * pol.loss_scale, 0
        if overflow and pol.loss_scale > 1:  # at 1 it counts below: scaling down is not what fixes it
            pol.loss_scale /= 2
            if run.process_index == 0:
                tqdm.write(f"warning: epoch {epoch}: fp16 gradient overflow, step skipped, loss scale halved to "
                           f"{pol.loss_scale:g}")
            return
    if problem:
        pol.bad_steps += 1
        if run.process_index == 0:  # tqdm.write: a message never lands on the progress bar's line
            tqdm.write(f"warning: epoch {epoch}: {problem}, optimizer step skipped ({pol.bad_steps} in a row)")
        if pol.bad_steps >= args.max_nonfinite_steps:
            saved = checkpoints(args.output_dir)[-1:]
            kept = f"the last good checkpoint, {saved[0]}, intact" if saved else "no checkpoint saved yet"
            advice = ("the reward and the rollouts (--guidance_scale, --solver)" if problem == "no finite reward"
                      else "--learning_rate (lower it) or the reward")
            raise UserError(f"{pol.bad_steps} non-finite optimizer steps in a row ({problem}); stopping with {kept}. "
                            f"Check {advice}, then continue with --resume_from latest")
        return
    pol.step, pol.bad_steps, log["grad_norm"] = pol.step + 1, 0, grad_norm
    soft_update_(pol.ema, pol.theta, ema_decay(pol.step, args.ema_max_decay))


NONFINITE_GRADIENT = "non-finite gradient"  # optimizer_step's problem that fp16's loss scale answers (take_step)


def optimizer_step(params, opt, max_grad_norm, sync=True, loss_scale=1.0):
    """Average the gradients over ranks (the only gradient sync of the step, unless --grad_sync micro_step already did
    it after every backward, or --fsdp's backward reduce-scattered them), divide out the backward's loss_scale, clip,
    step. Returns (gradient norm, None), or (None, problem) when the step was skipped or undone: a NaN/inf gradient
    (an fp16 overflow too), or finite gradients that made a weight NaN/inf (too high a learning rate); then the weights
    and the optimizer state go back to before the step."""
    if sync:
        average_gradients(params)
    if loss_scale != 1:
        for p in params.values():
            if p.grad is not None:
                p.grad.div_(loss_scale)
    # the norm over every rank's gradients (--fsdp: gathered), NaN/inf when one is: all ranks skip or step alike
    norm, problem = float(full(torch.nn.utils.clip_grad_norm_(params.values(), max_grad_norm))), None
    if not math.isfinite(norm):
        norm, problem = None, NONFINITE_GRADIENT
    else:
        before = [p.detach().clone() for p in params.values()]  # the LoRA only: a few MB to a few hundred
        saved = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
        opt.step()
        if not math.isfinite(float(full(torch.nn.utils.get_total_norm(params.values())))):  # a weight is NaN/inf
            problem, norm = "the step made the weights NaN/inf", None
            with torch.no_grad():
                for p, b in zip(params.values(), before):
                    p.copy_(b)
            for p in list(opt.state):
                if id(p) in saved:
                    opt.state[p] = saved[id(p)]
                else:  # the first step created this state: gone again
                    del opt.state[p]
    opt.zero_grad(set_to_none=True)
    return norm, problem


def average_gradients(params):
    """Average the accumulated LoRA gradients over ranks with one flat all-reduce, in place. A LoRA tensor outside
    the graph (Qwen-Image's last text block) has no gradient: it counts as zero."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
    flat = torch.cat([gr.flatten() for gr in grads])
    if dist.is_initialized():
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
    for p, gr in zip(params.values(), flat.split([gr.numel() for gr in grads])):
        p.grad = gr.view_as(p)


def gather(t):
    """Concatenate a tensor over ranks (rank order); identity on one process."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def update_old_policy(pol, args):
    """Step 5: theta_old <- d*theta_old + (1 - d)*theta with d = old_decay(step). Returns d."""
    d = old_decay(pol.step, args.old_flat, args.old_rate, args.old_max)
    soft_update_(pol.old, pol.theta, d)
    return d


@contextlib.contextmanager
def policy(params, weights):
    """Run the transformer with `weights` in the LoRA: the old policy (theta_old), the EMA, or the reference
    (weights=None: lora_B = 0, the base model exactly, since base(x) + 0 = base(x)). The weights are copied in and
    theta copied back after: module flags (peft's set_adapter, disable_adapters) and requires_grad flips are guards of
    torch.compile, so switching policies through them recompiles the model. --fsdp: local shards are copied.
    Enter it outside any autocast context: autocast caches its bf16 copy of the LoRA until the context exits."""
    names = list(params)
    live = [local(params[n].detach()) for n in names]
    backup = [t.clone() for t in live]
    with torch.no_grad():
        if weights is None:
            torch._foreach_zero_([t for n, t in zip(names, live) if "lora_B" in n])
        else:
            torch._foreach_copy_(live, [local(weights[n]) for n in names])
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(live, backup)


def local(t):
    """This rank's part of t: an FSDP DTensor's local shard (--fsdp), else t itself."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def full(t):
    """All of t: an FSDP DTensor gathered from every rank (each must call this), else t itself."""
    return t.full_tensor() if local(t) is not t else t


def guided_velocity(transformer, x, sigma, cond, negative, scale):
    """True classifier-free guidance as the family's pipeline does it: combine(v(cond), v(negative), scale) in two
    passes (Family.combine: cfg; Qwen-Image rescales it). negative: the negative prompt's conditioning, one row;
    scale 1 is the conditional velocity alone, one pass."""
    v = velocity(transformer, x, sigma, cond)
    if scale == 1:
        return v
    negative = {k: t.expand(len(x), *t.shape[1:]) for k, t in negative.items()}
    return family_of(transformer).combine(v, velocity(transformer, x, sigma, negative), scale)


def velocity(transformer, x, sigma, cond):
    """v = transformer(xt, sigma, prompt), by the transformer's family (FAMILIES; the functions below).
    x, v: (B, C, h, w) float32 latents; sigma: float or (B,) tensor; cond: encode_prompts' dict, B rows."""
    return family_of(transformer).velocity(transformer, x, sigma, cond)


def rows(cond, s):
    """Rows s (a slice or an index tensor) of every tensor of a conditioning dict."""
    return {k: v[s] for k, v in cond.items()}


def _sigma_batch(sigma, x):
    """sigma as a (B,) float32 tensor on x's device. A Python float is filled on the device:
    torch.as_tensor(float, device=cuda) is a blocking host copy."""
    return (sigma.to(x.device, torch.float32).expand(x.shape[0]) if torch.is_tensor(sigma)
            else torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32))


def sd3_velocity(transformer, x, sigma, cond):
    """SD3 / SD3.5: v = SD3Transformer(xt, timestep 1000*sigma, embeds, pooled)."""
    embeds = cond["embeds"]
    out = transformer(hidden_states=x.to(embeds.dtype), timestep=sigma_to_timestep(_sigma_batch(sigma, x)),
                      encoder_hidden_states=embeds, pooled_projections=cond["pooled"], return_dict=False)[0]
    return out.float()


# FLUX.1 and Qwen-Image see 2x2 patches of the latents as tokens and take sigma itself (their pipelines pass t / 1000
# and the models scale by 1000 inside). Latents stay unpacked (B, C, h, w) outside the velocity: packing does not
# change the NFT loss (a mean over all non-batch dims), so the loop and the noise draws stay as for SD3.
def pack(x):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens of 2x2 patches, row-major, channel-major inside a token
    (FluxPipeline._pack_latents; Qwen-Image's is the same with a frame axis of length 1)."""
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(tokens, h, w):
    """Inverse of pack: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    B, _, D = tokens.shape
    return tokens.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


def flux_velocity(transformer, x, sigma, cond):
    """FLUX.1: v = unpack(FluxTransformer(pack(x), timestep sigma, guidance, text)). The RoPE ids: text tokens all
    zeros (L, 3), image tokens (0, row, col) (FluxPipeline._prepare_latent_image_ids)."""
    B, _, h, w = x.shape
    embeds = cond["embeds"]
    row = torch.arange(h // 2, device=x.device).repeat_interleave(w // 2)
    col = torch.arange(w // 2, device=x.device).repeat(h // 2)
    img_ids = torch.stack([torch.zeros_like(row), row, col], 1).to(embeds.dtype)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype)
    out = transformer(hidden_states=pack(x.to(embeds.dtype)), timestep=_sigma_batch(sigma, x),
                      guidance=cond.get("guidance"), pooled_projections=cond["pooled"], encoder_hidden_states=embeds,
                      img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    return unpack(out, h, w).float()


def qwenimage_velocity(transformer, x, sigma, cond):
    """Qwen-Image: v = unpack(QwenImageTransformer(pack(x), timestep sigma, text, mask or None, img_shapes));
    img_shapes (frames 1, h/2, w/2) place the image tokens' 3D RoPE."""
    B, _, h, w = x.shape
    embeds = cond["embeds"]
    out = transformer(hidden_states=pack(x.to(embeds.dtype)), timestep=_sigma_batch(sigma, x),
                      encoder_hidden_states=embeds, encoder_hidden_states_mask=cond.get("mask"),
                      img_shapes=[[(1, h // 2, w // 2)]] * B, return_dict=False)[0]
    return unpack(out, h, w).float()


def qwenimage_cfg(v, v_neg, scale):
    """QwenImagePipeline's true CFG: cfg, then each packed token (a 2x2 patch, 4C values) rescaled to the norm of
    the conditional velocity's token."""
    guided = pack(cfg(v, v_neg, scale))
    return unpack(guided * (pack(v).norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)), *v.shape[-2:])


# =========================================================================== plumbing
# Everything below sets up, loads, saves, checks and reports; the algorithm above never depends on how.


# --------------------------------------------------------------------------- the run: setup and bookkeeping
@dataclass
class Run:
    """What stays fixed for a whole run, training (start_run) or --eval_only (eval_only)."""
    args: Args
    process_index: int  # this process's rank under torchrun, 0 alone
    num_processes: int  # the world size
    device: torch.device
    pipe: object = None  # the diffusers pipeline; pipe.transformer carries the LoRA
    autocast: object = contextlib.nullcontext  # () -> the autocast context of the chosen precision
    reward_fn: object = None  # (images, prompts, records) -> (rewards, components): rewards.make_reward
    eval_fn: object = None  # reward_fn with --eval_reward's components beside it (rewards.with_eval_rewards)
    train_records: list = ()
    eval_records: list = ()
    negative: dict = None  # the negative prompt's conditioning, one row (guidance_scale > 1 only)
    sigmas: torch.Tensor = None  # the rollout schedule: float64 on the CPU, num_steps + 1 values ending in 0
    lora_meta: dict = None  # the LoRA config saved next to its weights
    wandb: object = None
    graphs: int = None  # --compile: graphs compiled by the end of the last epoch (none yet: None)
    compile_s: float = 0.0  # --compile: seconds spent compiling so far
    eager: str = None  # --compile: why the run fell back to eager, once it has
    logged: int = -1  # the last epoch whose metrics line is written (write_metrics)
    draws: dict = None  # run_draws, saved with each checkpoint (its prompts' fingerprint: hashed once)
    pool: ThreadPoolExecutor = dataclasses.field(default_factory=lambda: ThreadPoolExecutor(1))  # the reward thread

    def __post_init__(self):
        self.per_rank = self.args.num_groups * self.args.group_size // self.num_processes  # images per epoch, rank
        self.T = max(1, int(self.args.num_steps * self.args.timestep_fraction))  # training sigmas per sample (9/10)
        self.bar = dict(disable=self.process_index != 0, leave=False, dynamic_ncols=True)  # tqdm on rank 0 only
        self.metrics_path = os.path.join(self.args.output_dir, "metrics.jsonl")

    def compile_started(self, _):  # dynamo calls these around each graph it compiles (forward or backward)
        self.compile_s -= time.perf_counter()

    def compile_done(self, _):
        self.compile_s += time.perf_counter()
        if self.compile_s > self.args.compile_budget:
            go_eager(self, f"compiling took {self.compile_s:.0f} s, past --compile_budget {self.args.compile_budget:g}")


class PhaseTimer:
    """log["time_<phase>"] = seconds since the previous phase, once the device's queued work is done, minus `less`
    (time already logged under its own name); log["time_epoch"] = seconds since the timer started."""
    def __init__(self, log, device):
        self.log, self.device = log, device
        self.start = self.last = clock(device)

    def __call__(self, phase, less=0.0):
        now = clock(self.device)
        self.log[f"time_{phase}"], self.log["time_epoch"], self.last = now - self.last - less, now - self.start, now


def setup(args):
    """torch.distributed under torchrun, the device, and every check that can run before a model loads: a Run."""
    if "RANK" in os.environ and not dist.is_initialized():  # launched by torchrun
        unset = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if unset:  # a RANK left in the environment: init_process_group's traceback, or a wait for ranks never started
            raise UserError(f"RANK is set but {', '.join(unset)} not: launch with torchrun, which sets them all, or "
                            "unset RANK")
        # a collective waits while another rank scores (a call up to --reward_timeout): nccl's default, 10 min, was
        # --reward_timeout's, so its watchdog raced the reward's one-line error (validate() checks the value later)
        wait = args.reward_timeout if 0 < args.reward_timeout < math.inf else Args.reward_timeout
        # the rendezvous waits in C++ for ranks that may never come, where no Python handler runs: a signal ends it
        handlers = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)}  # (nothing to save)
        try:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                    timeout=datetime.timedelta(seconds=max(1800, 2 * wait)))
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    check_model_name(args.model)
    hub = not builtin(args.model) and not _is_local(args.model)  # a hub id, not a built-in model or a folder
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif hub:  # --model is the default where no run was found (or asked for) to take it from: say why
        latest = args.resume_from == "latest"
        run = args.output_dir if latest or not args.resume_from else run_of(args.resume_from)
        config = os.path.join(run, "config.json") if run else ""
        held, its_model = os.path.isfile(config), args.model
        with contextlib.suppress(OSError, ValueError, AttributeError):  # none, or unreadable: no hint of its --model
            its_model = json.loads(read_text(config)).get("model")
        where = (f"{args.output_dir} holds no run's config.json" if latest
                 else "not a checkpoint folder of a run (<run>/checkpoints/checkpoint-N)")
        why = (f" (--resume_from {args.resume_from}: {where} to take --model from; is it spelled right?)"
               if args.resume_from and args.model == Args.model and not held else
               f" (--output_dir {args.output_dir} holds a run of --model {its_model}: continue it with --resume_from "
               "latest)" if held and not args.resume_from and its_model != args.model else "")
        raise UserError(f"no CUDA GPU found for --model {args.model}{why}; on a CPU run the demo instead: python "
                        "nft.py --model tiny --reward color")
    validate(args, world)
    check_memory(args, world, device)
    existing = os.path.abspath(args.output_dir)  # the folder, or the nearest parent that will hold it
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    saves = os.path.join(args.output_dir, "checkpoints")  # a resumed run's, written only after an epoch's work
    for folder in [existing] + [saves] * (os.path.isdir(saves) and bool(args.resume_from) and not args.overwrite):
        try:  # a real write that leaves no name: permissions, a read-only disk, /sys or /proc (which refuse root too)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            what = "a folder" if e.errno in (errno.ENOTDIR, errno.ENOENT) else "writable"  # a file or a broken link
            raise UserError(f"--output_dir {args.output_dir}: {folder} is not {what} ({e.strerror}); give a folder "
                            "you can write to") from None
    names = os.path.relpath(os.path.abspath(args.output_dir), existing).split(os.sep)  # the folders still to make
    most = math.inf
    with contextlib.suppress(OSError, ValueError):  # a file system that does not say: no check
        most = os.pathconf(existing, "PC_NAME_MAX")
    if max(len(os.fsencode(n)) for n in names) > most:
        raise UserError(f"--output_dir {args.output_dir}: a folder name is longer than the file system allows "
                        f"({most} bytes); give a shorter one")
    for inside in (os.path.abspath(args.output_dir), os.path.realpath(args.output_dir)):  # through links too: a run's
        while os.path.dirname(inside) != inside and not (  # checkpoints/ is that run's to replace and remove
                os.path.basename(inside) == "checkpoints" and checkpoints(os.path.dirname(inside))):
            inside = os.path.dirname(inside)
        if os.path.basename(inside) == "checkpoints":
            raise UserError(f"--output_dir {args.output_dir} is in the checkpoints of the run in "
                            f"{os.path.dirname(inside)}, which that run replaces and removes; give a folder outside it")
    # a missing package fails now, not after minutes of loading
    if args.wandb and not args.eval_only and rank == 0 and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb needs the wandb package: pip install wandb (then `wandb login`), or drop --wandb")
    train_records, eval_records = prompt_sets(args)
    for spec, records, which in [(args.reward, train_records, "train")] * (not args.eval_only) + [
            (args.reward, eval_records, "eval"), (args.eval_reward, eval_records, "eval")] * evaluates(args):
        if spec:  # the metadata and prompts each reward needs of each set used, before any model loads
            flag = "--prompts" if which == "train" else "--eval_prompts"
            rewards.check_metadata(spec, records, prompt_set(args)[which], flag)
    # one line before any load or write: offline, all missing downloads; online, a gated, missing or unreachable --model
    rewards.check_downloads(args.reward, used_eval_reward(args), models=[args.model] if hub else [])
    if hub:
        check_hub_model(args.model)
    run = Run(args, rank, world, device, train_records=train_records, eval_records=eval_records)
    # a stop (error, Ctrl-C) drops the batches queued for scoring, then the wait for the one being scored: exiting
    # would otherwise wait to score them all
    _HELD.extend([rewards.abandon, functools.partial(run.pool.shutdown, wait=False, cancel_futures=True)])
    return run


def evaluates(args):
    """Whether the run evaluates: --eval_only, or evaluations during training (--profile has none)."""
    return bool(args.eval_only or args.eval_every and not args.profile)


def used_eval_reward(args):
    """--eval_reward where it is used (its models load only then)."""
    return args.eval_reward if evaluates(args) else ""


def prompt_sets(args):
    """(train, eval) prompt records of --prompts / --eval_prompts (a folder: its official files) or built-in sets."""
    try:
        args.prompts, args.eval_prompts, warning = rewards.prompt_files(args.preset, args.prompts, args.eval_prompts,
                                                                        args.eval_only, evaluates(args))
        train, evals, repeats = rewards.prompt_records(args.reward, args.prompts, args.eval_prompts,
                                                       args.eval_max_prompts)
    except rewards.RewardError as e:  # a resume's missing file may be named by the run's config.json
        gone = args.resume_from and not all(os.path.exists(p) for p in (args.prompts, args.eval_prompts) if p)
        raise UserError(f"{e}; a resumed run reads its prompt files from its config.json unless given: pass moved "
                        "ones anew" if gone else str(e)) from None
    if warning:  # once, before any model loads
        print0(warning)
    if repeats:
        print0(f"{args.eval_prompts}: {repeats} repeated lines (the official test files list a prompt once per "
               "image); evaluating each distinct prompt once")
    if not args.eval_only and args.num_groups > len(train):  # epoch_prompt_indices cycles through the set
        print0(f"warning: --num_groups {args.num_groups} is more than the {len(train)} training prompts: an epoch "
               "draws some prompts twice, and their groups merge into one (its advantages compare all their images)")
    return train, evals


def prompt_set(args):
    """What config.json records as the prompts used: the files, or which built-in set stood in."""
    name = rewards.prompt_reward(args.reward)
    return {"train": args.prompts or f"built-in {name} train set (rewards.default_prompts)",
            "eval": args.eval_prompts or f"built-in {name} test set (rewards.default_prompts)"}


def load_model(run):
    """A line saying what loads (minutes for SD3.5: never a silent terminal), the reward models (a missing download
    fails before the big model), the pipeline in --mixed_precision, its VAE in --reward_precision, and the rest."""
    args, device = run.args, run.device
    watched = used_eval_reward(args)
    models = [n for n in dict.fromkeys(rewards.reward_names(args.reward) + rewards.reward_names(watched))
              if n not in rewards.NO_MODEL]
    name = args.model.split(":")[-1]
    model = f"random-weight {name}" if builtin(args.model) else args.model
    if name.startswith("tiny") and name in BUILTIN:
        model = f"the tiny random {family_named(BUILTIN[name]['family']).title} (built in code, no download)"
    print0(f"loading {model}" + (f" and the reward model{'s' * (len(models) > 1)} of {', '.join(models)}"
                                 if models else "") + " ...")
    run.reward_fn = rewards.make_reward(args.reward, device, args.reward_precision, args.reward_timeout)
    run.eval_fn = rewards.with_eval_rewards(run.reward_fn, args.reward, watched, device, args.reward_precision,
                                            args.reward_timeout)
    dtype, run.autocast = precision(args, device)
    run.pipe = load_pipeline(args.model, dtype, device)
    # to the GPU, but not what may not fit there whole: --fsdp's transformer (shard() moves it block by block) and
    # offloaded text encoders (resident on the CPU; encode_prompts brings them over once per call)
    stay = ["transformer"] if args.fsdp else []
    stay += family_of(run.pipe).text_encoders if args.offload_text_encoders else ()
    for name, module in run.pipe.components.items():
        if isinstance(module, torch.nn.Module) and name not in stay:
            module.to(device)
    # the VAE only decodes for the rewards: fp32 as officially (bf16 noise in the pixels moves thresholded rewards
    # such as GenEval's), or bf16 by --reward_precision whatever the transformer's precision
    run.pipe.vae.to(torch.float32 if args.reward_precision == "fp32" else torch.bfloat16)
    resolve_guidance(run.pipe, args)
    warn_long_prompts(run)
    if args.guidance_scale > 1:  # the negative prompt's conditioning, one row
        run.negative = encode_prompts(run.pipe, [args.negative_prompt], args.max_sequence_length, run.device,
                                      args.embedded_guidance_scale)


def warn_long_prompts(run):
    """One line when prompts in use are longer than --max_sequence_length tokens of the family's long text encoder
    (T5, Qwen2.5-VL): it sees their first tokens only (the pipelines, and the official code, cut them without a
    word). Counted as the pipeline encodes them: Qwen-Image's in its template, less the 34 tokens it drops."""
    args, family = run.args, family_of(run.pipe)
    tokenizer = getattr(run.pipe, family.text_encoders[-1].replace("text_encoder", "tokenizer"))
    template = getattr(run.pipe, "prompt_template_encode", "{}")
    dropped = getattr(run.pipe, "prompt_template_encode_start_idx", 0)
    said = []
    for what, records, used in [("training", run.train_records, not args.eval_only),
                                ("evaluation", run.eval_records, evaluates(args))]:
        ids = tokenizer([template.format(r["prompt"]) for r in records])["input_ids"] if used and records else []
        cut = sum(len(prompt) - dropped > args.max_sequence_length for prompt in ids)
        if cut:
            said.append(f"{cut} of {len(records)} {what} prompts")
    if said:
        print0(f"warning: {' and '.join(said)} are longer than --max_sequence_length {args.max_sequence_length} "
               f"tokens, so the text encoder sees only their first ones (it takes up to {family.max_text})")


def start_run(args):
    """Everything before the first epoch, from setup to config.json and W&B. Returns (run, policies, first epoch), or
    (None, None, None) when the run to resume is already complete."""
    run = setup(args)
    args.eval_images_per_prompt = args.eval_images_per_prompt or 1
    if args.profile:  # a few timed epochs, no evaluation (so no --eval_reward model loads) and no checkpoints
        args.eval_every = 0
    claimed = claim_output_dir(args, run.process_index, run.num_processes, run.train_records)
    if claimed is None:
        return None, None, None
    resume, foreign, locked, replace = claimed
    init = find_lora(args.init_lora, "--init_lora") if args.init_lora and not resume else None  # before the model
    load_model(run)
    pol = make_policies(run.pipe.transformer, args, init)
    if precision_mode(args, run.device) == "fp16":  # fp16 gradients of a loss averaged over 16 x 64 x 64 latent values
        pol.loss_scale = FP16_LOSS_SCALE  # and 144 visits underflow to 0: the loss is scaled up for the backward
    start_epoch = restore(pol, *resume, args) if resume else 0
    if args.profile:  # config.json records the epochs that run
        args.num_epochs = start_epoch + 3
    if args.compile is None:  # config.json records what ran
        args.compile = run.device.type == "cuda"
    if args.compile:  # a one-off cost, checked as each graph is done: a compile past its budget must not stall a run
        if not INDUCTOR_CACHE_GIVEN:  # a resumed run reuses the compiled kernels (set it to share them between runs)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(args.output_dir, "compile_cache")
        compile_blocks(run.pipe.transformer)
        torch._dynamo.callback_handler.register_start_callback(run.compile_started)
        torch._dynamo.callback_handler.register_end_callback(run.compile_done)
    if run.process_index == 0:
        if not locked:
            lock_new_folder(args.output_dir)
        carry_over(args, resume[0] if foreign else None, start_epoch, replace)
        print0("configuration:\n" + "\n".join(f"  {k} = {v!r}" for k, v in dataclasses.asdict(args).items()))
        write_config(args)
        if args.wandb:  # setup() found the package; the folder's W&B run continues (a resume, a restart before the
            import wandb  # first checkpoint): its id is kept in wandb_id, which --overwrite removes and a branch lacks
            id_file = os.path.join(args.output_dir, "wandb_id")
            known = read_text(id_file).strip() if os.path.isfile(id_file) else None
            run.wandb = wandb.init(project=args.wandb_project, config=dataclasses.asdict(args), resume="allow",
                                   name=args.wandb_run_name or os.path.basename(os.path.abspath(args.output_dir)),
                                   id=known)
            if run.wandb.id != known:
                write_file(id_file, run.wandb.id)
    run.lora_meta = run.pipe.transformer.peft_config["default"].to_dict()
    run.lora_meta["target_modules"] = sorted(run.lora_meta["target_modules"])  # a set is not JSON
    run.sigmas = schedule(run.pipe, args.num_steps, args.resolution)
    run.draws = run_draws(args, run.num_processes, run.train_records)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)  # the training loop's peak, not the model build's
    return run, pol, start_epoch


def write_config(args, **extra):
    """config.json, whole or not at all: the flags as resolved (what ran), the prompt sets and `extra`."""
    config = dict(dataclasses.asdict(args), prompt_set=prompt_set(args), **extra)
    write_file(os.path.join(args.output_dir, "config.json"), json.dumps(json_safe(config), indent=1, allow_nan=False))


def go_eager(run, reason):
    """A compile must not stall a run: force_eager for the rest of it, one warning, recorded in config.json."""
    if run.eager is None:
        run.eager = reason
        torch.compiler.set_stance("force_eager")
        if run.process_index == 0:  # tqdm.write: on a line of its own above the progress bar it comes in
            tqdm.write(f"warning: {reason}; the rest of the run is eager (--no-compile skips compiling)")
            write_config(run.args, compile_fallback=reason)


def evaluate_ema(run, pol, epoch, log, suffix=""):
    """The EMA weights on the eval prompts: rank 0 saves a grid; log gets eval_reward_mean, eval_<name> and (GenEval)
    eval_geneval_overall, + suffix."""
    with policy(pol.theta, pol.ema):
        results = evaluate(run, run.eval_records)
    if run.process_index == 0:  # evaluate() keeps the images of the first prompts, 16 at most
        kept = [r for r in results if "_image" in r]
        grid = os.path.join(run.args.output_dir, f"eval_epoch{epoch:05d}.png")
        save_grid(torch.stack([r["_image"] for r in kept]), grid, nrow=min(16, run.args.eval_images_per_prompt),
                  row_labels=[r["prompt"] for r in kept if r["image"] == 0])
        if run.wandb:  # the grid's images, each captioned with its prompt and reward (as the official code logs them)
            import wandb
            images = [wandb.Image(to_uint8(r["_image"]), caption=f"{r['prompt']:.100} | reward {r['reward']:.3f}")
                      for r in kept]
            run.wandb.log({"eval_images" + suffix: images}, step=pol.step)
    names = {"eval_reward_mean": "reward", **{f"eval_{n}": n for n in rewards.reward_names(run.args.eval_reward)}}
    for key, name in names.items():
        log[key + suffix] = rewards.finite_mean([r[name] for r in results])  # an unscored (NaN) image left out
    if "geneval" in rewards.reward_names(run.args.reward) + rewards.reward_names(run.args.eval_reward):
        # the benchmark's number (the mean of its tags' accuracies) beside the images' mean partial score
        log["eval_geneval_overall" + suffix] = rewards.benchmark_metrics(results, "geneval")["GenEval overall"]
    warn_unscored(results, run.args, f"epoch {epoch} evaluation: ")


def warn_unscored(results, args, what=""):
    """One line for the evaluation images a reward could not score (NaN), which every mean leaves out. Returns how
    many the --reward total left unscored."""
    extra = [n for n in rewards.reward_names(args.eval_reward) if n not in rewards.reward_names(args.reward)]
    counts = {name: sum(not math.isfinite(r[key]) for r in results)
              for name, key in [(args.reward, "reward"), *zip(extra, extra)]}
    if any(counts.values()):
        print0(f"warning: {what}images a reward could not score (NaN/inf) are left out of its means: "
               + ", ".join(f"{name} {n} of {len(results)}" for name, n in counts.items() if n))
    return counts[args.reward]


def end_epoch(run, pol, epoch, log):
    """Step 6: rank 0 keeps a copy of the trained state (what a stop saves from now on: save_epoch); evaluate every
    eval_every epochs (the EMA weights after this epoch's update); append the metrics line and print it; save the
    copy every save_every epochs."""
    args = run.args
    if args.compile:
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        if run.graphs is not None and graphs > run.graphs:
            go_eager(run, f"epoch {epoch} compiled {graphs - run.graphs} graph(s) after the first epoch")
        # graphs and compile seconds so far: flat after the first epoch, else compile_fallback says why
        log.update(compiled_graphs=graphs, compile_time_s=run.compile_s, compile_fallback=run.eager)
    keep = not args.profile and "grad_norm" in log  # a step this epoch (grad_norm comes with one): keep a copy
    state = training_state(pol) if keep else None  # on every rank: --fsdp gathers the shards
    last = epoch + 1 == args.num_epochs
    due = args.eval_every and ((epoch + 1) % args.eval_every == 0 or last)
    if state is not None:
        state.update(step=pol.step, epoch=epoch + 1, bad_steps=pol.bad_steps, loss_scale=pol.loss_scale,
                     scale_steps=pol.scale_steps, config={k: getattr(args, k) for k in RESUME_KEYS},
                     draws=run.draws)
        save = functools.partial(save_epoch, run, log, state)
        # a stop during the evaluation (minutes on a GPU) saves this epoch without it; not the last epoch, whose
        # resume then trains it again, so that the run ends with its evaluation
        if not (due and last):
            _LAST[:] = [save]
    if due:
        try:
            evaluate_ema(run, pol, epoch + 1, log)
        except Exception:  # a reward that fails on the evaluation images (or a rank that did): keep the training
            if run.process_index == 0 and _LAST:  # the last epoch's is not kept: its resume ends evaluated
                saved = _LAST.pop()()
                print0(f"epoch {epoch}'s evaluation failed; " + (f"the epoch is saved without it in {saved}"
                       if not last else f"a resume trains the epoch again, from {saved}"))
            raise
    # what an evaluation compiles (its batch sizes) is not a recompile of the training loop, nor is the first backward
    if args.compile and (run.graphs is not None or "grad_norm" in log):  # of a run whose first epochs took no step
        run.graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # a signal that reached only other ranks (one node's, preempted) stops every rank here: rank 0 saves this epoch
    stop = int(gather(torch.tensor([_STOPS[0] if _STOPS else 0], device=run.device)).max())
    if run.process_index == 0:
        if state is not None:
            _LAST[:] = [save]
        write_metrics(run, log)
        print_epoch(epoch, pol.step, log)
        if run.wandb:
            run.wandb.log(log, step=pol.step)
        if not args.profile and ((epoch + 1) % args.save_every == 0 or last):
            if _LAST:
                _LAST[0]()
                _LAST.clear()
            else:  # no step since the last checkpoint: no checkpoint of untrained weights
                print0(f"epoch {epoch} took no optimizer step, so no checkpoint is written for it")
    if stop and not last:  # every rank is here: rank 0 saves the epoch, then all leave together
        if _LAST:  # (a rank that leaves while another still saves can abort in the process group's teardown)
            _LAST.pop()()
        dist.barrier()
        dist.destroy_process_group()
        raise KeyboardInterrupt(stop)  # main: rank 0 says where the epoch is and how to continue


def write_metrics(run, log):
    """Append the epoch's metrics line once (NaN as null: it stays valid JSON)."""
    if log["epoch"] <= run.logged:
        return
    try:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(json_safe(log), allow_nan=False) + "\n")
    except OSError as e:
        raise write_error(e, run.metrics_path) from None
    run.logged = log["epoch"]


def save_epoch(run, log, state):
    """The checkpoint of log's epoch, after its metrics line: a stop during the evaluation writes the line here,
    without the evaluation."""
    write_metrics(run, log)
    return save_checkpoint(run.args, log["epoch"] + 1, state, run.lora_meta, family_of(run.pipe).pipeline)


def end_run(run, history):
    """After the last epoch: curves.png, the --profile report, and where the outputs are."""
    run.pool.shutdown()
    if run.process_index == 0 and os.path.exists(run.metrics_path):
        plot_curves(run.metrics_path, os.path.join(run.args.output_dir, "curves.png"))
    if run.wandb:
        run.wandb.finish()
    if run.args.profile and (run.process_index == 0 or run.args.fsdp):  # --fsdp: all ranks join the FLOP count
        profile_report(run, history)
    print0(f"done: the outputs are in {run.args.output_dir}")


# --------------------------------------------------------------------------- model loading and the LoRA
def builtin(model):
    """A model built in code (tiny*, random:<name>), no download."""
    return model.startswith("random:") or model in BUILTIN and model.startswith("tiny")


def check_model_name(model):
    """--model is a built-in name, a folder or a hub id (owner/name): a typo is one line naming the nearest built-in,
    not a failed download or a "no CUDA GPU" for a model that does not exist."""
    known = model in BUILTIN_NAMES if model.startswith("random:") else (
        builtin(model) or _is_local(model) or re.fullmatch(r"[\w.-]+/[\w.-]+", model))  # a hub id is owner/name
    if not known:
        raise UserError(f"unknown --model {model!r}{_closest(model, BUILTIN_NAMES)}: not a built-in model "
                        f"({', '.join(BUILTIN_NAMES)}), a folder or a hub id (owner/name, such as {Args.model})")


def _is_local(model):
    """A path rather than a hub id ("org/name" is a hub id unless such a folder exists)."""
    return os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1


@functools.lru_cache(maxsize=None)  # setup() checks early, load_pipeline() again: one look-up (errors are not cached)
def check_hub_model(model):
    """A hub id must be cached or reachable: one line now, not minutes of retries and then a traceback."""
    try:
        rewards.hub_ready(model, what="--model")
    except rewards.RewardError as e:
        raise UserError(f"{e}; or pass a local folder of a supported pipeline ({', '.join(FAMILIES)})")


def load_pipeline(model, dtype, device="cpu"):
    """A built-in model (tiny ones on the CPU, random:<name> on `device`), a hub id or a local folder of a pipeline
    in FAMILIES (its class picks the family), frozen, in eval mode."""
    import diffusers
    name, index = model.split(":")[-1], os.path.join(model, "model_index.json")
    check_model_name(model)
    if builtin(model):  # random:* built in `dtype` (fp32 first, Qwen-Image's 76 GiB would not fit an 80 GB GPU)
        tiny, default = name.startswith("tiny"), torch.get_default_dtype()
        torch.set_default_dtype(torch.float32 if tiny else dtype)
        try:
            pipe = builtin_pipeline(name, "cpu" if tiny else device)
        finally:
            torch.set_default_dtype(default)
        return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
    if not _is_local(model):
        check_hub_model(model)
    elif not os.path.isdir(model):
        raise UserError(f"--model folder not found: {model}")
    elif not os.path.isfile(index) or not any(f'"{n}"' in read_text(index) for n in FAMILIES):
        raise UserError(f"--model {model} is not a folder of a supported pipeline ({', '.join(FAMILIES)}: no such "
                        "model_index.json); save one with pipe.save_pretrained(folder) or pass a hub id")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as e:  # ValueError: a download cut short (a pipeline without its parts)
        fix = ("is it a pipeline saved whole with save_pretrained?" if _is_local(model) else "check the id, your token "
               f"(`hf auth login`, SD3.5 and FLUX.1-dev are gated) and download it with `hf download {model}`, or pass "
               "a local folder")
        raise UserError(f"could not load --model {model}: {str(e).splitlines()[0]}; {fix}")
    family_of(pipe)  # a supported class, or one clear error
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
    return pipe


def lora_config(args, official=OFFICIAL_TARGETS):
    """peft's LoraConfig of --rank, --lora_alpha, --lora_targets; "official" is the family's recipe (`official`)."""
    from peft import LoraConfig
    names = {"official": list(official), "official+proj_out": [*official, "proj_out"]}
    targets = names.get(args.lora_targets) or [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian", target_modules=targets)


def add_adapters(transformer, args):
    """theta, the fp32 LoRA adapter "default" on the frozen base, and theta_old, a copy that `policy` copies in for
    its passes. lora_B starts at zero: theta, theta_old and the reference (lora_B = 0) agree at step 0."""
    transformer.requires_grad_(False)
    config = lora_config(args, family_of(transformer).lora_targets)
    check_targets(transformer, config.target_modules, f"--lora_targets {args.lora_targets}")
    transformer.add_adapter(config, adapter_name="default")
    params = {n: p for n, p in transformer.named_parameters() if ".default." in n}
    for p in params.values():
        p.data = p.data.float()  # LoRA in fp32 on a bf16 base
    for m in transformer.modules():  # peft casts the bf16 input to the fp32 LoRA's dtype, and autocast casts it
        if hasattr(m, "cast_input_dtype_enabled"):  # back for the matmul: a lossless round trip of the activations
            m.cast_input_dtype_enabled = False
    return params, {n: p.detach().clone() for n, p in params.items()}


def make_policies(transformer, args, init=None):
    """theta (the LoRA adapter, seeded: the same on every rank), theta_old and the EMA (copies), AdamW over theta;
    init (--init_lora, read by find_lora) starts theta and theta_old."""
    torch.manual_seed(args.seed)
    params, old = add_adapters(transformer, args)
    if init:
        n = init_from_lora(params, old, init, args)
        print0(f"--init_lora {args.init_lora}: theta and theta_old start from its {n} LoRA tensors")
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.fsdp:  # theta_old still equals theta: copies of the shards
        params, old = shard(transformer)
    ema = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    return Policies(params, old, ema, opt)


def blocks(transformer):
    """The transformer's repeated blocks (FLUX.1 has two lists of them): the unit of compile and of --fsdp."""
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


def compile_blocks(transformer, **options):
    """torch.compile each block in place; the cheap layers around them stay eager. Blocks of one kind share a graph
    (weights are graph inputs, and `policy` copies weights, which no guard sees): SD3.5-Medium compiles 3 kinds x 2."""
    torch._dynamo.config.recompile_limit = 64  # past the limit dynamo silently runs eager
    for block in blocks(transformer):
        block.compile(**options)


def shard(transformer):
    """--fsdp: FSDP2, a unit per block, then the rest (resharded after its forward too, so what `policy` copies into
    the shards reaches the next forward): a rank holds 1/world of each weight. The transformer may still be on the CPU
    (load_model): fully_shard moves each unit to this rank's GPU as it splits it. Returns the LoRA and a copy of it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))  # as setup()
    # FLUX.1's single block returns two slices of one tensor; the model adds to them out of place only, which the
    # --fsdp tests confirm (sharded training equals unsharded), so FSDP2's warning about in-place ops is noise here
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPFluxSingleTransformerBlock\) returned a view")
    for block in blocks(transformer):
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh, reshard_after_forward=True)
    params = {n: p for n, p in transformer.named_parameters() if ".default." in n}
    return params, {n: p.detach().clone() for n, p in params.items()}


def encode_prompts(pipe, prompts, max_sequence_length, device, embedded_guidance=Args.embedded_guidance_scale):
    """The prompts' conditioning (Family.encode, each distinct prompt once, 64 at a time; offloaded text encoders visit
    `device` once per call): a dict of (N, ...) tensors sliced like the latents. FLUX.1-dev's embedded guidance (N,) is
    a model input, not CFG, so it rides along: the same in rollouts and training."""
    uniq, encoders = list(dict.fromkeys(prompts)), text_encoders(pipe)
    home = encoders[0].device
    for e in encoders if home != device else []:
        e.to(device)
    with torch.no_grad():
        parts = [family_of(pipe).encode(pipe, uniq[i:i + 64], max_sequence_length, device)
                 for i in range(0, len(uniq), 64)]
    for e in encoders if home != device else []:
        e.to(home)
    cond = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if "mask" in cond and cond["mask"].all():  # every token real: no mask, the fast attention, as Qwen-Image's
        del cond["mask"]  # pipeline does (decided once here: no device sync per step)
    row = {p: i for i, p in enumerate(uniq)}
    cond = rows(cond, torch.tensor([row[p] for p in prompts], device=cond["embeds"].device))
    if getattr(pipe.transformer.config, "guidance_embeds", False):
        cond["guidance"] = torch.full((len(prompts),), embedded_guidance, device=cond["embeds"].device)
    return cond


def decode(pipe, x0):
    """Latents (B, C, h, w) -> images in [0, 1], (B, 3, H, W) float32, by the pipeline's family."""
    with torch.no_grad():
        return family_of(pipe).decode(pipe, x0)


def lora_state(weights):
    """peft names (...lora_A.default.weight) -> diffusers transformer names (...lora_A.weight), CPU fp32."""
    return {n.replace(".default.", "."): t.detach().float().cpu().contiguous() for n, t in weights.items()}


def find_lora(path, flag="--lora"):
    """Locate and read (read_lora) a LoRA: pytorch_lora_weights.safetensors (ours) or the official DiffusionNFT /
    Flow-GRPO peft adapter_model.safetensors + adapter_config.json: the file, or in the folder or its lora/ subfolder.
    A hub id "owner/name" is downloaded first."""
    if not os.path.exists(path) and path.count("/") == 1 and not path.startswith("."):
        try:
            rewards.hub_ready(path, what=flag)
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
        except rewards.RewardError as e:
            raise UserError(f"{flag} {path}: no such file or folder; as a hub repo: {e}")
        except Exception as e:
            raise UserError(f"{flag} {path}: no such file or folder, and not a hub repo we can download "
                            f"({type(e).__name__}); try `hf download {path}`")
    if os.path.isfile(path):
        return read_lora(path, flag)
    for folder in (path, os.path.join(path, "lora")):
        if os.path.isfile(os.path.join(folder, "pytorch_lora_weights.safetensors")):
            return read_lora(os.path.join(folder, "pytorch_lora_weights.safetensors"), flag)
        if all(os.path.isfile(os.path.join(folder, f)) for f in ("adapter_model.safetensors", "adapter_config.json")):
            return read_lora(os.path.join(folder, "adapter_model.safetensors"), flag)
    found = checkpoints(path) or checkpoints(os.path.dirname(os.path.normpath(path)))  # a run, or its checkpoints/
    raise UserError(f"{flag} {path}: " + ("no such file or folder" if not os.path.exists(path) else "holds neither "
                    "pytorch_lora_weights.safetensors (diffusers) nor adapter_model.safetensors + adapter_config.json")
                    + (f"; a checkpoint of this run: {flag} {found[-1]}" if found else ""))


def read_lora(file, flag):
    """The one reader of LoRA files, before any model loads: the file complete, its config (peft's adapter_config.json,
    else its lora_adapter_metadata; none: alpha = r, as diffusers) a JSON object with r, alpha > 0, every tensor finite.
    Returns (file, config, weights), weights under diffusers' transformer names (<module>.lora_A.weight)."""
    from safetensors import safe_open
    try:
        with safe_open(file, "pt") as f:
            meta, weights = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:  # safetensors says "No such file" where it may not read one
        raise UserError(f"{flag} {file} cannot be read ({e.strerror or e}); check its permissions") from None
    except Exception:  # safetensors' own error (bad header, truncated)
        why = "empty" if os.path.getsize(file) == 0 else "bad header or truncated"
        raise UserError(f"{flag} {file} is not a safetensors file ({why}); give the pytorch_lora_weights.safetensors "
                        "of a checkpoint or a peft adapter folder") from None
    peft = os.path.join(os.path.dirname(file), "adapter_config.json")
    source = peft if os.path.basename(file) == "adapter_model.safetensors" else f"{file} (its lora_adapter_metadata)"
    try:
        config = json.loads(read_text(source) if source == peft else meta.get("lora_adapter_metadata", "{}"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{flag} {source} is not valid JSON ({e}); restore it from the adapter's source") from None
    except OSError as e:  # a peft adapter_model.safetensors given alone: its config says r, alpha and the targets
        raise UserError(f"{flag} {file}: {source} beside it is unreadable ({e.strerror}); a peft adapter needs its "
                        "adapter_config.json: copy it from the adapter's source, or give the whole folder") from None
    if not isinstance(config, dict):
        raise UserError(f"{flag} {source} is not a LoRA config (a JSON object with r and lora_alpha)")
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    weights = {k.removeprefix("base_model.model.").removeprefix("transformer.").replace(".default.", "."): t
               for k, t in weights.items()}
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in weights):
        raise UserError(f"{flag} {file} is a DoRA adapter (use_dora), which this trainer does not load; give a plain "
                        "LoRA")
    config.setdefault("r", next((t.shape[0] for k, t in weights.items() if ".lora_A." in k), None))
    config.setdefault("lora_alpha", config["r"])
    if not all(type(config[k]) in (int, float) and config[k] > 0 for k in ("r", "lora_alpha")):
        raise UserError(f"{flag} {source}: rank r = {config['r']!r} and lora_alpha = {config['lora_alpha']!r}; both "
                        "must be positive numbers")
    broken = [k for k, t in weights.items() if not bool(torch.isfinite(t).all())]
    if broken:
        raise UserError(f"{flag} {file} holds NaN/inf in {len(broken)} of its {len(weights)} tensors, e.g. {broken[0]} "
                        "(saved from a diverged run?); use another LoRA")
    return file, config, weights


def check_fit(params, weights, what, into, fix):
    """A LoRA's tensors must match `params` in names (".default." aside) and shapes, else one line ending in `fix`."""
    want = {n.replace(".default.", "."): tuple(p.shape) for n, p in params.items()}
    got = {n.replace(".default.", "."): tuple(t.shape) for n, t in weights.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shaped = [k for k in want if k in got and got[k] != want[k]]
    if missing or extra or shaped:
        k = (shaped or missing or sorted(want))[0]
        found = (f"shape {got[k]}" if shaped else f"{len(got)} tensors without it" if missing else
                 f"{len(got)} tensors, {len(extra)} of them for other modules, e.g. {extra[0]}")
        raise UserError(f"{what} does not fit {into}: expected {len(want)} LoRA tensors such as {k} {want[k]}, found "
                        f"{found}; {fix}")


def check_targets(transformer, targets, what, hint=""):
    """Every LoRA target must match a layer (its name or a dotted suffix of it, as peft matches; peft drops a target
    that matches nothing without a word): one line with the nearest real names otherwise (and `hint`). A str is a peft
    regex."""
    names = [n for n, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    suffixes = sorted({".".join(n.split(".")[i:]) for n in names for i in range(n.count(".") + 1)})
    for target in [] if isinstance(targets, str) else sorted(targets):
        if target not in suffixes:
            near = difflib.get_close_matches(target, suffixes, n=3)
            raise UserError(f"{what}: LoRA target {target!r} matches no layer of this transformer"
                            + (f"; the nearest are {', '.join(near)}" if near else "") + hint)


def load_lora(pipe, lora, flag="--lora"):
    """Add a LoRA (find_lora) to pipe.transformer as adapter "default", as its config says (no targets: the modules
    its tensors name); its tensors must be exactly the adapter's: peft would only warn of another family's."""
    from peft import LoraConfig
    file, config, weights = lora
    config = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}  # other peft versions' extras
    config["target_modules"] = config.get("target_modules") or sorted({k.split(".lora_")[0] for k in weights})
    check_targets(pipe.transformer, config["target_modules"], f"{flag} {file}", "; is it a LoRA of another model?")
    pipe.transformer.add_adapter(LoraConfig(**config), adapter_name="default")
    params = {n: p for n, p in pipe.transformer.named_parameters() if ".default." in n}
    check_fit(params, weights, f"{flag} {file}", "this transformer", "is it a LoRA of this --model?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n.replace(".default.", ".")])


def init_from_lora(params, old, lora, args):
    """--init_lora (official train.lora_path): a LoRA (find_lora) into theta and theta_old, exactly their tensors,
    its scale (alpha/r, rsLoRA's alpha/sqrt(r)) folded into lora_B: the policy `load_lora_weights` shows, whatever
    --lora_alpha. Returns their count."""
    file, config, weights = lora
    if config.get("rank_pattern") or config.get("alpha_pattern"):  # one scale per layer: not one number to fold
        raise UserError(f"--init_lora {file}: its config gives layers a rank or alpha of their own (rank_pattern, "
                        "alpha_pattern), which --init_lora cannot take over; use a LoRA of one rank and alpha")
    check_fit(params, weights, f"--init_lora {file}", "this run's LoRA", "match --rank and --lora_targets to it")
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    scale /= args.lora_alpha / args.rank
    with torch.no_grad():
        for n, p in params.items():
            k = n.replace(".default.", ".")
            p.copy_(weights[k] * (scale if ".lora_B." in k else 1.0))
            old[n].copy_(p)
    return len(params)


# --------------------------------------------------------------------------- model families
# NFT needs nothing model-specific beyond "a velocity for (x, sigma, prompt)". A Family is a handful of functions,
# picked by the loaded pipeline's class (family_of); the loop, the loss and the solvers never ask which.
@dataclass(frozen=True)
class Family:
    name: str  # "sd3" | "flux" | "qwenimage": also the name of its preset in PRESETS (none for sd3)
    title: str  # how the family is called in messages
    pipeline: str  # the diffusers pipeline class: picks the family, and saves the LoRA (save_lora_weights)
    transformer: str  # the transformer class, so velocity() finds the family from the module alone
    lora_targets: tuple  # --lora_targets official: the reference RL trainer's LoRA targets (peft suffix match)
    text_encoders: tuple  # the pipeline's text encoder attributes (--offload_text_encoders)
    max_text: int  # the longest --max_sequence_length its pipeline allows
    encode: object  # (pipe, prompts, max_sequence_length, device) -> cond: dict of (n, ...) tensors (encode_prompts)
    velocity: object  # (transformer, x, sigma, cond) -> v; x, v: (B, C, h, w) latents, sigma: float or (B,)
    decode: object  # (pipe, x0) -> images: (B, 3, H, W) in [0, 1]
    combine: object = cfg  # (v, v_neg, scale) -> v: the pipeline's true CFG (--guidance_scale, guided_velocity)
    negative_prompt: str = ""  # the published recipes' negative prompt (--negative_prompt unset)


def text_encoders(pipe):
    """The pipeline's text encoder modules (CLIP-L, CLIP-G, T5 for SD3; CLIP-L, T5 for FLUX; Qwen2.5-VL)."""
    return [getattr(pipe, name) for name in family_of(pipe).text_encoders]


def latent_shape(pipe, resolution):
    """(C, h, w) of one image's latents at `resolution` px (what the rollout noise is drawn in): the VAE downsamples by
    8; FLUX.1 and Qwen-Image pack 2x2 patches of in_channels / 4 latent channels, so their sides are even."""
    f, channels = pipe.vae_scale_factor, pipe.transformer.config.in_channels
    if family_of(pipe).name == "sd3":
        return channels, resolution // f, resolution // f
    return channels // 4, 2 * (resolution // (2 * f)), 2 * (resolution // (2 * f))


def schedule(pipe, num_steps, resolution):
    """The sigmas the family's pipeline samples with, num_steps + 1 ending in 0: SD3 shifts by a constant (3.0 for
    SD3.5, sd3_sigmas); FLUX.1 and Qwen-Image by the image's token count (shifted_sigmas)."""
    if family_of(pipe).name == "sd3":
        return sd3_sigmas(num_steps, pipe.scheduler.config.shift)
    _, h, w = latent_shape(pipe, resolution)
    return shifted_sigmas(pipe.scheduler.config, num_steps, h * w // 4)


def sd3_encode(pipe, prompts, max_sequence_length, device):
    """SD3: embeds (n, 77 + T5 length, 4096), CLIP-L and CLIP-G side by side then T5; pooled (n, 2048)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return {"embeds": embeds, "pooled": pooled}


def flux_encode(pipe, prompts, max_sequence_length, device):
    """FLUX.1: CLIP-L pooled (n, 768), T5-XXL embeds (n, max_sequence_length, 4096), padding unmasked (it changes v)."""
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                           max_sequence_length=max_sequence_length)
    return {"embeds": embeds, "pooled": pooled}


def qwenimage_encode(pipe, prompts, max_sequence_length, device):
    """Qwen-Image: Qwen2.5-VL's last hidden states of the prompt in the pipeline's template (less its 34 leading
    tokens): embeds (n, max_sequence_length, 3584), mask (n, same) bool. Padded to max_sequence_length (the pipeline:
    to the longest prompt) for one shape per run; padded keys are masked and their RoPE positions come last."""
    embeds, mask = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_sequence_length)
    n, length, _ = embeds.shape
    mask = torch.ones(n, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
    pad = max_sequence_length - length
    return {"embeds": F.pad(embeds, (0, 0, 0, pad)), "mask": F.pad(mask, (0, pad))}


def kl_decode(pipe, x0):
    """AutoencoderKL (SD3, FLUX): latent = x0 / scaling_factor + shift_factor, images in [0, 1]."""
    latent = x0 / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return (pipe.vae.decode(latent.to(pipe.vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)


def qwenimage_latent(vae, x0):
    """What AutoencoderKLQwenImage (a video VAE) decodes: a frame axis of length 1 and the pipeline's per-channel
    normalisation undone, x0 * latents_std + latents_mean."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=x0.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=x0.device).view(shape)
    return (x0[:, :, None].float() * std + mean).to(vae.dtype)


def qwenimage_decode(pipe, x0):
    """AutoencoderKLQwenImage decode (it clamps to [-1, 1]) of the single frame, images in [0, 1]."""
    return (pipe.vae.decode(qwenimage_latent(pipe.vae, x0)).sample[:, :, 0].float() / 2 + 0.5).clamp(0, 1)


# LoRA targets. SD3: the official DiffusionNFT ones. FLUX: Flow-GRPO's scripts/train_flux.py ("attn.to_q/k/v" also
# match the single-stream blocks, which have no to_out; "ff*" are the double-stream MLPs). Qwen-Image: Flow-GRPO's
# scripts/train_qwenimage.py; its last block's text-stream output is discarded, so 6 of those LoRA tensors never get
# a gradient (average_gradients counts them zero) and 2 (add_q_proj) a zero one.
FAMILIES = {f.pipeline: f for f in [
    Family("sd3", "SD3", "StableDiffusion3Pipeline", "SD3Transformer2DModel", OFFICIAL_TARGETS,
           ("text_encoder", "text_encoder_2", "text_encoder_3"), 512, sd3_encode, sd3_velocity, kl_decode),
    Family("flux", "FLUX.1", "FluxPipeline", "FluxTransformer2DModel",
           OFFICIAL_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
           ("text_encoder", "text_encoder_2"), 512, flux_encode, flux_velocity, kl_decode),
    Family("qwenimage", "Qwen-Image", "QwenImagePipeline", "QwenImageTransformer2DModel",
           OFFICIAL_TARGETS + ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
           ("text_encoder",), 1024, qwenimage_encode, qwenimage_velocity, qwenimage_decode, qwenimage_cfg, " "),
]}


def family_of(obj):
    """The Family of a loaded pipeline (by its class) or of its transformer (by the transformer's class)."""
    name = type(obj).__name__.removeprefix("FSDP")  # --fsdp's fully_shard subclasses it as FSDP<class>
    for f in FAMILIES.values():
        if name in (f.pipeline, f.transformer):
            return f
    raise UserError(f"--model is a {name}; supported pipelines: {', '.join(FAMILIES)}")


def family_named(name):
    """The Family called `name` ("sd3", "flux", "qwenimage")."""
    return next(f for f in FAMILIES.values() if f.name == name)


def model_family(model):
    """The family --model names, before it loads (for its preset and precision): a built-in's, else the class in its
    model_index.json (model_file; the hub is asked only if the id names no family), else the id's words, else SD3."""
    if builtin(model) and model.split(":")[-1] in BUILTIN:
        return BUILTIN[model.split(":")[-1]]["family"]
    low = model.lower()
    named = ("flux" if "flux" in low else "qwenimage" if "qwen-image" in low or "qwenimage" in low else
             "sd3" if "stable-diffusion-3" in low else None)
    with contextlib.suppress(TypeError, ValueError, AttributeError, KeyError):  # TypeError: none (None)
        return FAMILIES[json.loads(model_file(model, "model_index.json", ask=not named)).get("_class_name")].name
    return named or "sd3"


HUB_TIMEOUT = 10.0  # seconds model_file waits for the hub, once: hf_hub_download retries one that hangs for minutes
_HUB_SILENT = set()  # hub ids whose hub did not answer this run: not asked again


def model_file(model, filename, ask=True):
    """The text of a file of --model's pipeline (model_index.json, a config) before it loads, so that a FLUX.1 model
    whose name does not say so gets FLUX.1's preset: a folder's; a hub id's from the Hugging Face cache, else the cache
    beside it (<HF_HUB_CACHE>-diffusion-nft), else (ask) one request of HUB_TIMEOUT s to the hub, kept beside (never in
    the Hugging Face cache: a model with one file would pass for downloaded). None where there is none to be had."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if _is_local(model):
            return read_text(os.path.join(model, filename))
        import huggingface_hub.constants
        cache = huggingface_hub.constants.HF_HUB_CACHE
        return _hub_file(model, filename, cache, os.path.normpath(cache) + "-diffusion-nft",
                         ask and not rewards.hub_offline())
    return None


@functools.lru_cache(maxsize=None)  # one look-up per run (parse_args, validate, the memory check, ... ask), per cache
def _hub_file(model, filename, cache, side, ask):
    from huggingface_hub import get_session, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers
    mine = os.path.join(side, model.replace("/", "--"), filename)
    with contextlib.suppress(Exception):
        path = try_to_load_from_cache(model, filename, cache_dir=cache)
        path = path if isinstance(path, str) else mine if os.path.isfile(mine) else None
        if path:
            return read_text(path)
        if not ask or model in _HUB_SILENT:
            return None
        try:
            response = get_session().get(hf_hub_url(model, filename), headers=build_hf_headers(),
                                         timeout=HUB_TIMEOUT, follow_redirects=True)
        except Exception:  # unreachable, or no answer in time
            _HUB_SILENT.add(model)
            raise
        response.raise_for_status()  # gated, no such repo or file
        with contextlib.suppress(OSError):  # kept for the next run where the folder can be written
            os.makedirs(os.path.dirname(mine), exist_ok=True)
            with open(f"{mine}.{os.getpid()}.tmp", "w") as f:
                f.write(response.text)
            os.replace(f"{mine}.{os.getpid()}.tmp", mine)
        return response.text
    return None


def resolve_guidance(pipe, args):
    """--embedded_guidance_scale is an input of a transformer with a guidance embedding (FLUX.1-dev) only: None for
    the others (config.json says so). True CFG on top of it runs, as FluxPipeline allows, after one warning."""
    if not getattr(pipe.transformer.config, "guidance_embeds", False):
        args.embedded_guidance_scale = None
    elif args.guidance_scale > 1:
        print0(f"warning: --guidance_scale {args.guidance_scale} runs true CFG (two passes per step) on top of "
               f"the embedded guidance {args.embedded_guidance_scale} of this FLUX.1, distilled to need only that")


# --------------------------------------------------------------------------- RNG, ranks, precision, memory
def rng(*keys):
    """A generator seeded from a tuple such as (seed, epoch, rank, "rollout"): every random draw of a run is a
    function of these keys, so a resumed run draws exactly what the uninterrupted one would."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def device_rng(g, device):
    """A generator on `device` seeded by one draw from the CPU generator g (an rng(...)): noise is drawn where it is
    used (no host copy) and stays a function of rng's keys, so resume replays it exactly."""
    return torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))


def shard_like(whole, t):
    """A full tensor (a checkpoint's) split as t is: into this rank's shard of an FSDP DTensor, else as it is."""
    from torch.distributed.tensor import distribute_tensor
    if local(t) is t:
        return whole
    return distribute_tensor(whole.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None)


def training_state(pol):
    """theta ("default"), theta_old, EMA and optimizer state as full CPU tensors on rank 0 (None elsewhere), as
    checkpoints save them whatever the rank count; --fsdp gathers the shards here, so every rank must call it."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0

    def cpu(t):
        t = full(t)  # --fsdp: a collective, on every rank
        return t.detach().to("cpu", copy=True) if rank0 else None
    state = {key: {n: cpu(t) for n, t in weights.items()}
             for key, weights in [("default", pol.theta), ("old", pol.old), ("ema", pol.ema)]}
    state["optimizer"] = opt = pol.opt.state_dict()
    opt["state"] = {i: {k: cpu(v) if torch.is_tensor(v) else v for k, v in s.items()} for i, s in opt["state"].items()}
    return state if rank0 else None


def clock(device):
    """Wall time once the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def precision_mode(args, device):
    """--mixed_precision with auto resolved: bf16 on a GPU (fp16 for --eval_only of SD3, as the official evaluation
    runs; FLUX.1 and Qwen-Image are bf16-native, and diffusers clamps their fp16 overflows), no on a CPU."""
    if args.mixed_precision != "auto":
        return args.mixed_precision
    if device.type != "cuda":
        return "no"
    return "fp16" if args.eval_only and model_family(args.model) == "sd3" else "bf16"


FP16_LOSS_SCALE, FP16_GROWTH_INTERVAL = 2.0 ** 16, 2000  # GradScaler's first scale, and its steps between doublings


def precision(args, device):
    """Weights dtype and an autocast context. bf16: bf16 base + fp32 LoRA, bf16 matmuls. fp16: the official
    setting's fp32 weights + fp16 autocast, with GradScaler's loss scale (Policies.loss_scale). no: fp32."""
    weights, compute = {"bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float32, torch.float16),
                        "no": (torch.float32, None)}[precision_mode(args, device)]
    autocast = functools.partial(torch.autocast, device.type, dtype=compute) if compute else contextlib.nullcontext
    return weights, autocast


# memory_estimate's view of a family: published parameter counts, LoRA parameters per --rank (official targets),
# blocks, width d, bytes saved per token and block in units of d (bf16; .ci/memory_table.py), CLIP tokens, VAE width.
MEMORY_FIELDS = ("transformer", "text", "vae", "lora", "blocks", "width", "saved", "clip_tokens", "vae_width")
MEMORY = {"sd3": (2.243e9, 5.580e9, 83.7e6, 0.587e6, 24, 1536, 36.5, 77, 128),
          "flux": (11.90e9, 4.885e9, 83.8e6, 2.802e6, 57, 3072, 32.3, 0, 128),
          "qwenimage": (20.43e9, 8.29e9, 126.9e6, 6.636e6, 60, 3072, 44.4, 0, 96)}


def memory_estimate(sizes, args, precision="bf16", shards=1):
    """Peak GPU memory per rank in GiB by part, an estimate from parameter counts (model_sizes), args and the --fsdp
    ranks `shards`: weights (a transformer share + 2 gathered blocks, text encoders unless offloaded, VAE), the fp32
    LoRA's 7 copies, the fp32 reward models (rewards.REWARD_PARAMS), and the largest of: training activations, a decode
    (5 full-size tensors), encoders visiting."""
    w, a = {"bf16": (2, 2), "fp16": (4, 2), "no": (4, 4)}[precision]  # bytes per weight, per activation
    vae, lora, n = 2 if args.reward_precision == "bf16" else 4, sizes["lora"] * args.rank, sizes["blocks"]
    tokens = ((args.resolution // 16) ** 2 + args.max_sequence_length + sizes["clip_tokens"]) * args.train_batch_size
    per_block = sizes["width"] * a / 2 * tokens  # bytes per unit of "saved"; checkpointing keeps a block's input (2)
    parts = dict(transformer=sizes["transformer"] * w * (1 / shards + 2 / n * (shards > 1)),
                 text_encoders=sizes["text"] * w * (not args.offload_text_encoders), vae=sizes["vae"] * vae,
                 lora=lora * w if args.eval_only else lora * (28 / shards + 4 * (shards > 1)),
                 activations=0 if args.eval_only else per_block * (
                     2 * n + sizes["saved"] if args.gradient_checkpointing else sizes["saved"] * n),
                 decode=5 * sizes["vae_width"] * args.resolution ** 2 * vae * args.sample_batch_size,
                 encode=sizes["text"] * w * args.offload_text_encoders,
                 reward_models=4 * sum(rewards.REWARD_PARAMS.get(name, 0) for name in dict.fromkeys(
                     rewards.reward_names(args.reward) + rewards.reward_names(used_eval_reward(args)))))
    parts = {k: v / 2 ** 30 for k, v in parts.items()}
    phases = [parts[k] for k in ("activations", "decode", "encode")]  # one at a time
    return dict(parts, total=sum(parts.values()) - sum(phases) + max(phases))


def model_sizes(model):
    """memory_estimate's sizes for --model before its weights load: its family's MEMORY (published counts), with the
    counts of its own transformer, built on the meta device, where its config is at hand (a built-in model, whose
    random:* text encoders are one layer; a folder; a hub id's transformer/config.json): SD3.5-Large is not Medium."""
    sizes = dict(zip(MEMORY_FIELDS, MEMORY[model_family(model)]))
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    if builtin(model):
        pipe = load_pipeline(model, torch.float32, "meta")
        transformer = pipe.transformer
        sizes.update(text=count(text_encoders(pipe)), vae=count([pipe.vae]))
    else:
        transformer = meta_transformer(model)
        if transformer is None:
            return sizes
    targets = family_of(transformer).lora_targets  # --lora_targets official: LoRA parameters per --rank
    lora = [m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and any(n == t or n.endswith("." + t) for t in targets)]  # matched as peft matches them
    sizes.update(transformer=count([transformer]), blocks=len(blocks(transformer)), width=transformer.inner_dim,
                 lora=sum(m.in_features + m.out_features for m in lora))
    return sizes


def meta_transformer(model):
    """--model's transformer on the meta device (shapes only) from its transformer/config.json (model_file); None
    where it cannot be had or is not a supported class."""
    import diffusers
    with contextlib.suppress(Exception):  # offline and not cached, gated, unreachable: the published sizes stand
        config = json.loads(model_file(model, "transformer/config.json"))
        if any(config.get("_class_name") == f.transformer for f in FAMILIES.values()):
            with torch.device("meta"):
                return getattr(diffusers, config["_class_name"]).from_config(config)
    return None


# a container's memory limit and use (cgroup v2, v1), which MemAvailable does not see
CGROUP_MEMORY = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]


def free_memory(device):
    """GiB free for the run: the GPU's free memory; on a CPU the machine's MemAvailable, or a container's limit less
    its use where that is lower (Linux; None where neither is known)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2 ** 30
    free = []
    with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):  # /proc/meminfo counts in KiB
        free.append(1024 * next(int(line.split()[1]) for line in read_text("/proc/meminfo").splitlines()
                                   if line.startswith("MemAv")))
    for limit, used in CGROUP_MEMORY:
        with contextlib.suppress(OSError, ValueError):  # no such file, or "max": no limit
            free.append(int(read_text(limit)) - int(read_text(used)))
    return min(free) / 2 ** 30 if free else None


def check_memory(args, world, device):
    """Before any weight loads: stop with one line when memory_estimate says the run will not fit the free memory,
    naming the estimate and the fewest of --offload_text_encoders, --gradient_checkpointing, --fsdp that fit. On a
    CPU only the full-size random:* models are checked (free_memory, shared by the ranks on it): a kill for memory
    says nothing."""
    if not args.memory_check or device.type != "cuda" and not args.model.startswith("random:"):
        return
    free, gpus = free_memory(device), world if world > 1 else torch.cuda.device_count()
    sizes, precision = model_sizes(args.model), precision_mode(args, device)
    estimate = lambda trial: memory_estimate(sizes, trial, precision, gpus if trial.fsdp else 1)  # noqa: E731
    need = lambda trial: estimate(trial)["total"]  # noqa: E731
    ranks = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # CPU ranks share the memory
    if free is None or need(args) * ranks <= free:
        return
    if device.type == "cuda":
        names = ("offload_text_encoders", "gradient_checkpointing", "fsdp")
        tries = [dataclasses.replace(args, **{k: on or getattr(args, k) for k, on in zip(names, bits)})
                 for bits in sorted(itertools.product((False, True), repeat=3), key=lambda b: (b[2], sum(b)))]
        fit = next((trial for trial in tries if need(trial) <= free), None)  # the fewest flags, --fsdp last
        added = " ".join(f"--{k}" for k in names if fit and getattr(fit, k) > getattr(args, k))
        parts = estimate(args)  # none fits: the batch flag of the largest phase
        batch = "--sample_batch_size" if parts["decode"] >= parts["activations"] else "--train_batch_size"
        how = f"add {added} (about {need(fit):.1f} GiB)" if fit else f"lower {batch}, or use larger GPUs"
        if fit and fit.fsdp and world < 2:
            how += f" on {gpus} GPUs: torchrun --nproc_per_node {gpus}"
    else:
        how = "it is a full-size model for GPU profiling; on a CPU run the demo, --model tiny"
    per = "per GPU" if device.type == "cuda" else f"for {ranks} rank(s)"
    raise UserError(f"--model {args.model} needs about {need(args) * ranks:.1f} GiB {per} by memory_estimate, {device} "
                    f"has {free:.1f} GiB free; {how} (--no-memory_check runs anyway)")


# --------------------------------------------------------------------------- checkpoints, resume and the run folder
RESUME_KEYS = ["rank", "lora_alpha", "lora_targets", "model", "num_steps"]  # must match to resume
PATH_FLAGS = ["model", "prompts", "eval_prompts", "init_lora", "lora"]  # saved absolute (parse_args)
DRAW_KEYS = ["seed", "num_groups", "group_size", "train_batch_size", "sample_batch_size", "steps_per_epoch",
             "timestep_fraction", "solver", "eta", "prompts"]  # + rank count: change them and resume is not a replay
RESUME_MAY_CHANGE = [  # flags a resume may change; the rest come from the run's config.json (parse_args)
    *DRAW_KEYS, "num_epochs", "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "max_grad_norm", "max_nonfinite_steps", "reward_timeout", "eval_every", "eval_num_steps", "eval_images_per_prompt",
    "eval_max_prompts", "eval_prompts", "save_every", "checkpoints_total_limit", "wandb", "wandb_project",
    "wandb_run_name", "compile", "gradient_checkpointing", "offload_text_encoders", "grad_sync", "mixed_precision",
    "reward_precision", "profile", "output_dir", "resume_from", "overwrite", "eval_reward", "fsdp", "compile_budget",
    "memory_check"]
STATE_KEYS = {"default": dict, "old": dict, "ema": dict, "optimizer": dict, "step": int, "epoch": int,
              "bad_steps": int, "config": dict}
_HELD = []  # what main() releases when a run ends, whatever the way: the run lock, the reward queue
_LAST = []  # the last epoch not yet in a checkpoint: a save_epoch call ready to run (end_epoch, main)
_STOPS = []  # the stop signals received (_stop)


def run_draws(args, world_size, records=()):
    """What fixes a run's random draws besides the epoch: DRAW_KEYS, the rank count and the training prompt records
    (a prompt file edited in place keeps its name)."""
    draws = dict({k: getattr(args, k) for k in DRAW_KEYS}, world_size=world_size)
    if records:
        digest = hashlib.sha256(json.dumps(list(records), sort_keys=True, default=str).encode()).hexdigest()
        draws["prompt_records"] = f"{len(records)} prompts, sha256 {digest[:12]}"
    return draws


def checkpoints(root):
    """Complete checkpoint folders, oldest first (by number: checkpoint-100000 after checkpoint-99999). A kill mid-save
    leaves a *.tmp folder (`replacing`), which is ignored."""
    root = os.path.join(root, "checkpoints")
    names = [n for n in os.listdir(root) if re.fullmatch(r"checkpoint-[0-9]+", n)] if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[11:]))]


def write_error(e, what):
    """A failed write (disk full, read-only, no permission) as one line that says what was kept."""
    full = getattr(e, "errno", None) == errno.ENOSPC or any(  # torch.save and safetensors word it their own way
        s in str(e) for s in ("unexpected pos", "file write failed", "No space left", "StorageFull"))
    reason = "no space left on device" if full else (getattr(e, "strerror", None) or str(e).splitlines()[0])
    return UserError(f"could not write {what}: {reason}; what was written before it (the last good checkpoint, if "
                     "any) is kept. Free space (or fix the folder) and run again: a training run with --resume_from "
                     "latest")


def make_way(path):
    """Clear a name for a write: an old folder, a file, a link (to itself, to /dev/zero), never what it points to."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


@contextlib.contextmanager
def replacing(path, errors=OSError):
    """Write `path` atomically: the caller writes the yielded path + ".tmp" (cleared first), which then takes its
    place; a failed write (one of `errors`) leaves `path` as it was and is one write_error."""
    tmp = os.fspath(path) + ".tmp"
    try:
        make_way(tmp)
        yield tmp
        if os.path.isdir(tmp):  # a folder cannot be renamed over a folder, a file or a link
            make_way(path)
        os.replace(tmp, path)
    except errors as e:
        with contextlib.suppress(OSError):  # the half-written file or folder
            make_way(tmp)
        raise write_error(e, path) from None


def read_text(path):
    """A whole text file, closed once read (a bare open() leaves that to the garbage collector: a ResourceWarning)."""
    with open(path) as f:
        return f.read()


def write_file(path, text):
    """A whole text file, atomically (replacing): never half-written, a failed write one line."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_checkpoint(args, epoch, state, lora_meta, pipeline="StableDiffusion3Pipeline"):
    """checkpoint-<epoch>: the EMA LoRA as the family's pipeline class writes it (for its load_lora_weights) and
    training_state.pt; keeps the newest --checkpoints_total_limit. Refuses NaN/inf: never over a good checkpoint."""
    import diffusers
    from safetensors import SafetensorError
    if not all(torch.isfinite(t).all() for key in ("default", "old", "ema") for t in state[key].values()):
        raise UserError(f"epoch {epoch}: the LoRA weights are NaN/inf, so no checkpoint is saved; the last good "
                        f"one in {args.output_dir}/checkpoints is kept. Lower --learning_rate and resume from it")
    final = os.path.join(args.output_dir, "checkpoints", f"checkpoint-{epoch:05d}")
    with replacing(final, (OSError, RuntimeError, SafetensorError)) as tmp:  # torch.save: a full disk is a RuntimeError
        os.makedirs(tmp)
        getattr(diffusers, pipeline).save_lora_weights(tmp, transformer_lora_layers=lora_state(state["ema"]),
                                                       transformer_lora_adapter_metadata=lora_meta)
        torch.save(state, os.path.join(tmp, "training_state.pt"))
        mode = stat.S_IMODE(os.stat(os.path.join(tmp, "training_state.pt")).st_mode)  # the umask's
        for name in os.listdir(tmp):  # flush to disk before the rename makes the checkpoint visible
            path = os.path.join(tmp, name)
            if stat.S_IMODE(os.stat(path).st_mode) != mode:  # safetensors writes 0600: readable as the run's files
                with contextlib.suppress(OSError):  # where chmod is refused (gcsfuse, s3 mounts), as it is
                    os.chmod(path, mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    # only older ones count: one numbered above epoch is one `latest` skipped (unreadable), never kept over good ones
    older = [c for c in checkpoints(args.output_dir) if int(os.path.basename(c)[11:]) < epoch]
    for old in older[:max(0, len(older) - args.checkpoints_total_limit + 1)] if args.checkpoints_total_limit else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path):
    """training_state.pt of a checkpoint folder, checked before any model loads to hold what end_epoch saves,
    consistent and finite (the rules below); UserError otherwise. restore() then checks it against the model."""
    file = os.path.join(path, "training_state.pt")
    if not os.path.isfile(file):
        raise UserError(f"--resume_from {path}: no training_state.pt there (not a checkpoint of this script, "
                        "or an incomplete one); use --resume_from latest")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except OSError as e:
        raise Unreadable(path, "training_state.pt", e) from None
    except Exception as e:
        raise UserError(f"--resume_from {path}: training_state.pt is truncated or corrupted ({type(e).__name__}); "
                        "resume from an earlier checkpoint")
    wrong = [k for k, kind in STATE_KEYS.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    lora = {} if wrong else {n: getattr(t, "shape", None) for n, t in state["default"].items()}
    tensors = [] if wrong else [t for k in ("default", "old", "ema") for t in state[k].values()]

    def optimizer_fits(opt, shapes):  # AdamW's state_dict for these LoRA tensors: ids 0..n-1, moments of their shapes
        ids = [i for group in opt["param_groups"] for i in group["params"]]
        return ids == list(range(len(shapes))) and all(torch.is_tensor(v) and (k == "step" or v.shape == shapes[i])
                                                       for i, s in opt["state"].items() for k, v in s.items())
    rules = [  # (broken, what is wrong), checked in order
        (lambda: wrong, f"is not a training state of this script (missing or wrong: {', '.join(wrong)})"),
        (lambda: not all(torch.is_tensor(t) for t in tensors), "holds LoRA weights that are not tensors"),
        (lambda: any({n: t.shape for n, t in state[k].items()} != lora for k in ("old", "ema")),
         "holds a theta_old or EMA that does not match its LoRA (other names or shapes)"),
        (lambda: not optimizer_fits(state["optimizer"], list(lora.values())),
         f"holds an optimizer state that does not match its {len(lora)} LoRA tensors"),
        (lambda: not all(bool(torch.isfinite(t).all()) for t in tensors + [
            v for moments in state["optimizer"]["state"].values() for v in moments.values()]),
         "holds NaN/inf weights (a diverged run?)"),
        (lambda: not (1 <= (state.get("loss_scale") or 1.0) < math.inf and state.get("scale_steps", 0) >= 0),
         "holds a loss scale below 1, infinite or not a number, or a negative step count of it")]
    for broken, problem in rules:
        try:
            bad = broken()
        except (KeyError, TypeError, IndexError, AttributeError):  # a state too malformed for the rule to read
            bad = True
        if bad:
            raise UserError(f"--resume_from {path}: training_state.pt {problem}; resume from another checkpoint")
    lora = os.path.join(path, "pytorch_lora_weights.safetensors")
    try:  # the EMA LoRA that load_lora_weights and --eval_only read: a checkpoint without it whole is no good one
        from safetensors import safe_open
        with safe_open(lora, "pt"):
            pass
    except Exception as e:
        if isinstance(e, OSError) and os.path.isfile(lora):  # safetensors says "No such file" for no permission
            raise Unreadable(path, os.path.basename(lora), e) from None
        raise UserError(f"--resume_from {path}: pytorch_lora_weights.safetensors is missing or truncated "
                        f"({type(e).__name__}); resume from an earlier checkpoint") from None
    return state


class Unreadable(UserError):
    """A checkpoint's file that is there but cannot be read (permissions, an I/O error): the checkpoint may be whole,
    so `latest` stops here rather than fall back past it and replace it."""
    def __init__(self, path, name, e):
        super().__init__(f"--resume_from {path}: {name} cannot be read ({e.strerror or e}); fix its permissions or the "
                         "disk and resume again (moving the checkpoint away resumes from the one before it)")


def newest_good(paths, read):
    """(path, read(path)) for the newest of `paths` (oldest first) that read accepts, warning of each it refuses."""
    for path in reversed(paths):
        try:
            return path, read(path)
        except UserError as e:
            if path == paths[0] or isinstance(e, Unreadable):
                raise
            print0(f"warning: {str(e).split(': ', 1)[1].split(';')[0]} in {path}; trying the checkpoint before it")


def load_checkpoint(args, world_size, records=()):
    """The checkpoint to resume (path, state), or None for --resume_from latest with none saved yet; latest falls back
    past damaged ones, never past an unreadable one (newest_good). RESUME_KEYS must match (they shape the LoRA or the
    schedule); changed DRAW_KEYS or rank count only warn: the run continues correctly but no longer replays the
    uninterrupted one."""
    path = args.resume_from
    if path == "latest":  # like diffusers' scripts: nothing to resume yet starts a new run
        found = checkpoints(args.output_dir)
        if not found:
            print0(f"--resume_from latest: no checkpoint in {args.output_dir} yet, starting a new run")
            return None
        path, state = newest_good(found, read_state)
    elif not os.path.isdir(path):
        raise UserError(f"--resume_from {path}: no such folder; give a checkpoint folder or 'latest'")
    else:
        state = read_state(path)
    diff = [f"{k}: saved {v!r} vs now {getattr(args, k, None)!r}" for k, v in state["config"].items()
            if not same_value(k, v, getattr(args, k, None))]
    if diff:
        raise UserError(f"--resume_from {path} was saved with a different configuration ({', '.join(diff)}); "
                        "pass the same flags or start a new run")
    draws = run_draws(args, world_size, records)
    changed = [f"{k} {v!r} -> {draws[k]!r}" for k, v in state.get("draws", draws).items()
               if k in draws and not same_value(k, v, draws[k])]
    if changed:
        print0(f"warning: resuming with {', '.join(changed)}: training continues, but the prompts and noise "
               "of later epochs differ from what the uninterrupted run would have drawn")
    return path, state


def claim_output_dir(args, rank, world, records=()):
    """Lock --output_dir (rank 0), read the checkpoint to resume and refuse to clobber a run (a previous one, or one
    with newer checkpoints). Returns (resume (path, state) or None, foreign: another run's checkpoint, locked: the lock
    is held, replace: --overwrite replaces a previous run, once the model has loaded), or None when the run to resume
    is complete."""
    folder = os.path.join(args.output_dir, "checkpoints")
    locked = rank == 0 and os.path.isdir(args.output_dir)
    if locked:  # before reading or changing anything of the folder
        run_lock(args.output_dir)
    resume = load_checkpoint(args, world, records) if args.resume_from else None
    if resume and resume[1]["epoch"] >= args.num_epochs and not args.profile:  # said, not a silent no-op
        print0(f"the run in {args.output_dir} is complete: {resume[0]} holds epoch {resume[1]['epoch']} and "
               f"--num_epochs is {args.num_epochs}, so there is nothing to train; pass a larger --num_epochs")
        return None
    own = os.path.realpath(folder)
    foreign = bool(resume) and os.path.realpath(os.path.dirname(os.path.abspath(resume[0]))) != own
    if args.profile and resume and not foreign:  # its epochs would join the run's metrics.jsonl and curves
        raise UserError(f"--profile with --resume_from {args.resume_from}: the profile's epochs would join this run's "
                        "metrics; profile into another --output_dir with --resume_from <a checkpoint of this run> "
                        "(it is copied there)")
    held = previous_run(args.output_dir)  # a profile or another program's files: never taken over, even by a resume
    replace = held if not args.resume_from or foreign or args.profile or held != "a previous run" else ""
    if args.overwrite and resume and not replace:  # as parse_args' warnings: a flag given that does nothing
        print0(f"warning: --overwrite does nothing here: --resume_from {args.resume_from} continues the run in "
               f"{args.output_dir}")
    if replace and not args.overwrite:
        resumable = replace == "a previous run" and not args.profile
        fix = "pass --resume_from latest to continue it, " if resumable else "pass "
        raise UserError(f"--output_dir {args.output_dir} holds {replace}; {fix}--overwrite to replace it, or another "
                        "--output_dir")
    if resume and not foreign and args.resume_from != "latest":
        newer = [c for c in checkpoints(args.output_dir) if int(os.path.basename(c)[11:]) > resume[1]["epoch"]]
        if newer:  # `latest` would pick them after the next kill, mixing two futures of one run
            raise UserError(f"--resume_from {resume[0]}: this run already has newer checkpoints "
                            f"({os.path.basename(newer[-1])}); resume from the newest with --resume_from latest, or "
                            "branch off into another --output_dir (the checkpoint is copied there)")
    if os.path.lexists(folder) and not os.path.isdir(folder) and not replace:  # no save could land: fail now
        raise UserError(f"--output_dir {args.output_dir}: checkpoints is not a folder (a file, or a link to "
                        f"{os.path.realpath(folder)}); move it away")
    return resume, foreign, locked, replace


OUTPUT_NAMES = (r"eval_epoch\d+\.png|curves\.png|profile\.json|config\.json|eval\.(json|md)|eval_images\.jsonl|"
                r"compare\.png|wandb_id")  # what a run or an evaluation writes beside metrics.jsonl and checkpoints/


def previous_run(folder):
    """What `folder` holds that a new run would replace: "a previous run" (checkpoints or metrics), "a profile
    (profile.json)" (--profile's, which no run continues), "an evaluation (eval.json)" (--eval_only's), files named as
    this script's outputs in a folder without a config.json of its own (another program's), or ""."""
    if os.path.exists(os.path.join(folder, "profile.json")):  # also where --profile copied a checkpoint in
        return "a profile (profile.json)"
    if checkpoints(folder) or os.path.exists(os.path.join(folder, "metrics.jsonl")):
        return "a previous run"
    if os.path.exists(os.path.join(folder, "eval.json")):
        return "an evaluation (eval.json)"
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(OUTPUT_NAMES, n)) if os.path.isdir(folder) else []
    if not names:
        return ""
    with contextlib.suppress(OSError, ValueError, TypeError):  # a run's own config.json (stopped before epoch 0)
        keys = dict(json.loads(read_text(os.path.join(folder, "config.json")))).keys()
        if {"model", "reward", "group_size", "num_groups", "beta", "kl_coef", "adv_clip"} <= keys:
            return ""
    return f"files named as this script's outputs ({', '.join(names)})"


def run_of(checkpoint):
    """The run folder of a checkpoint (<run>/checkpoints/checkpoint-N), or None for one outside a run's folder."""
    for path in (os.path.abspath(checkpoint), os.path.realpath(checkpoint)):  # a run's linked checkpoints/, or a link
        if os.path.basename(os.path.dirname(path)) == "checkpoints":  # to a checkpoint: the run it lies in
            return os.path.dirname(os.path.dirname(path))
    return None


def restore(pol, path, state, args):
    """Load a checkpoint's theta, theta_old, EMA, optimizer state and counters into `pol`; returns the epoch to start
    from. Its LoRA must fit the model's (check_fit; `latest` skips one that does not, as it skips what read_state
    refuses). The optimizer's saved hyperparameters give way to the flags given now, and a line says so."""
    def fitting(candidate):
        found = state if candidate == path else read_state(candidate)
        check_fit(pol.theta, found["default"], f"--resume_from {candidate}: training_state.pt", "this model's LoRA",
                  "resume from another checkpoint")
        return found
    candidates = checkpoints(args.output_dir) if args.resume_from == "latest" else [path]
    path, state = newest_good(candidates[:candidates.index(path) + 1], fitting)
    with torch.no_grad():
        for n, p in pol.theta.items():
            for key, target in [("default", p), ("old", pol.old[n]), ("ema", pol.ema[n])]:
                target.copy_(shard_like(state[key][n], p))
    pol.opt.load_state_dict(state["optimizer"])
    for p, s in pol.opt.state.items():  # --fsdp: the saved moments split into this rank's shards
        s.update({k: shard_like(v, p) for k, v in s.items() if torch.is_tensor(v) and v.shape == p.shape})
    flags = dict(lr=("learning_rate", args.learning_rate), betas=("adam_beta1/2", (args.adam_beta1, args.adam_beta2)),
                 weight_decay=("adam_weight_decay", args.adam_weight_decay), eps=("adam_epsilon", args.adam_epsilon))
    saved = {k: tuple(v) if k == "betas" else v for k, v in pol.opt.param_groups[0].items()}
    changed = [f"--{flag} {saved[k]!r} -> {v!r}" for k, (flag, v) in flags.items() if saved[k] != v]
    for group in pol.opt.param_groups:
        group.update({k: v for k, (_, v) in flags.items()})
    if changed:
        print0(f"resumed optimizer takes the flags given now: {', '.join(changed)}")
    pol.step, pol.bad_steps = state["step"], state["bad_steps"]
    if pol.loss_scale and state.get("loss_scale"):  # fp16 then and now: GradScaler's scale continues
        pol.loss_scale, pol.scale_steps = state["loss_scale"], state["scale_steps"]
    print0(f"resumed from {path}: epoch {state['epoch']}, step {pol.step}")
    return state["epoch"]


def carry_over(args, source, start_epoch, replace=False):
    """Keep the metrics lines of the epochs before start_epoch. Another run's checkpoint (`source`) is copied in with
    its run's metrics, so that `latest` and the curves continue here; its folder is left as it is. replace
    (--overwrite, once the model has loaded): the previous run's checkpoints, metrics, grids and reports go first."""
    metrics_path = kept = os.path.join(args.output_dir, "metrics.jsonl")
    if replace:
        make_way(os.path.join(args.output_dir, "checkpoints"))  # a link: not its target
        for name in os.listdir(args.output_dir):
            if re.fullmatch(OUTPUT_NAMES, name):
                make_way(os.path.join(args.output_dir, name))
    if source:
        source = os.path.normpath(source)
        into = os.path.join(args.output_dir, "checkpoints", f"checkpoint-{start_epoch:05d}")  # the name `latest` reads
        with replacing(into) as tmp:
            shutil.copytree(source, tmp)
        print0(f"--resume_from {source}: another run's checkpoint, copied into {into}; its folder is left as it is")
        kept = os.path.join(run_of(source) or os.devnull, "metrics.jsonl")  # a checkpoint outside a run: none
    if os.path.isfile(kept):
        with open(kept) as f:
            lines = [line for line in f if _epoch_of(line) < start_epoch]
        lost = sorted(set(range(start_epoch)) - {_epoch_of(line) for line in lines})  # cut or removed by hand (a kill
        if lost:  # cuts only the line of an epoch it has not saved)
            print0(f"warning: {kept} has no readable line for epoch {lost[0]}" + (
                f" and {len(lost) - 1} more" if len(lost) > 1 else "") + "; their metrics are lost, not the weights")
        write_file(metrics_path, "".join(lines))
    else:
        if start_epoch and not kept.startswith(os.devnull):  # removed by hand (a checkpoint outside a run has none)
            print0(f"warning: {kept} is missing; the metrics of epochs 0 to {start_epoch - 1} are lost, not the "
                   "weights")
        if os.path.exists(metrics_path):  # --overwrite: the replaced run's lines must go
            os.remove(metrics_path)


def _epoch_of(line):
    """The epoch of a metrics.jsonl line; a line cut short by a kill counts as unfinished."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def run_lock(folder):
    """Hold folder/.lock while the run lives (flock: a killed run never blocks its resume); refuses while another run
    holds it. Never through a link, nor truncating anything but a regular file of its own (no hard link)."""
    import fcntl
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {folder} cannot be made ({e.strerror}); give another --output_dir") from None
    try:
        fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.fstat(fd).st_nlink != 1:
            os.close(fd)
            raise OSError(errno.EINVAL, "not a plain file of its own")
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):  # another user's, most likely
            raise UserError(f"--output_dir {folder}: its .lock cannot be opened ({e.strerror}); is it another user's "
                            "run? Use another --output_dir") from None
        what = "a symbolic link" if e.errno == errno.ELOOP else "a folder" if e.errno == errno.EISDIR else e.strerror
        raise UserError(f"--output_dir {folder}: .lock is {what}, which a run's lock never is; it is left as it is: "
                        "remove it, or use another --output_dir") from None
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = f.read().strip() or "?"
        f.close()
        raise UserError(f"--output_dir {folder} is in use by another running run (pid {owner}); wait for it to "
                        "finish, stop it, or use another --output_dir")
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD.append(f.close)
    return f


def lock_new_folder(folder):
    """Create and lock an --output_dir that did not exist when the run started, once its model has loaded (a start
    that fails leaves no folder behind); refuses where another run wrote into it meanwhile."""
    run_lock(folder)
    held = previous_run(folder)
    if held:  # it did not exist a moment ago: another run is using it
        raise UserError(f"--output_dir {folder}: another run wrote into it while this one loaded (it holds {held}); "
                        "use another --output_dir")


def json_safe(x):
    """NaN/inf floats -> None (JSON null), recursively: json.dumps would write bare NaN, which is not JSON."""
    return json.loads(json.dumps(x), parse_constant=lambda _: None)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(run, records, items):
    """Yield (batch, images) for (prompt index, image index) pairs with the transformer's active weights: Euler,
    eval_num_steps. The noise is drawn on the CPU from rng(seed, "eval", i, k), so an image depends on its pair
    alone, not on the batch, the rank or the device (that generator's initial_seed() redraws it)."""
    args, pipe, device = run.args, run.pipe, run.device
    if not items:  # more ranks than images
        return
    sigmas = schedule(pipe, args.eval_num_steps, args.resolution)
    shape = latent_shape(pipe, args.resolution)
    prompts = sorted({i for i, _ in items})  # encoded once, kept on the CPU (offloaded encoders visit once)
    cond = encode_prompts(pipe, [records[i]["prompt"] for i in prompts], args.max_sequence_length, device,
                          args.embedded_guidance_scale)
    cond, row = {k: v.cpu() for k, v in cond.items()}, {i: j for j, i in enumerate(prompts)}
    for b in range(0, len(items), args.sample_batch_size):
        batch = items[b:b + args.sample_batch_size]
        run_as = list(batch)
        if args.compile and not args.eval_only:  # one batch size: a short last batch would make the compiled blocks
            run_as += batch[-1:] * (args.sample_batch_size - len(batch))  # recompile with a dynamic one (repeats cut)
        where = torch.tensor([row[i] for i, _ in run_as])
        noise = torch.stack([torch.randn(shape, generator=rng(args.seed, "eval", prompt_index(records, i), k))
                             for i, k in run_as]).to(device)
        x0 = sample(run, noise, {k: v[where].to(device) for k, v in cond.items()}, sigmas, "euler")[:len(batch)]
        yield batch, decode(pipe, x0)


def prompt_index(records, i):
    """Prompt i's index in its whole evaluation set (a capped set keeps it: rewards.prompt_records), which seeds its
    images and names it in eval_images.jsonl: a capped evaluation's images are the whole evaluation's."""
    return records[i].get("_index", i)


@torch.no_grad()
def evaluate(run, records):
    """Score the active weights on the test prompts (run.eval_fn), eval_images_per_prompt images each, split over ranks
    by position and gathered (none missing or duplicated). Returns on every rank one dict per image, sorted by (index,
    image): index, image, prompt, seed, tag (GenEval), reward, each component, and `_image` (CPU) for the grid: the
    images of as many first prompts as 16 hold whole (of the first prompt, its first 16)."""
    args, rank, world = run.args, run.process_index, run.num_processes
    items = [(i, k) for i in range(len(records)) for k in range(args.eval_images_per_prompt)]
    out, mine = [], items[rank::world]
    padded = mine + items[:1] * (len(items[::world]) - len(mine)) * args.fsdp  # --fsdp: equal forwards on all ranks
    for batch, images in tqdm(generate(run, records, padded), desc=f"evaluating {len(items)} images",
                              total=-(-len(padded) // args.sample_batch_size), **run.bar):
        scores, comps = run.eval_fn(images, [records[i]["prompt"] for i, _ in batch], [records[i] for i, _ in batch])
        bad = ~torch.isfinite(images.flatten(1)).all(1).cpu()  # a diverged image: unscored, as a rollout's (score)
        scores, comps = scores.masked_fill(bad, math.nan), {k: v.double().masked_fill(bad, math.nan)
                                                            for k, v in comps.items()}
        for j, (i, k) in enumerate(batch):
            seed = rng(args.seed, "eval", prompt_index(records, i), k).initial_seed()
            out.append(dict(index=prompt_index(records, i), image=k, prompt=records[i]["prompt"], seed=seed,
                            **({"tag": records[i]["tag"]} if "tag" in records[i] else {}), reward=float(scores[j]),
                            **{c: float(v[j]) for c, v in comps.items()},
                            **({"_image": images[j].cpu()} if i < max(1, 16 // args.eval_images_per_prompt)
                               and k < 16 else {})))
    out = out[:len(mine)]  # without the padding
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = [r for p in parts for r in p]
    return sorted(out, key=lambda r: (r["index"], r["image"]))


def eval_only(args):
    """--eval_only: the paper's evaluation (Euler at --eval_num_steps, guidance 1, 512 px; unless set, SD3 at the
    official script's T5 length 256 and fp16, FLUX.1 and Qwen-Image at their training length and bf16) of the base model
    or a --lora on the test prompts, scored with --reward and --eval_reward. Writes eval.json, eval.md (also printed),
    eval_images.jsonl (each image's seed and scores), compare.png (--lora: base vs LoRA) and curves.png (below)."""
    lora = find_lora(args.lora) if args.lora else None  # a bad path fails before the model loads
    run = setup(args)
    locked = run.process_index == 0 and os.path.isdir(args.output_dir)
    if locked:  # not into a folder a live run is writing
        run_lock(args.output_dir)
    held = previous_run(args.output_dir)
    if held.startswith(("an evaluation", "files")) and not args.overwrite:
        raise UserError(f"--output_dir {args.output_dir} holds {held}; pass --overwrite to replace "
                        "it, or another --output_dir")
    if not args.eval_images_per_prompt:  # not set: the benchmark's own count
        args.eval_images_per_prompt = rewards.EVAL_IMAGES.get(rewards.prompt_reward(args.reward), 1)
    load_model(run)
    if run.process_index == 0 and not locked:
        lock_new_folder(args.output_dir)
    if lora:
        load_lora(run.pipe, lora)
    if args.fsdp:
        shard(run.pipe.transformer)
    mode = precision_mode(args, run.device)
    mode = "fp32" if mode == "no" else mode  # the transformer's, as eval.json and eval.md name it
    scored = f"{args.reward} (+ {args.eval_reward})" if args.eval_reward else args.reward
    setting = (f"{scored} on {len(run.eval_records)} prompts x {args.eval_images_per_prompt} images, "
               f"{args.eval_num_steps} Euler steps, guidance {args.guidance_scale}, {args.resolution} px, "
               f"text length {args.max_sequence_length}, transformer {mode}, "
               f"rewards {args.reward_precision}, seed {args.seed}")
    print0(f"evaluating {args.lora or 'the base model'}: {setting}, {run.num_processes} rank(s)")
    results = evaluate(run, run.eval_records)
    columns, items = [], [(i, 0) for i in range(min(8, len(run.eval_records)))]  # image 0: the same seed in both
    for on in (False, True) if lora and (run.process_index == 0 or args.fsdp) else ():  # --fsdp: all ranks join
        run.pipe.transformer.enable_adapters() if on else run.pipe.transformer.disable_adapters()
        columns.append(torch.cat([im.cpu() for _, im in generate(run, run.eval_records, items)]))
    if run.process_index != 0:
        return
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    for name in ("compare.png", "curves.png"):  # --overwrite: a replaced evaluation's, made again below if they apply
        make_way(os.path.join(out, name))
    write_file(os.path.join(out, "eval_images.jsonl"), "".join(
        json.dumps(json_safe({k: v for k, v in r.items() if k != "_image"})) + "\n" for r in results))
    metrics = rewards.benchmark_metrics(results, args.reward, args.eval_reward)
    unscored = warn_unscored(results, args)  # eval_images.jsonl lists them as null
    keys = ("model", "lora", "reward", "eval_reward", "eval_images_per_prompt", "eval_num_steps", "guidance_scale",
            "negative_prompt", "embedded_guidance_scale", "resolution", "max_sequence_length", "mixed_precision",
            "reward_precision", "seed")
    summary = dict(**{k: getattr(args, k) for k in keys}, transformer_precision=mode,
                   prompt_set=prompt_set(args)["eval"], prompts=len(run.eval_records), images=len(results),
                   unscored_images=unscored, reward_mean=rewards.finite_mean([r["reward"] for r in results]),
                   metrics=metrics)
    write_file(os.path.join(out, "eval.json"), json.dumps(json_safe(summary), indent=1))
    name = os.path.basename(os.path.normpath(args.lora)) if args.lora else "base"
    table = (f"| model | {' | '.join(metrics)} |\n|---|{'---|' * len(metrics)}\n"
             f"| {name} | {' | '.join(f'{v:.4f}' for v in metrics.values())} |\n")
    write_file(os.path.join(out, "eval.md"), f"{args.model} + {args.lora or 'no LoRA'}: {setting}\n\n{table}")
    print0(table)
    if lora:
        save_grid(torch.stack(columns, 1).flatten(0, 1), os.path.join(out, "compare.png"), nrow=2,
                  col_labels=["base", "LoRA"], row_labels=[run.eval_records[i]["prompt"] for i, _ in items])
    # curves.png: from metrics.jsonl of output_dir, or of the LoRA's run (<run>/checkpoints/checkpoint-N/[lora/]<file>)
    folders = [out] + ([os.path.abspath(os.path.join(lora[0], *[".."] * n)) for n in (1, 2, 3, 4)] if lora else [])
    found = [p for p in (os.path.join(d, "metrics.jsonl") for d in folders) if os.path.isfile(p)]
    if found:
        plot_curves(found[0], os.path.join(out, "curves.png"))
    print0(f"outputs in {out}")


# --------------------------------------------------------------------------- logging, profiling and plots
def gather_components(results, diverged, device):
    """Every rank's reward components of the epoch from its reward calls' (scores, components) results: {name: (all
    N,) float64 CPU tensor}, NaN for a diverged image (`diverged`: this rank's mask) and for the images of a call (or a
    rank) that returned no such component: as evaluate() scores them. Every rank gathers the same names, in one
    order."""
    names = list(dict.fromkeys(k for r in results for k in r[1]))
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, names)
        names = list(dict.fromkeys(k for part in every for k in part))
    return {k: gather(torch.cat([r[1].get(k, torch.full_like(r[0], math.nan, dtype=torch.float64)).double()
                                 for r in results]).masked_fill(diverged, math.nan).to(device)).cpu() for k in names}


def rollout_stats(R, group_ids, strict=None, tags=()):
    """What the official run logs besides the reward: zero_std_share, the share of prompt groups whose rewards all
    tie (std 0: every advantage in the group is 0, it teaches nothing; NaN when no reward is finite), and with GenEval
    strict_<tag>, the epoch's strict accuracy per tag (rewards.strict_by_tag). R: (N,); group_ids: (N,) int."""
    groups = {}
    for r, g in zip(R.tolist(), group_ids.tolist()):
        groups.setdefault(g, []).append(r)
    share = sum(max(v) == min(v) for v in groups.values()) / len(groups) if groups else float("nan")
    return dict(zero_std_share=share, **rewards.strict_by_tag(strict, tags) if strict is not None else {})


def print_epoch(epoch, step, log):
    """The epoch's line: reward, loss terms, r, |v_theta - v_old|, GenEval strict accuracy, evaluation, times."""
    strict = " ".join(f"{k[7:]} {v:.2f}" for k, v in log.items() if k.startswith("strict_"))
    extra = "".join(f" {k[5:]} {v:.4f}" for k, v in log.items()  # --eval_reward's
                    if k.startswith("eval_") and not k.startswith("eval_reward") and not k.endswith("_before"))
    t = {k[5:]: v for k, v in log.items() if k.startswith("time_")}
    print0(f"epoch {epoch:4d} step {step:4d} | reward {log['reward_mean']:.4f} +- {log['reward_std']:.4f} | "
           f"loss {log['loss']:.4f} kl {log['kl']:.2e} r {log['r_mean']:.3f} |v-v_old| {log['dv_old']:.2e} "
           f"zero-std {log['zero_std_share']:.2f} | " + (f"strict {strict} | " if strict else "")
           + (f"eval {log['eval_reward_mean']:.4f}{extra} | " if "eval_reward_mean" in log else "")
           + f"{t['epoch']:.1f}s (text {t['text']:.1f} rollout {t['rollout']:.1f} decode {t['decode']:.1f} "
           f"reward {t['reward']:.1f} train {t['train']:.1f})")


def profile_report(run, logs):
    """--profile: profile.json, also printed. Phase times are means over the epochs after the first (which warms up and
    compiles); MFU is against a bf16 matmul timed in the same run. FLOPs are counted once (FlopCounterMode), for a
    forward and for a training forward + backward with LoRA gradients only (about one forward: none reach the frozen
    weights)."""
    import resource
    from torch.utils.flop_counter import FlopCounterMode
    args, pipe, device, per_rank, T = run.args, run.pipe, run.device, run.per_rank, run.T
    peak_memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else  # ru_maxrss: KiB
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    x = torch.randn(1, *latent_shape(pipe, args.resolution), device=device)
    cond = encode_prompts(pipe, ["a photo"], args.max_sequence_length, device)
    # eager: inductor's fused kernels would hide FLOPs from the counter, and batch 1 would recompile
    with FlopCounterMode(display=False) as counter, torch.no_grad(), run.autocast(), \
            torch.compiler.set_stance("force_eager"):
        velocity(pipe.transformer, x, 0.5, cond)
    f = counter.get_total_flops()  # one transformer forward of one image
    with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        with run.autocast():
            v = velocity(pipe.transformer, x, 0.5, cond)
        v.square().mean().backward()
    f_train = counter.get_total_flops()  # forward + backward, as measured
    pipe.transformer.zero_grad(set_to_none=True)
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t = clock(device)
    for _ in range(10):
        a @ b
    peak = 2 * n ** 3 * 10 / (clock(device) - t)
    estimate = memory_estimate(model_sizes(args.model), args, precision_mode(args, device),
                               dist.get_world_size() if args.fsdp else 1)["total"]
    steady = logs[1:] or logs
    secs = {k: sum(log[f"time_{k}"] for log in steady) / len(steady)
            for k in ("text", "rollout", "decode", "reward", "train", "epoch")}
    # v_theta forward + backward, v_old (and v_ref) forward; --train_guided runs each for both CFG branches
    passes = 1 + (args.train_guided and args.guidance_scale > 1)
    train_tflops = per_rank * T * (f_train + f * (1 + (args.kl_coef > 0))) * passes / secs["train"] / 1e12
    rollout_tflops = per_rank * args.num_steps * f * (1 + (args.guidance_scale > 1)) / secs["rollout"] / 1e12
    graphs = [log.get("compiled_graphs", 0) for log in (logs[0], logs[-1])]
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  **{k: getattr(args, k) for k in ("model", "resolution", "train_batch_size", "mixed_precision",
                                                   "compile", "kl_coef", "grad_sync", "gradient_checkpointing")},
                  gflop_per_forward=f / 1e9, gflop_per_train_forward_backward=f_train / 1e9,
                  peak_tflops_matmul=peak / 1e12, **{f"time_{k}_s": v for k, v in secs.items()},
                  time_first_epoch_s=logs[0]["time_epoch"], epoch_images_per_s=per_rank / secs["epoch"],
                  rollout_images_per_s=per_rank / secs["rollout"], train_samples_per_s=per_rank * T / secs["train"],
                  rollout_tflops=rollout_tflops, train_tflops=train_tflops, peak_memory_gib=peak_memory,
                  memory_estimate_gib=estimate, compiled_graphs=graphs[1],
                  compile_time_s=logs[-1].get("compile_time_s", 0), recompiles_after_first_epoch=graphs[1] - graphs[0],
                  rollout_mfu=rollout_tflops * 1e12 / peak, train_mfu=train_tflops * 1e12 / peak)
    if run.process_index == 0:
        write_file(os.path.join(args.output_dir, "profile.json"), json.dumps(json_safe(report), indent=1))
    print0("profile (per rank, mean of epochs after the first):\n" + "\n".join(
        f"  {k:<22} {v:.4g}" if isinstance(v, float) else f"  {k:<22} {v}" for k, v in report.items()))
    return report


def _font(size):
    """PIL's default font at `size` px (Pillow >= 10.1 with FreeType), else its small bitmap font."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def to_uint8(image):
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8 pixels, rounded: what a PNG or W&B shows."""
    return (image.nan_to_num().permute(1, 2, 0).numpy() * 255).round().astype("uint8")  # a diverged image: black


def save_grid(images, path, nrow, col_labels=(), row_labels=(), min_size=128):
    """Save (N, 3, H, W) images in [0, 1] as one PNG grid, nrow a row, with optional column and row labels; images
    smaller than min_size are upscaled by a whole factor (nearest), so a 32 px demo image shows pixel for pixel."""
    import textwrap
    from PIL import Image, ImageDraw
    n, _, h, w = images.shape
    grid = torch.zeros(3, -(-n // nrow) * h, nrow * w)
    for i, im in enumerate(images):
        grid[:, (i // nrow) * h:(i // nrow + 1) * h, (i % nrow) * w:(i % nrow + 1) * w] = im
    image = Image.fromarray(to_uint8(grid))
    k = max(1, -(-min_size // h))
    image, h, w = image.resize((image.width * k, image.height * k), Image.NEAREST), h * k, w * k
    top, left = 16 * bool(col_labels), 160 * bool(row_labels)
    canvas = Image.new("RGB", (left + image.width, top + image.height), "white")
    canvas.paste(image, (left, top))
    draw, font = ImageDraw.Draw(canvas), _font(13)
    for j, label in enumerate(col_labels):
        draw.text((left + j * w + 3, 1), label, fill="black", font=font)
    for i, label in enumerate(row_labels):  # as many wrapped lines of the prompt as the row's height holds
        lines = textwrap.wrap(label, 24)[:max(1, h // 16)]
        draw.multiline_text((3, top + i * h + 2), "\n".join(lines), fill="black", spacing=2, font=font)
    with replacing(path) as tmp:
        canvas.save(tmp, format="PNG")


def _ticks(lo, hi, n=5):
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = ((hi - lo) or abs(hi) or 1.0) / n  # the span over n; never 0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.floor(lo / step) * step
    return [round(first + i * step, 12) for i in range(max(2, int(math.ceil((hi - first) / step)) + 1))]


def plot_curves(metrics_path, png_path, size=(640, 400), title=None):
    """Draw metrics.jsonl as a PNG with PIL alone: train reward_mean and eval_reward_mean against step (the base
    model's, or --init_lora's, eval_reward_mean_before at step 0), titled with the run's reward (config.json). An
    --eval_reward (eval_<name>) has its own scale: its curve is stretched onto the others' y range, its legend names its
    range."""
    from PIL import Image, ImageDraw
    lines = read_text(metrics_path).splitlines()
    records = [json.loads(line) for line in lines if _epoch_of(line) < math.inf]  # not one cut by a kill
    evals = lambda key: ([(0, r[key + "_before"]) for r in records if key + "_before" in r]  # noqa: E731
                         + [(r["step"], r[key]) for r in records if key in r])
    extra = dict.fromkeys(k[5:].removesuffix("_before") for r in records for k in r
                          if k.startswith("eval_") and not k.startswith("eval_reward"))
    series = {"train reward": [(r["step"], r["reward_mean"]) for r in records if "reward_mean" in r],
              "eval reward": evals("eval_reward_mean"), **{name: evals(f"eval_{name}") for name in extra}}
    series = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}  # NaN: null
    extra = {name: series.pop(name) for name in extra}
    if title is None:
        config = os.path.join(os.path.dirname(metrics_path), "config.json")
        reward = json.loads(read_text(config)).get("reward") if os.path.isfile(config) else None
        title = f"{reward + ' ' if reward else ''}reward against optimizer step"
    W, H, L, R, T, B = *size, 64, 20, 44, 40  # canvas and margins
    font, small = _font(16), _font(12)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    text = functools.partial(draw.text, fill="black", font=small)
    text(((W - draw.textlength(title, font=font)) / 2, 8), title, font=font)
    text((W // 2 - 12, H - 16), "step")
    points = [p for s in series.values() for p in s] or [p for s in extra.values() for p in s]
    if points:
        (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*points)]
        yt, xt = _ticks(y0, y1), _ticks(x0, x1, 6)
        (y0, y1), (x0, x1) = (yt[0], yt[-1]), (min(x0, xt[0]), max(x1, xt[-1]))
        sx = lambda x: L + (x - x0) / ((x1 - x0) or 1) * (W - L - R)  # noqa: E731
        sy = lambda y: H - B - (y - y0) / ((y1 - y0) or 1) * (H - T - B)  # noqa: E731
        for name, pts in extra.items():  # [lo, hi] stretched onto [y0, y1]
            lo, hi = min((y for _, y in pts), default=0), max((y for _, y in pts), default=0)
            series[f"eval {name} ({lo:.4g} to {hi:.4g}, stretched)"] = [
                (x, y0 + (y - lo) / ((hi - lo) or 1) * (y1 - y0)) for x, y in pts]
        for y in yt:  # grid line and label at every round value
            draw.line([(L, sy(y)), (W - R, sy(y))], fill="#dddddd")
            text((L - 4 - draw.textlength(f"{y:.4g}", font=small), sy(y) - 7), f"{y:.4g}")
        for x in (x for x in xt if x0 <= x <= x1):
            draw.line([(sx(x), T), (sx(x), H - B)], fill="#dddddd")
            text((sx(x) - draw.textlength(f"{x:g}", font=small) / 2, H - B + 4), f"{x:g}")
        for n, (name, pts) in enumerate(series.items()):
            color = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")[n % 6]
            xy = [(sx(x), sy(y)) for x, y in pts]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            for x, y in xy if len(xy) <= 50 else []:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            draw.line([(L + 10, T + 10 + 16 * n), (L + 30, T + 10 + 16 * n)], fill=color, width=2)  # legend
            text((L + 35, T + 3 + 16 * n), name)
    draw.line([(L, T), (L, H - B), (W - R, H - B)], fill="black")
    with replacing(png_path) as tmp:
        canvas.save(tmp, format="PNG")


# --------------------------------------------------------------------------- command line
def parse_args(argv=None):
    """Defaults (Args) <- preset (the reward's, or --preset; then the model family's, "flux" or "qwenimage", or
    "tiny" for the tiny models) <- command line; with --resume_from, the run's own config.json first (resumed)."""
    epilog = ("presets (applied before the flags you give; a FLUX.1 or Qwen-Image --model adds its family's, "
              "--model tiny / tiny-flux / tiny-qwenimage the tiny one):\n") + "\n".join(
        f"  {name}: " + " ".join(f"--{k} {v}" for k, v in preset.items()) for name, preset in PRESETS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.error = functools.partial(_flag_error, [f"--{f.name}" for f in dataclasses.fields(Args)])
    helps = dict(re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(Args), re.M))  # the field comments
    choices = {"reward": f"Rewards: {', '.join(rewards.REWARDS)}.", "solver": f"Solvers: {', '.join(SOLVERS)}.",
               "preset": f"Presets: {', '.join(PRESETS)}.", "model": f"Built in: {', '.join(BUILTIN_NAMES)}."}
    for f in dataclasses.fields(Args):
        by_preset = ", ".join(f"{name} {preset[f.name]!r}" for name, preset in PRESETS.items() if f.name in preset)
        text = " ".join(filter(None, [helps.get(f.name, ""), choices.get(f.name)])) + \
            f" (default: {f.default!r}" + (f"; presets: {by_preset})" if by_preset else ")")
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(f"--{f.name}", type=f.type, metavar=f.type.__name__.upper(), help=text)
    given = vars(p.parse_args(argv))  # only the flags on the command line (defaults are suppressed)
    for k in ("reward", "eval_reward"):  # "ocr " and "color : 1" are "ocr" and "color:1": their preset, their folder
        if k in given:
            given[k] = re.sub(r"\s*([,:])\s*", r"\1", given[k].strip())
    # the preset: --preset, else the one whose reward is this spec (multi's sum spelled out), else the reward's own
    # name; a weighted sum of several rewards has none
    spec, model = given.get("reward", Args.reward), given.get("model", Args.model)
    name = given.get("preset") or next((k for k, preset in PRESETS.items() if "reward" in preset and reward_terms(
        preset["reward"]) == reward_terms(spec)), "" if "," in spec else spec.split(":")[0])
    if "reward" in given and name == spec and "reward" in PRESETS.get(name, {}):  # --reward multi: the preset's spec
        given["reward"] = PRESETS[name]["reward"]
    presets = [name]
    if builtin(model) and model in BUILTIN:
        presets += ["tiny"] + [model] * (model in PRESETS)
    elif model_family(model) in PRESETS:  # FLUX.1, Qwen-Image: the nearest published recipe's model settings
        presets.append(model_family(model))
    if name not in PRESETS and name == given.get("preset"):
        raise UserError(f"unknown --preset {name!r}; choose from {sorted(PRESETS)}")
    values = {k: v for preset in presets for k, v in PRESETS.get(preset, {}).items()}
    if given.get("eval_only") and "max_sequence_length" not in values | given:
        values["max_sequence_length"] = 256  # the official evaluation runs the pipeline at diffusers' default T5 length
    values.update(negative_prompt=family_named(model_family(model)).negative_prompt,
                  preset=name if name in PRESETS else "")  # config.json: the reward's recipe (--model adds its own)
    for k in ("output_dir", "resume_from"):  # the shell leaves the ~ of `--output_dir=~/x`: no folder named ~ here
        if k in given:
            given[k] = os.path.expanduser(given[k])
    args = Args(**(values | given))
    run = run_of(args.resume_from) if not args.output_dir and args.resume_from not in ("", "latest") else None
    if run and os.path.isfile(os.path.join(run, "config.json")):  # a run's checkpoint continues in its run's folder
        args.output_dir = run
    if not args.output_dir:  # runs/<model>-<reward>[-eval]: runs of other models or rewards, and evaluations, apart
        reward = args.preset or re.sub(r":[^,]*", "", args.reward).replace(",", "+")  # a sum: its names, no weights
        folder = f"{os.path.basename(os.path.normpath(args.model))}-{reward}" + "-eval" * args.eval_only
        args.output_dir = os.path.join("runs", re.sub(r"[^\w.+-]+", "_", folder))
    if args.resume_from and args.eval_only:  # resumed() would take a training run's flags for the evaluation
        raise UserError(f"--resume_from {args.resume_from} continues a training run; --eval_only evaluates a "
                        "checkpoint given as --lora (--lora <run>/checkpoints/checkpoint-N)")
    args = resumed(args, given) if args.resume_from else args
    for k in PATH_FLAGS:  # saved absolute, so that a resume from another folder finds them; links kept (a file in
        path = os.path.expanduser(getattr(args, k))  # the Hugging Face cache links to a blob without its name)
        if path and os.path.exists(path) and not (k == "model" and builtin(path)):  # a hub id, a built-in: as given
            setattr(args, k, os.path.join(os.getcwd(), path))
    unused = {"eta": args.solver != "sde" and f"it is the sde solver's noise, and --solver is {args.solver}",
              "negative_prompt": args.guidance_scale == 1 and "it is CFG's, and --guidance_scale is 1 (no CFG)",
              "train_guided": args.guidance_scale == 1 and "there is no guided velocity at --guidance_scale 1"}
    if args.eval_only:  # the evaluation samples with Euler (--eval_num_steps), eager, and trains nothing
        unused.update(dict.fromkeys(TRAINING_ONLY, "--eval_only trains nothing"), eta="--eval_only samples with Euler",
                      solver="--eval_only samples with Euler", num_steps="--eval_only samples --eval_num_steps steps",
                      compile="--eval_only runs eager", compile_budget="--eval_only runs eager",
                      prompts=bool(args.eval_prompts) and "--eval_only evaluates --eval_prompts and trains nothing")
    elif args.profile:  # a few timed epochs (start_run)
        unused.update(dict.fromkeys(EVALUATION + ("num_epochs", "eval_every", "save_every", "checkpoints_total_limit"),
                                    "--profile times 3 epochs, without evaluations or checkpoints"))
    elif not args.eval_every:
        unused.update(dict.fromkeys(EVALUATION, "--eval_every is 0: the run never evaluates"))
    unused.update(embedded_guidance_scale=model_family(args.model) != "flux" and "it is an input of FLUX.1-dev only",
                  offload_text_encoders=not torch.cuda.is_available() and "without a GPU they are on the CPU anyway")
    for flag in [k for k, why in unused.items() if why and given.get(k, False) is not False]:  # given, yet idle
        print0(f"warning: --{flag} does nothing here: {unused[flag]}")
    return args


# the flags that only evaluation reads: given to a run that never evaluates, each gets a warning line (parse_args)
EVALUATION = ("eval_prompts", "eval_reward", "eval_num_steps", "eval_images_per_prompt", "eval_max_prompts")
# the flags that only training reads: given with --eval_only, each gets a warning line (parse_args)
TRAINING_ONLY = ("group_size", "num_groups", "beta", "kl_coef", "adv_clip", "global_std", "timestep_fraction",
                 "old_flat", "old_rate", "old_max", "ema_max_decay", "learning_rate", "adam_beta1", "adam_beta2",
                 "adam_weight_decay", "adam_epsilon", "max_grad_norm", "train_batch_size", "steps_per_epoch",
                 "num_epochs", "rank", "lora_alpha", "lora_targets", "train_guided", "eval_every", "save_every",
                 "checkpoints_total_limit", "max_nonfinite_steps", "wandb", "wandb_project", "wandb_run_name",
                 "gradient_checkpointing", "grad_sync", "profile")


def same_value(key, saved, now):
    """Whether a flag's saved value is the one given now: for a path flag, the same file however spelled (a run saved
    before paths were saved absolute holds them relative to the folder it started in); for a reward spec, the same
    rewards and weights ("color" is "color:1")."""
    paths = key in PATH_FLAGS and all(isinstance(v, str) and v for v in (saved, now))
    return saved == now or paths and os.path.realpath(os.path.expanduser(saved)) == os.path.realpath(
        os.path.expanduser(now)) or key in ("reward", "eval_reward") and reward_terms(saved) == reward_terms(now)


def reward_terms(spec):
    """A reward spec's (name, weight) pairs, what it means: "color" and "color:1" are one spec. The text itself where
    it does not parse (a reward of another script, not registered here)."""
    try:
        return rewards.parse_reward_spec(spec)
    except rewards.RewardError:
        return spec


# other trainers' names for our flags: what a user means by them is not the nearest spelling (--lr is not --lora)
FLAG_ALIASES = {"--lr": "--learning_rate", "--batch_size": "--train_batch_size", "--epochs": "--num_epochs",
                "--steps": "--num_steps", "--cfg": "--guidance_scale"}


def _flag_error(flags, message):
    """argparse's errors as one line: an unknown flag (no abbreviations) with the closest real one."""
    unknown = re.match(r"unrecognized arguments: (-*[^\s=]+)", message)
    said = f"unknown flag {unknown[1]}" + _closest(unknown[1], flags, FLAG_ALIASES) if unknown else message
    raise UserError(f"{said}; see --help")


def _closest(name, choices, aliases=None):
    name = name.lower()  # COLOR: color, --LR: --learning_rate
    near = [aliases[name]] if name in (aliases or {}) else difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def resumed(args, given):
    """--resume_from continues a run as configured: its config.json (of --output_dir for latest, else of the
    checkpoint's run) under the flags given now, which may change only RESUME_MAY_CHANGE. Without one the flags given
    are the configuration, and --init_lora with a checkpoint named is refused (its weights would replace the init)."""
    latest = args.resume_from == "latest"
    if not latest and not os.path.isfile(os.path.join(args.resume_from, "training_state.pt")):  # before the model
        folder = next((f for f in (args.resume_from, os.path.dirname(os.path.normpath(args.resume_from)))
                       if checkpoints(f) or os.path.isfile(os.path.join(f, "config.json"))), None)
        if folder:  # a run's folder, or its checkpoints/
            raise UserError(f"--resume_from {args.resume_from} is not a checkpoint of the run in {folder}; continue "
                            f"that run with --resume_from latest --output_dir {folder}")
    run = args.output_dir if latest else run_of(args.resume_from) or os.devnull  # outside a run's folder: no config
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path) or previous_run(run).startswith("files"):  # none, or another program's config.json
        if args.init_lora and not latest:
            raise UserError(f"--init_lora with --resume_from {args.resume_from}: the checkpoint's weights replace the "
                            "init; drop --init_lora")
        if not latest or checkpoints(args.output_dir):  # a checkpoint to resume, but no record of its flags
            print0(f"warning: --resume_from {args.resume_from}: no config.json of its run, so the flags given now are "
                   f"its configuration; the checkpoint checks only {', '.join('--' + k for k in RESUME_KEYS)}")
        return args
    kinds = {f.name: f.type for f in dataclasses.fields(Args)}
    try:
        saved = json.loads(read_text(path))  # null: a value resolved away (another family's flag): the default applies
        saved = {k: v for k, v in saved.items() if k in kinds and v is not None and k != "lora"}  # lora: --eval_only's
        wrong = [k for k, v in saved.items() if type(v) is not kinds[k] and not (kinds[k] is float and type(v) is int)]
        if wrong:
            raise TypeError(f"{wrong[0]} is {saved[wrong[0]]!r}, not {kinds[wrong[0]].__name__}")
        saved = Args(**saved)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"--resume_from {args.resume_from}: {path} is unreadable ({type(e).__name__}: {e}); restore "
                        "it, or move it away and give every flag of the run") from None
    if saved.profile:  # a --profile run's record, not a run to continue: the flags given are the configuration
        if latest and not args.profile and not args.overwrite:  # (on a CPU the default --model would say "no GPU")
            raise UserError(f"--resume_from latest: {run} holds a profile (profile.json), which no run continues; "
                            "train in another --output_dir, or pass --overwrite to replace the profile")
        return args
    given = {k: v for k, v in given.items() if not same_value(k, getattr(saved, k), v)}  # a path spelled anew too
    fixed = [k for k in given if k not in RESUME_MAY_CHANGE]
    if fixed:
        may = ", ".join("--" + k for k in RESUME_MAY_CHANGE)
        raise UserError(f"--{fixed[0]} {given[fixed[0]]!r}: the run in {run} has {getattr(saved, fixed[0])!r}, which a "
                        f"resume cannot change; it may change {may}. Start a new run in another --output_dir for more")
    once = {k: getattr(args, k) for k in ("output_dir", "overwrite", "profile", "eval_only")}  # this call's, not saved
    return dataclasses.replace(saved, **(given | once))


# validate's rules, as data: the range of each number flag (BOUNDS, with a note NOTES adds) and the choices of a few
RANGES = {"positive": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, ">= 2": lambda v: v >= 2,
          "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1]": lambda v: 0 < v <= 1}
BOUNDS = {**dict.fromkeys(["learning_rate", "num_groups", "num_steps", "train_batch_size",
                           "sample_batch_size", "num_epochs", "rank", "resolution", "steps_per_epoch", "adv_clip",
                           "save_every", "eval_num_steps", "max_sequence_length", "lora_alpha", "max_grad_norm",
                           "max_nonfinite_steps", "reward_timeout", "adam_epsilon"], "positive"),
          **dict.fromkeys(["eval_every", "eval_images_per_prompt", "eval_max_prompts", "old_flat", "old_rate", "eta",
                           "adam_weight_decay", "checkpoints_total_limit", "compile_budget", "kl_coef"], ">= 0"),
          **dict.fromkeys(["adam_beta1", "adam_beta2", "old_max", "ema_max_decay"], "in [0, 1)"),
          "beta": "in (0, 1]", "timestep_fraction": "in (0, 1]", "guidance_scale": ">= 1", "group_size": ">= 2"}
NOTES = {"checkpoints_total_limit": "0 keeps every checkpoint", "adam_epsilon": "lora_A's first gradients are 0: 0/0",
         "guidance_scale": "1 = no classifier-free guidance",
         "beta": "the paper uses 1.0, or 0.1 for OCR and multi-reward; beta > 1 gives v_old a negative weight in v+",
         "timestep_fraction": "official: 0.99, 9 of 10 rollout sigmas",
         "group_size": "advantages compare the images of a prompt: alone, an image's is 0 and nothing trains"}
CHOICES = {"solver": SOLVERS, "grad_sync": ("step", "micro_step"), "mixed_precision": ("auto", "bf16", "fp16", "no"),
           "reward_precision": ("fp32", "bf16")}


def validate(args, world_size):
    """Fail fast, before any model loads, on values that would crash or silently misbehave later."""
    for f in dataclasses.fields(Args):  # NaN passes every range check, so finiteness comes first
        if f.type is float and not math.isfinite(getattr(args, f.name)):
            raise UserError(f"--{f.name} must be a finite number, got {getattr(args, f.name)}")
    for name, bound in BOUNDS.items():  # a training flag with --eval_only is idle (parse_args warns), not wrong
        if not RANGES[bound](getattr(args, name)) and not (args.eval_only and name in TRAINING_ONLY):
            note = f" ({NOTES[name]})" if name in NOTES else ""
            raise UserError(f"--{name} must be {bound}, got {getattr(args, name)}{note}")
    for name, choices in CHOICES.items():
        if getattr(args, name) not in choices:
            raise UserError(f"unknown --{name} {getattr(args, name)!r}; choose from {', '.join(choices)}"
                            + _closest(getattr(args, name), choices))
    most = family_named(model_family(args.model)).max_text  # as each family's pipeline allows
    if args.max_sequence_length > most:
        raise UserError(f"--max_sequence_length {args.max_sequence_length} is past this model's text encoder maximum "
                        f"({most} tokens, as its diffusers pipeline allows); pass at most {most}")
    if args.resolution % 16:
        near = sorted({max(16, args.resolution // 16 * 16), args.resolution // 16 * 16 + 16})
        raise UserError(f"--resolution must be a multiple of 16 (VAE x8, patch 2), got {args.resolution}; "
                        f"try {' or '.join(map(str, near))}")
    if args.fsdp and world_size < 2:
        raise UserError("--fsdp shards the model over ranks: launch it with torchrun --nproc_per_node N, N > 1, or "
                        "pass --no-fsdp (a --fsdp run's checkpoints resume either way)")
    if args.lora and not args.eval_only:  # it would go unused without a word
        raise UserError("--lora is the LoRA --eval_only evaluates; to start training from a LoRA use --init_lora")
    if args.init_lora and args.eval_only:
        raise UserError("--init_lora starts a training run; to evaluate a LoRA use --lora with --eval_only")
    if args.eval_reward and any(w != 1 for _, w in rewards.parse_reward_spec(args.eval_reward)):
        raise UserError(f"--eval_reward {args.eval_reward}: a weight does nothing there (each reward is logged on its "
                        f"own); give the names: --eval_reward {','.join(rewards.reward_names(args.eval_reward))}")
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise UserError(f"--seed must fit in 64 bits, got {args.seed}")
    layers = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    whole = args.lora_targets in ("official", "official+proj_out")
    if not layers or not whole and any("official" in t for t in layers):
        raise UserError(f"--lora_targets {args.lora_targets!r} names no layer list; give official, official+proj_out "
                        "(whole values) or a comma list of layers")
    total = args.num_groups * args.group_size
    unit = world_size * math.lcm(args.train_batch_size * args.steps_per_epoch, args.sample_batch_size)
    if not args.eval_only and total % unit:
        # g * group_size is a multiple of unit exactly when g is a multiple of every = unit / gcd(unit, group_size):
        # the nearest two valid g by arithmetic, not a search (a search over 1..unit hangs for --sample_batch_size 1e12)
        every = unit // math.gcd(unit, args.group_size)
        low = max(every, args.num_groups // every * every)  # the nearest valid g below, or the smallest one
        lower = [f"--{k}" for k in ("steps_per_epoch", "train_batch_size", "sample_batch_size") if getattr(args, k) > 1]
        other = (f"lower {' or '.join(lower)}, or " if lower else "") + "change --group_size" + (
            f" (or --num_groups {every}: {every / args.num_groups:.3g}x the images)" if every <= 10 * args.num_groups
            else "")
        raise UserError(
            f"num_groups x group_size = {args.num_groups} x {args.group_size} = {total} images per epoch must split "
            f"evenly into {world_size} rank(s) x lcm(train_batch_size x steps_per_epoch, sample_batch_size) = "
            f"{world_size} x lcm({args.train_batch_size} x {args.steps_per_epoch}, {args.sample_batch_size}) = {unit}; "
            + (f"nearest valid: --num_groups {low}" + (f" or {low + every}" if low < args.num_groups else "")
               if every <= 4 * args.num_groups else other))


# --------------------------------------------------------------------------- the built-in models
# Random-weight pipelines built in code, no download. "tiny*": CPU tests and demos (their decoder fitted so that
# colours are reachable). The others: the published transformers and VAEs at full size (the transformer/ and vae/
# config.json of stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev, Qwen/Qwen-Image) with
# one-layer text encoders of the real widths, for GPU profiling ("meta" builds shapes only). text: (width, layers,
# heads[, feed-forward width]) per text encoder; Qwen-Image's is a Qwen2.5-VL config (qwen_text, qwen_vision).
_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)
_SCHEDULER = {"sd3": dict(shift=3.0),
              "flux": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                           base_image_seq_len=256, max_image_seq_len=4096),
              "qwenimage": dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                time_shift_type="exponential")}
BUILTIN = {
    "tiny": dict(family="sd3", transformer=dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16), text=((32, 2, 4), (32, 2, 4), (32, 2, 4)),
        vae=dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4)),
    "tiny-flux": dict(family="flux", transformer=dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
        text=((32, 2, 4), (32, 2, 4)), vae=dict(block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4)),
    "tiny-qwenimage": dict(family="qwenimage", transformer=dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4)),
        qwen_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, mrope_section=[1, 1, 2]),
        qwen_vision=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2),
        vae=dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)),
    "sd3.5-medium": dict(family="sd3", transformer=dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        text=((768, 1, 12), (1280, 1, 20), (4096, 1, 64)),
        vae=dict(block_out_channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2)),
    "flux.1-dev": dict(family="flux", transformer=dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), text=((768, 1, 12), (4096, 1, 64, 10240)),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)),
    "qwen-image": dict(family="qwenimage", transformer=dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
        vae=dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
        qwen_vision=dict(depth=1, hidden_size=1280, intermediate_size=3420, num_heads=16),
        qwen_text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=1, num_attention_heads=28,
                       num_key_value_heads=4, mrope_section=[16, 24, 24])),
}
BUILTIN_NAMES = [n if n.startswith("tiny") else f"random:{n}" for n in BUILTIN]  # as --model names them
TINY_WORDS = ("a an the photo image of picture red green blue yellow orange purple pink brown black white gray cyan "
              "and with on in cat dog car tree house sky sign says two three four")
# QwenImagePipeline wraps each prompt in a fixed system template and drops its first 34 tokens: words, "\n" and
# punctuation are one token each in this vocabulary, which makes that prefix exactly 34 tokens, as with Qwen's BPE
QWEN_WORDS = ("system Describe the image by detailing color shape size texture quantity text spatial relationships "
              "of objects background user assistant " + TINY_WORDS)


def word_tokenizer(specials, words, max_length, split_punctuation=False, **tokens):
    """A word-level tokenizer built in memory (no download): the special tokens, then the sorted words; unknown
    words map to <unk>. split_punctuation: "\\n" and punctuation are tokens of their own (Qwen's template)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = [*specials, *sorted(set(words.split()))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split(
        Regex(r"\n|[^\w\s]"), behavior="isolated")]) if split_punctuation else pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", model_max_length=max_length, **tokens)


def builtin_pipeline(name, device="cpu"):
    """The pipeline of BUILTIN[name] with random weights (torch.manual_seed(0): the same model every time), built on
    `device` ("meta": shapes only) in eval mode, with its family's scheduler config; a tiny one's decoder fitted."""
    import diffusers
    import transformers as tf
    cfg, device, family = BUILTIN[name], torch.device(device), family_named(BUILTIN[name]["family"])
    sd3, text, transformer = family.name == "sd3", cfg.get("text"), getattr(diffusers, family.transformer)
    specials = ["<pad>", "<|startoftext|>", "<|endoftext|>", "</s>", "<unk>"]
    clip_tok = word_tokenizer(specials, TINY_WORDS + " text", 77, bos_token="<|startoftext|>",
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    t5_tok = word_tokenizer(specials, TINY_WORDS + " text", 256 if sd3 else 512, eos_token="</s>", pad_token="<pad>")
    qwen_tok = None if family.name != "qwenimage" else word_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n", ",", ":"], QWEN_WORDS, 2048, True,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])

    def clip(width, layers, heads):  # CLIP-L and CLIP-G with projections (SD3), CLIP-L (FLUX.1)
        return (tf.CLIPTextModelWithProjection if sd3 else tf.CLIPTextModel)(tf.CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=width, intermediate_size=(2 if sd3 else 4) * width,
            projection_dim=width, num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
            bos_token_id=1, eos_token_id=2, pad_token_id=2))

    def t5(width, layers, heads, ff=None):  # FLUX.1's is gated
        return tf.T5EncoderModel(tf.T5Config(
            vocab_size=len(clip_tok), d_model=width, d_kv=width // heads, d_ff=ff or 2 * width, num_layers=layers,
            num_heads=heads, pad_token_id=0, eos_token_id=3, **({} if sd3 else {"feed_forward_proj": "gated-gelu"})))

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), device:
        torch.manual_seed(0)  # parts are built in the order the weights were first drawn in
        if family.name == "qwenimage":
            parts = dict(tokenizer=qwen_tok, transformer=transformer(**cfg["transformer"]),
                         vae=diffusers.AutoencoderKLQwenImage(z_dim=16, **cfg["vae"]))
        elif sd3:
            parts = dict(text_encoder=clip(*text[0]), text_encoder_2=clip(*text[1]), text_encoder_3=t5(*text[2]),
                         tokenizer=clip_tok, tokenizer_2=clip_tok, tokenizer_3=t5_tok, vae=diffusers.AutoencoderKL(
                             shift_factor=0.0609, scaling_factor=1.5305, **_VAE, **cfg["vae"]))
        else:
            parts = dict(text_encoder=clip(*text[0]), text_encoder_2=t5(*text[1]), tokenizer=clip_tok,
                         tokenizer_2=t5_tok, vae=diffusers.AutoencoderKL(
                             latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611, **_VAE, **cfg["vae"]))
        if name.startswith("tiny"):
            fitted_decoder(parts["vae"])
        if family.name != "qwenimage":
            parts["transformer"] = transformer(**cfg["transformer"])
        else:  # Qwen2.5-VL: its text model with multimodal RoPE sections, and a vision tower
            qwen = dict(cfg["qwen_text"])
            rope = dict(rope_type="default", rope_theta=1e6, mrope_section=qwen.pop("mrope_section"))
            parts["text_encoder"] = tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(
                text_config=dict(vocab_size=len(qwen_tok), rope_parameters=rope, **qwen), vocab_size=len(qwen_tok),
                pad_token_id=0, vision_config=dict(out_hidden_size=qwen["hidden_size"], fullatt_block_indexes=[0],
                                                   **cfg["qwen_vision"])))
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**_SCHEDULER[family.name])
        pipe = getattr(diffusers, family.pipeline)(scheduler=scheduler, **parts)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()  # constructors build modules in train mode (T5 dropout 0.1)
    return pipe


def fitted_decoder(vae, steps=150):
    """Fit the tiny decoder (fit_decoder, up to a minute on a busy CPU) once per machine, cached in $NFT_CACHE (default
    ~/.cache/diffusion-nft; unwritable: refit). The key hashes the initial weights, the fit's code, the library
    versions and the thread count (the fit's float sums depend on it), so a cached decoder is bit for bit what the fit
    would return here."""
    import diffusers
    # what the fit trains: the decoder, and Qwen-Image's post_quant_conv (a random 1x1 conv mixing the channels)
    fitted = vae.decoder if vae.post_quant_conv is None else torch.nn.ModuleDict(
        dict(decoder=vae.decoder, post_quant_conv=vae.post_quant_conv))
    key = (steps, torch.__version__, diffusers.__version__, torch.get_num_threads(), inspect.getsource(fit_decoder))
    h = hashlib.sha256(repr(key).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    home = os.path.expanduser("~")  # "~" itself where neither HOME nor a passwd entry names one: no cache
    folder = os.environ.get("NFT_CACHE") or (os.path.join(home, ".cache", "diffusion-nft") if home != "~" else "")
    path = os.path.join(folder, f"tiny_decoder_{h.hexdigest()[:16]}.pt")
    if not folder:
        return fit_decoder(vae, steps)
    with contextlib.suppress(Exception):  # not cached yet, or a damaged file: refit
        fitted.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        vae.requires_grad_(False)
        return
    print0("fitting the tiny VAE decoder (once per machine, then cached)")
    fit_decoder(vae, steps)
    tmp = f"{path}.{os.getpid()}.tmp"  # written, then renamed: parallel runs never read half a file
    try:
        os.makedirs(folder, exist_ok=True)
        torch.save(fitted.state_dict(), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError):  # unwritable or full (torch.save says so with a RuntimeError): refit next time
        with contextlib.suppress(OSError):
            os.remove(tmp)


def fit_decoder(vae, steps=150):
    """A random decoder squashes every latent to grey, so no colour is reachable and the demo cannot learn. Fit it
    briefly so the first three latent channels map smoothly onto RGB, pixel = 0.5 + 0.3*z, through what the family's
    decode hands the VAE. Qwen-Image's decode clamps to [-1, 1], which stops the gradient of every saturated pixel of
    a random decoder, so its fit runs the decoder unclamped; its tiny video VAE fits less well (one output channel
    stays nearly flat: green, for tiny-qwenimage's init)."""
    qwen = type(vae).__name__ == "AutoencoderKLQwenImage"
    params = list(vae.decoder.parameters()) + (list(vae.post_quant_conv.parameters()) if qwen else [])
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        z = torch.randn(16, vae.config.z_dim if qwen else vae.config.latent_channels, 2, 2, generator=g)
        z = torch.nn.functional.interpolate(z, size=4, mode="bilinear", align_corners=False) * 1.5
        target = (0.5 + 0.3 * z[:, :3]).clamp(0, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)
        images = (vae.decoder(vae.post_quant_conv(qwenimage_latent(vae, z)))[:, :, 0] if qwen else
                  vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample)
        loss = ((images / 2 + 0.5 - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.requires_grad_(False)


# --------------------------------------------------------------------------- main
def _close_bars():
    """Close progress bars an error left open, so the error line starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def _stop(signum, frame):
    """Ctrl-C or SIGTERM (sent before preemption; torchrun passes it to every rank): rank 0 stops at once; another
    rank goes on, as rank 0 may be waiting for it in a collective, and ends when rank 0 has gone (main), or, where
    rank 0 got no signal, all ranks stop at the end of the epoch (end_epoch)."""
    _STOPS.append(signum)
    if int(os.environ.get("RANK", 0)) == 0:
        raise KeyboardInterrupt(signum)


def interrupted(args, signum, finished=False):
    """After Ctrl-C or SIGTERM: rank 0 writes the last completed epoch not yet in a checkpoint (the copy end_epoch
    keeps) and says how to continue, or, `finished` (the ranks' goodbye was cut short), that nothing is left to do.
    Returns the exit code: 130 for SIGINT, 143 for SIGTERM, 141 for SIGPIPE."""
    for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the save short
        signal.signal(s, signal.SIG_IGN)
    _close_bars()
    saved, where, said = [], "the last completed epoch is in", "no epoch was completed: nothing to save"
    if args and args.eval_only:
        said = "the evaluation stopped; it writes its results when it completes"
    if finished:
        said = f"the {'evaluation' if args.eval_only else 'run'} had completed; its outputs are in {args.output_dir}"
    elif args and not args.eval_only and int(os.environ.get("RANK", 0)) == 0:
        try:
            saved = [_LAST[0]()] if _LAST else checkpoints(args.output_dir)[-1:]
        except UserError as e:  # the save failed: the newest checkpoint on disk is where to continue from
            print(f"error: {e}", file=sys.stderr)
            saved = checkpoints(args.output_dir)[-1:]
            where = "the last completed epoch could not be saved; the newest checkpoint is"
            said = "the last completed epoch could not be saved, and there is no checkpoint yet"
    if saved:  # the run's config.json supplies every other flag (parse_args)
        launcher = shlex.quote(sys.executable)
        if "RANK" in os.environ:  # torchrun: as many nodes, as many ranks on each
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
            nodes = int(os.environ["WORLD_SIZE"]) // local
            one_node = f"--nproc_per_node={local} --standalone"  # a free port, as the README launches one node
            launcher = "torchrun " + (f"--nnodes={nodes} --nproc_per_node={local}" if nodes > 1 else one_node)
        said = f"{where} {saved[0]}; continue with {launcher} " + shlex.join(  # from any working folder
            [os.path.abspath(sys.argv[0]), "--resume_from", "latest", "--output_dir", os.path.abspath(args.output_dir)])
    print0(f"\n{signal.Signals(signum).name}: {said}", file=sys.stderr)
    return 128 + signum


def main(argv=None):
    args = None
    for name in ("transformers", "diffusers"):  # the log is what this script says (set here, not by `import nft`)
        if f"{name.upper()}_VERBOSITY" not in os.environ and name in sys.modules:  # imported already: it read the
            sys.modules[name].utils.logging.set_verbosity_error()  # variable then, so it is told directly
        os.environ.setdefault(f"{name.upper()}_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers, finished = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}, False
    try:
        args = parse_args(argv)
        eval_only(args) if args.eval_only else train(args)
        finished = True
        if dist.is_initialized():  # every rank is done: the ranks' goodbye
            dist.barrier()
            dist.destroy_process_group()
    except KeyboardInterrupt as e:  # no traceback: what is safe on disk and how to go on
        sys.exit(interrupted(args, e.args[0] if e.args else signal.SIGINT, finished))
    except BrokenPipeError:  # what reads the output is gone (`| head`): stopped as by a signal, the epoch saved
        import select
        for stream in (sys.stdout, sys.stderr):  # stdout, or both (2>&1): nothing more is written to a closed pipe
            with contextlib.suppress(OSError, ValueError):  # (poll reports POLLERR for a pipe without its reader)
                poller = select.poll()
                poller.register(stream.fileno(), 0)
                if poller.poll(0):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        sys.exit(interrupted(args, signal.SIGPIPE, finished) if args else 128 + signal.SIGPIPE)
    except Exception as e:
        if _STOPS:  # a collective that failed as a rank left after the signal: said by rank 0, no traceback
            sys.exit(interrupted(args, _STOPS[0], finished))
        peer_gone = dist.is_initialized() and dist.get_world_size() > 1 and any(  # raised in a collective: a rank
            "torch/distributed/" in frame.filename for frame in traceback.extract_tb(e.__traceback__)[-4:])  # left
        if not isinstance(e, (UserError, rewards.RewardError)) and not peer_gone:
            raise
        _close_bars()
        rank = int(os.environ.get("RANK", 0)) if "MASTER_ADDR" in os.environ else 0  # (a stale RANK: it is alone)
        said = str(e)
        if peer_gone:  # another rank stopped (its own line says why) or its connection broke; rank 0 says so
            first = (said.strip().splitlines() or [""])[0]
            said = (f"a torch.distributed collective failed ({type(e).__name__}: {first}): another rank stopped or "
                    "lost its connection; its own line above, or torchrun's summary, says which")
        if rank == 0 or isinstance(e, rewards.RewardFailed):  # rank 0 says it (under torchrun every rank stops
            print(f"{f'[rank {rank}] ' if rank else ''}error: {said}", file=sys.stderr, flush=True)  # alike), and a
        sys.exit(2)  # rank whose reward failed on its own images
    finally:
        _LAST.clear()
        _STOPS.clear()
        ended = sys.exc_info()[1]  # as the script: a signal while the interpreter exits (a second or so of cleanup)
        code = ended.code if isinstance(ended, SystemExit) else int(ended is not None)  # ends it at once, with this
        code = code if isinstance(code, int) else int(code is not None)  # exit code (sys.exit(None): 0, "text": 1)
        for s, handler in handlers.items():  # imported (tests, your script): the caller's handlers back
            signal.signal(s, (lambda *_: os._exit(code)) if __name__ == "__main__" else handler)
        while _HELD:  # the run's lock (the OS drops it anyway when the process ends) and its reward queue
            _HELD.pop()()


if __name__ == "__main__":
    for s in (signal.SIGINT, signal.SIGTERM):  # Python's exit resets its handlers to the default after the atexit
        atexit.register(signal.signal, s, signal.SIG_IGN)  # calls: ignored from then on, the exit code is kept
    main()
