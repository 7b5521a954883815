#!/bin/bash
# The same job without SLURM: torchrun starts one process per GPU on each node and Lightning reads
# torchrun's variables (TorchElasticEnvironment). Run this script on every node.
#
# For N nodes with G GPUs each, change: NNODES=N, GPUS_PER_NODE=G, MASTER_ADDR to node 0's address,
# and NODE_RANK to 0..N-1 on each node (the --trainer.* numbers follow the variables).
# CIFAR-10 is read from ./data: fetch it once beforehand (on a shared file system, or on every node):
#   python -c "from torchvision.datasets import CIFAR10; CIFAR10('data', download=True)"
set -euo pipefail
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

torchrun \
    --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "$(command -v lightning-reg)" fit \
    --config examples/configs/cnn_cifar10.yaml \
    --data.download false \
    --trainer.accelerator gpu \
    --trainer.strategy ddp \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$GPUS_PER_NODE"
