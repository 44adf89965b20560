"""The model floor: loading a checkpoint (``loading.py``: dtype, device maps, bitsandbytes; ``awq.py``: AWQ
on torch's int4 kernels), where it computes (``devices.py``), what its keys and values cost and the pool a
card leaves (``kv_budget.py``, for the engine and ``rank1-hf plan``), planning a split without weights
(``planning.py``), the weights' fingerprint in the store key (``fingerprint.py``) and the demo weights
built offline (``assets.py``).
"""
