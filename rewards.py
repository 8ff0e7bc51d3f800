"""Rewards for DiffusionNFT: every reward of the paper on maintained libraries, plus prompt sets.

Each entry of `REWARDS` is a factory `make(device) -> fn`, and
`fn(images, prompts, metadata) -> (scores, components)` with images a float tensor in [0, 1],
NCHW, on any device; scores a float CPU tensor of shape (N,) (NaN: an image it cannot score); components a
dict of (N,) CPU tensors for logging (may be empty). Formulas: each scorer's docstring (`*_fn`, GenEvalScorer);
GenEval rules: github.com/djghosh13/geneval.

Differences from the official stack (Flow-GRPO / DiffusionNFT reward servers), on purpose:
1. GenEval runs on transformers' Mask2Former + CLIP instead of mmdetection 2.x + open_clip; the
   mmdetection instance post-process is redone from the raw logits (`mask2former_instances`).
2. GenEval's partial score appends only 0.0 when a position check fails (the official server
   appends 0.0 and then 1.0).
3. OCR runs rapidocr_onnxruntime (PP-OCRv4 ONNX, in the wheel, Chinese-English recognizer) instead of
   PaddleOCR 2.9's English model; no angle classifier and the 0.5 line-score cut, as the official call.
4. ImageReward scores each (prompt, image) pair, not the N x N matrix's diagonal.
5. Prompt sets are generated here from a seed; the official files still work through --prompts.
6. Scorers run in fp32 by default as officially (make_reward's precision="bf16" for speed).
7. HPSv2.1 and ImageReward run their official checkpoints on transformers' CLIP and BLIP modules instead of
   open_clip and the image-reward package, with the same scores (.ci/reward_reference.py measures it).
"""
import base64
import concurrent.futures
import contextlib
import copy
import difflib
import html
import http.client
import io
import json
import math
import os
import pickle
import re
import site
import socket
import sysconfig
import threading
import time
import traceback
import urllib.parse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class RewardError(Exception):
    """A one-line, user-facing problem with a reward (nft.py prints it and exits)."""


class RewardFailed(RewardError):
    """A reward call that raised, broke the contract or hung (call_reward): on this rank's images, maybe on no other
    rank's, so every rank that meets one says it."""


def load_weights(path, key=None):
    """A downloaded checkpoint's tensors (its dict's `key`, if given): torch.load(weights_only=True), so a file that
    holds code is never unpickled; such a file, a truncated one or one of another structure is a RewardError that
    names it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise RewardError(f"{path} is not a weights-only checkpoint ({reason}); it is not unpickled, since that could "
                          "run code: delete it and download it again") from None
    state = state.get(key) if key and isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(t) for t in state.values()):
        raise RewardError(f"{path} is not the checkpoint this reward reads (no dict of tensors"
                          f"{f' under {key!r}' if key else ''}); delete it and download it again")
    return state


def load_into(model, weights, path):
    """model.load_state_dict(weights), strictly; weights of another model are a RewardError naming the file."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # missing or unexpected keys, other shapes
        said = " ".join(str(e).split())[:300]
        raise RewardError(f"{path} does not fit the reward's model ({said}); delete it and download it "
                          "again") from None
    return model


# ---- shared helpers ----

def to_uint8(images):
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8 numpy, rounding like the official code."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _require(module, pip_name):
    """Import an optional package or say exactly what to install."""
    try:
        return __import__(module)
    except ImportError:
        raise RewardError(f"this reward needs the '{pip_name}' package: pip install {pip_name}") from None


def hub_offline():
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, true, on, yes)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "on", "yes")


def hub_download_command(hub_id, filename=None):
    """The exact command that fills the local Hugging Face cache with what a loader reads (`filename`: a file, a
    tuple of files or of patterns such as PROCESSOR_FILES, or None for the whole repository)."""
    files = _files(filename)
    if any("*" in f for f in files):  # the hf CLI takes one pattern per --include
        return " ".join(["hf download", hub_id, *(f"--include '{f}'" for f in files)])
    return " ".join(["hf download", hub_id, *files])


def _files(filename):
    """A loader's hub file argument as a tuple: a file, a tuple of files or patterns, None (the repo: empty)."""
    return (filename,) if isinstance(filename, str) else filename or ()


def hub_cached(hub_id, filename=None):
    """Whether the local Hugging Face cache holds what a loader reads (a file, a tuple of files, None or patterns:
    the repo, whatever part of it is there)."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    files = _files(filename)
    try:
        if files and not any("*" in f for f in files):
            return all(isinstance(try_to_load_from_cache(hub_id, f), str) for f in files)
        snapshot_download(hub_id, local_files_only=True)
        return True
    except Exception:  # not cached (LocalEntryNotFoundError), or an unparsable id
        return False


def check_downloads(*specs, models=()):
    """Offline (HF_HUB_OFFLINE=1): one line with the `hf download` commands of everything the rewards of `specs` read
    from the hub (HUB_FILES) and of the hub `models` that is not cached, before any loads: not one per start."""
    if not hub_offline():  # online, the loaders download what is missing
        return
    missing = {}  # (repo, files) -> what reads it
    for repo in models:
        if not hub_cached(repo):
            missing.setdefault((repo, None), []).append(f"--model {repo}")
    for name in dict.fromkeys(name for spec in specs if spec for name in reward_names(spec)):
        for repo, files in HUB_FILES.get(REWARDS[name], ()):
            if not hub_cached(repo, files):
                missing.setdefault((repo, files), []).append(f"{name}'s model")
    commands = [hub_download_command(repo, files) for repo, files in missing if files is None or (repo, None) not in
                missing]  # a file of a repo that is missing whole comes with it
    if missing:
        users = dict.fromkeys(user for users in missing.values() for user in users)
        raise RewardError(f"the hub is offline (HF_HUB_OFFLINE=1) and {len(commands)} download(s) for "
                          f"{', '.join(users)} are not in the local Hugging Face cache: run `{' && '.join(commands)}` "
                          "where the hub is reachable, or unset HF_HUB_OFFLINE")


def hub_ready(hub_id, filename=None, what="model"):
    """Fail fast, in one line, when a hub repo (or one of its files) is neither in the local cache nor
    downloadable: without this, huggingface_hub retries an unreachable hub for minutes before failing.
    Cached: returns at once, with no network. Offline (HF_HUB_OFFLINE=1): says so. Online: one metadata
    request with a 10 s timeout, no retries, tells an unreachable hub from a missing repo."""
    if hub_cached(hub_id, filename):
        return
    fix = f"download it first with `{hub_download_command(hub_id, filename)}`"
    if hub_offline():
        raise RewardError(f"{what} '{hub_id}' is not in the local Hugging Face cache and the hub is offline "
                          f"(HF_HUB_OFFLINE=1): {fix}, or unset HF_HUB_OFFLINE")
    from huggingface_hub import HfApi
    try:
        HfApi().model_info(hub_id, timeout=10)
    except Exception as e:
        name = type(e).__name__
        if name in ("RepositoryNotFoundError", "HFValidationError"):
            raise RewardError(f"{what} '{hub_id}' does not exist on the Hugging Face hub (or it is private: log in "
                              "with `hf auth login`); check the id") from None
        if name == "GatedRepoError":
            raise RewardError(f"{what} '{hub_id}' is gated: accept its terms on https://huggingface.co/{hub_id} "
                              "and log in with `hf auth login`") from None
        raise RewardError(f"cannot reach the Hugging Face hub to get {what} '{hub_id}' ({name}): {fix} "
                          "where the hub is reachable, or set HF_ENDPOINT to a mirror") from None


def _from_hub(hub_id, load, *args, filename=None, **kwargs):
    """Call a from_pretrained-style loader; a missing download becomes one line naming the hub id. `filename`
    (default: the loader's first argument) names what hub_ready checks: a file, a tuple of files or patterns, None =
    all."""
    filename = filename or (args[0] if args else None)
    hub_ready(hub_id, filename, "reward model")
    try:
        return load(hub_id, *args, **kwargs)
    except OSError as e:  # a damaged cache, or a gated/removed repo
        raise RewardError(f"could not load '{hub_id}' from the Hugging Face hub ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200]}); download it again with "
                          f"`{hub_download_command(hub_id, filename)}`") from None


def reward_autocast(device, precision="fp32"):
    """The precision every scorer runs in: fp32 (autocast off, even inside a caller's bf16 region: near a
    threshold such as GenEval counting's 0.9 bf16 noise flips rewards) or bf16 autocast on `device`."""
    if precision not in ("fp32", "bf16"):
        raise RewardError(f"reward precision must be fp32 or bf16, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _size(size, key):
    """Read a field of an image processor's size (a dict in old transformers, a SizeDict in new)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def clip_pixels(images, image_processor):
    """CLIP preprocessing on tensors: resize the short side (bicubic, antialiased), center crop,
    normalize with the processor's mean/std. Same steps as CLIPImageProcessor without a PIL round
    trip, so it batches on the GPU. images: (N, 3, H, W) in [0, 1] -> (N, 3, S, S)."""
    short = _size(image_processor.size, "shortest_edge")
    crop_h = _size(image_processor.crop_size, "height")
    crop_w = _size(image_processor.crop_size, "width")
    h, w = images.shape[-2:]
    scale = short / min(h, w)
    new_h, new_w = max(crop_h, round(h * scale)), max(crop_w, round(w * scale))
    x = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    x = x[..., top:top + crop_h, left:left + crop_w].clamp(0, 1)
    mean = torch.tensor(image_processor.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _cpu(x):
    return torch.as_tensor(x, dtype=torch.float32).detach().float().cpu()


# ---- jpeg (compressibility) ----

def jpeg_kb(image_uint8):
    """Size in kB (1000 bytes) of one (H, W, 3) uint8 image saved as JPEG at quality 95."""
    buffer = io.BytesIO()
    Image.fromarray(image_uint8).save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


def make_jpeg(device):
    """reward = -(JPEG size at quality 95 in kB) / 500: smaller files score higher."""
    def fn(images, prompts, metadata):
        return _cpu([-jpeg_kb(im) / 500 for im in to_uint8(images)]), {}
    return fn


# ---- color (CPU demo reward) ----

COLOR_RGB = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.5), "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5),
}


def color_target(prompt):
    """RGB target of the first color word of COLOR_RGB found in the prompt (whole words)."""
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in COLOR_RGB:
            return COLOR_RGB[word]
    raise RewardError(f"the color reward needs a color word ({', '.join(COLOR_RGB)}) in every prompt; got {prompt!r}")


def color_reward(images, prompts):
    """reward = 1 - mean over R, G, B of |mean image color - target color|, in [0, 1]."""
    targets = torch.tensor([color_target(p) for p in prompts], dtype=torch.float32)
    mean_rgb = images.detach().float().mean(dim=(2, 3)).cpu()
    return 1 - (mean_rgb - targets).abs().mean(dim=1)


def make_color(device):
    """A tiny prompt-conditional reward for CPU demos: does the image have the prompt's color?"""
    return lambda images, prompts, metadata: (color_reward(images, prompts), {})


# ---- ocr ----

def ocr_target(prompt):
    """The text the image should show: what sits inside the prompt's first pair of double quotes."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():  # empty quotes: every image would score 0, a group that teaches nothing
        raise RewardError(f'the ocr reward needs the target text in straight double quotes (") in the prompt; got '
                          f'{prompt!r}')
    return parts[1]


def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions all cost 1), two-row dynamic program."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_reward_from_text(recognized, target):
    """reward = 1 - d / len(target) on lowercased, space-free strings, where d = 0 when the target
    is a substring of the recognized text, else min(levenshtein, len(target)). In [0, 1]."""
    recognized = recognized.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        return 0.0
    d = 0 if target in recognized else min(levenshtein(recognized, target), len(target))
    return 1 - d / len(target)


OCR_MIN_SCORE = 0.5  # PaddleOCR's default drop_score, which the official reward leaves as is


def ocr_workers():
    """OCR threads per process: this node's cores shared by its ranks (torchrun's LOCAL_WORLD_SIZE), 8 at most."""
    return max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def make_ocr(device, engine=None, workers=None):
    """OCR reward with rapidocr_onnxruntime on CPU, one image per thread (onnxruntime releases the GIL).
    Set up as the official PaddleOCR call: no angle classifier (use_angle_cls=False there) and lines kept
    when their recognition score is >= 0.5 (PaddleOCR's drop_score; rapidocr's text_score)."""
    if engine is None:
        RapidOCR = _require("rapidocr_onnxruntime", "rapidocr_onnxruntime").RapidOCR
        # one onnxruntime thread per image, the pool's threads the parallelism (its default, every core per session,
        # oversubscribes them)
        engine = RapidOCR(use_cls=False, text_score=OCR_MIN_SCORE, intra_op_num_threads=1)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers or ocr_workers())

    def read(image_uint8):
        # rapidocr treats numpy input as BGR (OpenCV order); our images are RGB.
        result, _ = engine(np.ascontiguousarray(image_uint8[..., ::-1]), use_cls=False)
        return "".join(text for _, text, conf in (result or []) if float(conf) >= OCR_MIN_SCORE)

    def fn(images, prompts, metadata):
        targets = [ocr_target(p) for p in prompts]
        texts = list(pool.map(read, to_uint8(images)))
        return _cpu([ocr_reward_from_text(t, g) for t, g in zip(texts, targets)]), {}
    return fn


# ---- CLIP family: pickscore, clipscore, aesthetic ----

class ClipScorer:
    """Normalized CLIP image/text embeddings for any transformers CLIPModel (tests pass tiny ones).
    Text is truncated at the model's 77 tokens like the official scorers."""

    def __init__(self, model, tokenizer, image_processor, device):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.image_processor, self.device = tokenizer, image_processor, torch.device(device)

    @staticmethod
    def _features(out):
        # transformers 5 returns a model output for get_*_features; older versions a tensor.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_embeds(self, images):
        return self.pixel_embeds(clip_pixels(images.to(self.device), self.image_processor))

    @torch.no_grad()
    def pixel_embeds(self, pixels):
        """Normalized image embeddings of already preprocessed pixels (N, 3, S, S)."""
        emb = self._features(self.model.get_image_features(pixel_values=pixels)).float()
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts):
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77,
                                return_tensors="pt").to(self.device)
        return self.token_embeds(tokens.input_ids, tokens.attention_mask)

    @torch.no_grad()
    def token_embeds(self, input_ids, attention_mask=None):
        """Normalized text embeddings of token ids (N, L)."""
        emb = self._features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float()
        return F.normalize(emb, dim=-1)

    def cosine(self, images, prompts):
        """cos(image_i, text_i) per pair, shape (N,)."""
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


