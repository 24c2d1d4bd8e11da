#!/usr/bin/env python3
"""Sample images for the quickstart: seeded synthetic scenes (gradients, discs, boxes, stripes).

usage: make-sample-images.py OUT_DIR [--count 120]
"""
import argparse, os, random
from PIL import Image, ImageDraw

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--count", type=int, default=120)
args = ap.parse_args()
rng = random.Random(7)
os.makedirs(args.out, exist_ok=True)
for i in range(args.count):
    w, h = rng.randint(320, 640), rng.randint(240, 480)
    a, b = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    im = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(im)
    for y in range(h):
        t = y / h
        d.line([(0, y), (w, y)], fill=tuple(int(a[c] * (1 - t) + b[c] * t) for c in range(3)))
    for _ in range(rng.randint(3, 10)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randint(10, w // 2), y0 + rng.randint(10, h // 2)
        fill = tuple(rng.randrange(256) for _ in range(3))
        getattr(d, rng.choice(["ellipse", "rectangle"]))([x0, y0, x1, y1], fill=fill)
    sub = os.path.join(args.out, ["scenes", "shapes", "colours"][i % 3])
    os.makedirs(sub, exist_ok=True)
    im.save(os.path.join(sub, f"sample-{i:03}.jpg"), quality=90)
print(f"wrote {args.count} images under {args.out}")
