# The imageindex image (CPU): one binary for the operator, the embedding Jobs and the search pods,
# ONNX Runtime's shared library, and torchvision's ResNet50 exported to ONNX at /models.
# Build: docker build -t ghcr.io/imageindex/imageindex:0.1.0 .      (GPU Jobs: Dockerfile.cuda)

FROM rust:1.95-bookworm AS build
# cmake and nasm build libjpeg-turbo, which is linked into the binary statically.
RUN apt-get update && apt-get install -y --no-install-recommends cmake nasm && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target \
    cargo build --release --locked && cp target/release/imageindex /imageindex

# The model, and its int8 variant (--precision int8) calibrated on 64 crops of the fixture photos;
# calibrate on your own photos with hack/quantize.py for the best int8 accuracy.
FROM python:3.11-slim-bookworm AS model
RUN pip install --no-cache-dir onnxruntime==1.32.0 onnx==1.23.2 numpy Pillow \
 && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch torchvision
COPY hack/export-resnet50.py hack/quantize.py hack/make-photos.py /src/hack/
COPY tests/fixtures/ /src/tests/fixtures/
RUN python /src/hack/export-resnet50.py /models/resnet50.onnx --weights IMAGENET1K_V2 \
 && python /src/hack/make-photos.py /calibration --count 64 --seed 99 \
 && python /src/hack/quantize.py /models/resnet50.onnx --precision int8 --calibration /calibration -o /models/resnet50.int8.onnx \
 && mkdir /ort && cp /usr/local/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.* /ort/

# glibc and libstdc++ for ONNX Runtime; no shell, no package manager; uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /imageindex /usr/local/bin/imageindex
COPY --from=model /ort/ /opt/onnxruntime/
COPY --from=model /models/ /models/
ENV ORT_DYLIB_PATH=/opt/onnxruntime/libonnxruntime.so.1.32.0 IMAGEINDEX_MODEL=/models/resnet50.onnx
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/imageindex"]
