"""Reading image files: every supported Pillow mode read with its full range, the same way by the training
dataset, ``eval``, ``predict`` and ``demo``; unsupported modes and decompression bombs refused in one line
(at start-up and inside DataLoader workers); an empty class folder and swapped Fashion-MNIST files refused."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_train.commands.predict import InputError, load_input
from ddp_train.config import load_config
from ddp_train.data import DataError, build_data, load_dataset
from ddp_train.data.datasets import FASHION_FILES, Source
from ddp_train.distributed.context import DistContext

from .helpers import TINY, assert_ok, run_cli

S = 16  # side of the test images, and data.image_size: no resizing unless a test asks for it
GRAD8 = np.arange(S * S, dtype=np.uint8).reshape(S, S)  # every 8-bit value once: 0..255
GRAD16 = np.linspace(0, 65535, S * S).round().astype(np.uint16).reshape(S, S)  # 0..65535
GRADF = np.linspace(0, 1, S * S, dtype=np.float32).reshape(S, S)
RGB = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
ALPHA = Image.fromarray(np.random.default_rng(1).integers(0, 256, (S, S), dtype=np.uint8))
PALETTE = np.random.default_rng(2).integers(0, 256, (16, 3), dtype=np.uint8)
CHECKER = np.indices((S, S)).sum(0) % 2 == 0


def _palette_image() -> Image.Image:
    im = Image.fromarray(GRAD8 % 16, "P")
    im.putpalette(PALETTE.flatten().tolist())
    return im


def _with_alpha(im: Image.Image, mode: str) -> Image.Image:
    out = im.convert(mode)
    out.putalpha(ALPHA)
    return out


def _grey(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values))[None]


def _colour(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values)).permute(2, 0, 1)


# mode: (file name, the image as Pillow writes it, the tensor every reader must give at the image's own channels)
MODES = {
    "L": ("l.png", lambda: Image.fromarray(GRAD8, "L"), _grey(GRAD8)),
    "1": ("bilevel.png", lambda: Image.fromarray(CHECKER), _grey(np.where(CHECKER, 255, 0).astype(np.uint8))),
    "LA": ("la.png", lambda: _with_alpha(Image.fromarray(GRAD8, "L"), "LA"), _grey(GRAD8)),
    "I;16": ("i16.png", lambda: Image.fromarray(GRAD16), _grey(GRAD16 / 65535)),
    "I;16 (TIFF)": ("i16.tif", lambda: Image.fromarray(GRAD16), _grey(GRAD16 / 65535)),
    "I;16B": ("i16b.tif", lambda: Image.frombytes("I;16B", (S, S), GRAD16.astype(">u2").tobytes()),
              _grey(GRAD16 / 65535)),
    "I": ("i32.tif", lambda: Image.fromarray(GRAD16.astype(np.int32)), _grey(GRAD16 / 65535)),
    "F": ("f.tif", lambda: Image.fromarray(GRADF), _grey(GRADF)),
    "RGB": ("rgb.png", lambda: Image.fromarray(RGB), _colour(RGB)),
    "RGBA": ("rgba.png", lambda: _with_alpha(Image.fromarray(RGB), "RGBA"), _colour(RGB)),
    "P": ("p.png", _palette_image, _colour(PALETTE[GRAD8 % 16])),
    "PA": ("pa.tif", lambda: _with_alpha(_palette_image(), "PA"), _colour(PALETTE[GRAD8 % 16])),
    # Pillow's CMYK -> RGB is (255 - C)(255 - K)/255 per channel: with C = M = Y = 0, 255 - K.
    "CMYK": ("cmyk.tif", lambda: Image.merge("CMYK", [Image.new("L", (S, S), 0)] * 3 + [Image.fromarray(GRAD8)]),
             _colour(np.repeat((255 - GRAD8)[:, :, None], 3, 2))),
}


def _folder(root: Path, files: dict[str, Image.Image | bytes]) -> Path:
    """``root`` holding ``files`` ({relative path: image or raw bytes})."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path)
    return root


