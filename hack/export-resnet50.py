#!/usr/bin/env python3
"""Export torchvision's ImageNet ResNet50 or ResNet18 (fc removed) to the ONNX imageindex runs.

For users who have torch + torchvision and the weights (downloaded by torchvision, or a local
state_dict file). Output: `input` [N,3,224,224] -> `output` [N,2048] or [N,512] (pooled features, not normalised:
imageindex L2-normalises), dynamic batch, opset 17. Preprocessing to pair it with is torchvision's
ResNet50 transform, which imageindex implements (resize 256 bilinear+antialias, crop 224, ImageNet mean/std).

The file records its preprocessing (`imageindex.preprocess` = `torchvision`) in its metadata.

usage: export-resnet50.py OUT.onnx [--arch resnet50|resnet18] [--weights IMAGENET1K_V1 | --state-dict r.pth]

Other encoders, where torch is available (not run by the project: no hub is reachable here).
Export the image tower alone, with a fixed output width, and stamp its preprocessing:

  # OpenAI CLIP ViT-B/32 (transformers): 512-d image embeddings, the `clip` profile
  from transformers import CLIPVisionModelWithProjection
  m = CLIPVisionModelWithProjection.from_pretrained("openai/clip-vit-base-patch32").eval()
  class Image(torch.nn.Module):
      def __init__(s, m): super().__init__(); s.m = m
      def forward(s, x): return s.m(pixel_values=x).image_embeds
  torch.onnx.export(Image(m), (torch.zeros(1, 3, 224, 224),), "clip-vit-b32.onnx", input_names=["input"],
                    output_names=["output"], opset_version=17, dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})

  # DINOv2 ViT-S/14 (torch.hub facebookresearch/dinov2): 384-d CLS features; its transform is
  # Resize(256, bicubic), CenterCrop(224), ImageNet mean/std, declared in full:
  m = torch.hub.load("facebookresearch/dinov2", "dinov2_vits14").eval()   # forward gives [N, 384]
  torch.onnx.export(m, (torch.zeros(1, 3, 224, 224),), "dinov2-vits14.onnx", ...as above...)
  preprocess = "resize=256,crop=224,filter=bicubic,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"

  # then, for either file:
  import onnx; f = onnx.load(path); onnx.helper.set_model_props(f, {"imageindex.preprocess": "clip"})
  onnx.save(f, path)
"""
import argparse
import torch, torchvision

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--arch", choices=["resnet50", "resnet18"], default="resnet50")
ap.add_argument("--weights", default="IMAGENET1K_V2", help="torchvision weights enum name (ResNet18 has IMAGENET1K_V1)")
ap.add_argument("--state-dict", help="a local .pth state_dict instead of torchvision's download")
args = ap.parse_args()

build = getattr(torchvision.models, args.arch)
if args.state_dict:
    m = build(weights=None)
    m.load_state_dict(torch.load(args.state_dict, map_location="cpu"))
else:
    enum = {"resnet50": torchvision.models.ResNet50_Weights, "resnet18": torchvision.models.ResNet18_Weights}[args.arch]
    m = build(weights=getattr(enum, args.weights))
m.fc = torch.nn.Identity()
m.eval()
x = torch.zeros(1, 3, 224, 224)
torch.onnx.export(m, (x,), args.out, input_names=["input"], output_names=["output"], opset_version=17,
                  dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, dynamo=False)
import onnx  # noqa: E402  (torch brings it)
f = onnx.load(args.out)
onnx.helper.set_model_props(f, {"imageindex.preprocess": "torchvision"})
onnx.save(f, args.out)
print("wrote", args.out)
