#!/usr/bin/env bash
# p2pdiloco volunteer: check this machine, then join a run; rerun it after a reboot to resume.
#
#   bash volunteer.sh RECIPE PEERS [PUBLIC_HOST]
#
#   RECIPE       a bundled recipe (tiny-cpu, c4-150m, c4-1b) or a TOML file: the run's recipe
#   PEERS        a bootstrap list name (see peers/README.md), a coordinator's --addrs-file, or a multiaddr
#   PUBLIC_HOST  this machine's public address, if others can dial it on $P2PDILOCO_PORT (forward
#                that TCP port on your router); without it the peer checks whether the run's peers
#                can dial it back, and joins as a NAT client if they cannot
#
# Environment: P2PDILOCO_PORT (default 31338), P2PDILOCO_STATE (identity, checkpoint and metrics;
# default ~/.local/share/p2pdiloco), P2PDILOCO (the command; default p2pdiloco).
set -euo pipefail

recipe=${1:?usage: volunteer.sh RECIPE PEERS [PUBLIC_HOST]}
peers=${2:?usage: volunteer.sh RECIPE PEERS [PUBLIC_HOST]}
public_host=${3:-}
port=${P2PDILOCO_PORT:-31338}
state=${P2PDILOCO_STATE:-$HOME/.local/share/p2pdiloco}
p2pdiloco=${P2PDILOCO:-p2pdiloco}

mkdir -p "$state"
net=(--peers "$peers" --host 0.0.0.0 --port "$port")
if [ -n "$public_host" ]; then
    net+=(--public-host "$public_host")
fi

if ! "$p2pdiloco" doctor "$recipe" "${net[@]}"; then
    echo "volunteer.sh: fix the failed checks above, then run this script again" >&2
    exit 1
fi

# The same identity keeps this peer's id, data shard and position across restarts; the
# checkpoint lets it resume (or download the newer state if the swarm moved on meanwhile).
exec "$p2pdiloco" join "$recipe" "${net[@]}" \
    --identity "$state/peer.key" \
    --checkpoint-dir "$state/checkpoint" \
    --metrics-file "$state/metrics.jsonl"