def _dataset(root: Path, *overrides: str):
    return load_dataset(load_config(None, ["data.name=image_folder", f"data.root={root}", f"data.image_size={S}",
                                           *overrides]).data)


def _bomb_png(side: int = 20000) -> bytes:
    """A real 1-bit PNG of side x side black pixels: 400 M pixels (over twice Pillow's MAX_IMAGE_PIXELS) in 50 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + side // 8)  # filter byte + the row's bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _lab_tiff(path: Path) -> None:
    Image.new("LAB", (S, S), (50, 0, 0)).save(path)


def _one_error_line(res, *needles: str) -> str:
    """The run failed with exit 2 and one ``ddp_train: error:`` line holding every needle, no traceback."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    ours = [line for line in res.stderr.splitlines() if line.startswith("ddp_train: error:")]
    assert len(ours) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in ours[0], ours[0]
    return ours[0]


# --------------------------------------------------------------------------- every mode, every reader


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_is_read_with_its_full_range_by_every_reader(mode, tmp_path):
    name, make, expected = MODES[mode]
    image = make()
    assert image.mode == mode.split(" ")[0]
    root = _folder(tmp_path, {f"train/a/{name}": image, f"train/b/{name}": image})
    path = str(root / "train" / "a" / name)
    with Image.open(path) as im:
        assert im.mode == mode.split(" ")[0]  # what Pillow opens the file as: the mode under test
    ds = _dataset(root)
    got = ds.train.load(0)  # the training (and eval, and demo's examples) reader
    assert ds.channels == expected.shape[0]
    if expected.dtype == torch.uint8:
        assert got.dtype == torch.uint8 and torch.equal(got, expected)
    else:  # more than 8 bits: the full range, value / max, as float32
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), expected.double(), rtol=0, atol=1e-7)
        assert float(got.min()) == 0 and float(got.max()) == 1
        assert float((got == 1).float().mean()) == pytest.approx(1 / S**2)  # one white pixel, not 99.6%
    # predict (and demo, which calls predict's reader): the same tensor, at either channel count.
    assert torch.equal(load_input(path, ds.channels, S), got)
    other = 3 if ds.channels == 1 else 1
    converted = Source(np.zeros(1, np.int64), paths=[path], channels=other, image_size=S).load(0)
    assert torch.equal(load_input(path, other, S), converted)
    if other == 3:
        assert torch.equal(converted, got.expand(3, -1, -1))  # grey into an RGB model: replicated


def test_sixteen_bit_resized_and_normalised_like_its_eight_bit_twin(tmp_path):
    big16 = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    root = _folder(tmp_path, {"train/a/x.png": Image.fromarray(big16),
                              "train/b/x.png": Image.fromarray((big16 >> 8).astype(np.uint8))})
    ds = _dataset(root)
    x16, x8 = ds.train.load(0), ds.train.load(1)
    assert x16.shape == x8.shape == (1, S, S) and x16.dtype == torch.float32 and x8.dtype == torch.uint8
    # Bilinear in float and in 8 bits: the same picture to within the 8-bit rounding.
    assert float((x16 - x8.float() / 255).abs().max()) < 2 / 255
    assert ds.mean[0] == pytest.approx(0.5, abs=0.01)  # statistics measured on the real values


