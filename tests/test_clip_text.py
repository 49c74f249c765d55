"""CLIP's text transformer: equal to transformers' CLIPTextModel on converted random weights, causal,
quick-GELU, ViT-L/14's parameter count, and one-sentence errors for mismatched weights."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from minildm.checkpoint import CheckpointError
from minildm.safetensors import load_safetensors, save_safetensors
from minildm.text import clip_text
from minildm.text.clip_text import (CLIPTextConfig, CLIPTextTransformer, causal_mask, clip_text_state_dict_from_hf,
                                    quick_gelu)

SMALL = dict(vocab_size=1000, max_positions=77, width=64, layers=2, heads=4, mlp=128)
PAD = SMALL["vocab_size"] - 1  # plays <|endoftext|>: prompts are padded with it, as in SD v1


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights with O(1) activations and non-trivial biases / LayerNorm affines, so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 2 and "embedding" not in name:
                p.copy_(noise / math.sqrt(p.shape[1]))  # Linear weight: std 1 / sqrt(fan_in)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)  # biases
            else:
                p.copy_(noise)  # embeddings
    return model


def prompts_with_padding() -> torch.Tensor:
    """[3, 77]: a short prompt then padding, a full-length one, and the empty prompt (start, end, pad...)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((3, 77), PAD)
    ids[0, :12] = torch.randint(0, PAD, (12,), generator=g)
    ids[1] = torch.randint(0, PAD, (77,), generator=g)
    ids[2, :2] = torch.tensor([PAD - 1, PAD])
    return ids


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers", reason="transformers is a test-only reference")
    cfg = transformers.CLIPTextConfig(
        vocab_size=SMALL["vocab_size"], hidden_size=SMALL["width"], intermediate_size=SMALL["mlp"],
        num_hidden_layers=SMALL["layers"], num_attention_heads=SMALL["heads"], max_position_embeddings=77,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=PAD - 1, eos_token_id=PAD, pad_token_id=PAD,
    )
    return randomize_(transformers.CLIPTextModel(cfg)).eval()


