"""One rank of the distributed tests' trainings, run by torch.distributed.run:

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py MODEL OPTIMIZER OUT [CHECKPOINT]

trains MODEL's targets with the spec below and writes the trained targets (rank 0) to OUT;
with CHECKPOINT, resumes from the checkpoint there and writes one every 2 steps.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py MODEL load

checks that each rank's shards and buffers as `load_sharded` reads them are those of the
model loaded whole and then sharded.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from behaviorc.core import ir

EXAMPLES = tuple(ir.Example(context=f"Question {i} from the user: which parser?\nAnswer:",
                            response=" I will use the existing parser." if i % 2 else " A new one.")
                 for i in range(6))


def spec(optimizer: str) -> ir.Train:
    # rank 16 projects every 128-wide matrix of tiny-dense (tall MLP, wide attention)
    return ir.Train(examples=EXAMPLES, lr=1e-3, steps=5, batch=4, schedule="cosine", warmup=1,
                    targets=("attn.q", "attn.o", "mlp", "norm"),
                    optimizer=ir.Optimizer(name=optimizer, rank=16, refresh=2))


CHECKPOINT_EVERY = 2


def compare_loading(model_path: str) -> None:
    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.model.loading import load_model
    from behaviorc.train.distributed import device_mesh, load_sharded, shard_model

    read = load_sharded(Path(model_path), "float32", "cpu", device_mesh())
    whole, _ = load_model(model_path, "float32", "cpu")
    shard_model(whole, ArchitectureAdapter.for_model(whole).decoder_layers(whole), device_mesh())
    for kind in ("named_parameters", "named_buffers"):
        expected = dict(getattr(whole, kind)())
        got = dict(getattr(read, kind)())
        assert sorted(got) == sorted(expected), (kind, sorted(set(got) ^ set(expected)))
        for name, tensor in got.items():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            wanted = expected[name].to_local() if hasattr(expected[name], "to_local") else expected[name]
            assert torch.equal(local, wanted), name
    if read.config.tie_word_embeddings:
        assert read.get_output_embeddings().weight is read.get_input_embeddings().weight


def main(model_path: str, optimizer: str, out: str | None = None, checkpoint: str | None = None) -> None:
    from safetensors.torch import save_file

    from behaviorc.model.adapter import ArchitectureAdapter
    from behaviorc.model.loading import load_tokenizer
    from behaviorc.train.data import BatchSchedule, encode_examples, start_token
    from behaviorc.train.distributed import device_mesh, load_sharded
    from behaviorc.train.ranks import train_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:  # leave the group on every exit: see behaviorc.train.ranks.release
        if optimizer == "load":
            return compare_loading(model_path)
        model = load_sharded(Path(model_path), "float32", "cpu", device_mesh())
        tokenizer = load_tokenizer(model_path)
        train_spec = spec(optimizer)
        schedule = BatchSchedule(encode_examples(tokenizer, train_spec.examples), [], train_spec.batch, 0.0, 0)
        _, weights = train_sharded(model, ArchitectureAdapter.for_model(model), schedule, train_spec,
                                   pad_id=tokenizer.pad_token_id, start_token=start_token(tokenizer),
                                   checkpoint_dir=checkpoint and Path(checkpoint),
                                   checkpoint_every=CHECKPOINT_EVERY)
        if dist.get_rank() == 0:
            save_file(weights, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from behaviorc.train.ranks import exit_now

    main(*sys.argv[1:])
    exit_now(0)  # not through the interpreter's teardown: see behaviorc.train.ranks.release
