"""Guides for any Pyro model: an autoguide for the global latents composed with local guides.

The model is traced once. A latent site inside the data plate (``pyro.plate("data", ...)``) is
*local*; any other latent site is *global*. The composed guide is

    q(globals) q(locals | x) = A(globals) * prod_{local sites s} q_s(z_sn | x_n)

with A one of Pyro's autoguides (``AutoNormal``, ``AutoMultivariateNormal``,
``AutoLowRankMultivariateNormal``, ``AutoIAFNormal``; ``global_guide=``) over the global sites, and
for each local site a guide of :data:`elbolab.guides.LATENT_GUIDES` (``local=``, e.g. ``mean-field``,
``mlp``). That guide needs a real-valued site of shape (n, k) with one event dimension
(``.to_event(1)``) or a real scalar per point, shape (n,) with event shape () (guided as a 1-dim
latent sampled with event shape ()); any other local site is an error naming it (``auto-normal``
guides every site with a per-point ``AutoNormal``). All local guides share one data plate, so
minibatches line up. Discrete sites marked for enumeration stay out of q (they are summed out).
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.poutine.subsample_messenger import _Subsample
from torch import nn

from elbolab.guides.base import GuideSpec
from elbolab.guides.latent import LATENT_GUIDES, spec

GLOBAL_GUIDES = {
    "auto-normal": AutoNormal,
    "auto-mvn": AutoMultivariateNormal,
    "auto-lowrank": AutoLowRankMultivariateNormal,
    "auto-iaf": AutoIAFNormal,
}


def latent_sites(model, x, plate: str = "data") -> tuple[dict, dict, dict]:
    """(global, local, enumerated) latent sites of ``model(x)`` by name (trace nodes)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block():
        tr = poutine.trace(model).get_trace(x)
    glob, loc, enum = {}, {}, {}
    for name, s in tr.nodes.items():
        if s["type"] != "sample" or s["is_observed"] or isinstance(s["fn"], _Subsample):
            continue
        if s["infer"].get("enumerate") == "parallel":
            enum[name] = s
        elif any(f.name == plate for f in s["cond_indep_stack"]):
            loc[name] = s
        else:
            glob[name] = s
    return glob, loc, enum


class ComposedGuide(nn.Module):
    """A global autoguide and per-site local guides, called like the model."""

    kind = "composed"

    def __init__(self, global_guide, local_guides: list, auto_local, plate: str = "data"):
        super().__init__()
        self.global_guide = global_guide
        self.local_guides = nn.ModuleList(local_guides)
        self.auto_local = auto_local
        self.plate = plate

    def forward(self, x, subsample_size=None):
        out = {}
        if self.global_guide is not None:
            out.update(self.global_guide(x, subsample_size=subsample_size) or {})
        return {**out, **self.local_part(x, subsample_size)}

    def local_part(self, x, subsample_size=None):
        """The guide of the local sites alone (q(z | x) with the globals left to the caller).
        One data plate (one minibatch) is shared by every local part, the autoguide's included."""
        out = {}
        if not self.local_guides and self.auto_local is None:
            return out
        self._plate = pyro.plate(self.plate, x.shape[0], subsample_size=subsample_size, dim=-1,
                                 device=x.device)
        if self.local_guides:
            with self._plate as idx:
                for g in self.local_guides:
                    g.register()
                    out[g.site] = pyro.sample(g.site, g.site_distribution(x, idx))
        if self.auto_local is not None:
            out.update(self.auto_local(x, subsample_size=subsample_size) or {})
        return out

    def global_median(self, x) -> dict:
        """The global guide's median of each global site (empty without global sites)."""
        if self.global_guide is None:
            return {}
        with torch.no_grad():
            return {k: v.detach() for k, v in self.global_guide.median(x).items()}

    def shared_plate(self, *args, **kwargs):
        """``create_plates`` of the local autoguide: the plate this call opened."""
        return self._plate


def _is_real_vector(site) -> bool:
    fn = site["fn"]
    return fn.event_dim == 1 and fn.support is constraints.real_vector or (
        fn.event_dim == 1 and getattr(fn.support, "base_constraint", None) is constraints.real)


