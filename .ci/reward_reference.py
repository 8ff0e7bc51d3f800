"""rewards.py's `hpsv2` and `imagereward` against the original code, on reduced random-weight models.

Builds each original architecture at reduced width and depth with random weights: HPSv2's open_clip CLIP
(the `hpsv2x` 1.2.0 package that DiffusionNFT installs, = tgxs002/HPSv2's code) and ImageReward's BLIP ViT +
med BERT + MLP (`image-reward` 1.5, through its own constructors with the sizes patched). Scores the same
images and prompts with the originals (HPSv2: the package's evaluation transform as in its img_score.py, and
DiffusionNFT's flow_grpo/hpsv2_scorer.py on float batches; ImageReward: ImageReward.score(), one pair at a
time) and with rewards.py, and fails unless every score agrees within 1e-4 relative. The tokenizers are tiny
vocabularies made here (the real ones are on the hub) run through the originals' own tokenizer code
(open_clip's SimpleTokenizer on a tiny BPE file; BLIP's init_tokenizer() on a tiny BERT vocab.txt).

Reference environment, apart from the project's (about 6 GB; the CUDA build of torch runs on a CPU):
    python3.11 -m venv /work/refenv
    /work/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/refenv/bin/pip install transformers==4.40.0 timm==0.6.13 fairscale==0.4.13 "accelerate<1.5" \\
        diffusers==0.30.3 "datasets<3" ftfy regex clint safetensors "setuptools<70"
    /work/refenv/bin/pip install --no-deps hpsv2x==1.2.0 image-reward==1.5 openai-clip==1.0.1
    git clone https://github.com/NVlabs/DiffusionNFT /tmp/DiffusionNFT   # only flow_grpo/hpsv2_scorer.py is used
(image-reward pins timm 0.6.13, open_clip_torch wants a newer one: the vendored open_clip of hpsv2x needs none.)
Run from the repository root (two minutes on two cores):
    HF_HUB_OFFLINE=1 /work/refenv/bin/python .ci/reward_reference.py --diffusionnft /tmp/DiffusionNFT [--write]
--write (re)writes .ci/fixtures/, which test_nft.py checks without the original packages: the reduced models'
original-layout state dicts (weights rounded to float8 e4m3, so the file holds exactly what was scored), their
configs and tokenizer vocabularies, the images, prompts, the originals' token ids and scores, and the full-size
originals' key -> shape lists.
"""
import argparse
import datetime
import gzip
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import rewards  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")
# (rows, height, width, nearest-neighbour upscale): small stored images; "large" is 256 x 320 once upscaled, so
# both originals shrink it (the real case: 512 px images), "wide" is padded (HPSv2) and cropped (ImageReward).
BATCHES = {"square": (2, 32, 32, 1), "wide": (2, 24, 40, 1), "large": (2, 32, 40, 8)}
PROMPTS = {
    "square": ["A photo of a cat on the red sofa", "an astronaut\u2019s  glove floating, \"NASA 2049\" on the wrist"],
    "wide": ["Caf\u00e9 &amp; bakery at night:   the SIGN says \u201copen\u201d!", "two dogs and a red car"],
    "large": ["a photo of " + " and ".join(["a red cat", "a dog", "the tree", "a house", "a blue sky"] * 6),
              "A \u0152uvre-like painting of the sea, 1889, oil on canvas; st\u00e6rk lines & swirls"],
}
HPS_CONFIG = {"embed_dim": 16,  # open_clip's ViT-H-14.json, narrower and shallower (vocab_size: the tiny BPE's)
              "vision_cfg": {"image_size": 224, "layers": 2, "width": 16, "head_width": 8, "patch_size": 14},
              "text_cfg": {"context_length": 77, "width": 16, "heads": 2, "layers": 2}}
VISION = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=16)  # BLIP ViT
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 16, "initializer_range": 0.02, "intermediate_size": 64,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
              "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 768,
              "add_cross_attention": True}  # ImageReward's med_config.json, narrower (vocab_size: the tiny vocab's + 2)
TOLERANCE = 1e-4


def images_of(stored, repeat):
    """(N, 3, H, W) floats k/255 from stored uint8 images, upscaled `repeat` times by nearest neighbour."""
    return stored.repeat_interleave(repeat, -1).repeat_interleave(repeat, -2).float() / 255