def test_mixed_depths_in_one_folder_batch_together(tmp_path):
    """An RGB first image makes a 3-channel dataset; a 16-bit grey image in it is replicated, and both
    kinds (uint8 and float32 as read) make one normalised float batch, on the DataLoader path."""
    files = {"train/a/0.png": Image.fromarray(RGB), "train/a/1.png": Image.fromarray(GRAD16),
             "train/b/0.png": Image.fromarray(RGB), "train/b/1.tif": Image.fromarray(GRADF),
             "val/a/0.png": Image.fromarray(RGB), "val/a/1.png": Image.fromarray(GRAD16)}
    root = _folder(tmp_path, files)
    ds = _dataset(root)
    assert ds.channels == 3
    cfg = load_config(None, ["data.name=image_folder", f"data.root={root}", f"data.image_size={S}",
                             "train.batch_size=2", "data.num_workers=0", "data.augment=false"])
    bundle = build_data(ds, cfg, DistContext("single", 0, 0, 1, torch.device("cpu"), None))
    x, _ = next(iter(bundle.valid))  # val/a/0.png and val/a/1.png, in order
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    assert x.dtype == torch.float32 and x.shape == (2, 3, S, S)
    assert torch.allclose(x[0], (_colour(RGB).float() / 255 - mean) / std, atol=1e-5)
    assert torch.allclose(x[1], (_grey(GRAD16 / 65535).float() - mean) / std, atol=1e-5)
    x, _ = next(iter(bundle.train))
    assert x.dtype == torch.float32 and x.shape == (2, 3, S, S)


# --------------------------------------------------------------------------- refusals, in process


@pytest.mark.parametrize("case", ["LAB", "I negative", "I over 16 bits", "F over 1", "F NaN", "bomb"])
def test_unusable_images_are_one_line_naming_the_file(case, tmp_path):
    bad = {
        "LAB": ("lab.tif", None),
        "I negative": ("neg.tif", Image.fromarray(np.array([[-5, 7]], np.int32))),
        "I over 16 bits": ("big.tif", Image.fromarray(np.array([[0, 70000]], np.int32))),
        "F over 1": ("f.tif", Image.fromarray(np.array([[0, 1.5]], np.float32))),
        "F NaN": ("nan.tif", Image.fromarray(np.array([[0, np.nan]], np.float32))),
        "bomb": ("bomb.png", _bomb_png()),
    }[case]
    name, content = bad
    root = _folder(tmp_path, {"train/a/0.png": Image.fromarray(GRAD8), "train/b/0.png": Image.fromarray(GRAD8)})
    path = root / "train" / "b" / name
    if content is None:
        _lab_tiff(path)
    else:
        _folder(root, {f"train/b/{name}": content})
    expect = {"LAB": "mode LAB", "I negative": "mode I", "I over 16 bits": "mode I", "F over 1": "mode F",
              "F NaN": "mode F", "bomb": "decompression bomb"}[case]
    with pytest.raises(DataError) as caught:
        _dataset(root)  # found at start-up: the statistics read every image of a small folder
    message = str(caught.value)
    assert str(path) in message and expect in message and "\n" not in message, message
    with pytest.raises(InputError) as caught:
        load_input(path, 1, S)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expect in message and "\n" not in message, message


def test_an_empty_class_folder_is_refused(tmp_path):
    root = _folder(tmp_path, {"train/a/0.png": Image.fromarray(GRAD8), "train/b/0.png": Image.fromarray(GRAD8),
                              "train/c/notes.txt": b"no images here\n"})
    with pytest.raises(DataError, match=rf"class folder {root / 'train' / 'c'} holds no images"):
        _dataset(root)
    res = run_cli([*TINY, "data.name=image_folder", f"data.root={root}", f"out_dir={tmp_path / 'out'}"], timeout=120)
    _one_error_line(res, str(root / "train" / "c"))


def test_swapped_fashion_mnist_files_are_refused(fashion_root, tmp_path):
    (train_images, train_labels), (test_images, test_labels) = FASHION_FILES["train"], FASHION_FILES["test"]
    for name, target in [(train_images, test_images), (train_labels, test_labels), (test_images, train_images),
                         (test_labels, train_labels)]:
        (tmp_path / name).symlink_to(fashion_root / target)
    with pytest.raises(DataError, match="swapped"):
        load_dataset(load_config(None, ["data.name=fashion_mnist", f"data.root={tmp_path}"]).data)
    res = run_cli(["data.name=fashion_mnist", f"data.root={tmp_path}", f"out_dir={tmp_path / 'out'}"], timeout=120)
    _one_error_line(res, "swapped", str(tmp_path / train_images), "10000", "60000")


