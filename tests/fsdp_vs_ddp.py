"""Run by tests/test_distributed.py under torchrun (2 gloo CPU processes): one stage-I step sequence of a tiny
MERITS-L text encoder (RoBERTa layers) trained with FSDP2 (``fully_shard`` per RobertaLayer, as
configs/accelerate/fsdp.yaml wraps it), with DDP, and in one process on the union of the ranks' batches, from the
same initial weights; rank 0 saves the three final full state dicts to argv[1]. The maths says they must agree
(the same mean gradient: reduce-scattered, all-reduced, or computed at once), up to float summation order.
The optimizer is SGD with momentum (see train). Dropout is off (eval mode): each rank would draw its own dropout masks, which no single process reproduces.
"""

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import RobertaConfig

from merits import MeritsConfig, MeritsForConversationClassification

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
text = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
config = MeritsConfig(architecture="merits-l", text_config=text, id2label={0: "a", 1: "b", 2: "c"})
base = MeritsForConversationClassification(config).text_encoder.eval()
generator = torch.Generator().manual_seed(1)
batches = [(torch.randint(3, 100, (4, 12), generator=generator), torch.randint(0, 3, (4,), generator=generator))
           for _ in range(3 * world)]


def train(model, parameters, ranks=(rank,)):
    # SGD, not Adam: some gradients are zero in exact maths (an attention key bias cancels in the softmax) and are
    # float noise in practice; Adam divides by sqrt(v) and turns that noise into lr-sized steps, different per path
    optimizer = torch.optim.SGD(parameters, lr=0.5, momentum=0.9)
    for step in range(3):
        ids = torch.cat([batches[step * world + r][0] for r in ranks])
        labels = torch.cat([batches[step * world + r][1] for r in ranks])
        _, logits = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad()


single = copy.deepcopy(base)
train(single, single.parameters(), ranks=range(world))  # every rank's batch at once, in one process
ddp_model = copy.deepcopy(base)
train(DistributedDataParallel(ddp_model), ddp_model.parameters())
fsdp_model = copy.deepcopy(base)
for layer in fsdp_model.backbone.encoder.layer:
    fully_shard(layer)
fully_shard(fsdp_model)
train(fsdp_model, fsdp_model.parameters())
full = {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
        for name, value in fsdp_model.state_dict().items()}
sharded = any(hasattr(p, "full_tensor") for p in fsdp_model.parameters())
if rank == 0:
    torch.save({"initial": base.state_dict(), "single": single.state_dict(), "ddp": ddp_model.state_dict(), "fsdp": full, "sharded": sharded,
                "world": world}, sys.argv[1])
dist.barrier()
dist.destroy_process_group()
