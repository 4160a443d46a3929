# CPU image that runs the default job and the test suite:
#   docker build -t gaugeflow . && docker run --rm gaugeflow            # default job
#   docker run --rm -w /opt/gaugeflow gaugeflow python -m pytest        # tests
# Aurora does not run containers for this: frameworks module + venv (README, jobs/aurora/README.md).
# For NVIDIA GPUs start from a CUDA PyTorch image instead (e.g. pytorch/pytorch:<ver>-cuda<ver>-cudnn9-runtime
# with torch 2.6 or newer, which gaugeflow needs),
# drop the torch line below and keep the rest.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 WANDB_MODE=offline
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
# the CPU build of torch first, so the project's torch range is already satisfied
RUN python -m pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/gaugeflow
COPY pyproject.toml README.md ./
COPY app ./app
COPY conf ./conf
COPY tests ./tests
COPY tools ./tools
COPY jobs ./jobs
RUN python -m pip install -e ".[test]"

WORKDIR /work
CMD ["gaugeflow", "train"]
