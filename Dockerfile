# clinml project image: the `clinml` command line and the prediction service.
#
#   docker build -t clinml .
#   docker run --rm -p 3000:3000 -v "$PWD/.clinml:/data" clinml            # serve
#   docker run --rm -v "$PWD/.clinml:/data" clinml clinml monitor pathology --batch /data/b.parquet
#
# State (Feast repo, MLflow database, BentoML store, reports) lives in the /data volume
# (CLINML_HOME); the image holds code only, and no secrets: API keys come at run time from
# CLINML_API_KEYS or a mounted CLINML_API_KEYS_FILE (hashed entries; `docs/serving.md`).
#
# GPU variant: start FROM a CUDA runtime image with Python 3.11 (for example
# nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 plus python3.11), install torch==2.13.0
# from PyPI (which brings the CUDA build) instead of the CPU index below, and run with
# `--gpus 1 -e CLINML_GPU=1 -e CLINML_EXECUTION=split`: the model-execution service then
# requests the GPU, batches adaptively and runs on CUDA; without a GPU it logs that it
# falls back to the CPU. For a self-contained image with the
# champion baked in, build the bento instead: `clinml package pathology --build`, then
# `bentoml containerize clinml-service:latest`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 10001 clinml \
    && useradd --uid 10001 --gid clinml --create-home --home-dir /home/clinml clinml

WORKDIR /app

# The CPU build of torch first, from PyTorch's index, so the pinned torch==2.13.0 in
# pyproject.toml does not pull a multi-GB CUDA build. (GPU images: use a CUDA base and
# drop the --index-url.)
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md constraints.txt ./
COPY clinml ./clinml
COPY features ./features
COPY training ./training
COPY serving ./serving
COPY monitoring ./monitoring
COPY pipelines ./pipelines
COPY configs ./configs
# With Ray: the same image runs the KubeRay cluster's head and workers, and the training
# CronJob that submits to it (deploy/k8s/raycluster.yaml, docs/deployment.md).
RUN pip install --constraint constraints.txt '.[ray]' \
    && mkdir -p /data \
    && chown clinml:clinml /data

ENV CLINML_HOME=/data \
    BENTOML_HOME=/data/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    CLINML_USECASE=pathology

USER clinml
VOLUME ["/data"]
EXPOSE 3000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status == 200 else 1)"]

CMD ["bentoml", "serve", "clinml.serving.service:ClinicalService", "--host", "0.0.0.0", "--port", "3000"]
