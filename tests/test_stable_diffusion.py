"""Stable Diffusion v1 through minildm's own modules, against diffusers / transformers at small random configs.

Parity: the same random weights saved as a diffusers folder and as an original single file, loaded by
minildm, must give diffusers' UNet output, the VAE posterior and decode, CLIP's hidden states (1e-5, fp32)
and StableDiffusionPipeline / StableDiffusionImg2ImgPipeline's images (1e-4; DDIM "leading" + offset 1,
last step to abar_0, guidance 7.5). Plus: files that are not SD v1.x are refused with one sentence.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="parity tests need the [parity] extra (diffusers)")
pytest.importorskip("transformers", reason="parity tests need the [parity] extra (transformers)")
pytest.importorskip("minildm.text.clip_text", reason="parity tests need minildm's CLIP text transformer (minildm/text/clip_text.py)")

import sd_reference as ref  # noqa: E402
from minildm.pipeline import LatentDiffusion  # noqa: E402
from minildm.safetensors import save_safetensors  # noqa: E402
from minildm.stable_diffusion import SDLoadError  # noqa: E402
from minildm.stable_diffusion import keys as K  # noqa: E402

PROMPTS = ["a cat", "the red cat"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(diffusers components, folder path, single-file path, hf tokenizer)."""
    root = tmp_path_factory.mktemp("sd")
    unet, vae, text = ref.components()
    folder = ref.write_folder(root / "folder", unet, vae, text)
    state = ref.original_state_dict(unet, vae, text)
    ref.check_original_layout(state, unet, vae)
    single = root / "single" / "model.ckpt"
    single.parent.mkdir()
    torch.save({"state_dict": state, "global_step": 1}, single)
    save_safetensors(state, single.with_suffix(".safetensors"))
    return (unet, vae, text), folder, single, ref.hf_tokenizer(folder / "tokenizer")


def load(path, tok):
    return LatentDiffusion.from_stable_diffusion(path, tokenizer=ref.ids_fn(tok))


@pytest.mark.parametrize("layout", ["folder", "ckpt", "safetensors"])
def test_components_match_reference(sd, layout):
    (unet, vae, text), folder, single, tok = sd
    pipe = load({"folder": folder, "ckpt": single, "safetensors": single.with_suffix(".safetensors")}[layout], tok)
    assert pipe.unet.cfg.heads == 8 and pipe.unet.cfg.dim_head is None
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, ref.TEXT_WIDTH, generator=g)
    t = torch.tensor([1, 981])
    with torch.no_grad():
        assert (pipe.unet(x, t, c) - unet(x, t, encoder_hidden_states=c).sample).abs().max() < 1e-5
        img = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
        post, mine = vae.encode(img).latent_dist, pipe.autoencoder.encode(img)
        assert (post.mean - mine.mean).abs().max() < 1e-5 and (post.logvar - mine.logvar).abs().max() < 1e-5
        assert (vae.decode(x).sample - pipe.autoencoder.decode(x)).abs().max() < 1e-5
        ids = ref.ids_fn(tok)(PROMPTS)
        hidden, mask = pipe.text_encoder(ids)
        assert mask is None and (hidden - text(ids).last_hidden_state).abs().max() < 1e-5