def pickscore_fn(scorer):
    """PickScore / 26 = logit_scale.exp() * cos(image, text) / 26 (Flow-GRPO's scaling: raw PickScore
    is about 20-24, the paper reports it unscaled)."""
    def fn(images, prompts, metadata):
        scale = scorer.model.logit_scale.exp().float()
        return _cpu(scale * scorer.cosine(images, prompts) / 26), {}
    return fn


def clipscore_fn(scorer):
    """CLIPScore = cos(image, text) = CLIP logits / 100."""
    return lambda images, prompts, metadata: (_cpu(scorer.cosine(images, prompts)), {})


def aesthetic_mlp(dim=768):
    """LAION improved aesthetic predictor head; layer indices match sac+logos+ava1-l14-linearMSE.pth."""
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))


def aesthetic_fn(scorer, mlp):
    """aesthetic = MLP(normalized CLIP ViT-L/14 image embedding), about 1..10; ignores the prompt."""
    mlp = mlp.to(scorer.device).eval().requires_grad_(False)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        return _cpu(mlp(scorer.image_embeds(images)).squeeze(-1)), {}
    return fn


def _clip_from_hub(model_id, processor_id, device):
    from transformers import CLIPModel, CLIPProcessor
    processor = _from_hub(processor_id, CLIPProcessor.from_pretrained,
                          filename=None if processor_id == model_id else PROCESSOR_FILES)  # CLIP-H: no weights
    model = _from_hub(model_id, CLIPModel.from_pretrained)
    return ClipScorer(model, processor.tokenizer, processor.image_processor, device)


PICKSCORE_REPO, CLIP_L = "yuvalkirstain/PickScore_v1", "openai/clip-vit-large-patch14"
PROCESSOR_FILES = ("*.json", "*.txt")  # a processor's configs and vocabularies, not its repo's weights (CLIP-H: 16 GB)
CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor; HPSv2.1's tokenizer too


def make_pickscore(device):
    return pickscore_fn(_clip_from_hub(PICKSCORE_REPO, CLIP_H, device))


def make_clipscore(device):
    return clipscore_fn(_clip_from_hub(CLIP_L, CLIP_L, device))


AESTHETIC_REPO, AESTHETIC_FILE = "camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth"


def make_aesthetic(device):
    from huggingface_hub import hf_hub_download
    scorer = _clip_from_hub(CLIP_L, CLIP_L, device)
    return aesthetic_fn(scorer, load_aesthetic_mlp(_from_hub(AESTHETIC_REPO, hf_hub_download, AESTHETIC_FILE)))


def load_aesthetic_mlp(path):
    """The MLP with weights from sac+logos+ava1-l14-linearMSE.pth (keys "layers.<i>.weight")."""
    state = load_weights(path)
    first = state.get("layers.0.weight")
    dim = first.shape[-1] if first is not None and first.dim() else 768  # another file: the strict load says so
    # the checkpoint wraps the Sequential in a module attribute "layers"; ours is the bare Sequential
    return load_into(aesthetic_mlp(dim), {k.removeprefix("layers."): v for k, v in state.items()}, path)


# ---- checkpoints of other code bases on transformers' modules ----

def _renamed(key, names):
    """`key` with its first matching prefix in `names` replaced (None: a key the score does not use)."""
    for old, new in names.items():
        if key == old or key.startswith(old + "."):
            return None if new is None else new + key[len(old):]
    return None


def rename_state_dict(state, names, block):
    """An original checkpoint's state dict in a transformers module's key names: `names` renames key prefixes,
    `block` the names inside each transformer block (after "layers.<i>."). Returns (renamed, unused keys)."""
    out, unused = {}, []
    for key, value in state.items():
        new = _renamed(key, names)
        if new is None:
            unused.append(key)
            continue
        match = re.match(r"(.*\.layers\.\d+\.)(.*)", new)
        if match:
            new = match.group(1) + (_renamed(match.group(2), block) or match.group(2))
        out[new] = value
    return out, unused


# ---- hpsv2 (HPSv2.1: open_clip's ViT-H-14 on transformers' CLIPModel) ----

