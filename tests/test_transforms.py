"""cachedata.transforms against reference pipelines written directly with the libraries.

Every input is a real file written here (PIL for images, soundfile for audio, a BPE
tokenizer trained here with `tokenizers`); nothing is mocked.
"""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
import torchvision
from helpers import ListDataset
from PIL import Image, ImageOps
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_gif, decode_image, decode_jpeg, decode_png, read_file

from cachedata import CachedDataset, fingerprint
from cachedata.transforms import DecodeAudio, DecodeImage, Features, Tokenize

ORIENTATION = 0x0112


def assert_tree_equal(a, b) -> None:
    """Bit-exact equality of nested dict/tuple/list structures of tensors."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    else:
        assert a == b


def end_to_end(tmp_path: Path, items: list, transform, *, batch_size: int = 4) -> list:
    """Cold then warm epochs through CachedDataset + DataLoader; returns the items read."""
    cached = CachedDataset(ListDataset(items), tmp_path / "cache", transform=transform)
    loader = DataLoader(cached, batch_size=batch_size, collate_fn=list)
    cold = [x for batch in loader for x in batch]
    assert cached.stats.misses == len(items) and cached.stats.hits == 0
    warm = [x for batch in loader for x in batch]
    assert cached.stats.hits == len(items)
    cached.flush()
    again = CachedDataset(ListDataset(items), tmp_path / "cache", transform=transform)  # a new process's view
    assert again.path == cached.path and again.num_cached == len(items)
    assert [cached.is_cached(i) for i in range(len(items))] == [True] * len(items)
    for c, w in zip(cold, warm):
        assert_tree_equal(c, w)
    for i, c in enumerate(cold):
        assert_tree_equal(again[i], c)
    return cold


# ---------------------------------------------------------------------------------- images


def pixels(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    """A smooth image with some noise (JPEG-friendly), uint8 [H, W, C]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 3) % 256], -1)
    extra = rng.integers(0, 256, (h, w, 1))
    arr = np.concatenate([base, extra], -1)[:, :, :channels] + rng.integers(-8, 9, (h, w, channels))
    return np.clip(arr, 0, 255).astype(np.uint8)


def exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[ORIENTATION] = orientation
    return ex.tobytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    rgb = Image.fromarray(pixels(24, 32, 3, 0))
    rgba = Image.fromarray(pixels(24, 32, 4, 1), "RGBA")
    gray = Image.fromarray(pixels(24, 32, 1, 2)[:, :, 0], "L")
    files = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        files[name] = d / name
        img.save(files[name], **kw)

    save("rgb.jpg", rgb, quality=90)
    save("gray.jpg", gray, quality=90)
    save("rgb.png", rgb)
    save("rgba.png", rgba)
    save("gray.png", gray)
    save("palette.png", rgb.convert("P"))
    save("palette_trns.png", rgb.convert("P"), transparency=0)
    save("rgb.webp", rgb, quality=80)
    save("rgba.webp", rgba, lossless=True)
    save("rgb_lossless.webp", rgb, lossless=True)
    save("rgb.gif", rgb.convert("P"))
    frames = [Image.fromarray(pixels(24, 32, 3, s)).convert("P") for s in (3, 4, 5)]
    save("anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=50)
    save("exif6.jpg", rgb, quality=95, exif=exif(6))
    save("exif8.png", rgba, exif=exif(8))
    for o in range(1, 9):
        save(f"exif{o}.webp", rgb, lossless=True, exif=exif(o))
    save("exif8.tiff", rgb, exif=exif(8))  # Pillow path: torchvision has no TIFF decoder
    save("rgb.bmp", rgb)
    save("gray16.png", Image.fromarray(pixels(24, 32, 1, 6)[:, :, 0].astype(np.uint16) * 257 + 3))
    files["garbage.jpg"] = d / "garbage.jpg"
    files["garbage.jpg"].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(range(256)) * 4)
    files["garbage.bin"] = d / "garbage.bin"
    files["garbage.bin"].write_bytes(bytes(random.Random(0).randrange(256) for _ in range(500)))
    return files


def tv(path: Path, mode: str) -> torch.Tensor:
    """The torchvision reference: decode_image with EXIF orientation applied."""
    return decode_image(read_file(str(path)), mode=ImageReadMode[mode], apply_exif_orientation=True)


def pil(path: Path, mode: str) -> torch.Tensor:
    """The Pillow reference: exif_transpose, convert, HWC -> CHW."""
    with Image.open(path) as im:
        arr = np.array(ImageOps.exif_transpose(im).convert(mode))
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