def file_state_dict(hf_model) -> dict:
    """Keys as SD v1.5's text_encoder/model.safetensors has them: under "text_model." (transformers >= 5
    drops that level in memory and when saving; earlier versions keep it)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in hf_model.state_dict().items()}


def ours_from_hf(hf_model) -> CLIPTextTransformer:
    sd = clip_text_state_dict_from_hf(file_state_dict(hf_model))
    cfg = CLIPTextConfig.from_state_dict(sd, heads=SMALL["heads"])
    model = CLIPTextTransformer(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def max_diff_to_hf(model, hf_model, ids) -> float:
    with torch.no_grad():
        want = hf_model(input_ids=ids).last_hidden_state
        return (model(ids) - want).abs().max().item()


def test_matches_transformers_clip_text_model(hf_model):
    """Last hidden state (after the final LayerNorm) within 1e-5 in fp32, padding present, no padding mask."""
    model = ours_from_hf(hf_model)
    assert model.cfg == CLIPTextConfig(**SMALL)
    ids = prompts_with_padding()
    diff = max_diff_to_hf(model, hf_model, ids)
    print(f"CLIP text parity (diffusers layout), max |ours - transformers| = {diff:.2e}")
    assert diff < 1e-5


def test_matches_through_an_original_single_file(hf_model, tmp_path):
    """The original SD file layout: the text weights under cond_stage_model.transformer.text_model., next to
    other parts' tensors, in a .safetensors written by our writer and read back (lazily) by our reader."""
    sd = {f"cond_stage_model.transformer.{k}": v for k, v in file_state_dict(hf_model).items()}
    sd["model.diffusion_model.conv_in.weight"] = torch.zeros(8, 4, 3, 3)  # another part: skipped
    save_safetensors(sd, tmp_path / "model.safetensors")
    loaded = load_safetensors(tmp_path / "model.safetensors")
    ours_sd = clip_text_state_dict_from_hf(loaded, prefix="cond_stage_model.transformer.text_model.")
    model = CLIPTextTransformer(CLIPTextConfig.from_state_dict(ours_sd, heads=SMALL["heads"])).eval()
    model.load_state_dict(ours_sd, strict=True)
    diff = max_diff_to_hf(model, hf_model, prompts_with_padding())
    print(f"CLIP text parity (single-file layout), max |ours - transformers| = {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("mistake", ["exact GELU", "no causal mask"])
def test_parity_catches_the_common_mistakes(hf_model, monkeypatch, mistake):
    """The 1e-5 tolerance above is tight enough: each mistake moves the outputs by far more."""
    model = ours_from_hf(hf_model)
    if mistake == "exact GELU":
        monkeypatch.setattr(clip_text, "quick_gelu", F.gelu)
    else:
        monkeypatch.setattr(clip_text, "causal_mask", lambda n, device=None: None)
    assert max_diff_to_hf(model, hf_model, prompts_with_padding()) > 1e-2


def test_quick_gelu_closed_form():
    x = torch.tensor([-2.27, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    want = torch.tensor([v / (1 + math.exp(-1.702 * v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(quick_gelu(x), want, rtol=0, atol=1e-15)
    assert (quick_gelu(x) - F.gelu(x)).abs().max() > 0.02  # not GELU: 0.0203 apart at x = -2.27


def test_causal_mask_and_padding_leave_earlier_positions_alone():
    """Position i sees only tokens j <= i: changing token 5 leaves positions 0..4 unchanged and moves 5..;
    so a prompt's states are the same with or without the padding after it."""
    torch.manual_seed(0)
    model = randomize_(CLIPTextTransformer(CLIPTextConfig(**SMALL)), seed=2).eval()
    assert causal_mask(3).squeeze().tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    ids = prompts_with_padding()[:1]
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % PAD
    with torch.no_grad():
        a, b = model(ids), model(changed)
        assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
        assert (a[:, 5:] - b[:, 5:]).abs().amax(dim=-1).min() > 1e-3
        assert torch.allclose(model(ids[:, :12]), a[:, :12], atol=1e-5)  # unpadded prompt = padded prefix


def test_vit_l14_text_config_and_parameter_count():
    """SD v1's text encoder: 123,060,480 parameters (E 49408x768, P 77x768, 12 layers of 7,087,872, LN)."""
    with torch.device("meta"):
        model = CLIPTextTransformer(CLIPTextConfig())
    per_layer = 4 * (768 * 768 + 768) + 2 * 2 * 768 + (768 * 3072 + 3072) + (3072 * 768 + 768)
    assert per_layer == 7_087_872
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 49408 * 768 + 77 * 768 + 12 * per_layer + 2 * 768 == 123_060_480
    assert CLIPTextConfig.from_state_dict(model.state_dict()) == CLIPTextConfig()  # heads = 768 / 64 = 12
    with torch.device("meta"):
        narrow = CLIPTextTransformer(CLIPTextConfig(width=96, heads=3, mlp=384, layers=1)).state_dict()
    with pytest.raises(CheckpointError, match="not a multiple of 64: pass heads="):
        CLIPTextConfig.from_state_dict(narrow)
    assert CLIPTextConfig.from_state_dict(narrow, heads=3).heads == 3


HF_NAMES = [  # ours -> transformers, to build transformers-named dicts without transformers installed
    (r"token_embedding\.weight", "embeddings.token_embedding.weight"),
    (r"position_embedding$", "embeddings.position_embedding.weight"),
    (r"layers\.(\d+)\.attn\.to_(q|k|v)\.", r"encoder.layers.\1.self_attn.\2_proj."),
    (r"layers\.(\d+)\.attn\.to_out\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"layers\.(\d+)\.norm(1|2)\.", r"encoder.layers.\1.layer_norm\2."),
    (r"layers\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"final_norm\.", "final_layer_norm."),
]


def hf_named(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        pattern, repl = next((p, r) for p, r in HF_NAMES if re.match(p, k))
        out["text_model." + re.sub(pattern, repl, k, count=1)] = v
    out["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # present in real files: ignored
    return out


def test_conversion_round_trip_and_clear_errors():
    ours = CLIPTextTransformer(CLIPTextConfig(**SMALL)).state_dict()
    hf = hf_named(ours)
    back = clip_text_state_dict_from_hf(hf)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)  # renamed, not copied

    missing = {k: v for k, v in hf.items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match="lack 1 tensors .*layers.1.mlp.fc2.bias"):
        clip_text_state_dict_from_hf(missing)
    with pytest.raises(CheckpointError, match="not part of a CLIP text transformer"):
        clip_text_state_dict_from_hf({**hf, "text_model.encoder.layers.0.adapter.weight": torch.zeros(1)})
    wrong = {**hf, "text_model.encoder.layers.1.mlp.fc1.weight": torch.zeros(256, 64)}
    with pytest.raises(CheckpointError, match=r"wrong shape .*\(256, 64\), expected \(128, 64\)"):
        clip_text_state_dict_from_hf(wrong)
    with pytest.raises(CheckpointError, match="no CLIP text weights under the prefix 'cond_stage_model"):
        clip_text_state_dict_from_hf(hf, prefix="cond_stage_model.transformer.")
    # transformers >= 5 saves without the "text_model." level: found with the default prefix too
    v5 = {k.removeprefix("text_model."): v for k, v in hf.items()}
    assert clip_text_state_dict_from_hf(v5).keys() == ours.keys()
