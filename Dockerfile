# dit-serve on a GPU host. Weights are not baked in: they come from a volume mounted at /weights
# (the compose file fetches them once with dit-fetch). The embedded Fashion-MNIST model ships in the
# image as the default for CPU-only use.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv make curl \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 dit && mkdir -p /app /weights /data && chown dit:dit /app /weights /data
WORKDIR /app
COPY --chown=dit:dit . /app
USER dit
# The README's install command, without the test tools. torch is pinned to the release the GPU checks
# ran on (bench/RESULTS.md); its wheel brings its own CUDA libraries, the host brings the driver. The
# build machine needs no GPU: TORCH_BUILD=default keeps make from picking the CPU build there.
# EXTRAS=ray,postgres (docker build --build-arg EXTRAS=ray,postgres) adds Ray Serve and a PostgreSQL job store,
# for deploy/kubernetes/rayservice.yaml.
ARG EXTRAS=
RUN make install EXTRAS="$EXTRAS" TORCH_BUILD=default TORCH_SPEC="torch==2.11.0"

# /data: the server's data (the async jobs' store, SQLite), a volume so that jobs outlive the container
ENV PATH=/app/.venv/bin:$PATH DIT_HOST=0.0.0.0 DIT_PORT=8000 DIT_DATA_DIR=/data
EXPOSE 8000
VOLUME ["/weights", "/data"]
# Ready only after load, CUDA-graph capture and warm-up: allow a long start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1
# One uvicorn worker per GPU (see README: batching happens within one process).
CMD ["dit-serve"]
