"""The mixture of experts as NumPyro pieces: priors that sample a parameter record inside any
model, the ready-made regression models built from them, and the bridges from estimates to a
model's sites (values to condition on, and an init strategy). DESIGN sections 1 and 5.

Sample sites of `moe_priors` and their named dims (``infer={"event_dims": ...}``, which
``arviz.from_numpyro`` reads; plates add their own names in front):

=====================  ===========  =====================  =====================================
site                   shape        dims                   meaning
=====================  ===========  =====================  =====================================
``experts``            (k, d)       (expert, feature)      expert weights a_i
``gates``              (k - 1, d)   (gate, feature)        free gate rows; row k is fixed at 0;
                                                           (k - 1, q), dims (gate, gate_feature),
                                                           when the gate has q covariates of its own
``noise``              () or (k,)   () or (expert,)        noise sd, shared or one per expert
``expert_intercepts``  (k,)         (expert,)              only with ``intercepts=True``
``gate_intercepts``    (k - 1,)     (gate,)                only with ``intercepts=True``
``df``                 (k,)         (expert,)              Student-t degrees of freedom, only with
                                                           ``family="student_t"`` and ``df=None``
=====================  ===========  =====================  =====================================

Under ``numpyro.handlers.scope(prefix="a")`` the names become ``a/experts`` and so on; every
tool of the package takes the same ``prefix`` to find them.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import init_to_uniform
from numpyro.ops.indexing import Vindex

from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._links import Link
from numpyro_moe._params import MoEParams
from numpyro_moe._validation import check_positive_int

__all__ = [
    "FAMILIES",
    "PARAMETER_SITES",
    "as_params",
    "check_family",
    "check_fix",
    "default_priors",
    "fixed_sites",
    "init_to_params",
    "is_record",
    "moe_priors",
    "moe_regression",
    "moe_regression_enumerated",
    "params_to_sites",
    "resolve_priors",
    "site_name",
    "sites_to_params",
]

PARAMETER_SITES = ("experts", "gates", "noise", "expert_intercepts", "gate_intercepts", "df")
_GROUPS = {  # parameter group -> its sites (the vocabulary of ``fix``)
    "experts": ("experts", "expert_intercepts"),
    "gates": ("gates", "gate_intercepts"),
    "noise": ("noise", "df"),  # the experts' noise distribution: its scales and (t) degrees of freedom
}
FAMILIES = ("normal", "student_t")


def check_family(family, df, num_experts: int | None = None):
    """``(family, df)`` checked: ``family`` one of `FAMILIES`; ``df`` None, or (Student-t only) a
    positive finite number or a (k,) array of them, returned as a float array (shape () or (k,)).

    Raises
    ------
    ValueError
        Naming ``family`` or ``df``.
    """
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(f"family: expected one of {list(FAMILIES)}, got {family!r}")
    if df is None:
        return family, None
    if family == "normal":
        raise ValueError(
            "df: degrees of freedom given with family='normal' (Gaussian experts have none); pass "
            "family='student_t' for Student-t experts, or drop df"
        )
    traced = isinstance(df, jax.core.Tracer)
    try:
        kind = "f" if traced else np.asarray(df).dtype.kind
    except (TypeError, ValueError):
        kind = "O"
    if isinstance(df, bool | str) or kind not in "iuf":
        raise ValueError(
            f"df: expected None (degrees of freedom estimated) or a positive number of degrees of freedom "
            f"(or one per expert), got {df!r}"
        )
    if traced:
        return family, df
    value = np.asarray(df, dtype=float)
    shapes = [(), (num_experts,)] if num_experts is not None else None
    if (shapes is not None and value.shape not in shapes) or value.ndim > 1:
        expected = f"() or ({num_experts},)" if num_experts is not None else "() or (k,)"
        raise ValueError(
            f"df: expected a number or an array of shape {expected} (one per expert), got shape {value.shape}"
        )
    if not np.all(np.isfinite(value) & (value > 0)):
        raise ValueError(f"df: expected positive finite degrees of freedom, got {value.tolist()}")
    return family, jnp.asarray(value, jnp.result_type(float))


GATE_SCALE = 2.5  # each expert's gate row's prior sd


def default_priors() -> dict[str, dist.Distribution]:
    """The weakly informative default priors, for inputs and responses standardised to sd 1.

    They are what penalised (MAP) EM, `fit_map` and NUTS use unless told otherwise: the same
    model's priors everywhere, in the spirit of Fraley and Raftery (2007, "Bayesian regularization
    for normal mixture estimation and model-based clustering"), whose weakly informative priors keep
    EM's fits away from degenerate ones without moving the good ones.

    - ``experts`` and ``expert_intercepts``: Normal(0, 1). A unit change of a standardised input
      moves an expert's mean by about one sd of y; an expert that interpolates a few points needs
      far larger coefficients.
    - ``gates`` and ``gate_intercepts``: Normal(0, 2.5) on each expert's gate row, the scale of
      Gelman et al. (2008, "A weakly informative default prior distribution for logistic and other
      regression models") for logistic coefficients: gates sharp enough to switch experts within a
      few sd of x, kept away from separation (where the likelihood alone sends them to infinity).
      The model keeps the last row at zero; the prior is on all k rows with their common shift
      integrated out (`_GateContrasts`), so it is the same whichever expert is labelled last and a
      MAP fit does not depend on the experts' order. The contrast of two experts' rows (what the
      softmax reads) has sd 2.5 sqrt(2).
    - ``noise`` (each expert's sd): InverseGamma(2, 0.3), mode 0.1, mean 0.3, P(s > 1) = 0.04. Its
      density vanishes at zero faster than any power, so an expert that collapses onto a few points
      (a variance going to zero, an unbounded likelihood) cannot win; with n_i points the noise
      step adds about 3 pseudo-points and 0.3 s of residual, negligible once n_i is in the tens.
      For Student-t experts it is the prior of their scales s_i.
    - ``df`` (Student-t experts' degrees of freedom nu_i, when estimated): Gamma(2, 0.1), mode 10,
      mean 20, the weakly informative prior of Juarez and Steel (2010, "Model-based clustering of
      non-Gaussian panel data based on skew-t distributions"): it keeps nu_i off the boundaries
      (nu -> 0, where the density degenerates, and nu -> infinity, the flat likelihood of
      Gaussian-looking data) while the data decide in between. Unused by Gaussian experts.

    Pass ``priors=`` to `moe_priors` (and to the fits) to replace any of them, e.g. when y is not
    standardised.
    """
    return {
        "experts": dist.Normal(0.0, 1.0),
        "gates": dist.Normal(0.0, GATE_SCALE),
        "noise": dist.InverseGamma(2.0, 0.3),
        "expert_intercepts": dist.Normal(0.0, 1.0),
        "gate_intercepts": dist.Normal(0.0, GATE_SCALE),
        "df": dist.Gamma(2.0, 0.1),
    }


def resolve_priors(priors: dict | None) -> dict[str, dist.Distribution]:
    """`default_priors` updated by ``priors`` (a dict keyed by site name), or a ValueError naming
    unknown sites / a TypeError for a non-dict."""
    if priors is not None and not isinstance(priors, dict):
        raise TypeError(f"priors: expected a dict of site name -> Distribution, got {type(priors).__name__}")
    chosen = default_priors()
    unknown = sorted(set(priors or {}) - set(chosen))
    if unknown:
        raise ValueError(f"priors: unknown sites {unknown}; expected some of {list(chosen)}")
    for name, prior in (priors or {}).items():
        if not isinstance(prior, dist.Distribution):
            raise TypeError(f"priors[{name!r}]: expected a numpyro Distribution, got {type(prior).__name__}")
    chosen.update(priors or {})
    return chosen


def _site_prior(prior, shape: tuple[int, ...], name: str) -> dist.Distribution:
    """``prior`` as a distribution with event shape ``shape``: a univariate prior (or one with
    batch shape broadcasting to ``shape``) is expanded; one whose event shape is a trailing part of
    ``shape`` is expanded over the rest."""
    if not isinstance(prior, dist.Distribution):
        raise TypeError(f"priors[{name!r}]: expected a numpyro Distribution, got {type(prior).__name__}")
    event = tuple(prior.event_shape)
    split = len(shape) - len(event)
    if split < 0 or tuple(shape[split:]) != event:
        raise ValueError(
            f"priors[{name!r}]: expected a distribution with event shape () or a trailing part of "
            f"{shape}, got event shape {event}"
        )
    try:
        expanded = prior.expand(tuple(shape[:split])) if prior.batch_shape != tuple(shape[:split]) else prior
    except ValueError:
        raise ValueError(
            f"priors[{name!r}]: its batch shape {prior.batch_shape} does not broadcast to {shape[:split]}"
        ) from None
    return expanded.to_event(split) if split else expanded


class _GateContrasts(dist.Distribution):
    """The law of the gate's free rows under a Normal prior on every expert's gate row.

    The softmax ignores a shift common to the k rows, so the model keeps the last row at zero and
    samples the contrasts ``w_i - w_k`` (i < k). A Normal(``loc_i``, ``scale_i``) prior on each of
    the k rows, the common shift integrated out, gives the contrasts a multivariate Normal law,
    column by column: mean ``loc_i - loc_k`` and precision ``diag(pi) - pi pi^T / sum(pi)`` (pi the
    k precisions; the Schur complement of the shift). Its density is the same whichever expert is
    labelled last, so a MAP fit does not depend on the experts' order; with equal scales s, every
    pairwise contrast ``w_i - w_j`` has sd ``s sqrt(2)``. ``event_shape`` is (k - 1, *rest);
    ``loc`` and ``scale`` broadcast to (k, *rest).
    """

    arg_constraints = {"loc": dist.constraints.real, "scale": dist.constraints.positive}
    reparametrized_params = ["loc", "scale"]
    pytree_data_fields = ("loc", "scale")

    def __init__(self, loc, scale, event_shape, *, validate_args=None):
        full = (event_shape[0] + 1, *event_shape[1:])
        self.loc = jnp.broadcast_to(jnp.asarray(loc), full)
        self.scale = jnp.broadcast_to(jnp.asarray(scale), full)
        super().__init__(batch_shape=(), event_shape=tuple(event_shape), validate_args=validate_args)

    @property
    def support(self):
        return dist.constraints.independent(dist.constraints.real, len(self.event_shape))

    def _columns(self):
        k = self.loc.shape[0]
        return self.loc.reshape(k, -1), 1.0 / self.scale.reshape(k, -1) ** 2

    def sample(self, key, sample_shape=()):
        rows = self.loc + self.scale * jax.random.normal(key, (*sample_shape, *self.loc.shape), self.loc.dtype)
        return _contrasts(rows, len(self.event_shape))

    def log_prob(self, value):
        loc, precision = self._columns()
        k1 = loc.shape[0] - 1
        batch = value.shape[: value.ndim - len(self.event_shape)]
        residual = value.reshape(*batch, k1, -1) - (loc[:-1] - loc[-1])
        total = jnp.sum(precision, axis=0)
        log_det = jnp.sum(jnp.log(precision[:-1])) + jnp.sum(jnp.log(precision[-1]) - jnp.log(total))
        return -0.5 * contrast_quadratic(residual, precision) + 0.5 * log_det - 0.5 * k1 * loc.shape[1] * jnp.log(
            2 * jnp.pi
        )


def contrast_quadratic(residual, precision):
    """``sum_a r_a^T P_a r_a`` over the last two axes of ``residual`` ((..., k - 1, m): the free gate
    rows minus their prior means), with ``P_a = diag(pi_a) - pi_a pi_a^T / t_a`` the contrasts'
    prior precision in column a (``precision``: (k, m), every row's; pi_a its first k - 1 rows
    and t_a the sum of all k in column a; a column of zero precisions adds nothing). `_GateContrasts` and penalised EM's gate step share it."""
    weights, total = precision[:-1], jnp.sum(precision, axis=0)
    weighted = jnp.sum(weights * residual, axis=-2)
    safe = jnp.where(total > 0, total, 1.0)
    shift = jnp.sum(jnp.where(total > 0, weighted**2 / safe, 0.0), axis=-1)
    return jnp.sum(weights * residual**2, axis=(-2, -1)) - shift


def _contrasts(rows, event_dims: int):
    """The first k - 1 rows minus the last, the expert axis ``event_dims`` from the end."""
    axis = rows.ndim - event_dims
    last = jax.lax.slice_in_dim(rows, rows.shape[axis] - 1, rows.shape[axis], axis=axis)
    return jax.lax.slice_in_dim(rows, 0, rows.shape[axis] - 1, axis=axis) - last


def _gate_site_prior(prior, shape: tuple[int, ...], name: str) -> dist.Distribution:
    """The prior of a gate site (its free rows, shape (k - 1, ...)): a Normal is a prior on every
    expert's row (`_GateContrasts`), any other distribution one on the free rows as given."""
    if type(prior) is dist.Normal:  # a subclass may mean something else: taken as given
        full = (shape[0] + 1, *shape[1:])
        try:
            loc, scale = (jnp.broadcast_to(jnp.asarray(value), full) for value in (prior.loc, prior.scale))
        except ValueError:
            raise ValueError(
                f"priors[{name!r}]: a Normal gate prior is one on each of the k experts' rows; its loc and "
                f"scale must broadcast to {full}, got shapes {jnp.shape(prior.loc)} and {jnp.shape(prior.scale)}"
            ) from None
        return _GateContrasts(loc, scale, shape)
    return _site_prior(prior, shape, name)


def moe_priors(
    num_experts: int,
    dim: int,
    *,
    link: str | Link = "linear",
    intercepts: bool = False,
    shared_noise: bool = False,
    priors: dict | None = None,
    family: str = "normal",
    df=None,
    gate_dim: int | None = None,
) -> MoEParams:
    """Sample the mixture-of-experts parameter sites inside any NumPyro model.

    Parameters
    ----------
    num_experts, dim
        k and d (static integers).
    gate_dim
        q, the number of covariates of the gate's own (flexmix's concomitant variables; site
        ``gates`` of shape (k - 1, q), dims (gate, gate_feature)); None (the default): the gate
        reads the experts' d inputs.
    link
        The experts' link, recorded in the returned parameters.
    intercepts
        Also sample ``expert_intercepts`` and ``gate_intercepts``.
    shared_noise
        One noise sd for all experts (site ``noise`` of shape ()), or one per expert (shape (k,),
        the default, as in flexmix).
    priors
        Replacements for `default_priors`, keyed by site name (``"experts"``, ``"gates"``,
        ``"noise"``, ``"expert_intercepts"``, ``"gate_intercepts"``). A prior is a NumPyro
        distribution with event shape () (expanded to the site's shape; its batch shape may hold
        per-entry parameters, e.g. ``Normal(group_mean, tau)`` with ``group_mean`` of shape (k, d))
        or with an event shape that ends the site's shape. ``"df"`` is the prior of estimated
        Student-t degrees of freedom.
    family
        The experts' noise: ``"normal"`` (Gaussian experts, the default) or ``"student_t"``,
        ``y | z = i, x ~ StudentT(nu_i, g(a_i . x + c_i), s_i)`` with scale s_i (site ``noise``),
        robust to outliers (Peel and McLachlan 2000; McLachlan and Peel 2000, "Finite Mixture
        Models", ch. 7).
    df
        Student-t degrees of freedom: None (the default) estimates them, one per expert (site
        ``df`` of shape (k,), prior ``priors["df"]``, default Gamma(2, 0.1)); a positive number or
        a (k,) array fixes them (no site). Only with ``family="student_t"``.

    Returns
    -------
    MoEParams
        The sampled values with the gates' fixed last row (zero) appended, noise of shape (k,),
        the link, and ``df`` (k,) for Student-t experts (None for Gaussian ones).

    Raises
    ------
    ValueError
        For an unknown ``family``, or a ``df`` that is not None or positive degrees of freedom (or
        is given with Gaussian experts).
    """
    family, df = check_family(family, df, num_experts)
    chosen = resolve_priors(priors)
    free = num_experts - 1

    def sample(name, shape, dims):
        prior = (_gate_site_prior if name in ("gates", "gate_intercepts") else _site_prior)(chosen[name], shape, name)
        return numpyro.sample(name, prior, infer={"event_dims": dims} if dims else {})

    experts = sample("experts", (num_experts, dim), ["expert", "feature"])
    if gate_dim is not None:
        gate_dim = check_positive_int(gate_dim, "gate_dim")
    width = dim if gate_dim is None else gate_dim
    if free:
        free_gates = sample("gates", (free, width), ["gate", "feature" if gate_dim is None else "gate_feature"])
    else:
        free_gates = jnp.zeros((0, width), jnp.result_type(experts))
    gates = jnp.concatenate([free_gates, jnp.zeros((1, width), jnp.result_type(free_gates))], axis=0)
    if shared_noise:
        noise = jnp.broadcast_to(sample("noise", (), []), (num_experts,))
    else:
        noise = sample("noise", (num_experts,), ["expert"])
    expert_intercepts = gate_intercepts = None
    if intercepts:
        expert_intercepts = sample("expert_intercepts", (num_experts,), ["expert"])
        free_bias = sample("gate_intercepts", (free,), ["gate"]) if free else jnp.zeros((0,))
        gate_intercepts = jnp.concatenate([free_bias, jnp.zeros((1,), jnp.result_type(free_bias))])
    degrees = None
    if family == "student_t":
        degrees = sample("df", (num_experts,), ["expert"]) if df is None else jnp.broadcast_to(df, (num_experts,))
    return MoEParams(experts, gates, noise, expert_intercepts, gate_intercepts, link, degrees)


def moe_regression(
    x,
    y=None,
    *,
    num_experts: int,
    link: str | Link = "linear",
    intercepts: bool = False,
    shared_noise: bool = False,
    priors: dict | None = None,
    family: str = "normal",
    df=None,
    gate_x=None,
) -> MoEParams:
    """Softmax-gated mixture-of-experts regression: `moe_priors`, a plate ``obs`` and the
    `MixtureOfExperts` likelihood of ``y`` (the expert marginalised, log-likelihood per point).

    Parameters
    ----------
    x
        (n, d) inputs (standardise real data first).
    y
        (n,) responses, or None to sample them (prior / posterior predictive).
    num_experts, link, intercepts, shared_noise, priors, family, df
        As in `moe_priors` (``family="student_t"``: Student-t experts, df estimated unless given).
    gate_x
        (n, q) covariates of the gate's own, or None (the default): the gate reads x.

    Returns
    -------
    MoEParams
        The parameters sampled by `moe_priors`.
    """
    params = moe_priors(
        num_experts,
        jnp.shape(x)[1],
        link=link,
        intercepts=intercepts,
        shared_noise=shared_noise,
        priors=priors,
        family=family,
        df=df,
        gate_dim=None if gate_x is None else jnp.shape(gate_x)[1],
    )
    with numpyro.plate("obs", jnp.shape(x)[0]):
        numpyro.sample("y", MixtureOfExperts.from_params(params, x, gate_x=gate_x), obs=y)
    return params


def moe_regression_enumerated(
    x,
    y=None,
    *,
    num_experts: int,
    link: str | Link = "linear",
    intercepts: bool = False,
    shared_noise: bool = False,
    priors: dict | None = None,
    family: str = "normal",
    df=None,
    gate_x=None,
) -> MoEParams:
    """`moe_regression` with the expert of each point as a latent site ``expert_assignment``.

    The site is marked for parallel enumeration, so NUTS marginalises it exactly (needs
    ``funsor``); ``numpyro.contrib.funsor.infer_discrete`` then draws per-point assignments.
    Arguments and return value as in `moe_regression`.
    """
    params = moe_priors(
        num_experts,
        jnp.shape(x)[1],
        link=link,
        intercepts=intercepts,
        shared_noise=shared_noise,
        priors=priors,
        family=family,
        df=df,
        gate_dim=None if gate_x is None else jnp.shape(gate_x)[1],
    )
    means = params.expert_means(x)
    scales = jnp.broadcast_to(params.noise, means.shape)
    with numpyro.plate("obs", jnp.shape(x)[0]):
        assignment = numpyro.sample(
            "expert_assignment",
            dist.Categorical(logits=params.gate_logits(x if gate_x is None else gate_x)),
            infer={"enumerate": "parallel"},
        )
        loc, scale = Vindex(means)[..., assignment], Vindex(scales)[..., assignment]
        if params.df is None:
            likelihood = dist.Normal(loc, scale)
        else:
            degrees = Vindex(jnp.broadcast_to(params.df, means.shape))[..., assignment]
            likelihood = dist.StudentT(degrees, loc, scale)
        numpyro.sample("y", likelihood, obs=y)
    return params


def is_record(value) -> bool:
    """Whether ``value`` gives a parameter record (see `as_params`)."""
    return (
        isinstance(value, MoEParams)
        or isinstance(getattr(value, "params", None), MoEParams)
        or callable(getattr(value, "to_params", None))
    )


def as_params(value, name: str = "params") -> MoEParams:
    """The parameter record of ``value``: `MoEParams` itself, a fit result's ``.params``, or an
    estimate's ``.to_params()`` (gates zero, a uniform gate)."""
    if isinstance(value, MoEParams):
        return value
    if isinstance(getattr(value, "params", None), MoEParams):
        return value.params
    if is_record(value):
        return value.to_params()
    raise TypeError(
        f"{name}: expected MoEParams, an expert estimate or a fit result, got {type(value).__name__}"
    )


def predictive_params(value, name: str = "params") -> MoEParams:
    """`as_params` for predicting new points: a fit result that knows its experts' unbiased
    noise sds (``Fit.predictive_noise``, EM fits) gives its parameters with those; anything else
    its parameters as they are."""
    params = as_params(value, name)
    noise = getattr(value, "predictive_noise", None)
    if noise is None:
        return params
    return params.replace(noise=np.asarray(noise, np.asarray(params.noise).dtype))


def _shared(noise) -> jax.Array:
    """One noise sd for a shared noise site: the common value of equal noises (exactly), else
    their mean."""
    noise = jnp.atleast_1d(jnp.asarray(noise))
    return jnp.where(jnp.all(noise == noise[0]), noise[0], jnp.mean(noise))


def site_name(prefix: str, name: str) -> str:
    """``name`` under a ``handlers.scope`` prefix (NumPyro joins them with a slash)."""
    return f"{prefix}/{name}" if prefix else name


def params_to_sites(params, *, prefix: str = "", shared_noise: bool = False) -> dict[str, jax.Array]:
    """Site values of `moe_priors` for a parameter record (gates normalised, last row dropped).

    For ``handlers.condition`` (fix some sites: take a subset, e.g. the ``experts`` entry) and
    ``init_to_value``. ``params`` may be `MoEParams`, an expert estimate or a fit result.

    Parameters
    ----------
    prefix
        The model's ``handlers.scope`` prefix, if any.
    shared_noise
        Whether the model's ``noise`` site is shared (shape (), the mean of the k noises) or one per
        expert (shape (k,), `moe_priors`' default).

    Notes
    -----
    A record with degrees of freedom (Student-t experts) also gives the ``df`` site (k,), which a
    model with fixed degrees of freedom does not have (conditioning on it or starting it is then a
    no-op).
    """
    params = as_params(params).normalized()
    noise = jnp.asarray(params.noise)
    noise = _shared(noise) if shared_noise else jnp.broadcast_to(noise, (params.num_experts,))
    sites = {"experts": params.experts, "noise": noise}
    if params.num_experts > 1:
        sites["gates"] = params.gates[:-1]
    if params.has_intercepts:
        zeros = jnp.zeros(params.num_experts, jnp.result_type(params.experts))
        sites["expert_intercepts"] = zeros if params.expert_intercepts is None else params.expert_intercepts
        if params.num_experts > 1:
            gate_bias = zeros if params.gate_intercepts is None else params.gate_intercepts
            sites["gate_intercepts"] = gate_bias[:-1]
    if params.df is not None:
        sites["df"] = jnp.broadcast_to(jnp.asarray(params.df), (params.num_experts,))
    return {site_name(prefix, name): value for name, value in sites.items()}


def sites_to_params(
    sites: dict, *, prefix: str = "", link: str | Link = "linear", df=None, gate_dim: int | None = None
) -> MoEParams:
    """`MoEParams` from one draw of `moe_priors`' sites (the inverse of `params_to_sites`).

    A shared noise (shape ()) is broadcast to (k,). Leading batch axes (draws) are kept, so the
    result of ``jax.vmap(sites_to_params)`` stacks records. The degrees of freedom of Student-t
    experts come from the ``df`` site, or, for a model that fixes them (no site), from ``df``
    (a number or (k,) array); with neither the experts are Gaussian. ``gate_dim``: the gate's
    number of covariates when it has its own (needed only for one expert, which has no ``gates``
    site; otherwise read off the site).
    """
    get = lambda name, default=None: sites.get(site_name(prefix, name), default)  # noqa: E731
    if get("experts") is None:
        raise KeyError(f"sites: no {site_name(prefix, 'experts')!r} entry; expected the sites of moe_priors")
    experts = jnp.asarray(get("experts"))
    k, dim = experts.shape[-2:]
    batch = experts.shape[:-2]
    width = dim if gate_dim is None else gate_dim
    free_gates = jnp.asarray(get("gates", jnp.zeros((*batch, 0, width), experts.dtype)))
    width = free_gates.shape[-1]
    gates = jnp.concatenate([free_gates, jnp.zeros((*batch, 1, width), free_gates.dtype)], axis=-2)
    noise = jnp.asarray(get("noise"))
    if noise.shape == batch:
        noise = jnp.broadcast_to(noise[..., None], (*batch, k))
    expert_intercepts = gate_intercepts = None
    if get("expert_intercepts") is not None:
        expert_intercepts = jnp.asarray(get("expert_intercepts"))
        free_bias = jnp.asarray(get("gate_intercepts", jnp.zeros((*batch, 0), experts.dtype)))
        gate_intercepts = jnp.concatenate([free_bias, jnp.zeros((*batch, 1), free_bias.dtype)], axis=-1)
    degrees = get("df")
    if degrees is None and df is not None:
        degrees = jnp.broadcast_to(jnp.asarray(df, experts.dtype), (*batch, k))
    degrees = None if degrees is None else jnp.asarray(degrees)
    return MoEParams(experts, gates, noise, expert_intercepts, gate_intercepts, link, degrees)


def fixed_sites(fix, params, *, prefix: str = "", shared_noise: bool = False) -> dict[str, jax.Array]:
    """The site values that hold the parameter groups in ``fix`` (``"experts"``, ``"gates"``,
    ``"noise"``; each with its intercepts, the noise with the Student-t degrees of freedom) at
    ``params``, for ``handlers.condition``."""
    fix = check_fix(fix)
    sites = params_to_sites(params, prefix=prefix, shared_noise=shared_noise)
    names = {site_name(prefix, site) for group in fix for site in _GROUPS[group]}
    return {name: value for name, value in sites.items() if name in names}


def check_fix(fix) -> tuple[str, ...]:
    """``fix`` as a tuple of parameter groups, or a ValueError/TypeError naming it."""
    if isinstance(fix, str):
        raise TypeError(
            f"fix: expected a tuple of parameter groups, e.g. ('experts',), got the string {fix!r}"
        )
    fix = tuple(fix)
    unknown = sorted(set(fix) - set(_GROUPS))
    if unknown:
        raise ValueError(f"fix: unknown parameter groups {unknown}; expected some of {list(_GROUPS)}")
    return fix


def init_to_params(site=None, params=None, *, prefix: str = "", values: dict | None = None):
    """Init strategy (in NumPyro's style) starting the mixture-of-experts sites at ``params``.

    ``NUTS(model, init_strategy=init_to_params(params=fit))``, or in an ``AutoDelta`` guide.

    Parameters
    ----------
    params
        `MoEParams`, an expert estimate (a uniform gate) or a fit result, for the sites of
        `moe_priors` under ``prefix``; or a dict mapping prefixes to such records, for a model with
        several blocks (e.g. ``{"g1": fit1, "g2": fit2}`` for blocks under ``handlers.scope``).
    prefix
        The ``handlers.scope`` prefix of the sites (with a single record).
    values
        Starting values of the model's other sites, by name (as ``init_to_value``).

    Notes
    -----
    Every sample site of `moe_priors` starts at its value, the noise in the shape the model
    declares (shared: the mean of the k noises); a site in ``values`` at that value; any other
    latent site falls back to NumPyro's ``init_to_uniform``. Conditioned sites are left to the model.
    """
    if site is not None and not isinstance(site, dict):
        raise TypeError(
            f"site: init_to_params takes the record as a keyword, e.g. init_to_params(params=fit); got a "
            f"{type(site).__name__} as the site"
        )
    if site is None:
        blocks = params if isinstance(params, dict) else {prefix: params}
        sites = {}
        for block_prefix, block in blocks.items():
            sites.update(params_to_sites(block, prefix=block_prefix, shared_noise=False))
        sites.update({name: jnp.asarray(value) for name, value in (values or {}).items()})
        return partial(_init_to_sites, values=sites)
    return init_to_params(params=params, prefix=prefix, values=values)(site)


def _init_to_sites(site, *, values):
    if site["type"] == "sample" and not site["is_observed"] and site["name"] in values:
        value = values[site["name"]]
        shape = tuple(site["fn"].shape())
        if np.shape(value) != shape and shape == () and site["name"].split("/")[-1] == "noise":
            value = _shared(value)
        return jnp.broadcast_to(value, shape) if np.shape(value) != shape else value
    return init_to_uniform(site)
