#!/usr/bin/env python3
"""Photo-like JPEGs for benchmarks, calibration and parity checks: seeded random crops of the real
photos in tests/fixtures (scikit-image's data), rescaled to one size and saved at quality 90.
With --queries, also a near-duplicate of each (resized to 92%, re-encoded at quality 70) under
queries/ with the same name: what a user searching with a copy of a photo would upload.

usage: make-photos.py OUT_DIR [--count 1000] [--size 500x375] [--seed 1] [--queries]
"""
import argparse
import glob
import os
import random
import shutil

from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--count", type=int, default=1000)
ap.add_argument("--size", default="500x375")
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--queries", action="store_true")
a = ap.parse_args()

fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
bases = [Image.open(p).convert("RGB") for p in sorted(
    glob.glob(os.path.join(fixtures, "*.png")) + glob.glob(os.path.join(fixtures, "photos", "*.jpg"))
    + [os.path.join(fixtures, "rocket.jpg")])]
w, h = (int(v) for v in a.size.split("x"))
rng = random.Random(a.seed)
# Written aside and moved in place at the end, so an interrupted run never leaves half a set.
out = a.out.rstrip("/") + ".partial"
shutil.rmtree(out, ignore_errors=True)
os.makedirs(os.path.join(out, "photos"))
if a.queries:
    os.makedirs(os.path.join(out, "queries"))
for i in range(a.count):
    base = bases[i % len(bases)]
    bw, bh = base.size
    # A crop of 35-100% of each side, anywhere in the photo, then the output size (aspect may change a little).
    cw, ch = int(bw * rng.uniform(0.35, 1.0)), int(bh * rng.uniform(0.35, 1.0))
    x, y = rng.randrange(bw - cw + 1), rng.randrange(bh - ch + 1)
    photo = base.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
    name = f"{i:05}.jpg"
    photo.save(os.path.join(out, "photos", name), quality=90)
    if a.queries:
        q = photo.resize((round(w * 0.92), round(h * 0.92)), Image.BILINEAR)
        q.save(os.path.join(out, "queries", name), quality=70)
shutil.rmtree(a.out, ignore_errors=True)
os.rename(out, a.out)
print(f"{a.count} photos of {w}x{h} under {a.out}/photos" + (" (and queries/)" if a.queries else ""))
