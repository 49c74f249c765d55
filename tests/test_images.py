"""One image reader for training folders, image prompts and body views: 16-bit scaled, alpha composited on
the training background, a decompression bomb in one sentence, and the same pixels whichever path reads it."""
import numpy as np
import pytest
import torch
from PIL import Image

from minildm.adapters.body import load_view_folder
from minildm.adapters.image_prompt import load_image_file
from minildm.data import body_render, shapes
from minildm.data.folder import load_folder
from minildm.data.images import WHITE, ImageReadError, read_image, read_image_tensor


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = np.full((8, 8), 30000, np.uint16)  # 30000 / 65535 of white: 30000 >> 8 = 117
    grey[:, :4] = 65535
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    x = read_image(tmp_path / "g16.png", 8)
    assert (x[:, 4:] == 117).all() and (x[:, :4] == 255).all()
    assert torch.allclose(load_image_file(tmp_path / "g16.png", 8)[0, :, 0, 4], torch.full((3,), 117 / 127.5 - 1))


def rgba_pair(tmp_path):
    """Two RGBA files that look alike: a half-transparent red square on fully transparent pixels that store
    different colours (green in one, blue in the other)."""
    paths = []
    for hidden in ((0, 255, 0), (0, 0, 255)):
        a = np.zeros((8, 8, 4), np.uint8)
        a[..., :3] = hidden
        a[2:6, 2:6] = (255, 0, 0, 128)
        paths.append(tmp_path / f"hidden{hidden[1]}.png")
        Image.fromarray(a, "RGBA").save(paths[-1])
    return paths


def test_transparent_pixels_are_composited_on_the_training_background(tmp_path):
    a, b = rgba_pair(tmp_path)
    assert np.array_equal(read_image(a, 8), read_image(b, 8))  # what the hidden pixels store does not matter
    assert (read_image(a, 8)[0, 0] == WHITE).all()  # folders train on white
    assert torch.equal(load_image_file(a, 8), load_image_file(b, 8))
    assert (load_image_file(a, 8)[0, :, 0, 0] == -1).all()  # shapes (the IP-Adapter's data) are on black
    centre = read_image(a, 8, shapes.BACKGROUND)[4, 4]
    assert abs(int(centre[0]) - 128) <= 1 and centre[1] == centre[2] == 0  # alpha 128 over black


def test_image_prompts_read_the_same_pixels_as_training_folders(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    picture = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(picture).save(folder / "p.png")
    (folder / "p.txt").write_text("a picture")
    trained = load_folder(folder, 16, show_progress=False).images[0]  # [3, 16, 16] in [-1, 1]
    assert torch.equal(load_image_file(folder / "p.png", 16)[0], trained)
    assert torch.equal(read_image_tensor(folder / "p.png", 16)[0], trained)


def test_body_views_composite_on_the_bodies_background(tmp_path):
    a, _ = rgba_pair(tmp_path)
    views = load_view_folder(tmp_path, 8)
    assert views.shape == (2, 3, 8, 8) and torch.equal(views[0], views[1])
    assert torch.allclose(views[0, :, 0, 0], torch.tensor(body_render.BACKGROUND) / 127.5 - 1)


def test_a_decompression_bomb_is_one_sentence(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "bomb.png")
    (tmp_path / "bomb.txt").write_text("a bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x the limit: PIL refuses to decode
    with pytest.raises(ImageReadError, match=r"bomb.png has more pixels than PIL's guard against decompression "
                                             r"bombs allows \(2,000\): resize it"):
        load_image_file(tmp_path / "bomb.png", 32)
    with pytest.raises(ValueError, match="no usable captioned images"):
        load_folder(tmp_path, 32, show_progress=False)


# ---------------------------------------------------------------- crop=False: the whole picture (SD's --init-image)
def test_the_whole_picture_keeps_its_aspect_ratio(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)  # h 40 x w 56
    Image.fromarray(picture).save(tmp_path / "wide.png")
    Image.fromarray(picture.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")  # h 56 x w 40
    assert read_image(tmp_path / "wide.png", 16).shape == (16, 16, 3)  # the default: the central square
    assert read_image(tmp_path / "wide.png", 16, crop=False).shape == (16, 22, 3)  # 56 * 16 / 40 = 22.4
    assert read_image(tmp_path / "wide.png", 16, crop=False, multiple=8).shape == (16, 24, 3)  # rounded to 8s
    assert read_image(tmp_path / "tall.png", 16, crop=False, multiple=8).shape == (24, 16, 3)  # shorter side 16
    assert read_image(tmp_path / "wide.png", (20, None), crop=False).shape == (20, 28, 3)  # height given
    assert read_image(tmp_path / "wide.png", (None, 28), crop=False).shape == (20, 28, 3)  # width given
    assert read_image(tmp_path / "wide.png", (33, 30), crop=False, multiple=8).shape == (33, 30, 3)  # as asked
    # the same picture as the square reader where there is nothing to crop
    Image.fromarray(picture[:, :40].copy()).save(tmp_path / "square.png")
    assert np.array_equal(read_image(tmp_path / "square.png", 16, crop=False), read_image(tmp_path / "square.png", 16))
    with pytest.raises(ValueError, match="a square crop takes one side length"):
        read_image(tmp_path / "wide.png", (16, 16))
    with pytest.raises(ValueError, match="give the shorter side, or a height, a width or both"):
        read_image(tmp_path / "wide.png", (None, None), crop=False)


def test_the_whole_picture_gets_the_same_treatment(tmp_path, monkeypatch):
    grey = np.full((8, 12), 30000, np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert (read_image(tmp_path / "g16.png", 8, crop=False) == 117).all()  # 16-bit scaled, not clipped
    a, b = rgba_pair(tmp_path)
    assert np.array_equal(read_image(a, 8, crop=False), read_image(b, 8, crop=False))
    assert (read_image(a, 8, crop=False)[0, 0] == WHITE).all()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "ok.png").read_bytes()[:1500])  # a truncated download
    with pytest.raises(ImageReadError, match=r"cannot read .*broken.png as an image \(.*\): give a PNG or JPG file"):
        read_image(tmp_path / "broken.png", 8, crop=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    with pytest.raises(ImageReadError, match="g16.png has more pixels than PIL's guard"):
        read_image(tmp_path / "g16.png", 8, crop=False)
