"""DALI image decoding (the dali extra) against the Pillow path, in DALI's CPU-only mode."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali", reason="the dali extra is not installed")

from moca.data.cpt import encode  # noqa: E402
from moca.data.dali import DaliImages  # noqa: E402
from moca.data.images import fitted_size, image_rows  # noqa: E402
from moca.data.records import load_cpt  # noqa: E402
from moca.data.tokenizer import ByteTokenizer  # noqa: E402


def _picture(width, height, seed, mode="RGB"):
    # gradients, a disc with sharp edges, and mild noise
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float32)
    rgb = np.stack([200 * x + 30 * disc, 180 * y + 20, 120 + 100 * disc * x], -1) + rng.normal(0, 4, (height, width, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return image.convert(mode)


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dali():
    return DaliImages("cpu", batch=4)


@pytest.mark.parametrize("size,mode", [((150, 97), "RGB"), ((61, 230), "RGB"), ((112, 56), "L"), ((90, 90), "RGBA"),
                                       ((30, 41), "RGB")])  # shrinking, exact, and growing to min_pixels
def test_rows_match_pillow(dali, size, mode):
    image = _picture(*size, seed=sum(size), mode=mode)
    bounds = (56 * 56, 140 * 140)
    h, w = fitted_size(image.height, image.width, *bounds)
    ours = dali.rows([_png(image)], [(h, w)])[0]
    pillow, _ = image_rows(image, *bounds)
    assert ours.shape == pillow.shape  # same size, same patch order
    difference = np.abs(ours - pillow) * 0.27 * 255  # normalized units back to levels of 255
    # measured: at most one level of 255 apart (rounding), 0.1 to 0.2 on average
    assert difference.mean() < 0.5 and difference.max() < 1.5, (difference.mean(), difference.max())


def test_more_images_than_one_pipeline_batch(dali):
    images = [_picture(60 + 7 * i, 70, seed=i) for i in range(6)]  # batch is 4: two runs
    sizes = [fitted_size(im.height, im.width, 56 * 56, 84 * 84) for im in images]
    rows = dali.rows([_png(im) for im in images], sizes)
    assert [r.shape[0] for r in rows] == [h * w // 196 for h, w in sizes]
    for image, row in zip(images, rows):
        assert np.abs(row - image_rows(image, 56 * 56, 84 * 84)[0]).mean() * 0.27 * 255 < 0.5


def test_a_corrupt_image_raises_a_value_error_and_the_decoder_goes_on(dali):
    with pytest.raises(ValueError, match="DALI could not decode"):
        dali.rows([b"\x89PNG\r\n\x1a\n but not really"], [(28, 28)])
    assert dali.rows([_png(_picture(40, 40, seed=1))], [(28, 28)])[0].shape == (4, 1176)


def test_encode_with_dali_equals_the_layout_of_pillow(dali, tmp_path):
    picture = _picture(120, 80, seed=3)
    record = {"text": "a cat <image> on a mat", "images": [base64.b64encode(_png(picture)).decode()]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    tokenizer = ByteTokenizer()
    pillow = encode(load_cpt(str(path), 0, f"{path}:1"), tokenizer, 512, 56 * 56, 112 * 112)
    ours = encode(load_cpt(str(path), 0, f"{path}:1", decode=False), tokenizer, 512, 56 * 56, 112 * 112, decoder=dali)
    assert ours.ids.tolist() == pillow.ids.tolist() and ours.grids.tolist() == pillow.grids.tolist()
    assert (ours.rows - pillow.rows).abs().mean() * 0.27 * 255 < 0.5


def test_training_with_dali_follows_the_pillow_run(tmp_path):
    from moca.config import Config
    from moca.train import train
    config = Config().update({"run.stage": "cpt", "max_steps": 4, "save_every": 4, "log_every": 2,
                              "token_budget": 512})
    pil = train(config.update({"out": str(tmp_path / "pil")}))
    ours = train(config.update({"out": str(tmp_path / "dali"), "image_decoder": "dali-cpu"}))
    assert ours["step"] == pil["step"] == 4
    for key in ("mlm_loss", "mae_loss"):
        assert ours[key] == pytest.approx(pil[key], rel=2e-2), key
