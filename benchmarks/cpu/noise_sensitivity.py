"""CPU check: how far does the next-token distribution move under bf16-sized noise on q and k
(relative 2^-8), with dense attention vs with Prism's block selection? 5000 tokens of GPL-3 on the
bundled SmolLM2-135M. Usage: python benchmarks/cpu/noise_sensitivity.py"""
import os
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from prism_vllm import PrismConfig, reference as R
from prism_vllm.rope import RopeLayout, rope_bands
from prism_vllm.bundled import ensure_bundled_model
torch.set_num_threads(2)
M = os.environ.get("PRISM_TEST_MODEL") or str(ensure_bundled_model())
tok = AutoTokenizer.from_pretrained(M)
model = AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32)
theta = model.config.rope_parameters["rope_theta"] if getattr(model.config, "rope_parameters", None) else model.config.rope_theta
bands = rope_bands(RopeLayout(64, 64, True, theta), 32, 48)
S = {"mode": "dense", "noise": 0.0, "seed": 0}
def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    if S["noise"]:
        g = torch.Generator().manual_seed(S["seed"] + module.layer_idx)
        query = query * (1 + S["noise"] * torch.randn(query.shape, generator=g))
        key = key * (1 + S["noise"] * torch.randn(key.shape, generator=g))
    if S["mode"] == "dense":
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
    q = query[0].transpose(0, 1); k = key[0].transpose(0, 1); v = value[0].transpose(0, 1)
    o, _ = R.prism_attention(q, k, v, 0, bands, PrismConfig(rule="paper"), scaling)
    return o[None].contiguous(), None
AttentionInterface.register("exp", attn); model.config._attn_implementation = "exp"
text = open("/usr/share/common-licenses/GPL-3").read()
ids = tok.encode(text, add_special_tokens=False)[:5000]
for mode in ("dense", "prism"):
    lps = []
    for noise, seed in ((0.0, 0), (2**-8, 1), (2**-8, 2)):
        S.update(mode=mode, noise=noise, seed=seed)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        lps.append(lp)
    d = [float((lps[i] - lps[0]).abs().max()) for i in (1, 2)]
    top = int(lps[0].argmax())
    print(mode, "max |dlogprob| over vocab under bf16-sized q/k noise:", [f"{x:.3f}" for x in d],
          "top-token dlogprob:", [f"{float(lps[i][top]-lps[0][top]):.3f}" for i in (1, 2)], flush=True)
