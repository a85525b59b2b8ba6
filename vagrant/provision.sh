#!/usr/bin/env bash
# Runs inside each VM (as root, from the Vagrantfile): give the node its address on the cluster
# network, then deploy dfs exactly as on a real machine (deploy/install-node.sh: wheels,
# dfs-mountd@NODE.service, fstab line), and start it.
#   provision.sh NODE ADDRESS      with /tmp/dfs-payload.tar uploaded beside it
set -euo pipefail
NODE=$1 ADDRESS=$2
printf '[Match]\nName=eth1\n\n[Network]\nAddress=%s/24\n' "$ADDRESS" > /etc/systemd/network/20-eth1.network
networkctl reload
for _ in $(seq 300); do
  ip -4 -o addr show dev eth1 | grep -q "inet $ADDRESS/" && break
  sleep 0.2
done
ip -4 -o addr show dev eth1 | grep -q "inet $ADDRESS/" || { echo "eth1 has no $ADDRESS" >&2; exit 1; }
rm -rf /tmp/dfs-payload
mkdir -p /tmp/dfs-payload
tar -C /tmp/dfs-payload -xf /tmp/dfs-payload.tar
/tmp/dfs-payload/deploy/install-node.sh --wheels /tmp/dfs-payload/wheels \
  --config /tmp/dfs-payload/cluster.toml --node "$NODE"
findmnt -n -o SOURCE,TARGET,FSTYPE /mnt/dfs
