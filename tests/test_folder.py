"""Image-caption folders (Flickr8k captions.txt and .txt sidecars): bad files skipped and counted, colours
converted right, captions read exactly, the latent cache equal to encoding on the fly, and train.py end to end."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import train
from minildm.autoencoder.vqvae import VQVAE
from minildm.checkpoint import load_checkpoint
from minildm.config import micro
from minildm.data.folder import Uint8Images, load_folder
from minildm.train.ldm import encode_latent_cache

SIZE = 16
RED, GREEN, BLUE, WHITE = (220, 40, 40), (0, 200, 0), (0, 0, 255), (255, 255, 255)
ODD = 'Ünïcödé café — a dog, "Rex", jumps 🐶 over 2 logs'


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def good_images() -> dict[str, bytes]:
    """name -> file bytes of every decodable test image (the expected colours are in test_colours)."""
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # left half opaque blue, right half fully transparent
    rgba.paste(Image.new("RGBA", (10, 20), BLUE + (255,)), (0, 0))
    palette = Image.new("P", (24, 24), 3)
    palette.putpalette([0, 0, 0] * 3 + list(GREEN) + [0, 0, 0] * 252)
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # only the middle third is white: a centre crop sees white, a left crop black
    photo = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
    return {
        "red.png": png_bytes(Image.new("RGB", (30, 40), RED)),
        "grey.png": png_bytes(Image.new("L", (32, 32), 100)),
        "deep.png": png_bytes(Image.fromarray(np.full((32, 32), 32768, np.uint16))),  # 16-bit grey
        "rgba.png": png_bytes(rgba),
        "palette.gif": png_bytes(palette, "GIF"),
        "wide.png": png_bytes(Image.fromarray(wide)),
        "photo.jpg": png_bytes(Image.fromarray(photo), "JPEG"),
    }


def bad_images() -> dict[str, bytes]:
    jpeg = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    return {"cut.jpg": jpeg[: len(jpeg) // 2], "notes.png": b"these are meeting notes, not a picture\n"}


@pytest.fixture
def sidecar_folder(tmp_path):
    root = tmp_path / "sidecars"
    (root / "sub").mkdir(parents=True)
    for name, data in {**good_images(), **bad_images()}.items():
        (root / ("sub/" + name if name == "photo.jpg" else name)).write_bytes(data)
        stem = root / ("sub/" + name if name == "photo.jpg" else name)
        stem.with_suffix(".txt").write_text(f"a picture called {name}\n", encoding="utf-8")
    (root / "red.txt").write_text(f"a red square\n\n  {ODD}  \n", encoding="utf-8")  # two captions, a blank line
    (root / "uncaptioned.png").write_bytes(png_bytes(Image.new("RGB", (8, 8))))  # no .txt beside it
    (root / "orphan.txt").write_text("a caption without an image\n")
    (root / ".DS_Store").write_bytes(b"\0\1junk")  # hidden files are not candidates
    return root


@pytest.fixture
def flickr_folder(tmp_path):
    root = tmp_path / "flickr8k"
    (root / "Images").mkdir(parents=True)
    for name, data in {**good_images(), **bad_images()}.items():
        (root / "Images" / name).write_bytes(data)
    lines = ["image,caption", 'red.png,"A dog, ""Rex"", runs ."', "red.png,an unquoted, comma in a caption",
             f'grey.png,"{ODD.replace(chr(34), chr(34) * 2)}"', "missing.jpg,a photo that is not there", "lonely-row"]
    lines += [f"{name},a picture called {name}" for name in {**good_images(), **bad_images()} if name != "red.png"]
    (root / "captions.txt").write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode("utf-8"))  # with a BOM
    return root


def test_sidecar_folder_skips_and_counts_bad_files(sidecar_folder):
    folder = load_folder(sidecar_folder, SIZE, show_progress=False)
    assert sorted(folder.names) == sorted(n if n != "photo.jpg" else "sub/photo.jpg" for n in good_images())
    reasons = dict(folder.skipped)
    assert set(reasons) == {"cut.jpg", "notes.png", "uncaptioned.png"}
    assert "unreadable" in reasons["cut.jpg"] and "truncated" in reasons["cut.jpg"]
    assert "unreadable" in reasons["notes.png"] and "no caption" in reasons["uncaptioned.png"]
    assert folder.captions[folder.names.index("red.png")] == ["a red square", ODD]
    log = folder.write_skipped(sidecar_folder.parent / "skipped.txt").read_text(encoding="utf-8")
    assert log.count("\n") == 3 and "cut.jpg\t" in log


def test_flickr8k_captions_file(flickr_folder):
    folder = load_folder(flickr_folder, SIZE, show_progress=False)
    assert sorted(folder.names) == sorted(good_images())
    assert folder.captions[folder.names.index("red.png")] == ['A dog, "Rex", runs .', "an unquoted, comma in a caption"]
    assert folder.captions[folder.names.index("grey.png")] == [ODD, "a picture called grey.png"]
    reasons = dict(folder.skipped)
    assert set(reasons) == {"cut.jpg", "notes.png", "missing.jpg", "captions.txt line 6"}
    assert "not found" in reasons["missing.jpg"]


def test_colours_modes_and_centre_crop(flickr_folder):
    folder = load_folder(flickr_folder, SIZE, show_progress=False)
    pixels = {name: folder.images.pixels[i] for i, name in enumerate(folder.names)}  # uint8 [3, H, W]
    assert all(p.shape == (3, SIZE, SIZE) for p in pixels.values())

    def colour(name, x=SIZE // 2, y=SIZE // 2):
        return tuple(pixels[name][:, y, x].tolist())

    assert colour("red.png") == RED and colour("grey.png") == (100, 100, 100)
    assert colour("deep.png") == (128, 128, 128)  # 32768 of 65535 -> 128 of 255, not clipped to white
    assert colour("palette.gif") == GREEN
    assert colour("rgba.png", x=1) == BLUE and colour("rgba.png", x=SIZE - 2) == WHITE  # transparent -> white
    assert pixels["wide.png"][:, :, 5:11].min() >= 250  # the middle third survives the crop
    images = folder.images[:]
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    assert torch.equal(Uint8Images(torch.tensor([0, 255], dtype=torch.uint8).expand(1, 3, 1, 2))[0][0, 0],
                       torch.tensor([-1.0, 1.0]))


def test_missing_empty_and_malformed_folders_explain_themselves(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_folder(tmp_path / "nowhere", SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable captioned images"):
        load_folder(tmp_path / "empty", SIZE)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "captions.txt").write_text("file;text\na.jpg;a dog\n")
    with pytest.raises(ValueError, match="header line 'image,caption'"):
        load_folder(tmp_path / "bad", SIZE)


def test_latent_cache_equals_encoding_on_the_fly(sidecar_folder):
    torch.manual_seed(0)
    autoencoder = VQVAE(micro().vq).eval()
    autoencoder.scale_factor.fill_(2.5)
    folder = load_folder(sidecar_folder, 32, show_progress=False)
    cache = encode_latent_cache(autoencoder, folder.images, batch_size=3)  # batches of 3, uint8 -> float inside
    for i in range(len(folder)):
        z = autoencoder.encode(folder.images[i:i + 1]) * 2.5  # z_0 = scale_factor * E(x), one image at a time
        torch.testing.assert_close(cache[i:i + 1], z, rtol=1e-4, atol=1e-5)  # batch-size float noise only


def test_train_cli_runs_both_stages_on_a_folder(sidecar_folder, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data", str(sidecar_folder), "--preset", "micro", "--out", str(run), "--steps", "3"]
    assert train.main(common + ["--stage", "autoencoder"]) == 0
    assert train.main(common + ["--stage", "ldm"]) == 0
    ldm = load_checkpoint(run / "ldm.pt", "ldm")
    assert ldm["step"] == 3 and "rex" in ldm["tokenizer"]["words"]  # the vocabulary came from the folder
    assert (run / "skipped_files.txt").read_text().count("\n") == 3
    assert "3 files skipped" in capsys.readouterr().out
    assert train.main(common + ["--stage", "lora"]) == 2  # adapters train on shapes only
