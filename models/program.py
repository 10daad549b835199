"""A family made from a plain Pyro program: the model function (or ``PyroModule``) a researcher
already has, with its data as its own arguments.

    def model(J, sigma, y=None):
        mu = pyro.sample("mu", dist.Normal(0., 5.))
        ...
    inference.fit("mcmc", model, {"J": 8, "sigma": sigma, "y": y})

Nothing is subclassed. The data are the program's arguments: a dict of keyword arguments
(tensors, numpy arrays, lists, plain numbers), a tuple of positional arguments, or one tensor.
:class:`ProgramData` holds them and shows the engines what they read from data (``shape[0]``,
``device``, ``dtype``). :meth:`Program.check_data` checks them against the program's signature,
refuses NaN or inf in any floating-point argument, and traces the program once; from that trace:

* the latent and observed sites and the plates with their sizes;
* ``max_plate_nesting`` (the deepest plate dim used);
* the discrete latent sites (discrete support, or marked ``infer={"enumerate": ...}``): the model
  is run under ``config_enumerate`` so every one of them is summed out (``TraceEnum_ELBO``, NUTS);
* the data plate (``data_plate=``, else the one plate every observed site lies in), whose size is
  the number of data points ``n``; sites inside it are local, the others global. Without a data
  plate, n = 1.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.poutine.subsample_messenger import _Subsample

from elbolab.models.base import ModelFamily


class ProgramData:
    """A program's arguments, looking to the engines like data: ``shape == (n,)``, ``device`` and
    ``dtype`` of its observed tensors. Call the program with ``program(*data.args, **data.kwargs)``."""

    def __init__(self, args: tuple, kwargs: dict, n: int, device, dtype):
        self.args, self.kwargs = args, kwargs
        self.shape = torch.Size([n])
        self.device, self.dtype = torch.device(device), dtype

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor arguments by name (positional ones as ``arg0``, ``arg1``, ...)."""
        named = {f"arg{i}": v for i, v in enumerate(self.args)} | self.kwargs
        return {k: v for k, v in named.items() if torch.is_tensor(v)}

    def numel(self) -> int:
        return sum(v.numel() for v in self.tensors().values())

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def __repr__(self) -> str:
        return f"ProgramData(n={self.shape[0]}, arguments={sorted(self.tensors()) or '()'})"


@dataclass
class Structure:
    """What one trace of the program shows (module docstring)."""

    latent: dict[str, tuple] = field(default_factory=dict)  # site -> value shape
    observed: dict[str, tuple] = field(default_factory=dict)
    plates: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # name -> (size, dim)
    discrete: tuple[str, ...] = ()
    local: tuple[str, ...] = ()
    dims: dict[str, list[str]] = field(default_factory=dict)  # latent site -> its batch dims' names
    params: tuple[str, ...] = ()
    max_plate_nesting: int = 0