READ_MODE = {"L": "GRAY", "LA": "GRAY_ALPHA", "RGB": "RGB", "RGBA": "RGB_ALPHA"}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
@pytest.mark.parametrize("name", ["rgb.png", "rgba.png", "gray.png", "palette_trns.png", "exif8.png"])
def test_png_matches_torchvision_in_every_mode(images, name, mode):
    out = DecodeImage(mode)(images[name])
    assert out.dtype == torch.uint8 and out.is_contiguous()
    assert_tree_equal(out, tv(images[name], READ_MODE[mode]))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_palette_png_without_transparency(images, mode):
    # torchvision 0.28 returns uninitialized alpha bytes for a palette PNG without tRNS
    # asked for RGB_ALPHA / GRAY_ALPHA; DecodeImage decodes the color and adds opaque alpha.
    path = images["palette.png"]
    color = tv(path, READ_MODE[mode.rstrip("A")] if mode != "RGBA" else "RGB")
    ref = torch.cat([color, torch.full_like(color[:1], 255)]) if mode in ("RGBA", "LA") else color
    assert_tree_equal(DecodeImage(mode)(path), ref)
    if mode in ("RGB", "RGBA"):
        assert_tree_equal(DecodeImage(mode)(path), pil(path, mode))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_decoding_is_deterministic(images, mode):
    dec = DecodeImage(mode)
    for name, path in images.items():
        if name.startswith("garbage"):
            continue
        first = dec(path)
        for _ in range(3):
            assert_tree_equal(dec(path), first)


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", ["rgb.jpg", "gray.jpg", "exif6.jpg"])
def test_jpeg_matches_torchvision(images, name, mode):
    assert_tree_equal(DecodeImage(mode)(images[name]), tv(images[name], READ_MODE[mode]))
    data = read_file(str(images[name]))
    direct = decode_jpeg(data, mode=ImageReadMode[READ_MODE[mode]], apply_exif_orientation=True)
    assert_tree_equal(DecodeImage(mode)(images[name]), direct)


def test_jpeg_alpha_modes_add_an_opaque_channel(images):
    rgb = tv(images["rgb.jpg"], "RGB")
    gray = tv(images["rgb.jpg"], "GRAY")
    assert_tree_equal(DecodeImage("RGBA")(images["rgb.jpg"]), torch.cat([rgb, torch.full_like(gray, 255)]))
    assert_tree_equal(DecodeImage("LA")(images["rgb.jpg"]), torch.cat([gray, torch.full_like(gray, 255)]))
    # a grayscale JPEG as RGB repeats its one channel
    g = tv(images["gray.jpg"], "GRAY")
    assert_tree_equal(DecodeImage("RGB")(images["gray.jpg"]), g.expand(3, -1, -1).contiguous())


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("name", ["rgb.webp", "rgba.webp"])
def test_webp_matches_torchvision(images, name, mode):
    assert_tree_equal(DecodeImage(mode)(images[name]), tv(images[name], READ_MODE[mode]))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
@pytest.mark.parametrize("name", ["rgba.webp", "rgb_lossless.webp", "rgb.gif"])
def test_lossless_webp_and_gif_match_pillow_in_every_mode(images, name, mode):
    # torchvision cannot make gray WebP or anything but RGB from a GIF; the conversion done
    # here must equal Pillow's own (lossless files decode to the same pixels in both).
    out = DecodeImage(mode)(images[name])
    if name.endswith(".gif") and mode in ("RGBA", "LA"):  # torchvision's GIF decoder drops transparency
        ref = pil(images[name], mode[:-1] if mode == "LA" else "RGB")
        ref = torch.cat([ref, torch.full_like(ref[:1], 255)])
    else:
        ref = pil(images[name], mode)
    assert_tree_equal(out, ref)


def test_gif_is_decoded_by_torchvision_first_frame(images):
    frames = decode_gif(read_file(str(images["anim.gif"])))
    assert frames.dim() == 4 and frames.shape[0] == 3
    assert_tree_equal(DecodeImage("RGB")(images["anim.gif"]), frames[0].contiguous())
    assert_tree_equal(DecodeImage("RGB")(images["rgb.gif"]), decode_gif(read_file(str(images["rgb.gif"]))))