HPSV2_REPO, HPSV2_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
# open_clip's tokenizer is OpenAI CLIP's BPE; PickScore's processor repo has it in transformers' format
CLIP_TOKENIZER = CLIP_H
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what transformers' tokenizers read
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VIT_H_14 = {"embed_dim": 1024,  # open_clip's model_configs/ViT-H-14.json
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
OPEN_CLIP_NAMES = {  # open_clip CLIP key prefix -> transformers CLIPModel's
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1": "vision_model.embeddings.patch_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre": "vision_model.pre_layrnorm", "visual.transformer.resblocks": "vision_model.encoder.layers",
    "visual.ln_post": "vision_model.post_layernorm", "visual.proj": "visual_projection.weight",
    "token_embedding": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "transformer.resblocks": "text_model.encoder.layers", "ln_final": "text_model.final_layer_norm",
    "text_projection": "text_projection.weight", "logit_scale": "logit_scale"}
OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "attn": "self_attn", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2"}


def open_clip_config(cfg):
    """transformers' CLIPConfig of an open_clip model config (model_configs/<name>.json): exact GELU (open_clip's
    nn.GELU, not QuickGELU), LayerNorm eps 1e-5, the text pooled at the end-of-text token, the vocabulary's last id
    (open_clip pools at the highest id)."""
    from transformers import CLIPConfig
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    text = dict(vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=4 * t["width"],
                num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                max_position_embeddings=t["context_length"], bos_token_id=t["vocab_size"] - 2,
                eos_token_id=t["vocab_size"] - 1, pad_token_id=0)
    vision = dict(hidden_size=v["width"], intermediate_size=int(v.get("mlp_ratio", 4.0) * v["width"]),
                  num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v.get("head_width", 64),
                  image_size=v["image_size"], patch_size=v["patch_size"])
    return CLIPConfig(text_config=dict(text, hidden_act="gelu"), vision_config=dict(vision, hidden_act="gelu"),
                      projection_dim=cfg["embed_dim"])


def hpsv2_state_dict(state):
    """open_clip's CLIP state dict in CLIPModel's names and layout: nn.MultiheadAttention's stacked in_proj (q, k, v)
    split in three, the `x @ proj` matrices transposed to Linear weights. Returns (state dict, unused keys)."""
    out, unused = rename_state_dict(state, OPEN_CLIP_NAMES, OPEN_CLIP_BLOCK)
    for key in [k for k in out if ".in_proj_" in k]:
        head, kind = key.split(".in_proj_")
        for name, part in zip("qkv", out.pop(key).chunk(3)):
            out[f"{head}.{name}_proj.{kind}"] = part
    for key in ("visual_projection.weight", "text_projection.weight"):
        if key in out:  # missing: the strict load says so
            out[key] = out[key].T
    return out, unused


def load_hpsv2(state, cfg=VIT_H_14, device="cpu", path=HPSV2_FILE):
    """CLIPModel with an open_clip checkpoint's weights (every one of its keys used, all of the model's filled)."""
    from transformers import CLIPModel
    with torch.device(device):
        model = CLIPModel(open_clip_config(cfg))
    weights, unused = hpsv2_state_dict(state)
    if unused:  # the original loads strictly too
        raise RewardError(f"the HPSv2 checkpoint has keys that open_clip's CLIP has not ({', '.join(unused[:3])}); "
                          f"is it {HPSV2_FILE}?")
    return load_into(model, weights, path).eval()


def normalize(x, mean=OPENAI_MEAN, std=OPENAI_STD):
    """(x - mean) / std per channel of (N, 3, H, W), as torchvision's Normalize (OpenAI CLIP's mean and std)."""
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


def hps_pixels(images, size):
    """HPSv2's evaluation transform (open_clip's ResizeMaxSize on tensors) on the float images, as the official
    scorer applies it: the long side resized to `size` (bicubic, antialiased, no clamp), the short side padded with
    0 to a centred square, normalized. images: (N, 3, H, W) in [0, 1] -> (N, 3, size, size)."""
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return normalize(x)


def open_clip_tokens(tokenizer, texts, context_length=77):
    """open_clip's tokenize() with a transformers CLIP tokenizer: the text cleaned as open_clip does (ftfy.fix_text,
    html.unescape twice, whitespace collapsed; the tokenizer lowercases), [start] + BPE + [end] cut to
    `context_length` with the end token kept, padded with 0. -> (N, context_length) int64."""
    ftfy = _require("ftfy", "ftfy")
    cleaned = [re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(t))).strip()).strip() for t in texts]
    out = torch.zeros(len(cleaned), context_length, dtype=torch.long)
    for row, ids in zip(out, tokenizer(cleaned, truncation=True, max_length=context_length).input_ids):
        row[:len(ids)] = torch.tensor(ids)
    return out


class HpsScorer(ClipScorer):
    """ClipScorer's normalized features with HPSv2.1's preprocessing and tokens; its score is their cosine."""

    @torch.no_grad()
    def image_embeds(self, images):
        return self.pixel_embeds(hps_pixels(images.to(self.device), self.model.config.vision_config.image_size))

    @torch.no_grad()
    def text_embeds(self, texts):
        ids = open_clip_tokens(self.tokenizer, texts, self.model.config.text_config.max_position_embeddings)
        return self.token_embeds(ids.to(self.device))  # no padding mask: open_clip has none (causal attention only)


def make_hpsv2(device):
    """HPSv2.1 = cos(image, text) of open_clip ViT-H-14 with HPS_v2.1_compressed.pt (hub repo xswu/HPSv2)."""
    from huggingface_hub import hf_hub_download
    from transformers import CLIPTokenizer
    _require("ftfy", "ftfy")  # open_clip_tokens needs it: say so before any download or load
    path = _from_hub(HPSV2_REPO, hf_hub_download, HPSV2_FILE)
    tokenizer = _from_hub(CLIP_TOKENIZER, CLIPTokenizer.from_pretrained, filename=TOKENIZER_FILES)
    model = load_hpsv2(load_weights(path, "state_dict"), VIT_H_14, device, path)
    return clipscore_fn(HpsScorer(model, tokenizer, None, device))


# ---- imagereward (ImageReward-v1.0: BLIP ViT-L + a BERT that cross-attends to it, on transformers' BLIP) ----

IMAGEREWARD_REPO, IMAGEREWARD_FILES = "THUDM/ImageReward", ("ImageReward.pt", "med_config.json")
BERT_TOKENIZER = "google-bert/bert-base-uncased"  # BLIP's BertTokenizer.from_pretrained('bert-base-uncased')
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: (mlp - mean) / std
BLIP_VIT_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=16)
IMAGEREWARD_NAMES = {  # ImageReward key prefix -> ImageRewardModel's (None: not used by the score)
    "blip.visual_encoder.cls_token": "vision.embeddings.class_embedding",
    "blip.visual_encoder.pos_embed": "vision.embeddings.position_embedding",
    "blip.visual_encoder.patch_embed.proj": "vision.embeddings.patch_embedding",
    "blip.visual_encoder.blocks": "vision.encoder.layers", "blip.visual_encoder.norm": "vision.post_layernorm",
    "blip.text_encoder.embeddings.position_ids": None, "blip.text_encoder": "text", "mlp.layers": "mlp"}
BLIP_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
              "norm2": "layer_norm2"}


