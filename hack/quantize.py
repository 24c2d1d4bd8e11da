#!/usr/bin/env python3
"""Lower-precision variants of the fp32 ResNet50 feature extractor (ONNX in, ONNX out).

  fp16  weights and activations in half precision, inputs and outputs kept fp32 (GPU: the CUDA and
        TensorRT providers run it on tensor cores; ONNX Runtime's x86 CPU provider has few fp16
        kernels, so on a CPU it runs slowly, through inserted casts where it runs at all).
  int8  static QDQ quantization for the CPU provider: per-channel int8 weights, uint8 activations
        whose ranges are calibrated on real photos (a folder of JPEG/PNG/WebP). AVX-512 VNNI does
        u8 x s8 products without saturation; older AVX2 CPUs may saturate, which --reduce-range
        avoids at some accuracy cost (measure with the parity test before choosing it).

The output records what it is in the model's metadata (imageindex.precision, imageindex.source,
and the source's imageindex.preprocess), which `imageindex` reads and stores with the collection,
so vectors of different precisions never mix unnoticed.

usage: quantize.py MODEL.onnx --precision fp16|int8 [--calibration DIR] [--count 64] -o OUT.onnx
"""
import argparse
import os
import random
import sys
import tempfile

import numpy as np
import onnx
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def tensor(path):
    """torchvision's Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize, with PIL."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((max(256, int(w * s)), max(256, int(h * s))), Image.BILINEAR)
    w, h = im.size
    left, top = round((w - 224) / 2), round((h - 224) / 2)
    im = im.crop((left, top, left + 224, top + 224))
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return ((x - MEAN) / STD)[None]


def images(folder, count, seed=1):
    found = []
    for d, _, files in os.walk(folder):
        found += [os.path.join(d, f) for f in files if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))]
    found.sort()
    random.Random(seed).shuffle(found)
    if not found:
        sys.exit(f"no images under {folder}")
    return found[:count]


def stamp(model, precision, source):
    meta = {p.key: p for p in model.metadata_props}
    # What the source records about itself (its preprocessing) holds for the variant too.
    inherited = [(p.key, p.value) for p in onnx.load(source, load_external_data=False).metadata_props
                 if p.key.startswith("imageindex.") and p.key not in ("imageindex.precision", "imageindex.source")]
    for k, v in inherited + [("imageindex.precision", precision), ("imageindex.source", os.path.basename(source))]:
        if k in meta:
            meta[k].value = v
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def fp16(src, out):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    stamp(model, "fp16", src)
    onnx.save(model, out)


def int8(src, out, calibration, count, reduce_range, fp32_tail):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    paths = images(calibration, count)
    name = onnx.load(src, load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(paths)

        def get_next(self):
            p = next(self.it, None)
            return None if p is None else {name: tensor(p)}

    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference and graph folding first, as onnxruntime's quantization guide advises.
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(src, prepared, skip_symbolic_shape=True)
        # The last nodes (the final bottleneck block and the pooling) write the embedding itself:
        # kept in fp32, their rounding does not land in the vectors. Nodes need names to be named.
        graph = onnx.load(prepared)
        for i, node in enumerate(graph.graph.node):
            node.name = node.name or f"{node.op_type.lower()}_{i}"
        onnx.save(graph, prepared)
        tail = [n.name for n in graph.graph.node[len(graph.graph.node) - fp32_tail:]] if fp32_tail else []
        quantize_static(
            prepared, out, Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=tail,
        )
    model = onnx.load(out)
    stamp(model, "int8", src)
    onnx.save(model, out)
    print(f"int8: calibrated on {len(paths)} images from {calibration}; last {fp32_tail} nodes in fp32", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--precision", choices=["fp16", "int8"], required=True)
    ap.add_argument("--calibration", help="folder of photos for int8 calibration")
    ap.add_argument("--count", type=int, default=64, help="calibration photos to use")
    ap.add_argument("--reduce-range", action="store_true", help="7-bit weights, for CPUs without VNNI")
    ap.add_argument("--fp32-tail", type=int, default=9,
                    help="last graph nodes kept in fp32 (ResNet50: the final bottleneck block and pooling)")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    tmp = a.out + ".tmp"
    if a.precision == "fp16":
        fp16(a.model, tmp)
    else:
        if not a.calibration:
            sys.exit("--precision int8 needs --calibration DIR (photos like the ones you will index)")
        int8(a.model, tmp, a.calibration, a.count, a.reduce_range, a.fp32_tail)
    os.replace(tmp, a.out)
    print(f"{a.precision}: {a.out} ({os.path.getsize(a.out) / 2**20:.0f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
