#!/usr/bin/env bash
# Multi-node launch with torchrun's c10d rendezvous. Run the same command on every node:
#   MASTER=<host of node 0> NNODES=2 NPROC=8 launch/multinode.sh convert.fuse_experts --src s3://... --dst s3://...
# Every node must reach MASTER:PORT (TCP) and read --src / write --dst (a shared filesystem or S3).
# On one node, `python -m convert.X --nproc N ...` needs no torchrun and keeps the tool's exit codes
# (torchrun reports any failed rank as 1). Do not pass --nproc through this script: torchrun refuses it.
set -euo pipefail
: "${MASTER:?set MASTER to the address of the first node}"
exec torchrun \
  --nnodes "${NNODES:-2}" \
  --nproc-per-node "${NPROC:-8}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER}:${PORT:-29400}" \
  --rdzv-id "${JOB_ID:-moe-convert}" \
  -m "$@"