class ImageRewardModel(torch.nn.Module):
    """ImageReward.score() on transformers' BLIP: every token of the ViT (after its last LayerNorm) is the
    cross-attention context of the med BERT (med_config.json, bidirectional); its first ([CLS]) output goes
    through the MLP, then (x - mean) / std. `vision`: BlipVisionConfig fields of blip.create_vit's ViT."""

    def __init__(self, med_config, vision=BLIP_VIT_L):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
        self.vision = BlipVisionModel(BlipVisionConfig(
            intermediate_size=4 * vision["hidden_size"], layer_norm_eps=1e-6, hidden_act="gelu", **vision))
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")
        self.text = BlipTextModel(BlipTextConfig(  # is_decoder builds the cross-attention layers; forward runs unmasked
            encoder_hidden_size=vision["hidden_size"], is_decoder=True, **{k: med_config[k] for k in keys}),
            add_pooling_layer=False)
        self.mlp = aesthetic_mlp(med_config["hidden_size"])  # ImageReward's MLP: the aesthetic head's layers

    def forward(self, pixels, input_ids, attention_mask):
        image = self.vision(pixel_values=pixels).last_hidden_state
        every = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=every).last_hidden_state
        return ((self.mlp(text[:, 0].float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


def imagereward_state_dict(state):
    """ImageReward.pt's state dict in ImageRewardModel's names. Returns (state dict, unused keys)."""
    return rename_state_dict(state, IMAGEREWARD_NAMES, BLIP_BLOCK)


def load_imagereward(state, med_config, vision=BLIP_VIT_L, device="cpu", path="ImageReward.pt"):
    """ImageRewardModel with ImageReward.pt's weights. Keys it does not use (BLIP's contrastive projections) are
    skipped, as ImageReward's strict=False load leaves them; every weight of the model must be there."""
    with torch.device(device):
        model = ImageRewardModel(med_config, vision)
    return load_into(model, imagereward_state_dict(state)[0], path).eval()


def imagereward_pixels(images, size=224):
    """ImageReward's transform on PIL images, as the original: uint8 (rounded like the official wrapper), the short
    side resized to `size` (PIL bicubic, torchvision's Resize arithmetic), centre crop, normalized."""
    out = []
    for image in to_uint8(images):
        pil = Image.fromarray(image)
        w, h = pil.size
        if min(w, h) != size:
            long = int(size * max(w, h) / min(w, h))
            pil = pil.resize((size, long) if w <= h else (long, size), Image.BICUBIC)
        w, h = pil.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        out.append(torch.from_numpy(np.array(pil.crop((left, top, left + size, top + size)))).permute(2, 0, 1))
    return normalize(torch.stack(out).float() / 255)


def bert_tokenizer(tokenizer):
    """BLIP's init_tokenizer(): bert-base-uncased plus [DEC] (bos) and [ENC], ids 30522 and 30523."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def imagereward_fn(model, tokenizer, device):
    """ImageReward-v1.0 score of each (prompt, image) pair, as ImageReward.score() computes one pair (the official
    wrapper scores all N x N pairs and keeps the diagonal): text padded to 35 tokens."""
    model = model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        pixels = imagereward_pixels(images, model.vision.config.image_size).to(device)
        return _cpu(model(pixels, tokens.input_ids.to(device), tokens.attention_mask.to(device))), {}
    return fn


def make_imagereward(device):
    """ImageReward-v1.0: ImageReward.pt and med_config.json (hub repo THUDM/ImageReward), bert-base-uncased tokens."""
    from huggingface_hub import hf_hub_download
    from transformers import BertTokenizer
    weights, med = (_from_hub(IMAGEREWARD_REPO, hf_hub_download, name, filename=IMAGEREWARD_FILES)
                    for name in IMAGEREWARD_FILES)
    tokenizer = _from_hub(BERT_TOKENIZER, BertTokenizer.from_pretrained, filename=TOKENIZER_FILES)
    with open(med) as f:
        med_config = json.load(f)
    model = load_imagereward(load_weights(weights), med_config, BLIP_VIT_L, device, weights)
    return imagereward_fn(model, bert_tokenizer(tokenizer), device)


# ---- unifiedreward (VLM behind an OpenAI-compatible server) ----

UNIFIEDREWARD_QUESTION = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to "
    "evaluate this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this "
    "image aligns with the provided caption. Consider the accuracy of depicted objects, their relationships, "
    "and attributes as described in the caption.\n2. Overall Image Quality: Examine the visual quality of "
    "this image, including clarity, detail preservation, color accuracy, and overall aesthetic appeal.\n"
    "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided "
    "as follows:\nText Caption: [{prompt}]")


def parse_final_score(text):
    """'... Final Score: x' with x in 1..5 -> x / 5; 0.0 when the reply has no such score (10 or 5.5 is none, not
    1 or 5)."""
    match = re.search(r"Final Score:\s*([1-4](?:\.\d+)?|5(?:\.0+)?)(?!\.?\d)", text or "")
    return float(match.group(1)) / 5 if match else 0.0


MAX_REPLY_BYTES = 1 << 20  # a judge's reply is a few hundred bytes of JSON; anything near this is not one


def _redact(url):
    """The URL without user:password@ (it is printed in errors; credentials must never be)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def post_json(url, body, headers, deadline, max_bytes=MAX_REPLY_BYTES):
    """POST body (bytes) to url, return (HTTP status, parsed JSON reply). `deadline` (s) bounds the whole
    request, not each socket read: a watchdog shuts the socket, so a server that trickles a byte every few
    seconds still times out. Replies over max_bytes are refused. Raises TimeoutError, ConnectionError
    (connect/reset: worth a retry), RewardError (anything else, one line, credentials redacted)."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        conn = kind(parts.hostname, parts.port, timeout=deadline)
    except (http.client.InvalidURL, ValueError) as e:
        raise RewardError(f"bad unifiedreward URL {_redact(url)} ({e}); set UNIFIEDREWARD_URL to "
                          "http://host:port/v1") from None
    expired, sock = threading.Event(), []

    def stop():
        expired.set()
        for s in sock:  # held here: http.client drops conn.sock once a reply without a length has begun
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked on it
    watchdog = threading.Timer(deadline, stop)
    watchdog.start()
    try:
        conn.connect()  # bounded by the same deadline (the connection's timeout)
        sock.append(conn.sock)
        if expired.is_set():  # the deadline passed while connecting
            raise TimeoutError
        conn.request("POST", parts.path + (f"?{parts.query}" if parts.query else ""), body, headers)
        response = conn.getresponse()
        length = response.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > max_bytes:
            raise RewardError(f"unifiedreward server {_redact(url)} announced a reply of {length[:20]!r} bytes "
                              f"(at most {max_bytes} taken); is UNIFIEDREWARD_URL the judge's chat endpoint?")
        data = response.read(max_bytes + 1)
    except RewardError:
        raise
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set() or isinstance(e, TimeoutError):
            raise TimeoutError(f"no complete reply within {deadline:g} s") from None
        raise ConnectionError(f"{type(e).__name__}: {e}") from None
    finally:
        watchdog.cancel()
        conn.close()
    if expired.is_set():
        raise TimeoutError(f"no complete reply within {deadline:g} s")
    if len(data) > max_bytes:
        raise RewardError(f"unifiedreward server {_redact(url)} sent a reply of more than {max_bytes} bytes; "
                          "is UNIFIEDREWARD_URL the judge's chat endpoint?")
    if response.status >= 400:
        return response.status, None
    try:
        return response.status, json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RewardError(f"unifiedreward server {_redact(url)} answered with something that is not JSON "
                          f"(starts {data[:40]!r}); is UNIFIEDREWARD_URL the judge's OpenAI-compatible /v1 "
                          "URL?") from None


def make_unifiedreward(device, url=None, model=None, api_key=None, timeout=120, retries=3, backoff=1.0):
    """Client of an OpenAI-compatible /chat/completions server (e.g. sglang or vLLM serving
    UnifiedReward-7b-v1.5). URL, model and key from the arguments or UNIFIEDREWARD_URL,
    UNIFIEDREWARD_MODEL, UNIFIEDREWARD_API_KEY (user:password@ in the URL is sent as basic auth and never
    printed). Each request has `timeout` seconds in all; HTTP 5xx and connection errors are retried
    `retries` times, waiting backoff, 2*backoff, ... seconds. Unparsable replies score 0; anything else
    (4xx, timeout, retries spent, a non-JSON or oversized reply) is a one-line error."""
    url = (url or os.environ.get("UNIFIEDREWARD_URL", "http://127.0.0.1:17140/v1")).rstrip("/")
    try:  # checked before any model loads, not at the first rollout's request
        parts = urllib.parse.urlsplit(url)
        parts.port  # a port that is not a number raises here
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("it needs http:// or https:// and a host")
    except ValueError as e:
        # a regex, not _redact: urlsplit itself may be what failed
        raise RewardError(f"bad unifiedreward URL {re.sub(r'//[^/]*@', '//', url)} ({e}); set UNIFIEDREWARD_URL to "
                          "http://host:port/v1") from None
    model = model or os.environ.get("UNIFIEDREWARD_MODEL", "UnifiedReward-7b-v1.5")
    api_key = api_key or os.environ.get("UNIFIEDREWARD_API_KEY", "EMPTY")
    login = parts.netloc.rpartition("@")[0]
    auth = (f"Basic {base64.b64encode(urllib.parse.unquote(login).encode()).decode()}" if login and api_key == "EMPTY"
            else f"Bearer {api_key}")
    shown = _redact(url)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)

    def ask(pair):
        prompt, image = pair
        buffer = io.BytesIO()
        Image.fromarray(image).resize((512, 512)).save(buffer, format="PNG")  # 512 px as the official client
        data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {"model": model, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri}},
            {"type": "text", "text": UNIFIEDREWARD_QUESTION.format(prompt=prompt)}]}]}
        headers = {"Content-Type": "application/json", "Authorization": auth}
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                status, reply = post_json(f"{url}/chat/completions", json.dumps(body).encode(), headers, timeout)
            except TimeoutError as e:
                raise RewardError(f"unifiedreward server {shown}: {e}; is it overloaded? (a request's time "
                                  "limit is the timeout of make_unifiedreward)") from None
            except ConnectionError as e:
                problem = f"cannot reach it ({e})"
                continue
            if status >= 500:
                problem = f"HTTP {status}"
                continue
            if status >= 400:
                raise RewardError(f"unifiedreward server {shown} answered HTTP {status}; check UNIFIEDREWARD_URL, "
                                  "UNIFIEDREWARD_MODEL and UNIFIEDREWARD_API_KEY")
            try:
                return parse_final_score(reply["choices"][0]["message"]["content"])
            except (KeyError, IndexError, TypeError):
                return 0.0
        raise RewardError(f"unifiedreward server {shown}: {problem} after {retries + 1} tries; start it or set "
                          "UNIFIEDREWARD_URL")

    def fn(images, prompts, metadata):
        return _cpu(list(pool.map(ask, zip(prompts, to_uint8(images))))), {}
    return fn


# ---- geneval: rules ----

# GenEval's object_names.txt: the 80 COCO classes in COCO order, with GenEval's spellings.
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]
GENEVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
GENEVAL_TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
RELATIONS = ["left of", "right of", "above", "below"]
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_MARGIN = 0.3, 0.9, 16, 0.1


def keep_detections(detections, tag):
    """Per class: score >= 0.3 (0.9 for counting prompts), highest score first, at most 16; no NMS."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for name, objects in detections.items():
        objects = sorted((o for o in objects if o["score"] >= threshold), key=lambda o: -o["score"])[:MAX_OBJECTS]
        if objects:
            kept[name] = objects
    return kept


def relative_position(box_a, box_b):
    """Relations of box A to box B (x1, y1, x2, y2; y grows downward). offset = center_a - center_b;
    revised = max(|offset| - 0.1 (dim_a + dim_b), 0) sign(offset); none if all |revised| < 1e-3;
    (dx, dy) = revised / |offset|: dx < -0.5 left of, dx > 0.5 right of, dy < -0.5 above, dy > 0.5 below."""
    a, b = np.asarray(box_a[:4], float).reshape(2, 2), np.asarray(box_b[:4], float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - POSITION_MARGIN * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {rel for rel, holds in [("left of", dx < -0.5), ("right of", dx > 0.5),
                                   ("above", dy < -0.5), ("below", dy > 0.5)] if holds}


def _relation_holds(objects, targets, relation):
    """A relation holds only if every object has it to every object of the referenced group."""
    return targets is not None and all(relation in relative_position(o["box"], t["box"])
                                       for o in objects for t in targets)


def geneval_score(detections, metadata):
    """GenEval rules on raw detections {class: [{"box", "score", "color"}]} and a GenEval jsonl record.

    Returns (partial, strict, correct):
    - partial (training reward, mean of terms): per include, 1 - |count - n|/count with n = all kept
      detections (negative with many extras); then if n != count a 0 for a color/position attribute,
      else color: 1 - |count - n_color|/count and position: 1 if it holds else 0 (only 0 on failure;
      the official server also appends a 1 there).
    - strict: every include has exactly `count` with all attributes, and no exclude is hit.
    - correct (the benchmark metric): each include has >= count; the top `count` have the color and
      the position relation; an exclude fails when detections >= its count.
    """
    kept = keep_detections(detections, metadata.get("tag"))
    terms, strict, correct = [], True, True
    groups_correct, groups_strict = [], []
    for req in metadata.get("include", []):
        objects, count = kept.get(req["class"], []), req["count"]
        top = objects[:count]
        n = len(objects)
        terms.append(1 - abs(count - n) / count)

        # benchmark correctness: at least `count`, attributes on the `count` most confident
        ok = len(top) >= count
        if ok and "color" in req:
            ok = sum(o.get("color") == req["color"] for o in top) >= count
        if ok and "position" in req:
            relation, group = req["position"]
            ok = _relation_holds(top, groups_correct[group], relation)
        groups_correct.append(top if ok else None)
        correct &= ok

        # partial and strict: exact count first, then the attributes on all kept objects
        exact = n == count
        if not exact:
            terms += [0.0] * (("color" in req) + ("position" in req))
        if exact and "color" in req:
            n_color = sum(o.get("color") == req["color"] for o in objects)
            terms.append(1 - abs(count - n_color) / count)
            exact = n_color == count
        if "position" in req and n == count:
            relation, group = req["position"]
            holds = exact and _relation_holds(objects, groups_strict[group], relation)
            terms.append(1.0 if holds else 0.0)
            exact = holds
        groups_strict.append(objects if exact else None)
        strict &= exact
    for req in metadata.get("exclude", []):
        if len(kept.get(req["class"], [])) >= req["count"]:
            correct = strict = False
    partial = sum(terms) / len(terms) if terms else 0.0
    return float(partial), bool(strict), bool(correct)


def geneval_summary(correct, tags):
    """Benchmark aggregation: per-tag accuracy over images, "overall" = mean of the per-tag
    accuracies (not of all images), plus per-tag counts under "n/<tag>"."""
    summary = {}
    for tag in dict.fromkeys(tags):  # first-seen order, like the official summary
        values = [bool(c) for c, t in zip(correct, tags) if t == tag]
        summary[tag], summary[f"n/{tag}"] = sum(values) / len(values), len(values)
    per_tag = [summary[t] for t in dict.fromkeys(tags)]
    summary["overall"] = sum(per_tag) / len(per_tag) if per_tag else math.nan
    summary["n"] = len(correct)
    return summary


# ---- geneval: models ----

def mask2former_instances(class_logits, mask_logits, size, top_k=100):
    """mmdetection's Mask2Former instance post-process for one image, from raw logits.

    class_logits: (Q, K+1) with the no-object class last; mask_logits: (Q, h, w).
    Class probability = softmax over all K+1 columns, then the no-object column dropped; take the
    top_k (query, class) pairs; masks upsampled (bilinear) to `size` = (H, W) and binarized at
    logit > 0; score = class prob * mean mask prob inside the binary mask; box = tight box of the
    mask (x2, y2 exclusive). No NMS. Returns labels (k,), scores (k,), boxes (k, 4), masks (k, H, W) bool.
    """
    probs = class_logits.float().softmax(-1)[:, :-1]
    num_classes = probs.shape[1]
    scores, flat = probs.flatten().topk(min(top_k, probs.numel()))
    labels, queries = flat % num_classes, flat // num_classes
    logits = F.interpolate(mask_logits[None].float(), size=size, mode="bilinear", align_corners=False)[0][queries]
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    cols, rows = masks.any(1), masks.any(2)  # (k, W), (k, H): where each mask has pixels
    first = lambda m: m.float().argmax(1)  # index of the first True
    boxes = torch.stack([first(cols), first(rows), cols.shape[1] - first(cols.flip(1)),
                         rows.shape[1] - first(rows.flip(1))], dim=1).float()
    boxes[~cols.any(1)] = 0  # empty mask: no box (its score is 0 anyway)
    return labels, scores * mask_scores, boxes, masks


class GenEvalScorer:
    """GenEval reward = detector (transformers Mask2FormerForUniversalSegmentation, labels mapped
    by index to COCO_CLASSES) + CLIP zero-shot color of the kept objects (all crops of a batch in
    one CLIP call) + `geneval_score`. Works with any (tiny) models of those classes; the detector
    processor only supplies image_mean / image_std."""

    def __init__(self, detector, detector_processor, clip, clip_tokenizer, clip_image_processor, device,
                 detector_size=(800, 1333)):
        self.device = torch.device(device)
        # GenEval's mmdetection test pipeline resizes to short side 800, long side <= 1333 (512 px
        # images -> 800 px); fixed here rather than read from the hub processor config.
        self.detector_size = detector_size
        self.detector = detector.to(self.device).eval().requires_grad_(False)
        self.det_processor = detector_processor
        self.clip = ClipScorer(clip, clip_tokenizer, clip_image_processor, self.device)
        self.color_classifiers = {}  # class name -> (10, D) normalized text embeddings

    @torch.no_grad()
    def detect(self, images):
        """Raw detections per image {class: [{"box", "score", "color": None, "mask"}]} (before thresholds)."""
        images = images.to(self.device).float()
        h, w = images.shape[-2:]
        short, long = self.detector_size  # resize keeping the aspect ratio, then the processor's mean/std
        scale = min(short / min(h, w), long / max(h, w))
        x = F.interpolate(images, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.det_processor.image_mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.det_processor.image_std, device=self.device).view(1, 3, 1, 1)
        out = self.detector(pixel_values=(x - mean) / std)
        results = []
        for class_logits, mask_logits in zip(out.class_queries_logits, out.masks_queries_logits):
            if class_logits.shape[-1] != len(COCO_CLASSES) + 1:
                raise RewardError(f"the GenEval detector must have {len(COCO_CLASSES)} COCO classes, "
                                  f"got {class_logits.shape[-1] - 1}")
            labels, scores, boxes, masks = mask2former_instances(class_logits, mask_logits, (h, w))
            detections = {}
            for label, score, box, mask in zip(labels.tolist(), scores.tolist(), boxes.tolist(), masks):
                detections.setdefault(COCO_CLASSES[label], []).append(
                    {"box": tuple(box), "score": score, "color": None, "mask": mask})
            results.append(detections)
        return results

    def _color_classifier(self, classname):
        """Per color: embed the 3 templates, normalize, average, normalize (clip_benchmark's recipe)."""
        if classname not in self.color_classifiers:
            templates = [f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}",
                         "a photo of a {c} object"]
            texts = [t.format(c=c) for c in GENEVAL_COLORS for t in templates]
            emb = self.clip.text_embeds(texts).view(len(GENEVAL_COLORS), len(templates), -1).mean(1)
            self.color_classifiers[classname] = F.normalize(emb, dim=-1)
        return self.color_classifiers[classname]

    @torch.no_grad()
    def classify_colors(self, images, crops):
        """crops: list of (image index, class name, detection). Composite the image over gray #999999
        through the mask, crop to the box, and classify all crops with one CLIP image call."""
        if not crops:
            return []
        gray = torch.full((3, 1, 1), 0x99 / 255, device=self.device)
        pixels = []
        for i, _, det in crops:
            image = images[i].to(self.device).float()
            composite = torch.where(det["mask"].to(self.device), image, gray)
            x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
            crop = composite[:, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
            pixels.append(clip_pixels(crop[None], self.clip.image_processor))
        emb = self.clip.pixel_embeds(torch.cat(pixels))  # the one CLIP image call of the batch
        return [GENEVAL_COLORS[int((e @ self._color_classifier(name).T).argmax())]
                for e, (_, name, _) in zip(emb, crops)]

    def __call__(self, images, prompts, metadata):
        detections = self.detect(images)
        # Only the objects whose color matters: the `count` most confident kept ones of each
        # include with a color (the partial score needs n == count before it looks at colors).
        crops = []
        for i, (dets, meta) in enumerate(zip(detections, metadata)):
            kept = keep_detections(dets, meta.get("tag"))
            for req in meta.get("include", []):
                if "color" in req:
                    crops += [(i, req["class"], d) for d in kept.get(req["class"], [])[:req["count"]]]
        for (_, _, det), color in zip(crops, self.classify_colors(images, crops)):
            det["color"] = color
        results = [geneval_score(d, m) for d, m in zip(detections, metadata)]
        partial, strict, correct = (_cpu([r[k] for r in results]) for k in range(3))
        return partial, {"partial": partial, "strict": strict, "correct": correct}


MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"


def make_geneval(device):
    from transformers import CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation, AutoImageProcessor
    _require("scipy", "scipy")  # transformers' Mask2Former builds its (training) loss, which needs scipy
    detector = _from_hub(MASK2FORMER, Mask2FormerForUniversalSegmentation.from_pretrained)
    det_processor = _from_hub(MASK2FORMER, AutoImageProcessor.from_pretrained)
    clip_processor = _from_hub(CLIP_L, CLIPProcessor.from_pretrained)
    clip = _from_hub(CLIP_L, CLIPModel.from_pretrained)
    return GenEvalScorer(detector, det_processor, clip, clip_processor.tokenizer, clip_processor.image_processor,
                         device)


# ---- prompt sets ----

def _article(word):
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _plural(word):
    return f"{word}es" if word.endswith("s") else f"{word}s"


NUMBERS = ["zero", "one", "two", "three", "four"]


def _geneval_sample(rng, tag):
    """One GenEval record drawn like geneval's prompts/create_prompts.py (same rng calls and order)."""
    names, person = COCO_CLASSES, COCO_CLASSES.index("person")
    if tag == "two_object":
        a, b = rng.choice(len(names), size=2, replace=False)
        return {"tag": tag, "include": [{"class": names[a], "count": 1}, {"class": names[b], "count": 1}],
                "prompt": f"a photo of {_article(names[a])} and {_article(names[b])}"}
    if tag == "counting":
        idx, num = rng.choice(len(names)), int(rng.integers(2, 4, endpoint=True))
        return {"tag": tag, "include": [{"class": names[idx], "count": num}],
                "exclude": [{"class": names[idx], "count": num + 1}],
                "prompt": f"a photo of {NUMBERS[num]} {_plural(names[idx])}"}
    if tag == "colors":  # never "a <color> person"
        idx = (rng.choice(len(names) - 1) + 1 + person) % len(names)
        color = GENEVAL_COLORS[rng.choice(len(GENEVAL_COLORS))]
        return {"tag": tag, "include": [{"class": names[idx], "count": 1, "color": color}],
                "prompt": f"a photo of {_article(color)} {names[idx]}"}
    if tag == "position":
        a, b = rng.choice(len(names), size=2, replace=False)
        relation = RELATIONS[rng.choice(len(RELATIONS))]
        return {"tag": tag, "include": [{"class": names[b], "count": 1},
                                        {"class": names[a], "count": 1, "position": [relation, 0]}],
                "prompt": f"a photo of {_article(names[a])} {relation} {_article(names[b])}"}
    if tag == "color_attr":
        a, b = (rng.choice(len(names) - 1, size=2, replace=False) + 1 + person) % len(names)
        ca, cb = rng.choice(len(GENEVAL_COLORS), size=2, replace=False)
        ca, cb = GENEVAL_COLORS[ca], GENEVAL_COLORS[cb]
        return {"tag": tag, "include": [{"class": names[a], "count": 1, "color": ca},
                                        {"class": names[b], "count": 1, "color": cb}],
                "prompt": f"a photo of {_article(ca)} {names[a]} and {_article(cb)} {names[b]}"}
    raise ValueError(tag)


def _geneval_key(record):
    """Identity of a GenEval prompt up to object order ("A and B" == "B and A", "A left of B" ==
    "B right of A")."""
    include = record["include"]
    if record["tag"] == "position":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        target, subject = include[0]["class"], include[1]["class"]
        relation = include[1]["position"][0]
        return ("position", min((subject, relation, target), (target, flip[relation], subject)))
    return (record["tag"], tuple(sorted((r["class"], r["count"], r.get("color", "")) for r in include)))


def _single(index):
    return {"tag": "single_object", "include": [{"class": COCO_CLASSES[index], "count": 1}],
            "prompt": f"a photo of {_article(COCO_CLASSES[index])}"}


def geneval_prompts(split, seed=None, per_tag=None):
    """GenEval-style records in the official jsonl format, deterministic in `seed`.

    test: geneval's create_prompts.py recipe (seed 43, 100 draws per tag after all 80 single objects,
      exact duplicates dropped) with the same numpy rng calls, which reproduces the official
      evaluation_metadata.jsonl line for line: 553 prompts (80 single_object, 99 two_object,
      80 counting, 94 colors, 100 position, 100 color_attr).
    train: the same generators in the generator's own mix, 80 single objects to 100 draws of each other
      tag: `per_tag` (default 1000) draws of each of the five, 0.8 * per_tag single objects (5800 records).
      A draw equal to a test prompt up to object order is redrawn, except single objects: all 80 are test
      prompts, so the train singles are those, drawn with replacement. Repeats are kept so that every tag
      keeps its share (counting has only 160 prompts outside the test set).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    test = split == "test"
    rng = np.random.default_rng((43 if test else 42) if seed is None else seed)
    if not test:
        draws = per_tag or 1000
        banned = {_geneval_key(r) for r in geneval_prompts("test")}
        records = [_single(int(i)) for i in rng.choice(len(COCO_CLASSES), size=draws * 80 // 100)]
        for tag in GENEVAL_TAGS[1:]:
            drawn = 0
            while drawn < draws:
                record = _geneval_sample(rng, tag)
                if _geneval_key(record) not in banned:
                    records.append(record)
                    drawn += 1
        return records
    records = [_single(int(i)) for i in rng.choice(len(COCO_CLASSES), size=len(COCO_CLASSES), replace=False)]
    for tag in GENEVAL_TAGS[1:]:
        records += [_geneval_sample(rng, tag) for _ in range(per_tag or 100)]
    return list({json.dumps(r, sort_keys=True): r for r in records}.values())  # repeats dropped, first order kept


_OCR_WORDS = [
    "open", "closed", "welcome", "exit", "coffee", "bakery", "hotel", "garden", "market", "library",
    "station", "museum", "pizza", "books", "music", "sale", "fresh", "happy", "sunny", "quiet", "river",
    "mountain", "ocean", "forest", "city", "night", "morning", "summer", "winter", "spring", "autumn",
    "dream", "hope", "love", "peace", "power", "future", "vintage", "golden", "silver", "little", "big",
    "lucky", "magic", "wild", "green", "blue", "red", "north", "south"]
_OCR_TEMPLATES = [
    'A wooden sign that says "{}"', 'A neon sign reading "{}" on a brick wall', 'A coffee mug printed with "{}"',
    'A storefront with the word "{}" above the door', 'A t-shirt with "{}" written on it',
    'A chalkboard menu that says "{}"', 'A book cover titled "{}"', 'A street banner reading "{}"',
    'A birthday cake with "{}" written in icing', 'A poster with the text "{}" in bold letters',
    'A license plate that reads "{}"', 'A handwritten note saying "{}"']


def ocr_prompts(split, seed=0, n_test=1018):
    """Text-rendering prompts with the target in double quotes: one- and two-word texts from a fixed
    word list in natural templates. The texts are shuffled with `seed` and split, so train and test
    never share a target text; test has `n_test` prompts (the paper's OCR test set size)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(seed)
    texts = _OCR_WORDS + [f"{a} {b}" for a in _OCR_WORDS for b in _OCR_WORDS if a != b]
    texts = [texts[i].title() for i in rng.permutation(len(texts))]
    texts = texts[:n_test] if split == "test" else texts[n_test:]
    return [{"prompt": _OCR_TEMPLATES[int(rng.integers(len(_OCR_TEMPLATES)))].format(t)} for t in texts]


GENERIC_PROMPTS = [
    "a photo of a cat sitting on a windowsill", "a watercolor painting of a lighthouse at dawn",
    "a red sports car on a mountain road", "an astronaut riding a horse on the moon",
    "a bowl of ramen with a soft-boiled egg", "a cozy library with tall wooden shelves",
    "a fox in a snowy forest, digital art", "a futuristic city skyline at night",
    "a portrait of an old fisherman, oil painting", "a teddy bear having a picnic in a park",
    "a glass teapot on a sunny kitchen table", "a dragon made of autumn leaves",
    "a robot watering plants in a greenhouse", "a sailboat on a calm lake at sunset",
    "a plate of colorful macarons", "a snowy cabin under the northern lights"]


def default_prompts(reward_name, split):
    """Built-in prompt records for a reward: GenEval and OCR sets for those rewards, the 4 color
    prompts for `color` (same 4 for train and test), and otherwise a small generic list (same for
    both splits) standing in for Pick-a-Pic / DrawBench, whose files can be passed with --prompts."""
    if reward_name == "geneval":
        return geneval_prompts(split)
    if reward_name == "ocr":
        return ocr_prompts(split)
    if reward_name == "color":
        return [{"prompt": f"a {c} image"} for c in ("red", "green", "blue", "yellow")]
    return [{"prompt": p} for p in GENERIC_PROMPTS]


# ---- prompt files and the official prompt sets ----

# The official prompt files of each recipe (nft.py's presets), relative to the official repository's dataset/ folder:
# (train, test during training, --eval_only benchmark). The paper scores the preference rewards on DrawBench; the
# official test files repeat each prompt once per image.
OFFICIAL_PROMPTS = {
    "geneval": ("geneval/train_metadata.jsonl", "geneval/test_metadata.jsonl", "geneval/test_metadata.jsonl"),
    "ocr": ("ocr/train.txt", "ocr/test.txt", "ocr/test.txt"),
    **dict.fromkeys(["pickscore", "hpsv2", "multi"], ("pickscore/train.txt", "pickscore/test.txt",
                                                      "drawbench/test.txt")),
}


# files that read as text would turn into wrong prompts (load_prompts): what each is
NOT_PROMPT_TEXT = {".json": "a .json file", ".csv": "a table (.csv: its header and columns would become prompts)",
                   ".tsv": "a table (.tsv: its header and columns would become prompts)",
                   ".parquet": "a table (.parquet)", **{ext: f"compressed ({ext}): decompress it first" for ext in (
                       ".gz", ".zip", ".bz2", ".xz", ".zst", ".tar")}}


def load_prompts(path, flag="--prompts"):
    """Prompt records from a file: .txt (one prompt a line) or .jsonl (objects with a non-empty "prompt" and the
    reward's metadata, e.g. GenEval's). Blank lines are skipped; RewardError names the flag, file and line otherwise."""
    if os.path.isdir(path):
        raise RewardError(f"{flag} {path} is a folder; give a .txt with one prompt a line or a .jsonl file")
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe such as <(cat p.txt): read once, gone on resume
        raise RewardError(f"{flag} {path} is not a regular file (a pipe or a device); save the prompts to a file")
    if not os.path.isfile(path):
        raise RewardError(f"{flag} file not found: {path} (give a .txt with one prompt a line or a .jsonl)")
    kind = next((k for ext, k in NOT_PROMPT_TEXT.items() if path.lower().endswith(ext)), None)
    if kind:  # read as text, its brackets, quotes, commas or header would become prompts
        raise RewardError(f"{flag} {path} is {kind}; give a .jsonl (one JSON object a line, with a \"prompt\") or a "
                          ".txt with one prompt a line")
    try:
        with open(path, "rb") as f:
            data = f.read().removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not part of the first prompt
        text = data.decode()
    except OSError as e:  # no permission, an I/O error
        raise RewardError(f"{flag} {path} cannot be read ({e.strerror}); check its permissions") from None
    except UnicodeDecodeError as e:
        line = data[:e.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
        raise RewardError(f"{flag} {path} is not UTF-8 text (line {line}); save it as UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # the line ends of Python's text files (universal)
    lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    records = [] if path.lower().endswith(".jsonl") else [{"prompt": line.strip()} for _, line in lines]
    for n, line in lines if path.lower().endswith(".jsonl") else ():
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RewardError(f"{flag} {path}:{n}: malformed JSON ({e.msg}); each line must be one JSON "
                              "object") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise RewardError(f'{flag} {path}:{n}: each line needs a non-empty "prompt" string, e.g. '
                              '{"prompt": "a cat"}')
        records.append(record)
    if not records:
        raise RewardError(f"{flag} file is empty: {path}")
    return records


def official_file(folder, preset, which, flag):
    """The prompt file a --prompts/--eval_prompts folder stands for. which: 0 train, 1 test (evaluation during
    training), 2 the --eval_only benchmark. `folder` is the official repository's dataset/ (the preset's file from
    OFFICIAL_PROMPTS) or one of its subfolders ({split}_metadata.jsonl or {split}.txt, as the official code reads)."""
    names, split = OFFICIAL_PROMPTS.get(preset, ()), "train" if which == 0 else "test"
    for name in names[which:which + 1] + (f"{split}_metadata.jsonl", f"{split}.txt"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if not os.access(folder, os.R_OK | os.X_OK):  # its files would look missing
        raise RewardError(f"{flag} {folder} cannot be read (permission denied); check its permissions")
    want = names[which] if names else f"{split}.txt or {split}_metadata.jsonl"
    fix = ("pass the official DiffusionNFT repository's dataset/ folder, one of its subfolders, or a prompt file"
           if names else "this --reward has no preset to pick a file of the official dataset/ folder: pass the "
           "subfolder of the prompts to use (such as dataset/pickscore), or a prompt file")
    raise RewardError(f"{flag} {folder}: no {want} in this folder; {fix}")


def prompt_files(preset, prompts="", eval_prompts="", eval_only=False, evaluates=True):
    """--prompts and --eval_prompts with folders turned into files (official_file); --eval_prompts left empty follows
    a --prompts folder (its test file; with --eval_only the preset's benchmark file); "" is the built-in set. A run
    that never evaluates (`evaluates` False) needs no test file in a folder. Returns (prompts, eval_prompts,
    warning): warning is one line when a preset with official prompt files runs on a built-in set instead (GenEval's
    built-in test set is the official one, regenerated), else None."""
    folder = prompts if os.path.isdir(prompts) else ""
    if eval_only and prompts and not folder and not eval_prompts:  # it would evaluate another set without a word
        raise RewardError(f"--prompts {prompts} gives training prompts, which --eval_only does not read; evaluate "
                          f"them with --eval_prompts {prompts}")
    if folder or eval_only:  # --eval_only trains on nothing: a folder gives only its benchmark file
        prompts = "" if eval_only else official_file(folder, preset, 0, "--prompts")
    source, flag = (eval_prompts, "--eval_prompts") if eval_prompts else (folder, "--prompts")
    if source and os.path.isdir(source):
        try:
            eval_prompts = official_file(source, preset, 2 if eval_only else 1, flag)
        except RewardError:
            if evaluates:
                raise
            eval_prompts = ""  # the built-in set, never used (a resume that evaluates may pass --eval_prompts)
    names = OFFICIAL_PROMPTS.get(preset)
    missing = [] if not names or eval_only or prompts else [("trains", names[0], "--prompts")]
    if names and evaluates and not eval_prompts and not names[2 if eval_only else 1].startswith("geneval/"):
        missing.append(("evaluates", names[2 if eval_only else 1], "--eval_prompts"))
    warning = missing and (
        f"warning: the {preset} preset {' and '.join(m[0] for m in missing)} on a built-in prompt set, not the "
        f"official one; pass {missing[0][2]} path/to/DiffusionNFT/dataset (it reads "
        f"{' and '.join(m[1] for m in missing)}). The built-in sets are for demos and tests.") or None
    return prompts, eval_prompts, warning


def prompt_reward(spec):
    """The reward of a spec whose built-in prompt sets stand in for missing files: the first that needs prompts of its
    own (GenEval metadata, a colour word, quoted text), so that every reward of a sum can score them; else the first."""
    names = [name for name, _ in parse_reward_spec(spec)]  # an empty spec is one clear error here
    return next((n for n in names if n in NEEDS_METADATA or n in PROMPT_CHECKS), names[0])


def prompt_records(spec, prompts="", eval_prompts="", max_eval=0):
    """(train, eval, repeats) prompt records: the files (load_prompts), else prompt_reward's built-in sets
    (default_prompts). The `repeats` exact repeats leave the evaluation set, as the official test files list a prompt
    once per image while evaluation draws its own images of each; max_eval > 0 keeps that many, spread evenly over the
    set (a test set sorted by tag, as GenEval's, keeps every tag; its first prompts would all be single objects), each
    a copy with "_index", its position in the whole set (what evaluation seeds its images by: a file's own "_index"
    is dropped)."""
    name = prompt_reward(spec)
    train = load_prompts(prompts) if prompts else default_prompts(name, "train")
    evals = load_prompts(eval_prompts, "--eval_prompts") if eval_prompts else default_prompts(name, "test")
    unique = list({json.dumps(r, sort_keys=True): r for r in evals}.values())
    spread = [dict(unique[j], _index=j) for j in (i * len(unique) // max_eval for i in range(max_eval))
              ] if 0 < max_eval < len(unique) else [{k: v for k, v in r.items() if k != "_index"} for r in unique]
    return train, spread, len(evals) - len(unique)


# ---- benchmark numbers: what the paper reports per reward ----

# Images per prompt of each benchmark (GenEval 4, OCR 1, DrawBench 5 of its 200 prompts for the preference rewards),
# and each reward's column and scale in the paper: PickScore is logit*cos/26 here and x26 there, UnifiedReward /5.
EVAL_IMAGES = {"geneval": 4, "ocr": 1,
               **dict.fromkeys(["pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward", "unifiedreward"], 5)}
EVAL_COLUMNS = {"pickscore": ("PickScore", 26.0), "clipscore": ("CLIPScore", 1.0), "hpsv2": ("HPSv2.1", 1.0),
                "aesthetic": ("Aesthetic", 1.0), "imagereward": ("ImageReward", 1.0),
                "unifiedreward": ("UnifiedReward", 5.0)}


def finite_mean(xs):
    """The mean of the finite values: an image a reward cannot score is NaN, and is left out as training drops it.
    NaN when none is finite."""
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def benchmark_metrics(results, spec, extra=""):
    """The paper's numbers from per-image results (dicts holding "reward" and each reward's components), for the
    rewards of `spec` and `extra`. GenEval: per-tag accuracy of the binary "correct" check, overall = mean of the
    tags' accuracies (the benchmark's aggregation, not the mean over images), strict accuracy and the mean partial
    score. OCR: accuracy = mean reward, and the share of exact matches. Any other reward: its mean on the paper's
    scale (EVAL_COLUMNS). A weighted sum also gets its mean. Means leave unscored (NaN) images out (finite_mean)."""
    mean = finite_mean
    out = {}
    for name in dict.fromkeys(reward_names(spec) + reward_names(extra)):
        if name == "geneval":
            scored = [r for r in results if math.isfinite(r["geneval/correct"])]
            g = geneval_summary([r["geneval/correct"] for r in scored], [r["tag"] for r in scored])
            out.update({"GenEval overall": g["overall"], **{t: g[t] for t in GENEVAL_TAGS if t in g},
                        "GenEval strict": mean([r["geneval/strict"] for r in results]),
                        "GenEval partial": mean([r["geneval"] for r in results])})
        elif name == "ocr":
            out.update({"OCR accuracy": mean([r["ocr"] for r in results]),
                        "OCR exact": mean([float(r["ocr"] == 1.0) if math.isfinite(r["ocr"]) else math.nan
                                           for r in results])})
        else:
            column, scale = EVAL_COLUMNS.get(name, (name, 1.0))
            out[column] = scale * mean([r[name] for r in results])
    if len(reward_names(spec)) > 1:
        out["reward (weighted sum)"] = mean([r["reward"] for r in results])
    return out


def strict_by_tag(strict, tags):
    """GenEval's strict accuracy of an epoch's rollouts per tag, {"strict_<tag>": mean}, GENEVAL_TAGS' order first.
    strict: (N,) 0/1; tags: N tag names."""
    picked = {}
    for value, tag in zip(strict.tolist(), tags):
        picked.setdefault(tag, []).append(float(value))
    order = lambda t: GENEVAL_TAGS.index(t) if t in GENEVAL_TAGS else len(GENEVAL_TAGS)  # noqa: E731
    return {f"strict_{tag}": sum(picked[tag]) / len(picked[tag]) for tag in sorted(picked, key=order)}


# ---- registry and combinations ----

REWARDS = {
    "geneval": make_geneval, "ocr": make_ocr, "pickscore": make_pickscore, "clipscore": make_clipscore,
    "hpsv2": make_hpsv2, "aesthetic": make_aesthetic, "imagereward": make_imagereward, "jpeg": make_jpeg,
    "color": make_color, "unifiedreward": make_unifiedreward,
}
# what each built-in factory reads from the hub, (repo, a file or files; None: the repo), for check_downloads (a
# factory of your own in REWARDS has no entry: nothing is checked for it)
HUB_FILES = {
    make_geneval: [(MASK2FORMER, None), (CLIP_L, None)], make_clipscore: [(CLIP_L, None)],
    make_pickscore: [(CLIP_H, PROCESSOR_FILES), (PICKSCORE_REPO, None)],
    make_aesthetic: [(CLIP_L, None), (AESTHETIC_REPO, AESTHETIC_FILE)],
    make_hpsv2: [(HPSV2_REPO, HPSV2_FILE), (CLIP_TOKENIZER, TOKENIZER_FILES)],
    make_imagereward: [(IMAGEREWARD_REPO, IMAGEREWARD_FILES), (BERT_TOKENIZER, TOKENIZER_FILES)],
}
NEEDS_METADATA = {"geneval"}
NO_MODEL = {"color", "jpeg", "unifiedreward"}  # rewards that load no weights (unifiedreward asks a server)
# the parameters each reward keeps on the GPU, in fp32 (--reward_precision bf16 is autocast), for nft.memory_estimate:
# the published architectures (GenEval: Mask2Former Swin-S and CLIP ViT-L/14; PickScore and HPSv2.1: CLIP ViT-H-14;
# ImageReward: BLIP ViT-L and its BERT; aesthetic: CLIP ViT-L/14 and its MLP); OCR runs on the CPU
REWARD_PARAMS = {"geneval": 68.74e6 + 427.6e6, "pickscore": 986.1e6, "hpsv2": 986.1e6, "clipscore": 427.6e6,
                 "aesthetic": 428.5e6, "imagereward": 446.2e6}
PROMPT_CHECKS = {"color": color_target, "ocr": ocr_target}  # raise RewardError for a prompt the reward cannot score


# what a reward may not be called: the epoch's log has reward_<name> and eval_<name> keys of its own
RESERVED_NAMES = {"mean", "std", "reward_mean", "geneval_overall"}
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # a weight as written (no 1_0, no inf)


def parse_reward_spec(spec):
    """'geneval' or 'pickscore:1,hpsv2:0.5' -> [(name, weight), ...]; a bare name has weight 1."""
    parsed = []
    for part in (p.strip() for p in str(spec).split(",")):
        name, colon, text = part.partition(":")
        name, text = name.strip(), text.strip()
        if not name:
            raise RewardError(f"no reward name in {spec!r} (a stray comma or colon?); valid rewards: "
                              f"{', '.join(REWARDS)}")
        if name in RESERVED_NAMES:
            raise RewardError(f"a reward may not be called '{name}' (the log has a key of that name already); "
                              "register it under another name")
        if name not in REWARDS:
            close = difflib.get_close_matches(name.lower(), REWARDS, n=1)  # COLOR: color
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            mine = "" if close else "; a reward of your own: run the script that registers it (python my_reward.py ...)"
            raise RewardError(f"unknown reward '{name}' in '{spec}'{hint}; valid rewards: {', '.join(REWARDS)}{mine}")
        try:
            if colon and not NUMBER.fullmatch(text):  # "color:" is no weight of 1, nor "color:1_0" one of 10
                raise ValueError
            weight = float(text) if colon else 1.0
            if not math.isfinite(weight):  # every reward would be NaN/inf: the run could never train (1e400)
                raise ValueError
        except ValueError:
            raise RewardError(f"bad weight '{text}' for reward '{name}' in '{spec}': "
                              "use name:number with a finite number, e.g. pickscore:0.5") from None
        if name in (n for n, _ in parsed):
            raise RewardError(f"reward '{name}' appears twice in '{spec}'")
        parsed.append((name, weight))
    if not any(weight for _, weight in parsed):  # every reward 0: every advantage 0, a run that never learns
        raise RewardError(f"every weight in '{spec}' is 0; give at least one reward a weight other than 0")
    return parsed


def make_reward(spec, device, precision="fp32", timeout=600.0):
    """The reward fn of a spec: the WEIGHTED SUM of its rewards (Flow-GRPO / DiffusionNFT call it
    "avg" but sum), with components {"<name>": score, "<name>/<component>": ...} for logging.
    A single reward of weight 1 returns its score unchanged. Scorers run in `precision` (reward_autocast),
    each call within `timeout` seconds and checked against the contract (call_reward)."""
    reward_autocast(device, precision)  # a bad value fails before any model loads
    check_downloads(spec)
    parts = [(name, weight, made(name, device)) for name, weight in parse_reward_spec(spec)]
    hung = set()  # rewards that ran out of time: later calls (batches already queued) fail at once

    def fn(images, prompts, metadata):
        total, components = None, {}
        for name, weight, reward in parts:
            score, comps = call_reward(name, reward, (images, prompts, metadata), device, precision, timeout, hung)
            components[name] = score
            components.update({f"{name}/{k}": v for k, v in comps.items()})
            if len(parts) == 1 and weight == 1:  # the reward itself
                total = score
            elif weight:  # a weight of 0 only logs its reward: its NaN drops no image
                weighted = score.double() * weight  # float64: a large weight must not overflow float32 to inf
                total = weighted if total is None else total + weighted
        return total, components
    return fn


def made(name, device):
    """REWARDS[name](device), the reward's function; a factory that raises or returns no function is one line."""
    try:
        fn = REWARDS[name](device)
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"reward '{name}' failed to load: {raised(e)}") from None
    if not callable(fn):
        raise RewardError(f"reward '{name}': its factory returned {_described(fn)}, not a function fn(images, "
                          "prompts, metadata)")
    return fn


def raised(e):
    """An exception in one line with where it was raised: the innermost frame outside Python's and the installed
    packages' files (the reward's own code), e.g. 'ValueError at my_reward.py:12 (fn): bad input'."""
    libs = ("<frozen", *{sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")}, *site.getsitepackages(),
            site.getusersitepackages())
    frames = traceback.extract_tb(e.__traceback__)
    own = next((f for f in reversed(frames) if not f.filename.startswith(libs)), frames[-1] if frames else None)
    where = f" at {os.path.basename(own.filename)}:{own.lineno} ({own.name})" if own else ""
    return f"{type(e).__name__}{where}: {(str(e).strip() or '?').splitlines()[0][:300]}"


def _described(x):
    """A returned value in a few words: 'a list', 'an int64 tensor of shape (8, 1) on cpu', 'None'."""
    if x is None:
        return "None"
    what = (f"{str(x.dtype)[6:]} tensor of shape {tuple(x.shape)} on {x.device}" if torch.is_tensor(x)
            else type(x).__name__)
    return f"{'an' if what[0] in 'aeio' else 'a'} {what}"  # a uint8


def contract_problem(out, n):
    """What in a reward's return value breaks the contract (None if nothing): (scores, components), scores an (N,)
    float CPU tensor, finite or NaN (an image it could not score), components a dict of (N,) CPU tensors."""
    if not isinstance(out, tuple) or len(out) != 2:
        many = f" of {len(out)}" if isinstance(out, tuple) else ""
        return f"{_described(out)}{many}, not a (scores, components) pair"
    scores, comps = out
    if not torch.is_tensor(scores) or scores.shape != (n,) or not scores.is_floating_point() or \
            scores.device.type != "cpu":
        return f"scores as {_described(scores)} for {n} images"
    if bool(torch.isinf(scores).any()):
        return f"{int(torch.isinf(scores).sum())} infinite score(s) (NaN marks an image it cannot score)"
    if not isinstance(comps, dict):
        return f"components as {_described(comps)}, not a dict"
    bad = [k for k, v in comps.items() if not torch.is_tensor(v) or v.shape != (n,) or v.device.type != "cpu"]
    return f"component {bad[0]!r} as {_described(comps[bad[0]])} for {n} images" if bad else None


_WAITED = set()  # the futures of the reward calls being waited for (call_reward), which abandon() ends


def abandon():
    """A stopping run (Ctrl-C, SIGTERM, an error) stops waiting for the rewards being scored: the thread that waits
    (the trainer's reward thread, which the interpreter joins on exit) is free at once, not after --reward_timeout."""
    for future in list(_WAITED):
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # it has just returned
            future.set_exception(RewardError("the run stopped"))


def call_reward(name, reward, inputs, device, precision, timeout, hung):
    """reward(images, prompts, metadata) in a thread of its own, waited for at most `timeout` seconds, its return
    value checked (contract_problem). A reward that raises, breaks the contract or never returns is one RewardError
    line naming it. The thread is a daemon: one that hangs for good cannot keep the process from exiting."""
    if name in hung:
        raise RewardFailed(f"reward '{name}' did not return within {timeout:g} s before")
    images, prompts, metadata = inputs  # each reward gets its own copies: one that edits them changes neither the
    copies = (images.clone(), list(prompts),  # next reward of a sum, nor the run's prompts or evaluation grid
              None if metadata is None else [copy.deepcopy(m) for m in metadata])
    future = concurrent.futures.Future()

    def run():
        try:
            if torch.device(device).type == "cuda":  # the current GPU is per thread: this rank's, not GPU 0
                torch.cuda.set_device(device)
            with reward_autocast(device, precision), torch.no_grad():  # thread-local: set in the thread that scores
                out = reward(*copies)
        except BaseException as e:
            out = e
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # abandoned: nobody waits for it
            if isinstance(out, BaseException):
                future.set_exception(out)
            else:
                future.set_result(out)
    _WAITED.add(future)  # before the thread starts: a stop in between is not missed
    threading.Thread(target=run, name=f"reward {name}", daemon=True).start()
    try:
        out = future.result(timeout)
    except BaseException as e:
        own = future.done() and future.exception() is e  # the reward's (its SystemExit too: no stop of the run)
        if isinstance(e, RewardError) or not own and not isinstance(e, concurrent.futures.TimeoutError):
            raise  # an abandoned wait (abandon); a Ctrl-C of the waiting thread
        if not own:
            hung.add(name)
            raise RewardFailed(f"reward '{name}' did not return within {timeout:g} s; check it, or raise "
                              "--reward_timeout if it is only slow") from None
        raise RewardFailed(f"reward '{name}' raised {raised(e)}") from None
    finally:
        _WAITED.discard(future)
    problem = contract_problem(out, len(prompts))
    if problem:
        raise RewardFailed(f"reward '{name}' returned {problem}; a reward returns (scores, components): an (N,) float "
                          "CPU tensor (NaN for an image it cannot score) and a dict of (N,) CPU tensors")
    # copies: a score with a graph must not reach the loss, nor a buffer the reward refills reach the next batch
    return out[0].detach().clone(), {k: v.detach().clone() for k, v in out[1].items()}


def reward_names(spec):
    """The reward names of a spec, in order; none for an empty spec."""
    return [name for name, _ in parse_reward_spec(spec)] if spec else []


def with_eval_rewards(reward_fn, spec, extra, device, precision="fp32", timeout=600.0):
    """reward_fn (make_reward of `spec`) with the rewards of the `extra` spec scored beside it, for evaluation:
    the same total, and every reward's components, under its name. Each model loads once, here; a name that
    is in `spec` already is not loaded again (its component is there)."""
    more = [name for name in reward_names(extra) if name not in reward_names(spec)]  # weights: the total is spec's
    if not more:
        return reward_fn
    extra_fn = make_reward(",".join(more), device, precision, timeout)

    def fn(images, prompts, metadata):
        total, components = reward_fn(images, prompts, metadata)
        return total, {**components, **extra_fn(images, prompts, metadata)[1]}
    return fn


def check_metadata(spec, metadata_list, source="the prompt set", flag="--prompts"):
    """Fail early, naming the prompt set (`source`, e.g. "--prompts p.txt") and the prompt, when a reward that needs
    jsonl metadata lacks it, or a prompt the reward cannot score (PROMPT_CHECKS: color needs a color word, ocr quoted
    text): before any model loads or any file is written, not at the first rollout or evaluation. flag: the flag that
    gives this set (--prompts, or --eval_prompts, whose built-in set is the training reward's)."""
    for name, _ in parse_reward_spec(spec):
        for record in metadata_list if name in PROMPT_CHECKS else ():
            prompt = (record or {}).get("prompt", "")
            try:
                if PROMPT_CHECKS[name](prompt) is False:  # a checker may return False instead of raising
                    raise RewardError(f"the {name} reward cannot score the prompt {prompt!r}")
            except RewardError as e:
                raise RewardError(f"{source}: {e}; pass {flag} with prompts that the {name} reward can score") from None
            except Exception as e:
                raise RewardError(f"{source}: the {name} reward's prompt check of {prompt!r} raised "
                                  f"{raised(e)}") from None
    needs = [name for name, _ in parse_reward_spec(spec) if name in NEEDS_METADATA]
    for name in needs:  # only geneval today
        for record in metadata_list:
            missing = [k for k in ("tag", "include") if k not in (record or {})]
            prompt = f"{source}, prompt {(record or {}).get('prompt', '?')!r}"
            if missing:
                raise RewardError(f"reward '{name}' needs GenEval metadata but {prompt} lacks {', '.join(missing)}: "
                                  f"pass a GenEval jsonl (e.g. evaluation_metadata.jsonl) with {flag}" + (
                                      ", or leave --prompts out to use the built-in GenEval set"
                                      if flag == "--prompts" else ""))
            reqs = record["include"] + record.get("exclude", []) if isinstance(record["include"], list) and isinstance(
                record.get("exclude", []), list) and record["include"] else None
            if not isinstance(record["tag"], str) or reqs is None or not all(
                    isinstance(r, dict) and type(r.get("count")) is int for r in reqs):  # a bool is no count
                raise RewardError(f"{prompt}: GenEval metadata of the wrong type; \"tag\" must be a string and "
                                  '"include" (not empty) and "exclude" lists of {"class": name, "count": integer}')
            problems = [geneval_problem(req, index, index < len(record["include"])) for index, req in enumerate(reqs)]
            problems.append(None if record["tag"] in GENEVAL_TAGS else f"has tag {record['tag']!r}; GenEval's tags: "
                            + ", ".join(GENEVAL_TAGS))
            if any(problems):
                raise RewardError(f"{prompt} {next(p for p in problems if p)}")


def geneval_problem(req, index, include=True):
    """What is wrong with one "include"/"exclude" entry of GenEval metadata (None if nothing): every rule that
    geneval_score relies on. index: the entry's place, so a position may only name an earlier include; include: False
    for an exclude, whose count may pass MAX_OBJECTS ("exactly 16" excludes 17)."""
    position = req.get("position")
    rules = [
        (req.get("class") not in COCO_CLASSES, f"names {req.get('class')!r}, not one of GenEval's 80 COCO class names"),
        (req["count"] < 1, f"asks for {req['count']} of {req.get('class')!r}; a count is at least 1"),
        (include and req["count"] > MAX_OBJECTS,
         f"asks for {req['count']} of {req.get('class')!r}; GenEval keeps at most {MAX_OBJECTS} detections of a "
         "class, so no image could meet it"),
        ("color" in req and req.get("color") not in GENEVAL_COLORS,
         f"has color {req.get('color')!r}; GenEval's colors: {', '.join(GENEVAL_COLORS)}"),
        ("position" in req and not (isinstance(position, list) and len(position) == 2 and position[0] in RELATIONS
                                    and type(position[1]) is int and 0 <= position[1] < index),
         f"has position {position!r}; a position is [relation, index of an earlier include], relations: "
         + ", ".join(RELATIONS)),
    ]
    return next((text for broken, text in rules if broken), None)
