"""`prism-vllm inspect` on tiny random models: capture, block maps, selection stats, PNGs.

The text is a slice of the GPL-3 licence shipped by Debian's base-files package
(/usr/share/common-licenses/GPL-3): natural English that this project did not write.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from prism_vllm.config import PrismConfig  # noqa: E402
from prism_vllm.rope import rope_inv_freq  # noqa: E402
from prism_vllm import attention_maps as am  # noqa: E402
from prism_vllm.server import inspect_attention as ia  # noqa: E402

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def _text_slice(n_chars: int = 12000) -> str:
    if not GPL3.is_file():
        pytest.skip(f"{GPL3} (Debian base-files) not present")
    return GPL3.read_text()[:n_chars]


def _tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 400, sharpen: float = 6.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peakier attention than random init gives, so selections differ
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


def _eager_block_mass(model, ids, block):
    """Reference: HF's own eager attention probabilities, summed per block, rows averaged."""
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        att = model(ids, output_attentions=True).attentions  # per layer [1, H, S, S]
    out = []
    S = ids.shape[1]
    nb = math.ceil(S / block)
    for a in att:
        a = a[0].float()
        pad = torch.nn.functional.pad(a, (0, nb * block - S, 0, nb * block - S))
        m = pad.view(a.shape[0], nb, block, nb, block).sum(dim=(2, 4))
        rows = torch.bincount(torch.arange(S) // block, minlength=nb).float()
        out.append((m / rows.view(1, -1, 1), a))
    return out


@pytest.mark.parametrize("S", [300, 384], ids=["partial-last-block", "aligned"])
def test_captured_block_maps_and_recall_match_eager_attention(S):
    model = _tiny_llama()
    ids = torch.randint(0, 400, (1, S))
    cfg = PrismConfig(high_threshold=0.8, low_threshold=0.8)
    am.register_capture({})
    model.set_attn_implementation(am.ATTN_IMPL)
    res = am.run_inspect(model, ids, cfg, draw_layers=[0, 1])
    ref = _eager_block_mass(model, ids, cfg.block_size)
    assert [lr.layer for lr in res.layers] == [0, 1]
    for lr, (mass, probs) in zip(res.layers, ref):
        torch.testing.assert_close(lr.maps.mass, mass, atol=2e-5, rtol=1e-4)
        # Recall = share of all rows' attention probability inside the selected blocks.
        nb = mass.shape[1]
        for sel, recall, density in ((lr.maps.prism, lr.prism_recall, lr.prism_density),
                                     (lr.maps.meanpool, lr.meanpool_recall, lr.meanpool_density)):
            tok_sel = sel[:, torch.arange(S) // 128][:, :, torch.arange(S) // 128]  # [H, S, S]
            want = (probs * tok_sel).sum(dim=(1, 2)) / S
            torch.testing.assert_close(torch.tensor(recall), want, atol=1e-5, rtol=1e-5)
            causal = nb * (nb + 1) / 2
            torch.testing.assert_close(torch.tensor(density), sel.sum(dim=(1, 2)).float() / causal)
            assert sel[:, :, 0].all() and sel[:, torch.arange(nb), torch.arange(nb)].all()
            assert not sel.triu(1).any()


def test_threshold_one_selects_everything():
    model = _tiny_llama(layers=1)
    am.register_capture({})
    model.set_attn_implementation(am.ATTN_IMPL)
    res = am.run_inspect(model, torch.randint(0, 400, (1, 520)), PrismConfig(high_threshold=1.0, low_threshold=1.0), [0])
    lr = res.layers[0]
    for v in (*lr.prism_density, *lr.meanpool_density, *lr.prism_recall, *lr.meanpool_recall):
        assert v == pytest.approx(1.0, abs=1e-5)


def test_rope_layout_llama_is_neox_with_model_frequencies():
    model = _tiny_llama(layers=1)
    layout, inv_freq = am.probe_rope_layout(model)
    assert layout.is_neox_style and layout.rotary_dim == 16 and layout.head_size == 16
    torch.testing.assert_close(inv_freq, rope_inv_freq(16, 10000.0), atol=1e-6, rtol=1e-5)


def test_rope_layout_glm_is_gptj_style_partial_rotary():
    from transformers import GlmConfig, GlmForCausalLM

    cfg = GlmConfig(vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=1, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = GlmForCausalLM(cfg).eval()
    layout, inv_freq = am.probe_rope_layout(model)
    assert not layout.is_neox_style and layout.rotary_dim == 8 and layout.head_size == 16
    theta = cfg.rope_parameters["rope_theta"]
    torch.testing.assert_close(inv_freq, rope_inv_freq(8, theta), atol=1e-6, rtol=1e-5)


def test_int_list_parsing():
    assert ia._int_list("all", 4, "layers") == [0, 1, 2, 3]
    assert ia._int_list("0,2-3,-1", 6, "layers") == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="out of range"):
        ia._int_list("7", 4, "layers")
    with pytest.raises(ValueError, match="range"):
        ia._int_list("a-b", 4, "heads")
    assert ia.default_layers(30) == [7, 15, 22, 29]


def _tiny_model_dir(tmp_path: Path, text: str) -> Path:
    """A tiny random Llama with a BPE tokenizer trained on the text, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")
    d = tmp_path / "tiny-llama"
    _tiny_llama(layers=3, vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_inspect_command_writes_pngs_and_summary(tmp_path, capsys):
    mpimg = pytest.importorskip("matplotlib.image", reason="pip install 'prism-vllm[inspect]'")

    from prism_vllm.server import cli

    text = _text_slice()
    txt = tmp_path / "gpl3-slice.txt"
    txt.write_text(text)
    model_dir = _tiny_model_dir(tmp_path, text)
    out = tmp_path / "out"
    rc = cli.main(["inspect", str(txt), "--model", str(model_dir), "--tokens", "640", "--layers", "0,2",
                   "--heads", "0-2", "--out", str(out), "--device", "cpu", "--prism-high-threshold", "0.9"])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["density_recall.png", "layer_00.png", "layer_02.png"]
    for p in out.glob("*.png"):
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
        assert img[..., :3].std() > 0.05  # not a blank canvas
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 640 and summary["drawn_layers"] == [0, 2]
    assert [layer["layer"] for layer in summary["layers"]] == [0, 1, 2]
    assert summary["config"]["high_threshold"] == 0.9
    assert summary["config"]["rule"] == "paper"  # the paper's rule beside the mean-pool baseline by default
    assert all(layer["heads"] == [0, 1, 2] for layer in summary["layers"])
    assert summary["rope"]["is_neox_style"] is True
    assert "Prism density" in capsys.readouterr().out


def test_inspect_rejects_short_text(tmp_path, capsys):
    from prism_vllm.server import cli

    txt = tmp_path / "short.txt"
    txt.write_text("too short")
    assert cli.main(["inspect", str(txt), "--tokens", "100"]) == 2
    assert "too short" in capsys.readouterr().err


def test_inspect_names_a_missing_model_folder(tmp_path, capsys):
    from prism_vllm.server import cli

    txt = tmp_path / "t.txt"
    txt.write_text("word " * 2000)
    assert cli.main(["inspect", str(txt), "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("prism-vllm inspect: error: model folder /nonexistent/model does not exist (give an existing "
                   "folder, or a model hub id such as Qwen/Qwen2.5-7B-Instruct)")


def test_inspect_says_when_the_text_is_shorter_than_tokens(tmp_path, caplog):
    from prism_vllm.server import cli

    text = _text_slice(2500)
    txt = tmp_path / "gpl3-slice.txt"
    txt.write_text(text)
    model_dir = _tiny_model_dir(tmp_path, text)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        rc = cli.main(["inspect", str(txt), "--model", str(model_dir), "--tokens", "100000", "--layers", "0",
                       "--heads", "0", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    n = json.loads((out / "summary.json").read_text())["tokens"]
    assert n < 100000
    assert f"--tokens 100000: {txt} has only {n} tokens; using all {n}" in caplog.text


def test_inspect_help_explains_the_selection_flags_only(capsys):
    """Every --prism- flag of inspect shapes the selection it draws and says what it does (the
    field's summary; '%' in a docstring must not break argparse); the server-only ones are absent."""
    from prism_vllm.config import PrismConfig
    from prism_vllm.server import cli
    from prism_vllm.server.inspect_attention import SERVING_ONLY

    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    docs = PrismConfig.field_docs(summary=True)
    for name, doc in docs.items():
        flag = "--prism-" + name.replace("_", "-")
        assert (flag in out) == (name not in SERVING_ONLY), flag
        if name not in SERVING_ONLY:
            assert " ".join(doc.split()[:5]) in out, flag
    assert "PrismConfig." not in out and "+3.6..+5.7% perplexity" in out