# --------------------------------------------------------------------------- through the CLI


def _image_folder_args(root: Path, out: Path, *more: str) -> list[str]:
    return [*TINY, "data.name=image_folder", f"data.root={root}", f"data.image_size={S}", "train.batch_size=4",
            "train.epochs=1", f"out_dir={out}", "run_name=r", *more]


def _grey8_folder(root: Path, splits: tuple[str, ...] = ("train",)) -> Path:
    rng = np.random.default_rng(3)
    for split in splits:
        for c in ("a", "b"):
            for i in range(6):
                _folder(root, {f"{split}/{c}/{i}.png": Image.fromarray(rng.integers(0, 256, (S, S), np.uint8))})
    return root


@pytest.mark.slow
def test_bomb_at_start_up_is_one_line(tmp_path):
    root = _grey8_folder(tmp_path / "data")
    _folder(root, {"train/b/zz-bomb.png": _bomb_png()})
    res = run_cli(_image_folder_args(root, tmp_path / "out"), timeout=180)
    _one_error_line(res, str(root / "train" / "b" / "zz-bomb.png"), "decompression bomb")


@pytest.mark.slow
def test_bomb_in_a_loader_worker_is_one_line(tmp_path):
    """Only the validation split holds the bomb: it is read by a DataLoader worker, after the first epoch."""
    root = _grey8_folder(tmp_path / "data", ("train", "val"))
    _folder(root, {"val/b/zz-bomb.png": _bomb_png()})
    res = run_cli(_image_folder_args(root, tmp_path / "out", "data.num_workers=1"), timeout=180)
    _one_error_line(res, str(root / "val" / "b" / "zz-bomb.png"), "decompression bomb")


@pytest.mark.slow
def test_unsupported_mode_in_training_is_one_line(tmp_path):
    root = _grey8_folder(tmp_path / "data")
    _lab_tiff(root / "train" / "b" / "zz-lab.tif")
    res = run_cli(_image_folder_args(root, tmp_path / "out"), timeout=180)
    _one_error_line(res, str(root / "train" / "b" / "zz-lab.tif"), "mode LAB")


