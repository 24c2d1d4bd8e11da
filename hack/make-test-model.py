#!/usr/bin/env python3
"""ResNet50 or ResNet18 feature extractor (torchvision layout, fc removed) as ONNX, with seeded random weights.

For tests and benchmarks where no model hub is reachable. Needs only `onnx` and `numpy` (no torch).
The graph is the real one: torchvision's ResNet50 V1.5 (bottleneck blocks, stride on the 3x3 conv)
or ResNet18 (basic blocks), eval-mode BatchNorm folded into each Conv's weight and bias as
torch.onnx.export does, global average pool, flatten. Input `input` [N,3,224,224] float32, output
`output` [N,2048] (ResNet50) or [N,512] (ResNet18), dynamic batch, opset 17. So its speed is the
real model's speed; its vectors are random features (see README, Testing). Two widths let tests
change the model under a live index. The file records its preprocessing (torchvision's) in its
`imageindex.preprocess` metadata.

usage: make-test-model.py OUT.onnx [--arch resnet50|resnet18] [--seed 0]
"""
import argparse, os
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--arch", choices=["resnet50", "resnet18"], default="resnet50")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
rng = np.random.default_rng(args.seed)
nodes, inits = [], []


def conv_bn(x, name, cin, cout, k, stride, relu):
    # Kaiming-normal (fan_out) weights as torchvision initialises them, then a random eval-mode
    # BatchNorm (gamma, beta, running mean/var) folded in.
    w = rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.sqrt(2.0 / (cout * k * k))
    gamma = rng.uniform(0.5, 1.0, cout)
    var = rng.uniform(0.5, 1.5, cout)
    mean = rng.standard_normal(cout) * 0.1
    beta = rng.standard_normal(cout) * 0.1
    scale = gamma / np.sqrt(var + 1e-5)
    inits.append(numpy_helper.from_array((w * scale[:, None, None, None]).astype(np.float32), f"{name}.weight"))
    inits.append(numpy_helper.from_array((beta - mean * scale).astype(np.float32), f"{name}.bias"))
    nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], kernel_shape=[k, k],
                                  strides=[stride, stride], pads=[k // 2] * 4))
    if not relu:
        return name
    nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"]))
    return f"{name}.relu"


x = conv_bn("input", "conv1", 3, 64, 7, 2, True)
nodes.append(helper.make_node("MaxPool", [x], ["maxpool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
x, cin = "maxpool", 64
bottleneck = args.arch == "resnet50"
expansion = 4 if bottleneck else 1
layers = [3, 4, 6, 3] if bottleneck else [2, 2, 2, 2]
for li, (planes, blocks, stride) in enumerate(zip([64, 128, 256, 512], layers, [1, 2, 2, 2]), start=1):
    for b in range(blocks):
        s = stride if b == 0 else 1
        p = f"layer{li}.{b}"
        if bottleneck:
            y = conv_bn(x, f"{p}.conv1", cin, planes, 1, 1, True)
            y = conv_bn(y, f"{p}.conv2", planes, planes, 3, s, True)
            y = conv_bn(y, f"{p}.conv3", planes, planes * 4, 1, 1, False)
        else:
            y = conv_bn(x, f"{p}.conv1", cin, planes, 3, s, True)
            y = conv_bn(y, f"{p}.conv2", planes, planes, 3, 1, False)
        needs_projection = b == 0 and (s != 1 or cin != planes * expansion)
        short = conv_bn(x, f"{p}.downsample", cin, planes * expansion, 1, s, False) if needs_projection else x
        nodes.append(helper.make_node("Add", [y, short], [f"{p}.add"]))
        nodes.append(helper.make_node("Relu", [f"{p}.add"], [f"{p}.out"]))
        x, cin = f"{p}.out", planes * expansion
nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
nodes.append(helper.make_node("Flatten", ["pool"], ["output"], axis=1))

graph = helper.make_graph(
    nodes, f"{args.arch}_features",
    [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
    [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 512 * expansion])], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="imageindex")
model.ir_version = 8
helper.set_model_props(model, {"imageindex.preprocess": "torchvision"})
onnx.checker.check_model(model)
tmp = args.out + ".tmp"
onnx.save(model, tmp)
os.replace(tmp, args.out)
print(f"wrote {args.out}: {sum(i.dims[0] * int(np.prod(i.dims[1:])) for i in inits)} parameters")
