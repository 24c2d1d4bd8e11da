#!/usr/bin/env python3
"""Makes tests/fixtures/ from the torchvision reference data (see tests/fixtures/README.md).

Input: a folder with the images and `X.input.f32` tensors that torchvision made:
`Resize(256, bilinear, antialias=True) -> CenterCrop(224) -> ToTensor -> Normalize(ImageNet)`
on `PIL.Image.open(X).convert("RGB")`. ToTensor yields k/255 for 8-bit k, so the tensor is stored
losslessly as the u8 levels k (CHW), 4x smaller; the script checks the round trip.
Also writes a lossless WebP of one PNG (same pixels, so the same reference) and a JPEG stored
sideways with EXIF orientation 6 (decoders must rotate it back upright).
And the CLIP profile's reference, `X.clip.levels.u8`: `Resize(224, bicubic) -> CenterCrop(224)`
as torchvision applies them to a PIL image (PIL's own antialiased bicubic resize to the size
torchvision computes, then the centre crop with Python's rounding), stored the same way.

usage: make-fixtures.py SRC_IMAGES SRC_REFERENCE OUT
"""
import os, shutil, sys
import numpy as np
from PIL import Image

src_img, src_ref, out = sys.argv[1:4]
mean = np.array([0.485, 0.456, 0.406], "f4")[:, None, None]
std = np.array([0.229, 0.224, 0.225], "f4")[:, None, None]
for name in ["chelsea.png", "rocket.jpg", "camera.png", "logo.png"]:
    stem = os.path.splitext(name)[0]
    shutil.copy(os.path.join(src_img, name), os.path.join(out, name))
    x = np.fromfile(os.path.join(src_ref, f"{stem}.input.f32"), "<f4").reshape(3, 224, 224)
    k = np.rint((x * std + mean) * 255).astype(np.int64)
    assert k.min() >= 0 and k.max() <= 255
    back = (k.astype("f4") / 255 - mean) / std
    err = float(np.abs(back - x).max())
    assert err < 1e-5, (name, err)
    k.astype(np.uint8).tofile(os.path.join(out, f"{stem}.levels.u8"))
    print(name, "max round-trip error", err)

Image.open(os.path.join(src_img, "chelsea.png")).save(os.path.join(out, "chelsea.webp"), lossless=True)
# Stored rotated 90 degrees counter-clockwise; orientation 6 says "rotate 90 clockwise to display".
im = Image.open(os.path.join(src_img, "rocket.jpg")).convert("RGB")
exif = Image.Exif()
exif[0x0112] = 6
im.transpose(Image.Transpose.ROTATE_90).save(os.path.join(out, "rocket-exif6.jpg"), quality=95, exif=exif)

def clip_levels(path):
    im = Image.open(path).convert("RGB")
    w, h = im.size
    short, long = min(w, h), max(w, h)
    size = (224, int(224 * long / short)) if w <= h else (int(224 * long / short), 224)
    im = im.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    return np.asarray(im.crop((left, top, left + 224, top + 224))).transpose(2, 0, 1)


for name in ["chelsea.png", "rocket.jpg"]:
    clip_levels(os.path.join(src_img, name)).astype(np.uint8).tofile(
        os.path.join(out, f"{os.path.splitext(name)[0]}.clip.levels.u8"))
print("wrote", sorted(os.listdir(out)))