@pytest.fixture(scope="module")
def sixteen_bit_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run trained through the CLI on 16-bit PNGs (a dark and a bright class): (data root, run folder)."""
    tmp = tmp_path_factory.mktemp("sixteen")
    rng = np.random.default_rng(4)
    files = {}
    for split, n in (("train", 6), ("test", 2)):
        for c, base in (("dark", 0), ("bright", 30000)):
            for i in range(n):
                files[f"{split}/{c}/{i}.png"] = Image.fromarray(
                    (base + rng.integers(0, 35536, (S, S))).astype(np.uint16))
    root = _folder(tmp / "data", files)
    assert_ok(run_cli(_image_folder_args(root, tmp / "out"), timeout=180))
    return root, tmp / "out" / "r"


def _values16(root: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) / 65535 for p in sorted(root.glob("train/*/*.png"))])


@pytest.mark.slow
def test_training_on_sixteen_bit_images_sees_their_full_range(sixteen_bit_run):
    from ddp_train.persistence.checkpoint import load_checkpoint

    root, run = sixteen_bit_run
    meta = load_checkpoint(run / "checkpoints" / "best.pt")["dataset"]
    assert meta["channels"] == 1
    assert meta["mean"][0] == pytest.approx(_values16(root).mean(), abs=1e-6)  # not 0.99: no saturation
    assert meta["std"][0] == pytest.approx(_values16(root).std(), abs=1e-6)


@pytest.mark.slow
def test_predict_reads_sixteen_bit_files_and_refuses_bombs_and_modes(sixteen_bit_run, tmp_path):
    import json

    from ddp_train.commands.predict import Classifier

    _, run = sixteen_bit_run
    best = run / "checkpoints" / "best.pt"
    files = _folder(tmp_path, {"grad.png": Image.fromarray(GRAD16), "bomb.png": _bomb_png()})
    _lab_tiff(files / "lab.tif")
    names = [str(files / n) for n in ("grad.png", "bomb.png", "lab.tif")]
    res = run_cli(["predict", "--checkpoint", str(best), "--json", "--top-k", "2", *names], timeout=120)
    assert res.returncode == 2
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 2, res.stderr
    assert errors[0].startswith(f"ddp_train: predict: {names[1]}: ") and "decompression bomb" in errors[0]
    assert errors[1].startswith(f"ddp_train: predict: {names[2]}: ") and "mode LAB" in errors[1]
    got = {t["index"]: t["prob"] for t in json.loads(res.stdout)["results"][0]["top_k"]}
    # The model on the gradient as it should be read (value / 65535), computed here without the readers.
    classifier = Classifier.load(best, "cpu")
    with torch.no_grad():
        x = classifier.transform(_grey(GRAD16 / 65535).float())[None]
        want = torch.softmax(classifier.model(x), 1)[0]
    assert got == pytest.approx({i: float(want[i]) for i in got}, abs=1e-5)


@pytest.mark.slow
def test_eval_worker_bomb_is_one_line(sixteen_bit_run, tmp_path):
    root, run = sixteen_bit_run
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    _folder(copy, {"test/bright/zz-bomb.png": _bomb_png()})
    res = run_cli(["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), f"data.root={copy}",
                   "data.num_workers=1"], timeout=180)
    _one_error_line(res, str(copy / "test" / "bright" / "zz-bomb.png"), "decompression bomb")


@pytest.mark.slow
def test_demo_reads_through_predict_s_reader(sixteen_bit_run, tmp_path):
    """The demo page's handler (the function Gradio calls) and its test-split examples, on 16-bit data."""
    import os

    pytest.importorskip("gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from ddp_train.commands.demo import build_page, run_info, write_examples
    from ddp_train.commands.predict import Classifier

    root, run = sixteen_bit_run
    classifier = Classifier.load(run / "checkpoints" / "best.pt", "cpu")
    page = build_page(classifier, run_info(classifier.trained), [], 2)
    handler = next(f.fn for f in page.fns.values() if f.api_name == "predict")
    files = _folder(tmp_path, {"grad.png": Image.fromarray(GRAD16), "bomb.png": _bomb_png()})
    _lab_tiff(files / "lab.tif")
    with torch.no_grad():
        want = torch.softmax(classifier.model(classifier.transform(_grey(GRAD16 / 65535).float())[None]), 1)[0]
    got = handler(str(files / "grad.png"))
    assert got == pytest.approx({classifier.classes[i]: float(want[i]) for i in range(2)}, abs=1e-5)
    with pytest.raises(gr.Error, match="decompression bomb"):
        handler(str(files / "bomb.png"))
    with pytest.raises(gr.Error, match="mode LAB"):
        handler(str(files / "lab.tif"))
    # The examples the page offers keep the test images' 16 bits: read back, they are the test split's tensors.
    (tmp_path / "ex").mkdir()
    examples = write_examples(classifier.trained, tmp_path / "ex")
    ds = _dataset(root)
    firsts = [ds.test.load(int(np.flatnonzero(ds.test.labels == c)[0])) for c in range(len(ds.classes))]
    assert len(examples) == len(firsts) == 2
    for (path, _), first in zip(examples, firsts):
        back = load_input(path, 1, S)
        assert back.dtype == torch.float32 and torch.allclose(back, first, rtol=0, atol=0.5 / 65535)
