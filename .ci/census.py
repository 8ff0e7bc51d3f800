"""Census of one rollout forward (machine-independent numbers): ATen ops (~ kernels launched on a GPU),
matmul FLOPs, bytes moved by elementwise ops (inputs + outputs, views excluded) and by dtype casts, per
solver step of a 2-step rollout with the old policy, bf16 base + fp32 LoRA under bf16 autocast, real-width
SD3.5-Medium transformer with 2 layers (one dual-attention), batch 1, 512 px, 205 text tokens.
Runs the current nft.py, and first an earlier one when its path is given, on the same inputs:
    python .ci/census.py                                   # this version
    git show 1e502c6:nft.py > /tmp/nft_before.py && python .ci/census.py /tmp/nft_before.py   # the README's "before"
"""
import collections, importlib.util, inspect, json, os, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nft  # noqa: E402
from diffusers import SD3Transformer2DModel

MATMUL = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", "convolution"}

class Census(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.segments = [collections.Counter()]
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        c = self.segments[-1]
        name = func._schema.name.split("::")[-1]
        if any(r.alias_info is not None for r in func._schema.returns) or name in ("detach", "lift_fresh"):
            c["views"] += 1
            return out
        c["ops"] += 1
        flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in flat)
        if name in MATMUL:
            c["matmul_ops"] += 1
            c["matmul_gflop"] += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out) / 1e9 if func._overloadpacket in flop_registry else 0
            c["matmul_gb"] += nbytes / 1e9
        else:
            c["elementwise_ops"] += 1
            c["elementwise_gb"] += nbytes / 1e9
            if name in ("_to_copy", "to", "copy_") and len({t.dtype for t in flat}) > 1:
                c["cast_ops"] += 1
                c["cast_gb"] += nbytes / 1e9
            if name in ("_to_copy", "copy_") and len({t.device.type for t in flat}) > 1:
                c["host_device_copies"] += 1
            if flat and any(t.dtype == torch.float64 for t in flat):
                c["float64_ops"] += 1
        return out

def run(mod, label):
    cfg = dict(nft.BUILTIN["sd3.5-medium"]["transformer"], num_layers=2, dual_attention_layers=(0,))
    torch.manual_seed(0)
    t = SD3Transformer2DModel(**cfg).eval().to(torch.bfloat16)
    args = mod.parse_args(["--model", "tiny", "--mixed_precision", "bf16", "--lora_targets", "official", "--rank", "32",
                           "--lora_alpha", "64"])
    _, autocast = mod.precision(args, torch.device("cpu"))
    params, old = mod.add_adapters(t, args)
    pipe = type("P", (), {"transformer": t})()
    g = torch.Generator().manual_seed(0)
    x, emb, pooled = torch.randn(1, 16, 64, 64, generator=g), torch.randn(1, 205, 4096, generator=g).bfloat16(), torch.randn(1, 2048, generator=g).bfloat16()
    census = Census()
    real = mod.velocity
    def marked(*a, **k):
        census.segments.append(collections.Counter())
        return real(*a, **k)
    mod.velocity = marked
    if hasattr(mod, "policy"):
        ctx = mod.policy(params, old)
    else:
        mod.set_policy(t, "old"); import contextlib; ctx = contextlib.nullcontext()
    sigmas = getattr(mod, "sd3_sigmas", None) or mod.rollout_sigmas  # its name in earlier versions
    with ctx, census:
        if "run" in inspect.signature(mod.sample).parameters:  # this version: what stays fixed travels in a Run
            fixed = mod.Run(args, 0, 1, torch.device("cpu"), pipe=pipe, autocast=autocast)
            mod.sample(fixed, x, {"embeds": emb, "pooled": pooled}, sigmas(2), "euler")
        elif "cond" in inspect.signature(mod.sample).parameters:  # earlier versions: one conditioning dict
            mod.sample(pipe, x, {"embeds": emb, "pooled": pooled}, sigmas(2), "euler", args, autocast)
        else:  # earlier still: embeddings and pooled embeddings apart
            mod.sample(pipe, x, emb, pooled, sigmas(2), "euler", args, autocast)
    mod.velocity = real
    steps = census.segments[1:]
    steps[-1] = steps[-1]  # the last segment also holds the solver's update after the forward (a few ops)
    for i, s in enumerate(steps):
        print(json.dumps(dict(version=label, step=i + 1, **{k: round(v, 4) for k, v in sorted(s.items())})), flush=True)

if len(sys.argv) > 1:  # an earlier nft.py, e.g. from git show
    spec = importlib.util.spec_from_file_location("nft_before", sys.argv[1])
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    run(before, "before")
run(nft, "after")
