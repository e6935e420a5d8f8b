# raycls serve in a container: a trial's best model over HTTP (POST /predict, GET /healthz, GET /metadata).
# Built from this repository; the experiment's results (leaderboard, checkpoints) are mounted at /results.
#
#   docker build -t raycls-serve .                                          # CPU (python:3.11-slim)
#   docker build -t raycls-serve:cuda \
#     --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .     # CUDA
#   docker run -p 8000:8000 -v $PWD/raycls_results:/results raycls-serve EXPERIMENT [--trial ID]
#   docker run --gpus all -p 8000:8000 -v $PWD/raycls_results:/results raycls-serve:cuda EXPERIMENT
#
# Set RAYCLS_SERVE_TOKEN (docker run -e) to require a bearer token: the container listens on every interface.
ARG BASE=python:3.11-slim
FROM ${BASE}

# The CPU index keeps the image free of CUDA's libraries (about 2 GB); a CUDA build names its own index.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAYCLS_STORAGE=/results

# CUDA bases ship no Python: install one (python:* bases have it and skip this).
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# torch first, from the chosen index, in its own layer: the package's own changes do not reinstall it.
RUN pip install --index-url ${TORCH_INDEX} torch torchvision
COPY pyproject.toml README.md ./
COPY raycls ./raycls
RUN pip install . && raycls serve --help >/dev/null

RUN useradd --create-home --uid 1000 raycls && mkdir -p /results && chown raycls /results
USER raycls
VOLUME ["/results"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"

# The engine is uvicorn in the container's process (one machine; Ray Serve is `raycls serve --engine ray` on a
# cluster). Arguments of `docker run IMAGE ...` follow: the experiment name, then any raycls serve option.
ENTRYPOINT ["raycls", "serve", "--engine", "local", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--help"]
