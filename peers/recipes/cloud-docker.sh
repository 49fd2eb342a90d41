#!/usr/bin/env bash
# p2pdiloco on a rented cloud GPU with Docker: build once, check the machine, join in the background.
#
#   bash cloud-docker.sh RECIPE PEERS PUBLIC_HOST
#
# Run it from a checkout of the repository (the image is built from its Dockerfile). The cloud
# firewall must allow inbound TCP 31338 (the port the image publishes); PUBLIC_HOST is the
# machine's public address as the provider's console shows it. `docker logs -f p2pdiloco` follows
# the peer; `docker stop p2pdiloco` lets it finish its round and leave (within the stop timeout).
# The named volume keeps the identity, the checkpoint and the data cache across container restarts.
set -euo pipefail

recipe=${1:?usage: cloud-docker.sh RECIPE PEERS PUBLIC_HOST}
peers=${2:?usage: cloud-docker.sh RECIPE PEERS PUBLIC_HOST}
public_host=${3:?usage: cloud-docker.sh RECIPE PEERS PUBLIC_HOST}

docker build -t p2pdiloco .

# --init: a tiny init as PID 1 forwards SIGTERM to p2pdiloco and reaps hivemind's child processes.
# --ipc host: hivemind's averager keeps its buffers in shared memory (Docker's default is 64 MB),
#   and so do the local workers of a multi-GPU peer.
# --gpus all: every GPU of the machine trains this one peer (peer.devices = "all", docs/multi-gpu.md).
run=(docker run --init --gpus all --ipc host -p 31338:31338 -v p2pdiloco-cache:/cache)
net=(--peers "$peers" --host 0.0.0.0 --port 31338 --public-host "$public_host")

"${run[@]}" --rm p2pdiloco doctor "$recipe" "${net[@]}"
"${run[@]}" -d --name p2pdiloco --restart unless-stopped --stop-timeout 180 p2pdiloco \
    join "$recipe" "${net[@]}" --identity /cache/peer.key --checkpoint-dir /cache/checkpoint