class Program(ModelFamily):
    """A plain Pyro program as a family (module docstring). ``data_plate``: the plate over data
    points, when more than one plate holds every observed site."""

    def __init__(self, program, *, data_plate: str | None = None):
        if not callable(program):
            raise TypeError(f"model: expected a Pyro program (a callable) or a model family, got "
                            f"{type(program).__name__}")
        self.program = program
        self.data_plate = data_plate
        self.name = getattr(program, "__name__", None) or type(program).__name__
        self.structure: Structure | None = None
        self._run = program

    # -- what the engines call ------------------------------------------------------------------
    def model(self, x: ProgramData, subsample_size: int | None = None):
        if subsample_size is not None:
            raise ValueError("subsample_size: a plain Pyro program takes its data whole (subsample "
                             "inside it with pyro.plate(..., subsample_size=...))")
        return self._run(*x.args, **x.kwargs)

    def pointwise_log_likelihood(self, samples: dict, x: ProgramData) -> torch.Tensor:
        """log p(x_n | latents) of every draw, ``(chain, draw, n)``, for ArviZ's
        ``log_likelihood`` group (LOO, WAIC): one trace per draw. A KeyError (the engines then
        leave the group out) without a data plate, with discrete sites summed out (their
        conditional would not be the likelihood), or with an observed site outside the plate."""
        if not self.data_plate or self.discrete_sites:
            raise KeyError("no per-point likelihood: no data plate, or discrete sites summed out")
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block():
            return _pointwise(self.program, self.site_dims, samples, x, self.data_plate)

    def call(self, fn):
        """``fn`` (a guide written like the program) called the engines' way, ``fn(x)``."""
        def guide(x: ProgramData, subsample_size: int | None = None):
            return fn(*x.args, **x.kwargs)

        guide.__name__ = getattr(fn, "__name__", type(fn).__name__)
        guide.program_guide = fn
        return guide

    @property
    def site_dims(self) -> dict[str, list[str]]:
        """Latent site -> the names of its batch dims (its plates), for ArviZ."""
        return self.structure.dims if self.structure else {}

    @property
    def discrete_sites(self) -> tuple[str, ...]:
        return self.structure.discrete if self.structure else ()

    @property
    def local_plate(self) -> str:
        """The plate per-point guides open: the data plate when it uses dim -1."""
        plate = self.data_plate
        ok = self.structure and plate in self.structure.plates and self.structure.plates[plate][1] == -1
        return plate if ok else "data"

    @property
    def max_plate_nesting(self) -> int:
        return self.structure.max_plate_nesting if self.structure else 1

    def settings(self) -> dict:
        fn = self.program
        where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', self.name)}"
        return {"program": where, "data_plate": self.data_plate}

    # -- the data -------------------------------------------------------------------------------
    def check_data(self, data) -> ProgramData:
        if isinstance(data, ProgramData):
            return data
        args, kwargs = _arguments(data)
        _bind(self.program, args, kwargs)
        _check_finite(args, kwargs)
        tr = _trace(self.program, args, kwargs)
        self.structure = _structure(tr, self.data_plate)
        plate = _data_plate(self.structure, self.data_plate, tr)
        self.data_plate = plate
        if self.structure.discrete:  # summed out by TraceEnum_ELBO and NUTS
            self._run = config_enumerate(self.program, default="parallel")
        self.structure.local = tuple(k for k, s in tr.nodes.items() if k in self.structure.latent
                                     and any(f.name == plate for f in s["cond_indep_stack"]))
        n = self.structure.plates[plate][0] if plate else 1
        device, dtype = _device_dtype(tr, args, kwargs)
        return ProgramData(args, kwargs, n, device, dtype)


def as_family(model, data_plate: str | None = None):
    """``model`` when it is a family (it has ``model`` and ``check_data``), else a
    :class:`Program` around the callable; anything else is an error naming what was given."""
    if isinstance(model, ModelFamily) or (
            callable(getattr(model, "check_data", None)) and callable(getattr(model, "model", None))):
        if data_plate is not None:
            raise TypeError("data_plate: applies to a plain Pyro program, not to a model family")
        return model
    return Program(model, data_plate=data_plate)


def _pointwise(program, site_dims, samples: dict, x: ProgramData, plate: str) -> torch.Tensor:
    """log p(observed_n | latents) per draw, (chain, draw, n): the program conditioned on each
    draw's latent values, the log densities of its observed sites summed over every dim but the
    data plate's."""
    names = [k for k in site_dims if k in samples] or list(samples)
    chains, draws = next(iter(samples.values())).shape[:2]
    out = torch.empty(chains, draws, x.shape[0], dtype=x.dtype, device=x.device)
    for c in range(chains):
        for s in range(draws):
            fixed = {k: samples[k][c, s] for k in names}
            tr = poutine.trace(poutine.condition(program, data=fixed)).get_trace(*x.args, **x.kwargs)
            total = 0.0
            for site in tr.nodes.values():
                if site["type"] != "sample" or not site["is_observed"] or site["name"] in fixed:
                    continue
                dim = next((f.dim for f in site["cond_indep_stack"] if f.name == plate), None)
                if dim is None:
                    raise KeyError(f"observed site {site['name']!r} outside the data plate")
                lp = site["fn"].log_prob(site["value"])
                lp = lp.expand(site["fn"].batch_shape).movedim(dim, -1)
                total = total + lp.reshape(-1, lp.shape[-1]).sum(0)
            out[c, s] = total
    return out


# -- helpers ------------------------------------------------------------------------------------
def _arguments(data) -> tuple[tuple, dict]:
    if isinstance(data, dict):
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise TypeError(f"data: keys must be the program's argument names, got {bad}")
        return (), {k: _as_value(v) for k, v in data.items()}
    if isinstance(data, tuple):
        return tuple(_as_value(v) for v in data), {}
    if data is None:
        return (), {}
    return (_as_value(data),), {}


