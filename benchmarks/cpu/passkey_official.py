"""CPU check: does a passkey survive Prism's selection on the bundled SmolLM2-135M at 4K tokens?

Prefill only (the first answer token comes from the prefill's last row); dense SDPA vs the
official Prism estimation (needs PRISM_OFFICIAL_DIR: `bash benchmarks/fetch_official.sh`) vs ours
(prism_vllm.reference), each followed by exact attention over the selected blocks.
Modes: dense, official, official_nocal, rowcal (ours, dense_tail off: the paper's rule for every
row), nocal, tail (ours with PrismConfig's defaults, dense_tail on).
Usage: PRISM_OFFICIAL_DIR=benchmarks/_official python benchmarks/cpu/passkey_official.py dense,official,rowcal [N]
(N prompt tokens, default 4096; the official modes need N % 128 == 0.)
Prints per depth "argmax==first key token:logprob of it" and the mean selected density."""
import os
import random, sys, time
sys.path.insert(0, os.environ.get("PRISM_OFFICIAL_DIR", "benchmarks/_official"))
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
hd = 64
theta = getattr(model.config, "rope_theta", None) or model.config.rope_parameters["rope_theta"]
bands = rope_bands(RopeLayout(hd, hd, True, theta), 32, 48)
MODE = {"v": None, "d": []}
def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    v = MODE["v"]
    if v == "dense":
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
    q = query[0].transpose(0, 1); k = key[0].transpose(0, 1); vv = value[0].transpose(0, 1)
    g = q.shape[1] // k.shape[1]
    if v.startswith("official"):
        from prism.prism import prism_block_estimate
    if v == "official":
        m = prism_block_estimate(query, key.repeat_interleave(g, 1), low_freq_dim=48, high_freq_dim=32, calibrate=True)[0]
    elif v == "official_nocal":
        m = prism_block_estimate(query, key.repeat_interleave(g, 1), low_freq_dim=48, high_freq_dim=32, calibrate=False)[0]
    else:
        cfg = {"rowcal": PrismConfig(dense_tail=False), "nocal": PrismConfig(calibrate=False, dense_tail=False),
               "tail": PrismConfig(rule="paper")}[v]
        m = R.select_blocks(R.pool_blocks(q, 0, 128), R.pool_blocks(k, 0, 128), 0, bands, cfg, seq_len=q.shape[0])
    nk = m.shape[-1]
    causal = torch.arange(nk)[None] <= torch.arange(nk)[:, None]
    m = m & causal
    MODE["d"].append(float(m.sum()) / float(causal.sum() * m.shape[0]))
    o = R.block_sparse_attention(q, k, vv, 0, m, 128, scaling)
    return o[None].contiguous(), None
AttentionInterface.register("exp", attn)
model.config._attn_implementation = "exp"
filler = tok.encode(" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.", add_special_tokens=False)
head = tok.encode("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.", add_special_tokens=False)
question = tok.encode("\nWhat is the pass key? The pass key is", add_special_tokens=False)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
rng = random.Random(1234)
cases = []
for depth in (0.1, 0.5, 0.9):
    key = str(rng.randint(10000, 99999))
    needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key.", add_special_tokens=False)
    body = n - len(head) - len(needle) - len(question)
    hay = (filler * (body // len(filler) + 1))[:body]
    at = int(len(hay) * depth)
    ids = head + hay[:at] + needle + hay[at:] + question
    assert len(ids) == n
    cases.append((ids, key))
for v in sys.argv[1].split(","):
    MODE["v"] = v; MODE["d"] = []
    t = time.time(); res = []
    for ids, key in cases:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        first = tok.encode(" " + key, add_special_tokens=False)[0]
        lp = torch.log_softmax(logits.float(), -1)
        res.append(f"{int(logits.argmax()==first)}:{lp[first]:.2f}")
    print(f"{v:15s} {res} density={sum(MODE['d'])/max(1,len(MODE['d'])):.3f} {time.time()-t:.0f}s", flush=True)