def diffusers_pipe(components, tok, img2img=False):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    unet, vae, text = components
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**ref.SCHEDULER),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_text_to_image_matches_stable_diffusion_pipeline(sd):
    components, folder, _, tok = sd
    pipe = LatentDiffusion.from_stable_diffusion(folder)  # minildm's BPE tokenizer reads the folder's tokenizer/
    assert pipe.tokenizer.encode(PROMPTS).tolist() == ref.ids_fn(tok)(PROMPTS).tolist()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = pipe.generate(PROMPTS, steps=3, guidance_scale=7.5, height=16, width=16, latents=latents,
                         negative_prompts=["", "a dog"])
    theirs = diffusers_pipe(components, tok)(PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=7.5,
                                             negative_prompt=["", "a dog"], latents=latents, output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert (ours - theirs).abs().max() < 1e-4


def test_image_to_image_matches_img2img_pipeline(sd):
    components, folder, _, tok = sd
    pipe = load(folder, tok)
    init = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ours = pipe.generate(PROMPTS, steps=4, guidance_scale=7.5, init_images=init, strength=0.5, seed=3)
    theirs = diffusers_pipe(components, tok, img2img=True)(PROMPTS, image=init, strength=0.5, num_inference_steps=4,
                                                           guidance_scale=7.5, output_type="pt",
                                                           # minildm's seed=3: image i draws from its own generator,
                                                           # seeded 3 + i (diffusers' list of generators)
                                                           generator=[torch.Generator().manual_seed(3 + i)
                                                                      for i in range(2)]).images
    assert (ours - theirs).abs().max() < 1e-4


def test_last_step_to_abar_one_is_caught(sd):
    """The common SD sampler mistake (last DDIM step to abar = 1, not abar_0) is visible at this tolerance."""
    components, folder, _, tok = sd
    pipe = load(folder, tok)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = diffusers_pipe(components, tok)(PROMPTS[:1], height=16, width=16, num_inference_steps=3,
                                             guidance_scale=7.5, latents=latents, output_type="pt").images
    assert 0.05 < ((theirs > 0) & (theirs < 1)).float().mean()  # not a saturated image: the comparison means something
    pipe.ddim["final_timestep"] = -1
    wrong = pipe.generate(PROMPTS[:1], steps=3, guidance_scale=7.5, height=16, width=16, latents=latents)
    assert (wrong - theirs).abs().max() > 1e-3


def corrupt(sd_path, tmp_path, edit, name="bad.ckpt"):
    state = torch.load(sd_path, weights_only=True)["state_dict"]
    edit(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update({K.UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}), "inpainting"),
    (lambda s: s.update({"cond_stage_model.model.ln_final.weight": torch.zeros(1024)}), "SD 2.x"),
    (lambda s: s.update({"conditioner.embedders.0.transformer.x": torch.zeros(1)}), "SDXL"),
    (lambda s: [s.pop(k) for k in [k for k in s if k.startswith(K.VAE_PREFIX)]], "first_stage_model"),
    (lambda s: s.pop(K.UNET_PREFIX + "out.2.bias"), "missing"),
    (lambda s: s.update({K.UNET_PREFIX + "out.2.bias": torch.zeros(5)}), "wrong shape"),
    (lambda s: s.update({"some_other_model.weight": torch.zeros(1)}), "outside"),
])
def test_not_sd_v1_is_refused_in_one_sentence(sd, tmp_path, edit, words):
    path = corrupt(sd[2], tmp_path, edit)
    with pytest.raises(SDLoadError, match=words) as info:
        load(path, sd[3])
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_single_file_without_vocabulary_asks_for_one(sd):
    with pytest.raises(SDLoadError, match="vocab.json and merges.txt"):
        LatentDiffusion.from_stable_diffusion(sd[2])


def test_lora_and_truncated_files_are_refused(sd, tmp_path):
    lora = tmp_path / "lora.ckpt"
    torch.save({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, lora)
    with pytest.raises(SDLoadError, match="LoRA"):
        load(lora, sd[3])
    data = sd[2].read_bytes()
    half = tmp_path / "half.ckpt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(SDLoadError, match="truncated"):
        load(half, sd[3])
    data = sd[2].with_suffix(".safetensors").read_bytes()
    half = tmp_path / "half.safetensors"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(SDLoadError, match=str(half)):
        load(half, sd[3])


def test_bfloat16_keeps_the_schedule_in_float64(sd):
    """dtype= converts the networks only: the schedule's float64 tables would lose abar near t = 0 in 16 bits."""
    components, folder, _, tok = sd
    pipe = LatentDiffusion.from_stable_diffusion(folder, dtype=torch.bfloat16)
    assert pipe.unet.time_embed[0].weight.dtype == torch.bfloat16 and pipe.schedule.alphas_cumprod.dtype == torch.float64
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    low = pipe.generate(PROMPTS[:1], steps=3, guidance_scale=7.5, height=16, width=16, latents=latents)
    full = load(folder, tok).generate(PROMPTS[:1], steps=3, guidance_scale=7.5, height=16, width=16, latents=latents)
    assert low.dtype == torch.bfloat16 and (low.float() - full).abs().mean() < 0.05


def test_sd_v2_attention_layout_matches_reference():
    """Fixed head width (heads = C / 32 here, SD v2 uses 64) and Linear proj_in / proj_out, against diffusers."""
    from dataclasses import replace

    from diffusers import UNet2DConditionModel

    from minildm.modules.unet import UNet
    from minildm.stable_diffusion.load import unet_config_from_state_dict

    torch.manual_seed(0)
    ref_unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64, 64), cross_attention_dim=48,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2, 2), use_linear_projection=True, norm_num_groups=32).eval()  # heads per level
    sd = K.unet_original_to_minildm(K.unet_diffusers_to_original(ref_unet.state_dict()))
    cfg = replace(unet_config_from_state_dict(sd), heads=None, dim_head=32)
    assert cfg.proj_linear and [cfg.attention_layout(c) for c in (32, 64)] == [(1, 32), (2, 32)]
    ours = UNet(cfg).eval()
    ours.load_state_dict(sd)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 48)
    with torch.no_grad():
        assert (ours(x, t, c) - ref_unet(x, t, encoder_hidden_states=c).sample).abs().max() < 1e-5


def test_old_vae_attention_names_map_like_the_new(sd):
    """Older diffusers VAE folders name the mid-block attention query / key / value / proj_attn."""
    vae_sd = sd[0][1].state_dict()
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.").replace("to_out.0.", "proj_attn."): v for k, v in vae_sd.items()}
    assert any(".query." in k for k in old)
    new, legacy = K.vae_diffusers_to_original(vae_sd), K.vae_diffusers_to_original(old)
    assert set(new) == set(legacy) and all(torch.equal(new[k], legacy[k]) for k in new)