def learn_bpe(texts, merges=40):
    """A tiny BPE vocabulary learned on `texts` (lowercased words, "</w>" at the end), most frequent pair first."""
    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for t in texts for w in re.findall(r"[a-z]+", t.lower())]
    learned = []
    for _ in range(merges):
        pairs = {}
        for w in words:
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            break
        best = max(sorted(pairs), key=pairs.get)
        learned.append(best)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(tuple(out))
        words = merged
    return [" ".join(m) for m in learned]


def bert_vocab(texts):
    """A tiny WordPiece vocabulary: BERT's specials, some whole words of `texts`, a few suffixes and symbols."""
    words = sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower()) if len(w) <= 5})
    symbols = ["##s", "##ed", "##ing", "##er", ",", ".", "!", "&", ":", ";", "'", '"', "1", "8", "9", "2", "0", "4"]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + symbols


def randomize(model, generator):
    """Random weights of a useful size (Linear/conv ~ 1/sqrt(fan in), LayerNorm ~ 1, the rest ~ 0.5), rounded to
    float8 e4m3 so that the fixture stores exactly what is scored."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator)
                if isinstance(module, torch.nn.LayerNorm):
                    p.copy_(1 + 0.1 * noise if name == "weight" else 0.1 * noise)
                elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name == "weight":
                    p.copy_(noise / (p[0].numel() ** 0.5))
                else:
                    p.copy_(0.5 * noise / (p.shape[-1] ** 0.5 if p.dim() >= 2 else 5))
                p.copy_(p.to(torch.float8_e4m3fn).float())
    return model.eval()


def relative_errors(ours, original):
    return [abs(a - b) / abs(b) for a, b in zip(ours, original)]


# ---- HPSv2 ----

def hps_originals(tmp, diffusionnft):
    """The reduced open_clip CLIP made by hpsv2's create_model_and_transforms (img_score.py's arguments), its
    evaluation transform and tokenize() on a tiny BPE file, and DiffusionNFT's HPSv2Scorer.__call__ on it."""
    from hpsv2.src.open_clip import create_model_and_transforms, factory, get_tokenizer, tokenizer as tok_module
    merges = learn_bpe([p for ps in PROMPTS.values() for p in ps])
    bpe = os.path.join(tmp, "bpe_tiny.txt.gz")
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("#version: tiny\n" + "\n".join(merges) + "\n")
    tok_module._tokenizer = tok_module.SimpleTokenizer(bpe)
    cfg = json.loads(json.dumps(HPS_CONFIG))
    cfg["text_cfg"]["vocab_size"] = tok_module._tokenizer.vocab_size
    factory._MODEL_CONFIGS["HPS-tiny"] = cfg
    torch.manual_seed(0)
    model, _, preprocess_val = create_model_and_transforms(
        "HPS-tiny", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    randomize(model, torch.Generator().manual_seed(1))
    tokenizer = get_tokenizer("HPS-tiny")

    def package_scores(images, prompts):  # img_score.score()'s loop, one (image, prompt) at a time
        from PIL import Image
        out = []
        for image, prompt in zip(rewards.to_uint8(images), prompts):
            with torch.no_grad():
                pixels = preprocess_val(Image.fromarray(image)).unsqueeze(0)
                outputs = model(pixels, tokenizer([prompt]))
                logits = outputs["image_features"] @ outputs["text_features"].T
            out.append(float(torch.diagonal(logits)[0]))
        return out

    sys.modules.setdefault("flow_grpo", types.ModuleType("flow_grpo"))
    sys.modules["flow_grpo.reward_ckpt_path"] = types.SimpleNamespace(CKPT_PATH="")
    path = os.path.join(diffusionnft, "flow_grpo", "hpsv2_scorer.py")
    spec = importlib.util.spec_from_file_location("flow_grpo.hpsv2_scorer", path)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    scorer = official.HPSv2Scorer.__new__(official.HPSv2Scorer)  # its __init__ loads the full-size checkpoints
    torch.nn.Module.__init__(scorer)
    scorer.dtype, scorer.device, scorer.model, scorer.processor = torch.float32, "cpu", model, tokenizer
    scorer.preprocess_val = official.image_transform_tensor(model.visual.image_size[0], mean=None, std=None)
    vocab = list(tok_module._tokenizer.encoder)  # "<start_of_text>", "<end_of_text>" last: transformers' names
    vocab[-2:] = ["<|startoftext|>", "<|endoftext|>"]
    official_scores = lambda images, prompts: scorer(images, prompts).tolist()  # noqa: E731
    return model, cfg, merges, vocab, tokenizer, package_scores, official_scores


def hps_ours(state, cfg, merges, vocab, tmp):
    from transformers import CLIPTokenizerFast
    with open(os.path.join(tmp, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(tmp, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizerFast(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"))
    scorer = rewards.HpsScorer(rewards.load_hpsv2(state, cfg), tokenizer, None, "cpu")
    return tokenizer, rewards.clipscore_fn(scorer)


# ---- ImageReward ----

def imagereward_original(tmp):
    """ImageReward(med_config) through its own constructors, with create_vit, MLP(768) and the tokenizer's
    from_pretrained('bert-base-uncased') patched to the reduced sizes and the tiny vocabulary."""
    from ImageReward.models.BLIP import blip, blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    image_reward = sys.modules["ImageReward.ImageReward"]  # the module (the package exports the class by that name)
    vocab = bert_vocab([p for ps in PROMPTS.values() for p in ps])
    folder = os.path.join(tmp, "bert")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    med = dict(MED_CONFIG, vocab_size=len(vocab) + 2)
    with open(os.path.join(tmp, "med_config.json"), "w") as f:
        json.dump(med, f)

    class TinyBert(blip.BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            assert name == "bert-base-uncased"
            return super().from_pretrained(folder)

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        assert vit == "large" and image_size == 224
        return VisionTransformer(img_size=image_size, patch_size=VISION["patch_size"], embed_dim=VISION["hidden_size"],
                                 depth=VISION["num_hidden_layers"], num_heads=VISION["num_attention_heads"],
                                 drop_path_rate=0.1), VISION["hidden_size"]

    patched = blip.BertTokenizer, blip_pretrain.create_vit, image_reward.MLP
    blip.BertTokenizer, blip_pretrain.create_vit = TinyBert, create_vit
    image_reward.MLP = lambda input_size: patched[2](med["hidden_size"])
    torch.manual_seed(0)
    model = image_reward.ImageReward(med_config=os.path.join(tmp, "med_config.json"), device="cpu")
    blip.BertTokenizer, blip_pretrain.create_vit, image_reward.MLP = patched
    randomize(model, torch.Generator().manual_seed(2))
    return model, med, vocab, folder


def imagereward_ours(state, med, folder):
    from transformers import BertTokenizerFast
    tokenizer = rewards.bert_tokenizer(BertTokenizerFast(os.path.join(folder, "vocab.txt")))
    return tokenizer, rewards.imagereward_fn(rewards.load_imagereward(state, med, VISION), tokenizer, "cpu")


# ---- full-size layouts ----

def full_layouts(tmp, folder):
    """Key -> shape of the full-size originals' state dicts (HPSv2.1's open_clip ViT-H-14 and ImageReward-v1.0),
    HPSv2's built on the meta device; ImageReward's with its repository's med_config.json (train/src/config)."""
    from hpsv2.src.open_clip.model import CLIP
    from ImageReward.models.BLIP import blip
    image_reward = sys.modules["ImageReward.ImageReward"]
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
           "add_cross_attention": True}
    path = os.path.join(tmp, "med_config_full.json")
    with open(path, "w") as f:
        json.dump(med, f)

    class TinyBert(blip.BertTokenizer):  # the layout does not depend on the vocabulary file
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            return super().from_pretrained(folder)
    original, blip.BertTokenizer = blip.BertTokenizer, TinyBert
    with torch.device("meta"):
        hps = CLIP(**rewards.VIT_H_14, output_dict=True)
    ir = image_reward.ImageReward(med_config=path, device="cpu")  # on the CPU: its ViT calls .item() as it is built
    blip.BertTokenizer = original
    shapes = lambda m: {k: list(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    return {"hpsv2": shapes(hps), "imagereward": shapes(ir), "imagereward_med_config": med}


def stored_weights(name, state):
    """The fixture's copy of a state dict: floats as float8 e4m3 (exact: randomize rounded them), ints as they are."""
    return {f"{name}.{k}": v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in state.items()}


def check_hpsv2(stored, tmp, diffusionnft):
    """Scores of the two original HPSv2 paths and of rewards.py, printed; returns (record, tensors, worst error)."""
    model, cfg, merges, vocab, tokenize, package, official = hps_originals(tmp, diffusionnft)
    tokenizer, ours = hps_ours(model.state_dict(), cfg, merges, vocab, tmp)
    record, worst = dict(config=cfg, merges=merges, vocab=vocab, ids={}, scores={}), 0.0
    for name, (*_, repeat) in BATCHES.items():
        images, prompts = images_of(stored[name], repeat), PROMPTS[name]
        ids = tokenize(prompts)
        assert torch.equal(rewards.open_clip_tokens(tokenizer, prompts), ids), (name, "token ids differ")
        a, b, c = package(images, prompts), official(images, prompts), ours(images, prompts, None)[0].tolist()
        err = max(relative_errors(c, a) + relative_errors(c, b))
        worst = max(worst, err)
        print(f"  {name:6} {tuple(images.shape)}: hpsv2 package {[f'{x:.6f}' for x in a]}  DiffusionNFT scorer "
              f"{[f'{x:.6f}' for x in b]}  rewards.py {[f'{x:.6f}' for x in c]}  max relative difference {err:.1e}")
        record["ids"][name], record["scores"][name] = ids.tolist(), a
    return record, stored_weights("hpsv2", model.state_dict()), worst


def check_imagereward(stored, tmp):
    """Scores of ImageReward.score() and of rewards.py, printed; returns (record, tensors, worst error, vocab dir)."""
    from PIL import Image
    model, med, vocab, folder = imagereward_original(tmp)
    tokenizer, ours = imagereward_ours(model.state_dict(), med, folder)
    record, worst = dict(med_config=med, vision=VISION, vocab=vocab, ids={}, scores={}), 0.0
    for name, (*_, repeat) in BATCHES.items():
        images, prompts = images_of(stored[name], repeat), PROMPTS[name]
        ids = [model.blip.tokenizer(p, padding="max_length", truncation=True, max_length=35).input_ids for p in prompts]
        assert tokenizer(prompts, padding="max_length", truncation=True, max_length=35).input_ids == ids, name
        with torch.no_grad():
            a = [model.score(p, Image.fromarray(im)) for p, im in zip(prompts, rewards.to_uint8(images))]
        c = ours(images, prompts, None)[0].tolist()
        err = max(relative_errors(c, a))
        worst = max(worst, err)
        print(f"  {name:6} {tuple(images.shape)}: ImageReward.score {[f'{x:.6f}' for x in a]}  "
              f"rewards.py {[f'{x:.6f}' for x in c]}  max relative difference {err:.1e}")
        record["ids"][name], record["scores"][name] = ids, a
    return record, stored_weights("imagereward", model.state_dict()), worst, folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffusionnft", required=True, help="a checkout of NVlabs/DiffusionNFT")
    parser.add_argument("--write", action="store_true", help="write .ci/fixtures/")
    args = parser.parse_args()
    import transformers
    from importlib.metadata import version
    from safetensors.torch import save_file
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    g = torch.Generator().manual_seed(0)
    stored = {name: torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
              for name, (n, h, w, _) in BATCHES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"hpsv2 (hpsv2x {version('hpsv2x')}, torchvision {version('torchvision')}):")
        hps, hps_tensors, hps_worst = check_hpsv2(stored, tmp, args.diffusionnft)
        print(f"imagereward (image-reward {version('image-reward')}, transformers {transformers.__version__}):")
        ir, ir_tensors, ir_worst, folder = check_imagereward(stored, tmp)
        layouts = full_layouts(tmp, folder) if args.write else None
    failed = max(hps_worst, ir_worst) > TOLERANCE
    print(f"{'FAILED' if failed else 'equal'}: every score within {TOLERANCE:g} relative of the original's "
          f"(torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, {datetime.date.today()})")
    if args.write and not failed:
        os.makedirs(FIXTURES, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in dict(**{f"images.{k}": v for k, v in stored.items()}, **hps_tensors,
                                                         **ir_tensors).items()}
        save_file(tensors, os.path.join(FIXTURES, "reward_reference.safetensors"))
        made = dict(date=str(datetime.date.today()), torch=torch.__version__, transformers=transformers.__version__,
                    hpsv2x=version("hpsv2x"), image_reward=version("image-reward"), machine=platform.machine())
        record = dict(made=made, batches=BATCHES, prompts=PROMPTS, hpsv2=hps, imagereward=ir)
        with open(os.path.join(FIXTURES, "reward_reference.json"), "w") as f:  # a line per entry
            f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n")
        with gzip.GzipFile(os.path.join(FIXTURES, "reward_layouts.json.gz"), "wb", mtime=0) as f:  # reproducible bytes
            f.write(json.dumps(layouts).encode())
        print(f"wrote {FIXTURES}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
