"""Run ``adaprelora-llm`` with accelerate's FSDP path on CPU processes (a test launcher, not shipped).

accelerate offers FSDP only for GPU-like devices: with ``--use_cpu`` it silently trains without
it. torch's FSDP2 itself runs on CPU over gloo, so this launcher lets accelerate keep the FSDP
plugin it was given on a multi-CPU run; everything after that (accelerate's FSDP2 preparation,
``fully_shard``, the Trainer, the command) is the shipped code path.

    torchrun --nproc_per_node 2 tests/llm/cpu_fsdp.py sft ... --use_cpu --fsdp full_shard --fsdp_config cfg.json
"""

import sys

import accelerate
from accelerate.utils import DistributedType

_init = accelerate.Accelerator.__init__


def _keep_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.state.distributed_type == DistributedType.MULTI_CPU:
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = fsdp_plugin


accelerate.Accelerator.__init__ = _keep_fsdp_on_cpu

if __name__ == "__main__":
    from adaprelora_diffusion.llm.cli import main

    sys.exit(main())
