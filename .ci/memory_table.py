"""The README's memory table, from nft.memory_estimate (an estimate, not a measurement), and the activation constants
it uses.

    python .ci/memory_table.py            # the table: per family and GPU size, the fewest flags that fit
    python .ci/memory_table.py --derive   # MEMORY's "saved": bytes kept for the backward per token and block, / width

The table takes each family's preset (--model <hub id>: rank, text length; batch 9, 512 px) on one GPU, and for
--fsdp 8 ranks. --derive builds one block of each kind at full width on the CPU (about 7 GB of memory, a few minutes),
adds the LoRA on the official targets, runs the training forward under bf16 autocast and counts the bytes of the
tensors autograd saves (each storage once) at 128 and 256 px: the difference per image token and block."""
import atexit
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ["HF_HUB_OFFLINE"] = "1"  # the published sizes (MEMORY), not those of configs cached or downloaded here
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp()
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], True)
import nft  # noqa: E402

HUB = {"sd3": "stabilityai/stable-diffusion-3.5-medium", "flux": "black-forest-labs/FLUX.1-dev", "qwenimage": "Qwen/Qwen-Image"}
NAMES = {"sd3": "SD3.5-Medium", "flux": "FLUX.1-dev", "qwenimage": "Qwen-Image"}
FLAGS = ("offload_text_encoders", "gradient_checkpointing", "fsdp")


def fewest_flags(sizes, args, gib, gpus=8):
    """As nft.check_memory: the fewest of FLAGS (--fsdp last) with which the estimate fits `gib`."""
    import dataclasses
    import itertools
    for bits in sorted(itertools.product((False, True), repeat=3), key=lambda b: (b[2], sum(b))):
        trial = dataclasses.replace(args, **dict(zip(FLAGS, bits)))
        need = nft.memory_estimate(sizes, trial, "bf16", gpus if trial.fsdp else 1)["total"]
        if need <= gib:
            return " ".join(f"`--{k}`" for k in FLAGS if getattr(trial, k)) or "defaults", need
    return None, None


def table():
    sizes_gb = (24, 40, 48, 80)
    print("| model (preset) | estimate with the defaults | " + " | ".join(f"{g} GB GPU" for g in sizes_gb) + " |")
    print("|---|---|" + "---|" * len(sizes_gb))
    for family, model in HUB.items():
        args, sizes = nft.parse_args(["--model", model]), nft.model_sizes(model)
        parts = nft.memory_estimate(sizes, args)
        cells = []
        for gb in sizes_gb:
            flags, need = fewest_flags(sizes, args, gb * 1e9 / 2 ** 30)
            cells.append(f"{flags}: {need:.1f}" if flags else "does not fit")
        detail = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in parts.items() if k != "total" and v)
        print(f"| {NAMES[family]} (rank {args.rank}, text {args.max_sequence_length}) | **{parts['total']:.1f}** ({detail}) | "
              + " | ".join(cells) + " |")


def saved_bytes(transformer, family, res, text=64):
    """Bytes of the tensors autograd keeps for the backward of one training forward (batch 1, bf16 autocast)."""
    C = transformer.config.in_channels // (1 if family == "sd3" else 4)
    x = torch.randn(1, C, res // 8, res // 8)
    width = transformer.config.joint_attention_dim
    cond = dict(embeds=torch.randn(1, text, width, dtype=torch.bfloat16))
    pooled = torch.randn(1, getattr(transformer.config, "pooled_projection_dim", 1), dtype=torch.bfloat16)
    cond.update(dict(sd3=dict(pooled=pooled), flux=dict(pooled=pooled, guidance=torch.full((1,), 3.5)),
                     qwenimage=dict(mask=torch.ones(1, text, dtype=torch.bool)))[family])
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        nft.velocity(transformer, x, 0.5, cond)
    return sum(seen.values())


def derive():
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    arch = {"sd3": (SD3Transformer2DModel, nft.BUILTIN["sd3.5-medium"]["transformer"]),
            "flux": (FluxTransformer2DModel, nft.BUILTIN["flux.1-dev"]["transformer"]),
            "qwenimage": (QwenImageTransformer2DModel, nft.BUILTIN["qwen-image"]["transformer"])}
    # layouts whose differences isolate one block of each kind; weights: how many the full model has of each
    layouts = {"sd3": ([dict(num_layers=2, dual_attention_layers=()), dict(num_layers=3, dual_attention_layers=()),
                        dict(num_layers=3, dual_attention_layers=(0,))], [(1, 0, 11), (2, 0, 13)]),
               "flux": ([dict(num_layers=1, num_single_layers=1), dict(num_layers=2, num_single_layers=1),
                         dict(num_layers=1, num_single_layers=2)], [(1, 0, 19), (2, 0, 38)]),
               "qwenimage": ([dict(num_layers=1), dict(num_layers=2)], [(1, 0, 60)])}
    for family, (cls, config) in arch.items():
        per_token = []
        for layout in layouts[family][0]:
            torch.manual_seed(0)
            transformer = cls(**dict(config, **layout)).to(torch.bfloat16)
            tiny = {"sd3": "tiny", "flux": "tiny-flux", "qwenimage": "tiny-qwenimage"}[family]  # for its family's targets
            nft.add_adapters(transformer, nft.parse_args(["--model", tiny, "--lora_targets", "official", "--rank", "64"]))
            per_token.append((saved_bytes(transformer, family, 256) - saved_bytes(transformer, family, 128)) / (256 - 64))
            del transformer
        total = sum(n * (per_token[a] - per_token[b]) for a, b, n in layouts[family][1])
        blocks = sum(n for _, _, n in layouts[family][1])
        d = config["num_attention_heads"] * config["attention_head_dim"]
        print(f"{family}: {total / blocks:.0f} bytes per token and block on average = {total / blocks / d:.1f} x width {d}")


if __name__ == "__main__":
    derive() if "--derive" in sys.argv else table()
