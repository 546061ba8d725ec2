# kvgate image: `kvgate epp` and `kvgate body-transformer` (Envoy is the gateway's, not ours).
#   make image-build              # or: docker build -t kvgate:dev .
#   docker run --rm kvgate:dev epp --help

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
# A compiler and xxhash headers for the optional native block hasher; not shipped.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libxxhash-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/kvgate
ENV PATH=/opt/kvgate/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# src/kvgate/deploy_config links here: the EPP configs become package data of the install.
COPY deploy/config ./deploy/config
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip install --no-cache-dir .

FROM python:${PYTHON_VERSION}-slim-bookworm
# libxxhash0: what the native hasher links at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libxxhash0 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 kvgate \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kvgate
COPY --from=build /opt/kvgate /opt/kvgate
ENV PATH=/opt/kvgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface
USER 65532:65532
# ext_proc, gRPC health, metrics (epp); 9004/9005/9091 for the body transformer.
EXPOSE 9002 9003 9090
ENTRYPOINT ["kvgate"]
CMD ["epp", "--help"]
