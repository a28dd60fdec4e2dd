"""Builds the demo dataset from real data that ships inside installed packages.

    python -m launch.make_dataset --out DIR

Sources (each its own folder of tar shards, see dataloader/shard_format.py):

    text       Python's own standard-library sources, cut into documents
    captions   scikit-learn's handwritten digits (captioned with their labels), the
               scikit-image sample photographs (captioned by hand, describing what is in
               them), and interleaved pairs of digits with text between them
    grounding  digits with the box around their ink and the ink's centroid as a point, and
               the coins photograph with a box per coin found by Otsu thresholding
    video      short MPEG-4 clips encoded with PyAV: a camera panning across the photographs

A byte-level BPE with 2048 tokens is trained on the demo text (special tokens <pad>=0,
<media>=1, <bos>=2, <eos>=3; digits split one per token so grounding coordinates have a
fixed token count) and stored with the data. Builds in seconds; a few MB.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import sysconfig
import tempfile
import time

import numpy as np

from dataloader.shard_format import SPECIAL_TOKENS
from dataloader.shard_writer import ShardWriter, write_manifest
from dataloader.template import TextTokenizer

PHOTOS = {  # scikit-image sample name -> caption (what the picture shows)
    "astronaut": "A portrait of astronaut Eileen Collins in her orange flight suit, "
                 "with an American flag behind her.",
    "coffee": "A cup of coffee with a saucer and a spoon on a wooden table.",
    "chelsea": "A tabby cat named Chelsea looking to the side.",
    "rocket": "A rocket standing on its launch pad under a blue sky.",
    "camera": "A black and white photograph of a man with a camera on a tripod.",
    "coins": "A grey photograph of many old coins lying on a dark background.",
    "hubble_deep_field": "Galaxies of many shapes and colours in the Hubble deep field.",
    "immunohistochemistry": "A microscope image of tissue stained brown and blue.",
    "moon": "A grey close-up of the surface of the moon with craters.",
    "page": "A scanned page of printed text with uneven lighting.",
    "text": "A photograph of printed text and numbers on a card.",
    "clock": "A grey photograph of a clock on a wall.",
    "colorwheel": "A colour wheel with every hue around its circle.",
    "grass": "A texture of green grass blades, shown in grey.",
    "gravel": "A texture of small stones of gravel, shown in grey.",
    "brick": "A texture of a brick wall, shown in grey.",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STDLIB_MODULES = ["json/__init__.py", "textwrap.py", "argparse.py", "dataclasses.py", "functools.py",
                  "heapq.py", "bisect.py", "random.py", "statistics.py", "fractions.py", "tarfile.py",
                  "shutil.py", "pathlib/__init__.py", "pathlib.py", "string.py", "calendar.py",
                  "contextlib.py", "collections/__init__.py", "enum.py", "abc.py", "csv.py",
                  "glob.py", "fnmatch.py", "copy.py", "pprint.py", "base64.py", "difflib.py"]


def _encode_image(rgb: np.ndarray, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _as_rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _photos() -> dict[str, np.ndarray]:
    import skimage.data

    return {name: _as_rgb(getattr(skimage.data, name)()) for name in PHOTOS}


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit images as 56x56 RGB (ink dark on white), with their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = d.images[:n] / 16.0  # 8x8 in [0, 1], 1 = ink
    big = np.kron(imgs, np.ones((7, 7)))  # nearest upscale, so ink boxes stay exact
    rgb = (255 - big * 255).astype(np.uint8)
    return np.stack([rgb] * 3, axis=-1), d.target[:n]


def _ink_box(digit_8x8_scaled: np.ndarray) -> tuple[list, list]:
    ink = digit_8x8_scaled[..., 0] < 200
    ys, xs = np.nonzero(ink)
    weights = 255.0 - digit_8x8_scaled[..., 0][ink]
    cx = float((xs + 0.5) @ weights / weights.sum())
    cy = float((ys + 0.5) @ weights / weights.sum())
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], [cx, cy]


def _coin_boxes(gray: np.ndarray) -> list[list]:
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.morphology import closing, disk

    mask = closing(gray > threshold_otsu(gray), disk(3))
    boxes = []
    for region in regionprops(label(mask)):
        if region.area >= 400:
            y0, x0, y1, x1 = region.bbox
            boxes.append([int(x0), int(y0), int(x1), int(y1), "coin"])
    return boxes


def _pan_video(rgb: np.ndarray, frames: int, size: int, start: float) -> bytes:
    """A horizontal pan of a size x size window across the photograph (MPEG-4 in MP4)."""
    import av

    h, w, _ = rgb.shape
    y = (h - size) // 2
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        span = w - size
        for i in range(frames):
            x = int((start + (1 - start) * i / max(1, frames - 1)) * span) if span > 0 else 0
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[y:y + size, x:x + size]),
                                               format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _stdlib_documents(max_chars: int = 1500) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for rel in STDLIB_MODULES:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            continue
        text = open(path, encoding="utf-8").read()
        chunk = []
        size = 0
        for line in text.splitlines(keepends=True):
            chunk.append(line)
            size += len(line)
            if size >= max_chars and line.strip() == "":
                docs.append("".join(chunk))
                chunk, size = [], 0
        if chunk:
            docs.append("".join(chunk))
    return docs


def train_tokenizer(texts: list[str], path: str, vocab_size: int = 2048) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} is not at id {i}"
    tok.save(path)


VIDEO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def build(out: str, *, num_digits: int = 600, num_text_docs: int | None = None,
          video_photos: tuple[str, ...] = VIDEO_PHOTOS, samples_per_shard: int = 48) -> dict:
    """Writes the demo into `out`; smaller arguments give the tiny variant tests use."""
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    photos = _photos()
    digits, labels = _digits(num_digits)
    all_documents = _stdlib_documents()
    documents = all_documents[:num_text_docs]
    captions = list(PHOTOS.values()) + [f"A handwritten digit {NUMBER_WORDS[d]} ({d})." for d in range(10)]
    tok_path = os.path.join(tempfile.mkdtemp(prefix="k25tok-"), "tokenizer.json")
    train_tokenizer(all_documents + captions * 20 + [" <ref>coin</ref><box>(012,345),(678,901)</box>"] * 50,
                    tok_path)
    tok = TextTokenizer(tok_path)
    writers = {name: ShardWriter(out, name, tok, samples_per_shard=samples_per_shard)
               for name in ("text", "captions", "grounding", "video")}

    for i, doc in enumerate(documents):
        writers["text"].add(f"doc{i:05d}", {"txt": doc.encode()})

    cap = writers["captions"]
    for name, rgb in photos.items():
        cap.add(f"photo_{name}", {"jpg": _encode_image(rgb), "txt": PHOTOS[name].encode()})
    half = num_digits // 2
    for i in range(half):
        d = int(labels[i])
        cap.add(f"digit{i:05d}", {"png": _encode_image(digits[i], "PNG"),
                                  "txt": f"A handwritten digit {NUMBER_WORDS[d]} ({d}).".encode()})
    for i in range(half, num_digits - 1, 2):
        a, b = int(labels[i]), int(labels[i + 1])
        meta = {"segments": [{"text": "Here are two handwritten digits. The first:", "loss": False},
                             {"media": "0.png"}, {"text": " and the second:", "loss": False},
                             {"media": "1.png"},
                             {"text": f" They read {a} and {b}; together {a}{b}.", "loss": True}]}
        cap.add(f"pair{i:05d}", {"0.png": _encode_image(digits[i], "PNG"),
                                 "1.png": _encode_image(digits[i + 1], "PNG"),
                                 "json": json.dumps(meta).encode()})

    gr = writers["grounding"]
    for i in range(half):
        j = num_digits - 1 - i
        d = int(labels[j])
        box, point = _ink_box(digits[j])
        meta = {"segments": [{"media": "png"},
                             {"text": "Find the digit and its centre.", "loss": False}],
                "boxes": [box + [f"digit {d}"]], "points": [point + ["centre"]]}
        gr.add(f"ground{j:05d}", {"png": _encode_image(digits[j], "PNG"),
                                  "json": json.dumps(meta).encode()})
    coins = photos["coins"]
    meta = {"segments": [{"media": "jpg"}, {"text": "Find every coin.", "loss": False}],
            "boxes": _coin_boxes(coins[..., 0])}
    gr.add("coins", {"jpg": _encode_image(coins), "json": json.dumps(meta).encode()})

    vid = writers["video"]
    for name in video_photos:
        for k, start in enumerate((0.0, 0.3)):
            frames = 8 if k == 0 else 6
            vid.add(f"pan_{name}_{k}", {
                "mp4": _pan_video(photos[name][::2, ::2] if name == "hubble_deep_field" else photos[name],
                                  frames, 112, start),
                "txt": f"The camera pans right. {PHOTOS[name]}".encode()})

    for w in writers.values():
        w.close()
    write_manifest(out, writers, tok_path)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    return {"samples": {n: w.num_samples for n, w in writers.items()},
            "bytes": total, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build the demo dataset (real data from installed packages).")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--num-digits", type=int, default=600)
    a = p.parse_args(argv)
    info = build(a.out, num_digits=a.num_digits)
    print(f"demo dataset in {a.out}: {info['samples']}, {info['bytes'] / 2**20:.1f} MiB, "
          f"{info['seconds']} s", file=sys.stdout)


if __name__ == "__main__":
    main()
