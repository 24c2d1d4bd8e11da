#!/usr/bin/env python3
"""Export torchvision's ImageNet ResNet50 (fc removed) to the ONNX imageindex runs.

For users who have torch + torchvision and the weights (downloaded by torchvision, or a local
state_dict file). Output: `input` [N,3,224,224] -> `output` [N,2048] (pooled features, not normalised:
imageindex L2-normalises), dynamic batch, opset 17. Preprocessing to pair it with is torchvision's
ResNet50 transform, which imageindex implements (resize 256 bilinear+antialias, crop 224, ImageNet mean/std).

usage: export-resnet50.py OUT.onnx [--weights IMAGENET1K_V2 | --state-dict resnet50.pth]
"""
import argparse
import torch, torchvision

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--weights", default="IMAGENET1K_V2", help="torchvision weights enum name")
ap.add_argument("--state-dict", help="a local .pth state_dict instead of torchvision's download")
args = ap.parse_args()

if args.state_dict:
    m = torchvision.models.resnet50(weights=None)
    m.load_state_dict(torch.load(args.state_dict, map_location="cpu"))
else:
    m = torchvision.models.resnet50(weights=getattr(torchvision.models.ResNet50_Weights, args.weights))
m.fc = torch.nn.Identity()
m.eval()
x = torch.zeros(1, 3, 224, 224)
torch.onnx.export(m, (x,), args.out, input_names=["input"], output_names=["output"], opset_version=17,
                  dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, dynamo=False)
print("wrote", args.out)
