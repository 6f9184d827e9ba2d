"""Models bigger than one device: one model run tensor-parallel by a group of N rank
processes (`torch.distributed`: gloo on CPU, nccl on GPU), sharded by transformers' own
tensor-parallel plan, behind the same `run_graph` as any LanguageModel.

- `rank.py`: join the group, load the model with its plan, measure which sites are
  shards (runtime/shards.py) and which are lookups of the weights.
- `lockstep.py`: `ShardedLanguageModel`: rank 0 hands every run to the other ranks,
  all run it, and one outcome (rank 0's values, or the first rank's error) comes back.
- `frames.py`, `follower.py`, `start.py`: the embedded group: rank 0 is the model's
  worker process (server/worker.py) and the other ranks are its subprocesses, spoken
  to over pipes in length-prefixed frames (JSON + raw bytes, never pickle).
- `ray_group.py`: the group on Ray: rank 0 the replica's actor, the other ranks actors in
  its placement group's bundles (`RayPeers`: the same protocol through Ray).
- `local.py`: `LanguageModel(..., shards=N)` in a script runs through that same group.
"""
