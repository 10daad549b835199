"""Pyro's NUTS over several chains: one after another in this process, or one worker process
each (``Settings.chain_method``). Chain c is seeded ``seed + c`` either way, so both give the
same draws; the batched kernel (:mod:`.batched`) runs chains in one computation instead.
"""

from __future__ import annotations

import multiprocessing
import pickle
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
from pyro.infer import MCMC, NUTS

from elbolab.inference.runtime import MAX_SEED, seed_everything, show_progress


def one_chain(model, args, kwargs, settings, seed: int, init_params, max_plate_nesting,
              jit: bool):
    """One chain seeded ``seed``: (draws site -> (draw, ...), divergent draw indices, the reason
    the JIT failed or None). A model the JIT cannot trace (e.g. a network's weights read through
    ``pyro.module``) runs uncompiled; one that fails without JIT still raises."""
    try:
        mcmc = _mcmc(model, args, kwargs, settings, seed, init_params, max_plate_nesting, jit)
        failed = None
    except RuntimeError as exc:
        if not jit:
            raise
        failed = str(exc).splitlines()[0][:200]
        mcmc = _mcmc(model, args, kwargs, settings, seed, init_params, max_plate_nesting, False)
    idx = list(mcmc.diagnostics().get("divergences", {}).get("chain 0", []))
    return mcmc.get_samples(), idx, failed


def _mcmc(model, args, kwargs, settings, seed, init_params, max_plate_nesting, jit) -> MCMC:
    seed_everything(seed)
    kernel = NUTS(model, target_accept_prob=settings.target_accept,
                  max_tree_depth=settings.max_tree_depth, jit_compile=jit,
                  ignore_jit_warnings=True, max_plate_nesting=max_plate_nesting)
    mcmc = MCMC(kernel, num_samples=settings.num_samples, warmup_steps=settings.warmup,
                num_chains=1, initial_params=init_params,
                disable_progbar=not show_progress(settings.progress))
    mcmc.run(*args, **kwargs)
    return mcmc


def _in_worker(job):
    torch.set_num_threads(1)  # the processes share the cores
    return one_chain(*job)


def chain_seed(seed: int, c: int) -> int:
    """Chain c's seed: ``seed + c``, wrapped into [0, 2**63 - 1]."""
    return (seed + c) % (MAX_SEED + 1)


def run_chains(model, args, kwargs, settings, seed: int, init_params, max_plate_nesting):
    """Every chain, as ``settings.chain_method`` says: a list of :func:`one_chain`'s results."""
    C, jit = settings.num_chains, settings.jit
    if settings.chain_method != "parallel" or C == 1:
        out = []
        for c in range(C):
            out.append(one_chain(model, args, kwargs, settings, chain_seed(seed, c), init_params,
                                 max_plate_nesting, jit))
            if out[-1][2] is not None:
                jit = False  # failed once: the next chains run uncompiled at once
        return _warned(out)
    jobs = [(model, args, kwargs, settings, chain_seed(seed, c), init_params, max_plate_nesting,
             jit)
            for c in range(C)]
    try:
        pickle.dumps(jobs[0])
    except Exception as exc:  # noqa: BLE001 - any pickling failure: named, before any work
        raise ValueError(
            "chain_method: 'parallel' sends the model and its data to worker processes, which "
            f"needs them to pickle ({type(exc).__name__}: {exc}); define the model at module "
            "level (not a closure, lambda or function-local class), or use chain_method="
            "'sequential'") from exc
    workers = min(C, multiprocessing.cpu_count())
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return _warned(list(pool.map(_in_worker, jobs)))
    except BrokenProcessPool as exc:
        raise RuntimeError(
            "chain_method: 'parallel': a worker process died before returning its chain. The "
            "workers are spawned and import your script again, so the script must start its "
            "work under `if __name__ == \"__main__\":` while the model is defined outside "
            "that block, at module level, where an import finds it (and the machine needs "
            "memory for one process per chain); or use chain_method='sequential'") from exc


def _warned(out):
    failed = next((f for _, _, f in out if f is not None), None)
    if failed is not None:
        warnings.warn(f"NUTS: JIT compilation failed ({failed}); running without JIT",
                      stacklevel=3)
    return out


__all__ = ["one_chain", "run_chains"]