def _is_real_scalar(site, n: int) -> bool:
    """A real scalar per data point: event shape (), value of shape (n,) (the data plate only)."""
    fn = site["fn"]
    return (fn.event_dim == 0 and fn.support is constraints.real
            and tuple(site["value"].shape) == (n,))


def _not_local_error(name, site, local) -> ValueError:
    fn = site["fn"]
    return ValueError(
        f"{name}: the per-point guide {local!r} needs a real-valued local site of shape (n, k) "
        "with one event dimension (e.g. dist.Normal(...).to_event(1)) or a real scalar per "
        f"point of shape (n,); {name!r} has value shape {tuple(site['value'].shape)}, event "
        f"shape {tuple(fn.event_shape)}, support {fn.support}. Reshape it so, or use "
        "guide='auto-normal' (a per-point AutoNormal for every local site)")


def build_composed(family, x, *, local: str = "auto-normal", global_guide: str = "auto-normal",
                   init_scale: float = 0.1, **local_options):
    """``GuideSpec.build`` of a composed guide (see the module docstring)."""
    if global_guide not in GLOBAL_GUIDES:
        raise ValueError(f"global_guide: must be one of {sorted(GLOBAL_GUIDES)}, got {global_guide!r}")
    x = family.check_data(x)
    plate = getattr(family, "local_plate", "data")
    glob, loc, _ = latent_sites(family.model, x, plate)
    if not glob and not loc:
        raise ValueError(f"model: the {family.name} model has no latent site to guide")
    gg = None
    if glob:
        cls = GLOBAL_GUIDES[global_guide]
        kw = {} if cls is AutoIAFNormal else {"init_scale": init_scale}
        gg = cls(poutine.block(family.model, expose=list(glob)), **kw)
    local_guides, auto_names = [], []
    for name, site in loc.items():
        if local == "auto-normal":
            auto_names.append(name)
            continue
        scalar = _is_real_scalar(site, x.shape[0])
        if not (scalar or _is_real_vector(site)):
            # guiding it with AutoNormal instead would report a guide that was not used
            raise _not_local_error(name, site, local)
        k = 1 if scalar else site["value"].shape[-1]
        try:
            g = spec(local).build(family, x, latent_dim=k, site=name, plate=plate,
                                         name=f"guide_{local}_{name}", **local_options)
        except ValueError as e:  # e.g. a flow on a 1-dim latent: say which site, and what to do
            raise ValueError(f"{name}: the per-point guide {local!r} cannot guide this local site "
                             f"(latent_dim {k}{', a scalar per point' if scalar else ''}): {e}; "
                             "use another guide, e.g. 'mean-field' or 'auto-normal'") from e
        g.scalar_site = scalar
        local_guides.append(g)
    if local == "auto-normal" and local_options:
        raise TypeError(f"guide_options: unknown option(s) {sorted(local_options)} for auto-normal")
    guide = ComposedGuide(gg, local_guides, None, plate)
    if auto_names:
        guide.auto_local = AutoNormal(poutine.block(family.model, expose=auto_names),
                                      init_scale=init_scale, create_plates=guide.shared_plate)
    return guide


def composed_specs() -> dict:
    """GuideSpecs for any model: ``auto-normal`` / ``auto-mvn`` / ``auto-lowrank`` / ``auto-iaf``
    (that autoguide over the globals, AutoNormal over the locals), and ``global+LOCAL`` names
    for each per-point latent guide LOCAL (AutoNormal over the globals)."""
    def with_global(g):
        def build(family, x, **options):
            return build_composed(family, x, global_guide=g, **options)
        return build

    def with_local(name):
        def build(family, x, **options):
            return build_composed(family, x, local=name, **options)
        return build

    specs = {g: GuideSpec(g, with_global(g), description=f"{GLOBAL_GUIDES[g].__name__} over the "
                          "global latents, AutoNormal over the local ones") for g in GLOBAL_GUIDES}
    for name, s in LATENT_GUIDES.items():
        # semi-amortized refines q with family.log_joint(x, z), which is not defined for a
        # model with global latents (it would need them conditioned on): not composed
        if name in ("exact", "semi-amortized"):
            continue
        specs[name] = GuideSpec(name, with_local(name), amortized=s.amortized,
                                description=f"{s.description}; AutoNormal over the globals")
    return specs
