"""Spreading rank1 over many processes, GPUs or machines with Ray (the ``[ray]`` extra).

- :mod:`rank1_hf.scale.ray_batch`: batch jobs on Ray Data (an actor pool, one ranker per actor), behind
  the rerank pipeline, so a job writes the same run, traces and store as a single-process run;
- :mod:`rank1_hf.scale.ray_serve`: the HTTP rerank app on Ray Serve (one ranker per replica);
- :mod:`rank1_hf.scale.__main__`: ``python -m rank1_hf.scale rerank|serve ...``, the commands.

See docs/scale.md for choosing between torchrun shards, ``--shard`` array jobs, Ray Data and Ray Serve.
"""
