"""Compile time of whole-model vs regional (per-block) torch.compile (inductor, CPU) on real-width
SD3.5-Medium transformers with few layers, with the LoRA attached, in one process. For each layout and
mode: first no-grad forward + first grad forward/backward, minus the same calls once compiled = compile s.
Also |v_grad_graph - v_nograd_graph| at equal weights (what NFT would read as |v_theta - v_old| at epoch 0)."""
import sys, time, json, torch, torch._dynamo, torch._inductor.config as ic
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
import nft
ic.fx_graph_cache = False
import torch._functorch.config as fc
fc.enable_autograd_cache = False
torch._dynamo.config.recompile_limit = 64
from diffusers import SD3Transformer2DModel

def build(layers, dual):
    cfg = dict(nft.BUILTIN["sd3.5-medium"]["transformer"], num_layers=layers, dual_attention_layers=tuple(range(dual)))
    torch.manual_seed(0)
    t = SD3Transformer2DModel(**cfg).eval()
    args = nft.parse_args(["--model", "tiny"])
    args.lora_targets, args.rank, args.lora_alpha = "official", 32, 64
    params, old = nft.add_adapters(t, args)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.01)
    return t, params

B, h, L = 1, 32, 64  # 256 px latents, 64 text tokens: compile cost does not depend on the sizes
g = torch.Generator().manual_seed(0)
x, emb, pooled = torch.randn(B, 16, h, h, generator=g), torch.randn(B, L, 4096, generator=g), torch.randn(B, 2048, generator=g)

def calls(t):
    t0 = time.perf_counter()
    with torch.no_grad():
        v_ng = nft.velocity(t, x, 0.5, {"embeds": emb, "pooled": pooled})
    t1 = time.perf_counter()
    v_g = nft.velocity(t, x, 0.5, {"embeds": emb, "pooled": pooled})
    v_g.square().mean().backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, (v_g.detach() - v_ng).abs()

# warm-up: inductor's one-off process costs (imports, C++ toolchain, worker pool) must not count for the first layout
w = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)).requires_grad_(True)
wc = torch.compile(w)
with torch.no_grad():
    wc(torch.randn(2, 8))
wc(torch.randn(2, 8)).sum().backward()
base = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
res = []
for layers, dual in [(int(a), int(b)) for a, b in (s.split(":") for s in sys.argv[1:])]:
    for mode in ("whole", "regional"):
        torch._dynamo.reset()
        t, params = build(layers, dual)
        if mode == "whole":
            t.compile()
        else:
            nft.compile_blocks(t)
        with torch._inductor.utils.fresh_cache():  # cold: no kernel compiled by an earlier measurement is reused
            first = calls(t)
        again = calls(t)
        total = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        graphs, base = total - base, total  # the counter is cumulative over resets
        r = dict(layers=layers, dual=dual, mode=mode, graphs=graphs,
                 compile_nograd_s=first[0] - again[0], compile_grad_s=first[1] - again[1],
                 steady_nograd_s=again[0], steady_grad_s=again[1],
                 dv_equal_weights_mean=float(again[2].mean()), dv_equal_weights_max=float(again[2].max()))
        print(json.dumps(r), flush=True)
        res.append(r)
        del t, params
