"""The engine floor: turning prompt token ids into reasoning and the " true"/" false" readout.

``continuous.py`` (the continuous-batching engine: ``scheduler.py`` decides, ``pages.py`` allocates,
``runner.py`` runs the model over ``kv_cache.py``'s paged pool, ``decode_step.py`` captures its decode
step), ``generate.py`` (the ``model.generate`` engine), ``worker.py`` (the engine every caller shares),
``types.py`` (what engines take and give; no torch), ``stopping.py`` and ``readout.py`` (where reasoning
ends and what is read after it), ``head.py`` (the CPU output projection). Nothing is imported on package
import, so ``types.py`` stays free of torch for the command line.
"""