def _as_value(v):
    """numpy arrays and lists of numbers as tensors (numpy's dtype kept); anything else as is."""
    if isinstance(v, np.ndarray):
        return torch.as_tensor(v)
    if isinstance(v, list) and v and all(isinstance(e, (int, float, list)) for e in v):
        try:
            return torch.as_tensor(v)
        except (TypeError, ValueError):
            return v
    return v


def _bind(program, args, kwargs) -> None:
    fn = program.forward if isinstance(program, torch.nn.Module) else program
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and C callables: nothing to check
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        params = [p for p in sig.parameters if p != "self"]
        raise ValueError(f"data: the arguments {sorted(kwargs) or f'{len(args)} positional'} do "
                         f"not match the program's parameters {params} ({e})") from None


def _check_finite(args, kwargs) -> None:
    named = {f"argument {i}": v for i, v in enumerate(args)} | {repr(k): v for k, v in kwargs.items()}
    for name, v in named.items():
        if torch.is_tensor(v) and v.is_floating_point():
            bad = int((~torch.isfinite(v)).sum())
            if bad:
                raise ValueError(f"data: {name} has {bad} NaN or infinite value(s); remove or "
                                 "impute them (a model cannot condition on them)")


def _trace(program, args, kwargs):
    first = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v)), None)
    devices = [first.device] if first is not None and first.device.type == "cuda" else []
    tracer = poutine.trace(program)
    with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block():
        try:
            return tracer.get_trace(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the user's program is reported
            seen = [k for k, s in tracer.msngr.trace.nodes.items() if s["type"] == "sample"]
            where = f" after site {seen[-1]!r}" if seen else " before its first sample site"
            raise ValueError(f"model: the program failed when run on the data{where}: "
                             f"{type(e).__name__}: {e}") from e


def _structure(tr, data_plate) -> Structure:
    st = Structure()
    deepest = 0
    for name, s in tr.nodes.items():
        if s["type"] == "param":
            st.params += (name,)
        if s["type"] != "sample":
            continue
        if isinstance(s["fn"], _Subsample):
            continue
        for f in s["cond_indep_stack"]:
            if f.vectorized:
                st.plates[f.name] = (int(f.size), f.dim)
                deepest = max(deepest, -f.dim)
        shape = tuple(s["value"].shape) if torch.is_tensor(s["value"]) else ()
        batch = len(shape) - getattr(s["fn"], "event_dim", 0)
        by_dim = {f.dim: f.name for f in s["cond_indep_stack"] if f.vectorized}
        names = [by_dim.get(p - batch, f"{name}_dim_{p}") for p in range(batch)]
        if names and not s["is_observed"]:
            st.dims[name] = names
        if s["is_observed"]:
            st.observed[name] = shape
        else:
            st.latent[name] = shape
            fn = s["fn"]
            if s["infer"].get("enumerate") or getattr(fn, "has_enumerate_support", False):
                st.discrete += (name,)
    st.max_plate_nesting = max(deepest, 1)
    return st


def _data_plate(st: Structure, named, tr) -> str | None:
    if named is not None:
        if named not in st.plates:
            raise ValueError(f"data_plate: the program has no plate {named!r}; its plates: "
                             f"{sorted(st.plates) or 'none'}")
        return named
    common = None
    for name in st.observed:
        plates = {f.name for f in tr.nodes[name]["cond_indep_stack"] if f.vectorized}
        common = plates if common is None else common & plates
    if not common:
        return None
    if len(common) > 1:
        raise ValueError(f"data_plate: every observed site lies in the plates {sorted(common)}; "
                         "name the one over data points (data_plate=...)")
    return next(iter(common))


def _device_dtype(tr, args, kwargs):
    values = [s["value"] for s in tr.nodes.values()
              if s["type"] == "sample" and s["is_observed"] and torch.is_tensor(s["value"])]
    values += [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
    floats = [v for v in values if v.is_floating_point()]
    ref = floats[0] if floats else (values[0] if values else None)
    if ref is None:
        return "cpu", torch.get_default_dtype()
    return ref.device, ref.dtype if ref.is_floating_point() else torch.get_default_dtype()


__all__ = ["Program", "ProgramData", "Structure", "as_family"]