def test_exif_orientation_is_applied(images):
    # JPEG, orientation 6 (rotate 90 degrees clockwise): H and W swap.
    plain = decode_jpeg(read_file(str(images["exif6.jpg"])), mode=ImageReadMode.RGB)
    out = DecodeImage("RGB")(images["exif6.jpg"])
    assert tuple(plain.shape) == (3, 24, 32) and tuple(out.shape) == (3, 32, 24)
    assert_tree_equal(out, plain.rot90(-1, (1, 2)).contiguous())
    # PNG, orientation 8 (rotate 90 degrees counter-clockwise), lossless: equals Pillow.
    png_plain = decode_png(read_file(str(images["exif8.png"])), mode=ImageReadMode.RGB_ALPHA)
    png = DecodeImage("RGBA")(images["exif8.png"])
    assert_tree_equal(png, png_plain.rot90(1, (1, 2)).contiguous())
    assert_tree_equal(png, pil(images["exif8.png"], "RGBA"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_webp_exif_orientation_matches_pillow(images, orientation):
    # torchvision's decode_webp ignores EXIF; DecodeImage applies it like exif_transpose.
    path = images[f"exif{orientation}.webp"]
    with Image.open(path) as im:
        assert im.getexif().get(ORIENTATION) == orientation
    assert_tree_equal(DecodeImage("RGB")(path), pil(path, "RGB"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
@pytest.mark.parametrize("name", ["rgb.bmp", "exif8.tiff"])
def test_formats_torchvision_cannot_read_go_through_pillow(images, name, mode):
    with pytest.raises(RuntimeError):
        decode_image(read_file(str(images[name])))
    out = DecodeImage(mode)(images[name])
    assert_tree_equal(out, pil(images[name], mode))
    if name.endswith(".tiff"):
        assert tuple(out.shape[1:]) == (32, 24)  # rotated by its EXIF orientation


def test_16_bit_png_is_scaled_to_8_bits(images):
    raw = decode_image(read_file(str(images["gray16.png"])), mode=ImageReadMode.GRAY)
    assert raw.dtype == torch.uint16
    out = DecodeImage("L")(images["gray16.png"])
    assert_tree_equal(out, (raw.to(torch.int32) >> 8).to(torch.uint8))


def test_paths_bytes_and_pathlike_agree(images):
    dec = DecodeImage("RGB")
    for name in ("rgb.jpg", "rgba.png", "rgb.webp", "anim.gif", "rgb.bmp"):
        p = images[name]
        ref = dec(p)
        data = p.read_bytes()
        for item in (str(p), data, bytearray(data), memoryview(data), read_file(str(p))):
            assert_tree_equal(dec(item), ref)
    out = dec(images["rgb.png"])
    out.add_(1)  # fresh and writable
    assert not torch.equal(out, dec(images["rgb.png"]))


def test_image_errors_name_the_file_and_the_reason(images):
    dec = DecodeImage()
    with pytest.raises(
        ValueError, match=r"DecodeImage: cannot decode '.*garbage\.jpg': torchvision: .+; Pillow: "
    ):
        dec(images["garbage.jpg"])
    with pytest.raises(
        ValueError, match=r"DecodeImage: cannot decode '.*garbage\.bin': not a JPEG.*Pillow: cannot"
    ):
        dec(images["garbage.bin"])
    with pytest.raises(ValueError, match=r"cannot decode <500 bytes>: "):
        dec(images["garbage.bin"].read_bytes())
    missing = images["rgb.png"].parent / "missing.png"
    with pytest.raises(FileNotFoundError, match=r"DecodeImage: no such file: '.*missing\.png'") as info:
        dec(missing)
    assert info.value.filename == str(missing)
    with pytest.raises(TypeError, match=r"DecodeImage expects a file path .* got int"):
        dec(3)
    with pytest.raises(ValueError, match=r"mode must be one of \['L', 'LA', 'RGB', 'RGBA'\], got 'CMYK'"):
        DecodeImage("CMYK")


def test_decode_image_fingerprint_and_repr():
    fps = {m: fingerprint(DecodeImage(m)) for m in ("RGB", "RGBA", "L", "LA")}
    assert len(set(fps.values())) == 4
    assert fingerprint(DecodeImage("RGB")) == fps["RGB"] == fingerprint(DecodeImage())
    assert fingerprint(pickle.loads(pickle.dumps(DecodeImage("L")))) == fps["L"]
    assert repr(DecodeImage()) == "DecodeImage(mode='RGB')"
    assert repr(DecodeImage("L")) == "DecodeImage(mode='L')"


def test_decode_image_fingerprint_covers_decoder_versions(monkeypatch):
    from cachedata.transforms import image

    before = fingerprint(DecodeImage())
    tv_version = image.version("torchvision")
    assert tv_version == ".".join(torchvision.__version__.split(".")[:2])
    real = image.version

    def bumped(dist: str):
        return "99.0" if dist == "pillow" else real(dist)

    monkeypatch.setattr(image, "version", bumped)
    assert fingerprint(DecodeImage()) != before


def test_decode_image_end_to_end(tmp_path, images):
    names = ["rgb.jpg", "rgba.png", "gray.png", "rgb.webp", "anim.gif", "exif6.jpg", "rgb.bmp"]
    paths = [str(images[n]) for n in names]
    cold = end_to_end(tmp_path, paths, DecodeImage("RGB"))
    for p, x in zip(paths, cold):
        assert_tree_equal(x, DecodeImage("RGB")(p))
    # bytes items too, under two DataLoader workers
    blobs = [images[n].read_bytes() for n in names]
    cached = CachedDataset(ListDataset(blobs), tmp_path / "bytes", transform=DecodeImage("L"))
    got = [x for b in DataLoader(cached, batch_size=3, num_workers=2, collate_fn=list) for x in b]
    for blob, x in zip(blobs, got):
        assert_tree_equal(x, DecodeImage("L")(blob))


# ----------------------------------------------------------------------------------- audio


def tone(rate: int, seconds: float, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    chans = [
        0.4 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.05 * rng.standard_normal(len(t))
        for c in range(channels)
    ]
    return np.stack(chans, -1).astype(np.float32)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audio")
    spec = {
        "mono16k.wav": (16000, 1, "PCM_16"),
        "stereo16k.flac": (16000, 2, "PCM_16"),
        "stereo44k.flac": (44100, 2, "PCM_24"),
        "mono44k.wav": (44100, 1, "FLOAT"),
        "stereo8k.wav": (8000, 2, "PCM_16"),
        "mono8k.flac": (8000, 1, "PCM_16"),
    }
    files = {}
    for i, (name, (rate, channels, subtype)) in enumerate(spec.items()):
        files[name] = d / name
        sf.write(files[name], tone(rate, 0.7, channels, i), rate, subtype=subtype)
    files["garbage.wav"] = d / "garbage.wav"
    files["garbage.wav"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(200))
    return files


def audio_reference(path, sample_rate: int, mono: bool, max_seconds: float | None) -> torch.Tensor:
    """soundfile + torchaudio directly: read (the frames covering max_seconds), mix, resample, cut."""
    rate = sf.info(str(path)).samplerate
    frames = -1
    if max_seconds is not None:
        frames = math.ceil(math.floor(max_seconds * sample_rate) * rate / sample_rate)
    data, rate = sf.read(path, frames=frames, dtype="float32", always_2d=True)
    wave = torch.from_numpy(data.T)
    wave = wave.mean(0) if mono else wave
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    if max_seconds is not None:
        wave = wave[..., : math.floor(max_seconds * sample_rate)]
    return wave.contiguous()


@pytest.mark.parametrize("max_seconds", [None, 0.25, 0.5, 5.0])
@pytest.mark.parametrize("mono", [True, False])
@pytest.mark.parametrize("sample_rate", [16000, 22050])
@pytest.mark.parametrize(
    "name", ["mono16k.wav", "stereo16k.flac", "stereo44k.flac", "mono44k.wav", "stereo8k.wav", "mono8k.flac"]
)
def test_decode_audio_matches_soundfile_and_torchaudio(sounds, name, sample_rate, mono, max_seconds):
    out = DecodeAudio(sample_rate, mono=mono, max_seconds=max_seconds)(sounds[name])
    ref = audio_reference(sounds[name], sample_rate, mono, max_seconds)
    assert out.dtype == torch.float32 and out.is_contiguous()
    channels = sf.info(str(sounds[name])).channels
    assert out.dim() == (1 if mono else 2)
    if not mono:
        assert out.shape[0] == channels
    assert_tree_equal(out, ref)  # bit for bit, truncated reads included
    if max_seconds is not None:
        full = audio_reference(sounds[name], sample_rate, mono, None)
        n = min(full.shape[-1], math.floor(max_seconds * sample_rate))
        assert out.shape[-1] == n
        # the start of the untruncated output; only the last few samples see the cut
        assert_close(out[..., : n - 64], full[..., : n - 64], rtol=0, atol=1e-5)


def test_decode_audio_mixes_by_mean_and_keeps_channels_first(sounds):
    data, _ = sf.read(sounds["stereo16k.flac"], dtype="float32", always_2d=True)
    stereo = DecodeAudio(16000, mono=False)(sounds["stereo16k.flac"])
    assert tuple(stereo.shape) == (2, len(data))
    assert torch.equal(stereo, torch.from_numpy(data.T.copy()))
    assert torch.equal(DecodeAudio(16000)(sounds["stereo16k.flac"]), torch.from_numpy(data).mean(1))
    assert tuple(DecodeAudio(16000, mono=False)(sounds["mono16k.wav"]).shape) == (1, 11200)


def test_decode_audio_resample_false(sounds):
    path = sounds["stereo44k.flac"]
    keep = DecodeAudio(44100, mono=False, resample=False)(path)
    assert torch.equal(keep, torch.from_numpy(sf.read(path, dtype="float32", always_2d=True)[0].T.copy()))
    with pytest.raises(
        ValueError, match=r"DecodeAudio: '.*stereo44k\.flac' has a sample rate of 44100 Hz, not the 16000 Hz"
    ):
        DecodeAudio(16000, resample=False)(path)
    with pytest.raises(ValueError, match=r"<\d+ bytes> has a sample rate of 44100 Hz.*sample_rate=44100"):
        DecodeAudio(16000, resample=False)(path.read_bytes())


def test_decode_audio_bytes_and_paths_agree(sounds):
    dec = DecodeAudio(16000, max_seconds=0.3)
    for name in ("stereo44k.flac", "mono8k.flac", "mono16k.wav"):
        data = sounds[name].read_bytes()
        assert_tree_equal(dec(data), dec(sounds[name]))
        assert_tree_equal(dec(str(sounds[name])), dec(memoryview(data)))


def test_audio_errors(sounds):
    with pytest.raises(ValueError, match=r"DecodeAudio: cannot decode '.*garbage\.wav': \S"):
        DecodeAudio()(sounds["garbage.wav"])
    with pytest.raises(ValueError, match=r"DecodeAudio: cannot decode <10 bytes>: "):
        DecodeAudio()(b"not audio!")
    missing = sounds["mono16k.wav"].parent / "missing.flac"
    with pytest.raises(FileNotFoundError, match=r"DecodeAudio: no such file: '.*missing\.flac'"):
        DecodeAudio()(missing)
    with pytest.raises(TypeError, match="DecodeAudio expects a file path"):
        DecodeAudio()(np.zeros(3))
    for bad in (0, -8000, 16000.0, True):
        with pytest.raises(ValueError, match="sample_rate must be a positive int"):
            DecodeAudio(bad)
    for bad in (0, -1.0, float("inf"), "2"):
        with pytest.raises(ValueError, match="max_seconds must be a positive number"):
            DecodeAudio(max_seconds=bad)


def test_decode_audio_fingerprint_and_repr():
    base = fingerprint(DecodeAudio())
    assert base == fingerprint(DecodeAudio(16000, mono=True, max_seconds=None, resample=True))
    assert fingerprint(DecodeAudio(max_seconds=2)) == fingerprint(DecodeAudio(max_seconds=2.0))
    variants = [
        DecodeAudio(22050),
        DecodeAudio(mono=False),
        DecodeAudio(max_seconds=2.0),
        DecodeAudio(max_seconds=3.0),
        DecodeAudio(resample=False),
    ]
    fps = [fingerprint(v) for v in variants]
    assert len({base, *fps}) == 1 + len(variants)
    assert repr(DecodeAudio()) == "DecodeAudio(sample_rate=16000, mono=True, max_seconds=None, resample=True)"
    assert repr(DecodeAudio(8000, mono=False, max_seconds=2)) == (
        "DecodeAudio(sample_rate=8000, mono=False, max_seconds=2.0, resample=True)"
    )


def test_decode_audio_fingerprint_covers_the_decoding_stack(monkeypatch):
    import soundfile

    from cachedata.transforms import audio

    before = fingerprint(DecodeAudio())
    before_no_resample = fingerprint(DecodeAudio(resample=False))
    monkeypatch.setattr(soundfile, "__libsndfile_version__", "9.9.9")
    assert fingerprint(DecodeAudio()) != before
    monkeypatch.undo()
    real = audio.version
    monkeypatch.setattr(audio, "version", lambda d: "99.0" if d == "torchaudio" else real(d))
    assert fingerprint(DecodeAudio()) != before
    # without resampling torchaudio never touches the output
    assert fingerprint(DecodeAudio(resample=False)) == before_no_resample


def test_decode_audio_end_to_end(tmp_path, sounds):
    names = ["mono16k.wav", "stereo16k.flac", "stereo44k.flac", "mono44k.wav", "stereo8k.wav", "mono8k.flac"]
    paths = [str(sounds[n]) for n in names]
    dec = DecodeAudio(16000, max_seconds=0.5)
    cold = end_to_end(tmp_path, paths, dec, batch_size=4)
    for p, x in zip(paths, cold):
        assert_tree_equal(x, audio_reference(p, 16000, True, 0.5))


# ------------------------------------------------------------------------------------ text

SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]


def corpus(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "to", "mi", "ren", "sha", "lo", "vu", "pe", "dri", "ax", "on", "ul", "ze"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def train_bpe(vocab_size: int, seed: int = 0) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(300)


class FastTokenizerLike:
    """Duck-typed stand-in for a transformers fast tokenizer (transformers is not installed)."""

    def __init__(self, backend: Tokenizer) -> None:
        self.backend_tokenizer = backend


TEXTS = ["katomi renlo", "", "zeul axon drivu pesha " * 6, "unseen QQQ words", "ka"]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenize_matches_the_tokenizer(bpe, add_special_tokens):
    t = Tokenize(bpe, add_special_tokens=add_special_tokens)
    for text in TEXTS:
        enc = bpe.encode(text, add_special_tokens=add_special_tokens)
        out = t(text)
        assert list(out) == ["input_ids", "attention_mask"]
        assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
        assert out["input_ids"].tolist() == enc.ids
        assert out["attention_mask"].tolist() == enc.attention_mask
    assert t("ka")["input_ids"].tolist()[0] == (
        bpe.token_to_id("[CLS]") if add_special_tokens else bpe.token_to_id("ka")
    )


def test_tokenize_truncates_to_max_length_including_specials(bpe):
    text = TEXTS[2]
    plain = bpe.encode(text, add_special_tokens=False).ids
    assert len(plain) > 10
    cls, sep = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
    out = Tokenize(bpe, max_length=10)(text)
    assert out["input_ids"].tolist() == [cls, *plain[:8], sep]
    assert out["attention_mask"].tolist() == [1] * 10
    assert Tokenize(bpe, max_length=10, add_special_tokens=False)(text)["input_ids"].tolist() == plain[:10]
    short = Tokenize(bpe, max_length=10)("ka")["input_ids"].tolist()
    assert short == bpe.encode("ka").ids  # shorter inputs are not padded
    assert bpe.truncation is None  # the user's tokenizer is untouched


def test_tokenize_copies_the_tokenizer(bpe):
    tok = Tokenizer.from_str(bpe.to_str())
    t = Tokenize(tok)
    before = fingerprint(t)
    tok.enable_padding(length=64, pad_id=3, pad_token="[PAD]")
    tok.add_tokens(["katomi"])
    assert len(t("katomi")["input_ids"]) == len(bpe.encode("katomi").ids)
    assert fingerprint(t) == before
    # padding configured on the tokenizer itself is part of what it does
    padded = Tokenize(tok)("ka")
    assert padded["input_ids"].shape == (64,) and padded["attention_mask"].sum() == 3


def test_tokenize_hf_fast_tokenizer_duck_typed(bpe):
    hf = FastTokenizerLike(bpe)
    t = Tokenize(hf, max_length=6)
    ref = Tokenize(bpe, max_length=6)
    for text in TEXTS:
        assert_tree_equal(t(text), ref(text))
    assert fingerprint(t) == fingerprint(ref)
    # transformers leaves the last call's truncation/padding on its backend: not settings
    used = Tokenizer.from_str(bpe.to_str())
    used.enable_truncation(3)
    used.enable_padding(length=40)
    for text in TEXTS:
        assert_tree_equal(Tokenize(FastTokenizerLike(used), max_length=6)(text), ref(text))
        assert_tree_equal(Tokenize(FastTokenizerLike(used))(text), Tokenize(bpe)(text))
    assert used.truncation["max_length"] == 3  # untouched
    assert (
        repr(t) == "Tokenize(FastTokenizerLike(BPE, vocab_size=300), max_length=6, add_special_tokens=True)"
    )


def test_tokenize_batch_equals_one_by_one(bpe):
    t = Tokenize(bpe, max_length=12)
    texts = TEXTS * 3
    for got, text in zip(t.batch(texts), texts):
        assert_tree_equal(got, t(text))
    assert t.batch([]) == []
    with pytest.raises(TypeError, match="Tokenize expects a str, got int at position 1"):
        t.batch(["a", 1])


def test_tokenize_errors(bpe):
    with pytest.raises(
        TypeError, match=r"Tokenize needs a tokenizers\.Tokenizer or a Hugging Face fast tokenizer"
    ):
        Tokenize(object())
    with pytest.raises(TypeError, match="Tokenize expects a str, got bytes"):
        Tokenize(bpe)(b"abc")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be a positive int or None"):
            Tokenize(bpe, max_length=bad)


def test_tokenize_fingerprint_and_repr(bpe):
    base = fingerprint(Tokenize(bpe))
    assert base == fingerprint(Tokenize(bpe, max_length=None, add_special_tokens=True))
    assert base == fingerprint(Tokenize(Tokenizer.from_str(bpe.to_str())))
    assert base == fingerprint(Tokenize(train_bpe(300)))  # retrained identically
    assert base == fingerprint(pickle.loads(pickle.dumps(Tokenize(bpe))))
    variants = [
        Tokenize(train_bpe(200)),  # another vocabulary
        Tokenize(train_bpe(300, seed=1)),  # same size, other merges
        Tokenize(bpe, max_length=16),
        Tokenize(bpe, max_length=32),
        Tokenize(bpe, add_special_tokens=False),
    ]
    fps = [fingerprint(v) for v in variants]
    assert len({base, *fps}) == 1 + len(variants)
    assert (
        repr(Tokenize(bpe))
        == "Tokenize(Tokenizer(BPE, vocab_size=300), max_length=None, add_special_tokens=True)"
    )


class LoggingTokenize(Tokenize):
    """Records every batch call (same process: num_workers=0)."""

    calls: list

    def batch(self, items):
        self.calls.append(list(items))
        return super().batch(items)


def test_tokenize_end_to_end_with_batched_misses(tmp_path, bpe):
    texts = corpus(7, n=10)
    t = LoggingTokenize(bpe, max_length=16)
    t.calls = []
    cold = end_to_end(tmp_path, texts, t, batch_size=4)
    assert [len(c) for c in t.calls] == [4, 4, 2]  # once per __getitems__, cold epoch only
    ref = Tokenize(bpe, max_length=16)
    for text, x in zip(texts, cold):
        assert_tree_equal(x, ref(text))


# -------------------------------------------------------------------------------- features


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.requires_grad_(False)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).requires_grad_(False).eval()


def inputs(n: int, shape=(3, 16, 16), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def reference_forward(model: nn.Module, x) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x.unsqueeze(0))[0]


def test_features_one_item_equals_the_model(resnet):
    net = small_net().train()  # Features switches it to eval (documented)
    f = Features(net)
    assert not net.training and not any(m.training for m in net.modules())
    for x in inputs(4):
        out = f(x)
        assert out.shape == (5,) and out.device.type == "cpu" and not out.is_inference()
        assert torch.equal(out, reference_forward(net, x))
        assert torch.equal(f(x.numpy()), out)
    fr = Features(resnet)
    for x in inputs(2, (3, 64, 64)):
        assert torch.equal(fr(x), reference_forward(resnet, x))
    out = f(inputs(1)[0])
    out.add_(1)  # a normal, writable tensor


def test_features_batch_equals_one_by_one(resnet):
    for model, shape in ((small_net(), (3, 16, 16)), (resnet, (3, 64, 64))):
        f = Features(model)
        xs = inputs(6, shape, seed=1)
        for got, x in zip(f.batch(xs), xs):
            assert got.shape == f(x).shape
            assert_close(got, f(x), rtol=1e-4, atol=1e-5)
    assert Features(small_net()).batch([]) == []


class CountingNet(nn.Module):
    """Records the batch size of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.conv(x).mean((-2, -1))


def test_features_stacks_equal_shapes_and_runs_ragged_ones_alone():
    net = CountingNet().requires_grad_(False)
    f = Features(net)
    same = inputs(5)
    f.batch(same)
    assert net.batch_sizes == [5]
    net.batch_sizes.clear()
    ragged = [torch.randn(3, 8 + i, 9) for i in range(4)]
    outs = f.batch(ragged)
    assert net.batch_sizes == [1, 1, 1, 1]
    for x, out in zip(ragged, outs):
        assert torch.equal(out, reference_forward(net, x))
    net.batch_sizes.clear()
    mixed = [same[0], ragged[0], same[1], ragged[1], same[2], same[3]]
    outs = Features(net).batch(mixed)
    assert sorted(net.batch_sizes) == [1, 1, 4]  # one group per input shape
    for x, out in zip(mixed, outs):
        assert_close(out, reference_forward(net, x), rtol=1e-4, atol=1e-5)
    net.batch_sizes.clear()
    Features(net, max_batch_size=2).batch(same)
    assert net.batch_sizes == [2, 2, 1]
    # dtypes are part of the group: float32 and float64 items never share a stack
    flat = CountingFlatten()
    x = torch.arange(6.0).reshape(2, 3)
    outs = Features(flat).batch([x, x.double(), x + 1, (x + 2).double()])
    assert flat.batch_sizes == [2, 2]
    assert [o.dtype for o in outs] == [torch.float32, torch.float64, torch.float32, torch.float64]
    assert torch.equal(outs[3], (x + 2).double().reshape(-1))


class CountingFlatten(nn.Flatten):
    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return super().forward(x)


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 6)
        self.proj = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True)
        return {"hidden": h, "pooled": self.proj(pooled), "extra": None}


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 2)

    def forward(self, a, b):
        return self.lin(a + b), (a * b).sum(-1)


def test_features_dict_and_tuple_inputs_and_outputs():
    f = Features(DictNet().requires_grad_(False))
    items = [
        {"input_ids": torch.tensor([1, 2, 3, 4]), "attention_mask": torch.tensor([1, 1, 1, 0])}
        for _ in range(3)
    ]
    items[1]["input_ids"] = torch.tensor([5, 6, 7, 8])
    one = f(items[0])
    assert list(one) == ["hidden", "pooled", "extra"]
    assert one["hidden"].shape == (4, 6) and one["pooled"].shape == (3,) and one["extra"] is None
    with torch.no_grad():
        ref = f.model(**{k: v[None] for k, v in items[0].items()})
    assert torch.equal(one["pooled"], ref["pooled"][0])
    for got, item in zip(f.batch(items), items):
        assert list(got) == ["hidden", "pooled", "extra"]
        assert_close(got["pooled"], f(item)["pooled"])
    g = Features(TupleNet().requires_grad_(False))
    pairs = [(torch.randn(4), torch.randn(4)) for _ in range(3)]
    out = g(pairs[0])
    assert isinstance(out, tuple) and out[0].shape == (2,) and out[1].shape == ()
    for got, pair in zip(g.batch(pairs), pairs):
        assert_close(got[0], g(pair)[0])
        assert_close(got[1], g(pair)[1])


def test_features_errors():
    net = small_net().requires_grad_(True)
    with pytest.raises(
        ValueError,
        match=r"Sequential has 6 trainable parameter tensor\(s\) \(0\.weight, 0\.bias, 1\.weight, \.\.\.\).*model\.requires_grad_\(False\).*allow_trainable=True",
    ):
        Features(net)
    f = Features(net, allow_trainable=True)
    assert all(p.requires_grad for p in net.parameters())  # not changed
    assert f(inputs(1)[0]).shape == (5,)
    with pytest.raises(TypeError, match=r"Features needs a torch\.nn\.Module"):
        Features(lambda x: x)
    with pytest.raises(ValueError, match=r"Features\(device='nonsense'\): not a device torch understands"):
        Features(small_net(), device="nonsense")
    with pytest.raises(TypeError, match=r"got str at item\['x'\]"):
        Features(small_net())({"x": "text"})

    class Scalar(nn.Module):
        def forward(self, x):
            return x.sum()

    with pytest.raises(
        ValueError, match=r"output has shape \(\); every tensor it returns needs a leading batch"
    ):
        Features(Scalar())(torch.ones(3))


def test_features_keeps_eval_mode_without_lasting_changes():
    net = small_net()
    f = Features(net)
    x = inputs(1)[0]
    ref = f(x)
    fp = fingerprint(f)
    net.train()  # the user switches it back: Features still runs (and fingerprints) in eval mode
    assert torch.equal(f(x), ref)
    assert fingerprint(f) == fp
    assert net.training and all(m.training for m in net.modules())  # and restores the flags


def test_features_fingerprint_and_repr(resnet):
    base = fingerprint(Features(small_net()))
    assert base == fingerprint(Features(small_net()))  # equal construction
    assert base == fingerprint(Features(small_net(), device="cuda"))  # device-independent
    assert base == fingerprint(Features(small_net(), max_batch_size=4))
    assert base == fingerprint(pickle.loads(pickle.dumps(Features(small_net()))))
    changed = small_net()
    with torch.no_grad():
        changed[6].weight[0, 0] += 1e-3
    buffer = small_net()
    buffer[1].running_mean[0] += 1
    other_class = torchvision.models.resnet18(weights=None).requires_grad_(False)
    other_class.load_state_dict(resnet.state_dict())
    other_class.__class__ = type("ResNetCopy", (torchvision.models.ResNet,), {})
    fps = {fingerprint(Features(m)) for m in (changed, buffer, small_net(seed=1), resnet, other_class)}
    assert base not in fps and len(fps) == 5
    r = repr(Features(resnet))
    assert r == "Features(ResNet(11,689,512 params), device='cpu', allow_trainable=False)"


def test_features_device_copy_leaves_the_model_where_it_is():
    net = small_net()
    f = Features(net, device="cpu")
    assert f._model_on_device() is net  # already there: no copy
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for the cross-device part")
    g = Features(net, device="cuda")
    x = inputs(1)[0]
    out = g(x)
    assert out.device.type == "cpu"
    assert next(net.parameters()).device.type == "cpu"
    assert_close(out, f(x), rtol=1e-3, atol=1e-4)
    assert_close(g.batch([x, x])[1], f(x), rtol=1e-3, atol=1e-4)


class LoggingFeatures(Features):
    """Records the items of every batch call (num_workers=0: same process)."""

    calls: list

    def batch(self, items):
        self.calls.append([x.clone() for x in items])
        return super().batch(items)


def test_features_through_cached_dataset_one_batch_call_per_getitems(tmp_path):
    xs = inputs(10, seed=3)
    f = LoggingFeatures(small_net())
    f.calls = []
    cached = CachedDataset(ListDataset(xs), tmp_path, transform=f)
    first = cached.__getitems__([0, 1, 2, 3])
    assert len(f.calls) == 1 and len(f.calls[0]) == 4
    second = cached.__getitems__([2, 3, 4, 5, 6])  # 2 and 3 are hits
    assert len(f.calls) == 2
    assert [torch.equal(a, b) for a, b in zip(f.calls[1], xs[4:7])] == [True, True, True]
    assert torch.equal(second[0], first[2]) and torch.equal(second[1], first[3])
    cached.__getitems__([0, 5, 6])  # all hits: no call
    assert len(f.calls) == 2
    for i, got in zip([2, 3, 4, 5, 6], second):
        assert_close(got, Features(small_net())(xs[i]), rtol=1e-4, atol=1e-5)


def test_features_end_to_end(tmp_path, resnet):
    xs = inputs(10, (3, 32, 32), seed=5)
    f = LoggingFeatures(resnet)
    f.calls = []
    cold = end_to_end(tmp_path, xs, f, batch_size=4)
    assert [len(c) for c in f.calls] == [4, 4, 2]
    direct = Features(resnet)
    for x, got in zip(xs, cold):
        assert got.shape == (1000,)
        assert_close(got, direct(x), rtol=1e-4, atol=1e-5)
    # a single miss through __getitem__ is the one-item forward, bit for bit
    single = CachedDataset(ListDataset(xs), tmp_path / "single", transform=Features(resnet))
    assert torch.equal(single[7], direct(xs[7]))
    assert torch.equal(single[7], reference_forward(resnet, xs[7]))


def test_import_without_touching_the_extras():
    import subprocess
    import sys

    code = (
        "import sys, cachedata.transforms as t; "
        "bad = [m for m in ('torchvision', 'soundfile', 'torchaudio', 'tokenizers', 'PIL') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_extra_names_it():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['soundfile'] = None; sys.modules['tokenizers'] = None\n"
        "from cachedata.transforms import DecodeAudio, Tokenize\n"
        "for make in (DecodeAudio, lambda: Tokenize(None)):\n"
        "    try:\n"
        "        make()\n"
        "    except ImportError as exc:\n"
        "        print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "DecodeAudio needs soundfile" in lines[0] and "pip install 'cachedata[audio]'" in lines[0]
    assert "Tokenize needs tokenizers" in lines[1] and "pip install 'cachedata[text]'" in lines[1]


def test_transforms_keep_their_module_name_through_the_split():
    """The class's module is part of its fingerprint and of its pickles: it names the package."""
    from cachedata.fingerprint_walker import identity

    for cls in (DecodeAudio, DecodeImage, Features, Tokenize):
        assert cls.__module__ == "cachedata.transforms"
        assert identity(cls) == f"cachedata.transforms:{cls.__name__}"
    assert b"cachedata.transforms\x94\x8c\x0bDecodeImage" in pickle.dumps(DecodeImage())
