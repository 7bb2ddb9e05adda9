"""Fitting a CSV file end to end: read, standardise, estimate, fit (choosing k), (NUTS), write a
self-describing fit folder.

Used by ``numpyro-moe fit``. Everything is written into one output folder, atomically: an
interrupted run leaves only a hidden ``.<name>.partial-*`` folder, never one that looks complete.
``model.json`` in it says how to read new data for the fit (`numpyro_moe.apps.predict`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

import numpyro_moe
from numpyro_moe import MoEParams, fit_moe, run_nuts
from numpyro_moe._design import DESIGNS
from numpyro_moe._fit import finish_em
from numpyro_moe._select import _choose_prior_scale, _prior_scale_deviance, _resolved_criterion
from numpyro_moe._validation import check_probability
from numpyro_moe.apps.folders import output_folder
from numpyro_moe.apps.messages import column_names_in_warnings, progress_bars
from numpyro_moe.apps.plots import plot_gates, plot_predictive_check, plot_trace, save_plot
from numpyro_moe.apps.tables import CsvData, read_csv
from numpyro_moe.io import save_result
from numpyro_moe.simulation import sample_response

__all__ = [
    "AUTO_EXPERTS", "CRITERIA", "FORMAT", "READABLE_FORMATS", "CsvData", "fit_csv", "format_selection", "read_csv",
    "split_features",
]

FORMAT = 2
"""Version of ``model.json``'s layout (2: the experts' and the gate's features listed apart)."""
READABLE_FORMATS = (1, 2)
"""The layouts `numpyro_moe.apps.predict` reads (1: every feature feeds experts and gate)."""
AUTO_EXPERTS = (1, 2, 3, 4, 5)
"""The numbers of experts compared by ``--experts auto``."""
CRITERIA = ("auto", "bic", "icl", "cv")
PPC_ROWS = 20_000
"""The point fit's predictive check draws its replicates on at most this many rows, evenly spread."""


def _standardise(values: np.ndarray, names: list[str]):
    mean = values.mean(axis=0)
    scale = values.std(axis=0)
    constant = [name for name, s in zip(names, np.atleast_1d(scale), strict=True) if s == 0]
    if constant:
        raise ValueError(f"columns {constant} are constant; remove them")
    return (values - mean) / scale, mean, scale


def _parameter_table(params: MoEParams, feature_names: list[str], gate_names: list[str] | None = None) -> str:
    """parameters.csv: a row per expert, gate, and the noise (and df); with gate covariates the
    gate rows have their own header line."""
    lines = ["parameter," + ",".join(feature_names) + ",intercept"]
    for i in range(params.num_experts):
        intercept = "" if params.expert_intercepts is None else f"{float(params.expert_intercepts[i]):.6g}"
        lines.append(
            f"expert {i}," + ",".join(f"{float(v):.6g}" for v in params.experts[i]) + f",{intercept}"
        )
    if gate_names is not None:
        lines.append("parameter," + ",".join(gate_names) + ",intercept")
    for i in range(params.num_experts):
        intercept = "" if params.gate_intercepts is None else f"{float(params.gate_intercepts[i]):.6g}"
        lines.append(f"gate {i}," + ",".join(f"{float(v):.6g}" for v in params.gates[i]) + f",{intercept}")
    lines.append(
        "noise," + ",".join(f"{float(v):.6g}" for v in np.broadcast_to(params.noise, (params.num_experts,)))
    )
    if params.df is not None:
        lines.append("df," + ",".join(f"{float(v):.6g}" for v in np.broadcast_to(params.df, (params.num_experts,))))
    return "\n".join(lines) + "\n"


def _positive_int(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag}: expected an integer >= 1, got {value!r}")
    return value


def _candidates(num_experts) -> tuple[tuple[int, ...], bool]:
    """The numbers of experts to fit, and whether they are the automatic choice."""
    if isinstance(num_experts, str):
        if num_experts != "auto":
            raise ValueError(
                f"--experts: expected 'auto', an integer or a list of integers >= 1, got {num_experts!r}"
            )
        return AUTO_EXPERTS, True
    if isinstance(num_experts, Sequence):
        if not num_experts:
            raise ValueError("--experts: expected at least one number of experts, got none")
        return tuple(sorted({_positive_int(k, "--experts") for k in num_experts})), False
    return (_positive_int(num_experts, "--experts"),), False


def _rows_needed(k: int, d: int, q: int | None = None) -> tuple[int, int]:
    # A rough count (expert and gate weights and intercepts per expert; q gate covariates when the
    # gate has its own): twice as many rows as parameters keeps every expert's least squares well
    # posed with room to spare.
    parameters = k * (d + (d if q is None else q) + 2)
    return parameters, max(2 * parameters, d + 2)


def _too_few_rows(n: int, d: int, k: int, q: int | None = None) -> ValueError:
    parameters, needed = _rows_needed(k, d, q)
    return ValueError(
        f"DATA: too few rows: {n} rows for {k} experts on {d} features ({parameters} parameters); need at "
        f"least {needed}"
    )


def encoded_names(column: str, levels: dict[str, list[str]]) -> list[str]:
    """The feature names a raw column encodes to: itself, or ``column=level`` per one-hot level
    but the reference."""
    if column in levels:
        return [f"{column}={level}" for level in levels[column][1:]]
    return [column]


def split_features(
    columns: list[str], levels: dict[str, list[str]], feature_names: list[str], gate_columns: list[str] | None,
    expert_columns: list[str] | None = None,
) -> tuple[list[int], list[int] | None]:
    """Indices into ``feature_names`` (the encoded columns of ``columns``) of the experts'
    features and of the gate's (None when the gate reads the experts' features)."""
    position = {name: index for index, name in enumerate(feature_names)}
    if expert_columns is None:
        expert_columns = [column for column in columns if column not in (gate_columns or [])]
    experts = [position[name] for column in expert_columns for name in encoded_names(column, levels)]
    if gate_columns is None:
        return experts, None
    return experts, [position[name] for column in gate_columns for name in encoded_names(column, levels)]


def _gate_columns(gate_features, features, target: str) -> list[str] | None:
    """``--gate-features`` checked: distinct column names, not the target."""
    if gate_features is None:
        return None
    if isinstance(gate_features, str):
        gate_features = [name.strip() for name in gate_features.split(",") if name.strip()]
    gate_features = list(gate_features)
    if not gate_features:
        raise ValueError("--gate-features: expected at least one column name")
    repeated = sorted({name for name in gate_features if gate_features.count(name) > 1})
    if repeated:
        raise ValueError(f"--gate-features: columns {repeated} are listed more than once")
    if target in gate_features:
        raise ValueError(f"--gate-features: the target {target!r} cannot feed the gate")
    return gate_features


def _header(path) -> list[str] | None:
    """The column names of a CSV file's header row (to check names before reading it), or None
    when it cannot be read (`read_csv` then says why)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            return [name.strip() for name in next(csv.reader(file), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _tensor_note(fit) -> str:
    """Where the moment start ended, for the summary: won (a tie goes to it, the first start) or
    how far below the winner."""
    gap = fit.tensor_gap
    if gap is None:
        return ""
    if fit.start_labels[fit.start] == "tensor":
        return "; the tensor start won"
    return f"; the tensor start ended {gap:.3g} per point below the winner"


BINDING_PRIOR_SDS = 2.0
"""An expert coefficient beyond this many sds of its Normal(0, S) prior: the prior is binding."""
WIDER_PRIOR_SCALES = (3.0, 10.0)
"""The sds the default experts' prior widens to, in turn, while it binds (`fit_csv`)."""


def _binding_coefficient(params, scale: float, names: list[str]) -> tuple[str, float] | None:
    """The experts' coefficient (or intercept) farthest from 0, as ``("expert i's name", value)``,
    when it lies beyond `BINDING_PRIOR_SDS` sds of the Normal(0, ``scale``) prior (a prior of sd S
    gives such values 4.6% of its mass); None otherwise."""
    experts = np.asarray(params.experts, dtype=float)
    columns = list(names)
    if params.expert_intercepts is not None:
        experts = np.column_stack([experts, np.asarray(params.expert_intercepts, dtype=float)])
        columns.append("intercept")
    expert, column = np.unravel_index(int(np.argmax(np.abs(experts))), experts.shape)
    value = float(experts[expert, column])
    if not abs(value) > BINDING_PRIOR_SDS * scale:
        return None
    return f"expert {expert}'s {columns[column]}", value


def _binding_prior_note(params, scale: float, names: list[str]) -> str | None:
    """A note when the experts' prior holds back a coefficient the data ask for (see
    `_binding_coefficient`), with what to do; None otherwise."""
    binding = _binding_coefficient(params, scale, names)
    if binding is None:
        return None
    where, value = binding
    return (
        f"note: {where} coefficient is {value:.3g} (standardised), {abs(value) / scale:.1f} sd of the experts' "
        f"Normal(0, {scale:g}) prior, which is holding it back; strongly correlated columns (a polynomial "
        "basis) need a wider prior: try --expert-prior-scale auto (cross-validation) or a larger S"
    )


def _nuts_line(diagnostics: dict, chains: int, warmup: int) -> str:
    """The summary's line on the chains: their diagnostics, and what to do when they disagree."""
    from numpyro_moe._bayes import RHAT_LIMIT, _chain_heights

    r_hat, divergences = diagnostics["max_r_hat"], int(diagnostics["divergences"])
    line = (
        f"NUTS: {chains} chains x {diagnostics['draws']} draws ({warmup} warmup); max r_hat {r_hat:.3f}, "
        f"min bulk ESS {diagnostics['min_ess_bulk']:.0f}, {divergences} divergent transitions"
        + (
            "; the fixed Laplace metric's chains disagreed, so warmup ran again adapting it"
            if diagnostics.get("metric") == "laplace, adapted" else ""
        )
        + (
            f"; too many transitions diverged at first, so warmup ran again with target acceptance "
            f"{diagnostics['target_accept_prob']:g}"
            if diagnostics.get("accept_raised") else ""
        )
        + (
            f"; the first {diagnostics['burn_in']} draws of each chain were dropped as warmup (only the later "
            "ones agreed)"
            if diagnostics.get("burn_in") else ""
        )
    )
    problems = []
    if chains > 1 and not r_hat <= RHAT_LIMIT:
        problems.append(
            f"the chains disagree (max r_hat above {RHAT_LIMIT}), so the summaries and the posterior predictive "
            "mix what the chains found separately: draw longer (--max-draws), try fewer experts, or look at "
            "trace.png for chains stuck in different modes"
            + _chain_heights(diagnostics, tree="az.from_netcdf('posterior.nc')")
        )
    if divergences:
        problems.append(
            f"{divergences} transitions diverged, so the draws may miss a region of the posterior the sampler "
            "could not follow: a higher --target-accept (0.9, 0.95), fewer experts or a smaller "
            "--expert-prior-scale usually remove them"
        )
    if not problems:
        return line
    return f"{line}. Not to be trusted as it stands: {'; and '.join(problems)}"


def _finite(value):
    """JSON has no NaN or infinity: None instead (counts stay integers, names strings)."""
    if isinstance(value, (str, bool, np.bool_)):
        return value if isinstance(value, str) else bool(value)
    if isinstance(value, (list, tuple)):
        return [_finite(entry) for entry in value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def format_selection(table: list[dict], chosen: int, criterion: str) -> str:
    """Plain-text table of `numpyro_moe.select_num_experts`' rows, the chosen k marked ``*``."""
    cv = all("cv" in row for row in table)
    header = (
        f"  {'k':>3}{'loglik/pt':>11}{'params':>8}{'BIC':>12}{'ICL':>12}{format('CV', '>12') if cv else ''}"
        f"{'min weight':>12}{'converged':>11}"
    )
    lines = [header, "  " + "-" * (len(header) - 2)]
    for row in table:
        k = int(row["num_experts"])
        lines.append(
            f"{'*' if k == chosen else ' '} {k:>3}{row['log_likelihood']:>11.4f}{int(row['num_parameters']):>8}"
            f"{row['bic']:>12.2f}{row['icl']:>12.2f}{format(row['cv'], '>12.2f') if cv else ''}"
            f"{row['smallest_weight']:>12.3f}"
            f"{'yes' if row['converged'] else 'no':>11}"
        )
    lines.append(f"k = {chosen} chosen: the lowest {criterion.upper()} (* above)")
    return "\n".join(lines)


def _selection_row(row: dict) -> dict:
    return {
        "num_experts": int(row["num_experts"]),
        "log_likelihood": _finite(row["log_likelihood"]),
        "num_parameters": int(row["num_parameters"]),
        "bic": _finite(row["bic"]),
        "icl": _finite(row["icl"]),
        "converged": bool(row["converged"]),
        "smallest_weight": _finite(row["smallest_weight"]),
        **({"cv": _finite(row["cv"])} if "cv" in row else {}),
    }


ROW_DRAWS = 2_000_000
"""NUTS's default budget while the chains disagree, in rows x draws per chain (`default_max_draws`)."""


def default_max_draws(n: int, num_samples: int) -> int:
    """The default ``--max-draws``: as many draws per chain as `ROW_DRAWS` allows at ``n`` rows (the
    cost of a draw grows with n), in whole rounds of ``num_samples``, at least 4 rounds and at most
    20. Small data, where a draw is cheap and a posterior with few rows per parameter mixes slowly,
    get the longer runs: on the R suite of ``benchmarks/real_data.py`` the whiteside set (42 rows,
    k = 2) had max r_hat 1.022 after 4 x 2,000 draws and 1.008 after 4 x 5,500."""
    rounds = min(max(ROW_DRAWS // (max(n, 1) * num_samples), 4), 20)
    return int(rounds * num_samples)


AUTO_PRIOR_SCALES = (1.0, 3.0, 10.0)
AUTO_PRIOR_SCALE_ROWS = 2_000


def _expert_priors(scale: float) -> dict | None:
    """The experts' Normal(0, scale) prior as `fit_moe`'s ``priors`` (None: the default, sd 1)."""
    if scale == 1.0:
        return None
    import numpyro.distributions as dist

    return {"experts": dist.Normal(0.0, scale), "expert_intercepts": dist.Normal(0.0, scale)}


def format_scale_selection(table: list[dict], chosen: float) -> str:
    """The cross-validated deviance of each prior sd tried, the chosen one starred."""
    lines = ["experts' prior sd   CV deviance   SE of the difference to the lowest"]
    for row in table:
        mark = "*" if row["scale"] == chosen else " "
        lines.append(f"{row['scale']:>16g} {mark} {row['cv']:>12.2f} {row['cv_se_difference']:>12.2f}")
    lines.append(
        f"prior sd {chosen:g} chosen (* above): the smallest within one standard error of the lowest deviance"
    )
    return "\n".join(lines)


def fit_csv(
    path: str | os.PathLike,
    *,
    target: str,
    out: str | os.PathLike,
    num_experts: int | Sequence[int] | str = "auto",
    criterion: str = "auto",
    link: str = "linear",
    features: list[str] | None = None,
    gate_features: list[str] | str | None = None,
    missing: str = "error",
    one_hot: str | list[str] = (),
    shared_noise: bool = False,
    expert_prior_scale: float | str | None = None,
    family: str = "normal",
    df: float | None = None,
    design: str = "gaussian",
    nuts: bool = False,
    seed: int = 0,
    num_starts: int = 20,
    num_finalists: int | None = 5,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    max_samples: int | None = None,
    target_accept_prob: float = 0.8,
    max_iterations: int = 500,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Fit a mixture of experts to a CSV file and write a self-describing fit folder ``out``.

    The file is read by `numpyro_moe.apps.tables.read_csv` (row names, ``missing``, ``one_hot``),
    columns are standardised (mean 0, sd 1), the model has expert and gate intercepts, and the fit
    is `fit_moe` (the tensor estimate among random starts, joint EM). With several numbers of
    experts (a sequence, or ``"auto"`` = `AUTO_EXPERTS`, leaving out those the rows cannot support)
    `numpyro_moe.select_num_experts` fits each and keeps the best by ``criterion`` (``"auto"``:
    ``"cv"`` on at most 2,000 rows, ``"bic"`` on more; ``"bic"``, ``"icl"``, or ``"cv"``: 5-fold
    cross-validated log-likelihood, 6 fits per k).
    ``family="student_t"`` fits robust Student-t experts (``df`` fixed degrees of freedom, or None
    to estimate them). ``design``: the inputs the tensor start's moments assume (`fit_moe`:
    ``"gaussian"``, ``"mixture"`` or ``"auto"``). ``gate_features`` (column names) gives the gate covariates
    of its own (flexmix's concomitant variables): the gate reads those columns, the experts read
    ``features`` (default: every column but the target and the gate's). With ``nuts``, `run_nuts`
    from the fit; while its chains disagree (max r_hat > 1.01) they draw ``num_samples`` more, up
    to ``max_samples`` per chain (default `default_max_draws`: 4 to 20 times ``num_samples``,
    more on fewer rows); ``target_accept_prob``: the
    acceptance rate NUTS's step size is tuned to (`run_nuts`). ``max_iterations``: EM's
    iterations per start (`fit_moe`). ``num_starts`` EM starts (the tensor estimate and random
    ones), of which, after a short EM, the ``num_finalists`` best continue (None: all of them;
    `fit_moe`). ``expert_prior_scale``: the sd of the Normal prior on the experts' standardised
    coefficients and intercepts, in the point fit and in NUTS. None (the default): 1,
    `numpyro_moe.moe_priors`' default, checked against the fit: while a fitted coefficient lies
    beyond `BINDING_PRIOR_SDS` sds of it (a prior-data conflict, Evans and Moshonov 2006: the prior
    meant to be weak may be holding back what the data ask for), the next of `WIDER_PRIOR_SCALES`
    is tried: on data of at most `AUTO_PRIOR_SCALE_ROWS` rows it is kept only when its 5-fold
    cross-validated deviance is lower than the current sd's (the folds and starts of ``"auto"``),
    beyond on the sign alone; the data are refitted at the chosen k with it, and ``model.json``
    records each step (``expert_prior_scale_widened``) and the one refused
    (``expert_prior_scale_kept``). On the five real data sets of ``benchmarks/real_data.py`` only
    the motorcycle set's cubic basis widens (to 3; 10 predicted worse; the largest coefficients
    elsewhere were 0.47-1.40 sd). A number fixes the sd (a note in the summary says when it binds); ``"auto"``
    chooses it among `AUTO_PRIOR_SCALES` at the chosen k by 5-fold cross-validation and the
    one-standard-error rule (`numpyro_moe.select_expert_prior_scale`, 15 more fits, and one more
    when the chosen sd is not 1) when the data have at most `AUTO_PRIOR_SCALE_ROWS` rows, and
    keeps 1 beyond, where the likelihood outweighs the prior (on the 5,389 training rows of the
    High School and Beyond set the three sds' cross-validated deviances, about 13,444, differed by
    0.4). It is not the default: on the four real data sets of ``benchmarks/real_data.py`` small
    enough for it, it chose 1 every time, and it made the command more than twice as slow (1,000
    rows, d = 8, k = 3: 28 s against 13 s). A wider prior suits strongly correlated columns, such
    as a polynomial basis, whose fits need large coefficients of opposite signs.

    Outputs: ``model.json`` (format `FORMAT`: the package version, columns, one-hot levels,
    features, target, standardisation, training ranges, link, noise, number of experts, seed, the
    selection table), ``fit.npz`` (the point fit in standardised units;
    ``numpyro_moe.io.load_result``), ``parameters.csv``, ``summary.txt``,
    ``gate_probabilities.png``, ``ppc.png``; with ``nuts`` also ``posterior.nc`` (the ArviZ
    DataTree), ``summary.csv`` (``az.summary``) and ``trace.png``. ``numpyro-moe predict`` reads
    the folder.
    """
    candidates, auto = _candidates(num_experts)
    if criterion not in CRITERIA:
        raise ValueError(f"--criterion: expected one of {list(CRITERIA)}, got {criterion!r}")
    if design not in DESIGNS:
        raise ValueError(f"--design: expected one of {list(DESIGNS)}, got {design!r}")
    num_starts = _positive_int(num_starts, "--starts")
    max_iterations = _positive_int(max_iterations, "--max-iterations")
    auto_scale = expert_prior_scale == "auto"
    widen = expert_prior_scale is None
    if not auto_scale and not widen and (
        isinstance(expert_prior_scale, bool) or not isinstance(expert_prior_scale, numbers.Real)
        or not math.isfinite(expert_prior_scale) or expert_prior_scale <= 0
    ):
        raise ValueError(
            f"--expert-prior-scale: expected a positive number or 'auto', got {expert_prior_scale!r}"
        )
    if num_finalists is not None:
        num_finalists = _positive_int(num_finalists, "--finalists")
        if num_finalists >= num_starts:
            num_finalists = None  # every start runs to convergence
    if nuts:
        for value, flag in (
            (num_chains, "--chains"),
            (num_warmup, "--num-warmup"),
            (num_samples, "--num-draws"),
        ):
            _positive_int(value, flag)
        if max_samples is not None:
            max_samples = _positive_int(max_samples, "--max-draws")
            if max_samples < num_samples:
                raise ValueError(f"--max-draws: expected at least --num-draws ({num_samples}), got {max_samples}")
        target_accept_prob = check_probability(target_accept_prob, "--target-accept")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"--out: {str(out)!r} already exists; choose another folder or pass --overwrite"
        )
    gate_columns = _gate_columns(gate_features, features, target)
    read_features = features
    if gate_columns is not None:
        header = _header(path) or []
        absent = [name for name in gate_columns if name not in header]
        if header and absent:
            raise ValueError(
                f"--gate-features: columns {absent} are not in {str(path)!r}; columns are {[h for h in header if h]}"
            )
        if features is not None:
            read_features = list(features) + [name for name in gate_columns if name not in features]
    data = read_csv(path, target=target, features=read_features, missing=missing, one_hot=one_hot)
    expert_index, gate_index = split_features(data.columns, data.levels, data.feature_names, gate_columns, features)
    if not expert_index:
        raise ValueError(
            "--gate-features: every feature column feeds the gate and none is left for the experts; name the "
            "experts' columns with --features"
        )
    expert_names = [data.feature_names[j] for j in expert_index]
    gate_names = None if gate_index is None else [data.feature_names[j] for j in gate_index]
    n, d = data.x.shape[0], len(expert_index)
    q = None if gate_index is None else len(gate_index)
    if nuts and max_samples is None:
        max_samples = default_max_draws(n, num_samples)
    notes = list(data.notes)
    supported = [k for k in candidates if n >= _rows_needed(k, d, q)[1]]
    if not auto and len(supported) < len(candidates):
        raise _too_few_rows(n, d, min(set(candidates) - set(supported)), q)
    if not supported:
        raise _too_few_rows(n, d, candidates[0], q)
    if len(supported) < len(candidates):
        left_out = [k for k in candidates if k not in supported]
        notes.append(
            f"--experts auto: k = {', '.join(map(str, left_out))} left out: too few rows ({n}) for them"
        )
    candidates = tuple(supported)
    standardised, x_mean, x_scale = _standardise(data.x, data.feature_names)
    x = standardised[:, expert_index]
    gate_x = None if gate_index is None else standardised[:, gate_index]
    y, y_mean, y_scale = _standardise(data.y[:, None], [data.target])
    y = y[:, 0]

    def say(message):
        if verbose:
            print(message, flush=True)

    for note in notes:
        say(note)
    say(f"read {n} rows, {d} feature{'' if d == 1 else 's'} from {path}")
    if gate_names is not None:
        say(f"the gate reads {', '.join(gate_names)}; the experts read {', '.join(expert_names)}")
    bars = progress_bars(verbose)
    key = jax.random.key(seed)
    fit_key, nuts_key, check_key = jax.random.split(key, 3)
    selection = None
    with output_folder(out, overwrite=overwrite) as staging:
        scale = 1.0 if auto_scale or widen else float(expert_prior_scale)
        options = {
            "key": fit_key,
            "link": link,
            "num_starts": num_starts,
            "num_finalists": num_finalists,
            "intercepts": True,
            "shared_noise": shared_noise,
            "priors": _expert_priors(scale),
            "family": family,
            "df": df,
            "gate_x": gate_x,
            "max_iterations": max_iterations,
            "progress_bar": bars,
            "design": design,
        }
        with column_names_in_warnings(expert_names):
            if len(candidates) == 1:
                fit = fit_moe(x, y, num_experts=candidates[0], **options)
            else:
                criterion = _resolved_criterion(criterion, n)
                say(f"comparing k = {', '.join(map(str, candidates))} experts by {criterion.upper()}")
                selection = numpyro_moe.select_num_experts(
                    x, y, num_experts=candidates, criterion=criterion, **options
                )
                fit = selection.fit
        k = fit.params.num_experts
        if selection is not None:
            say(format_selection(selection.table, int(selection.num_experts), criterion))
        scale_table = None
        if auto_scale and n <= AUTO_PRIOR_SCALE_ROWS:
            say(
                f"choosing the experts' prior sd among {list(AUTO_PRIOR_SCALES)} by 5-fold "
                f"cross-validation at k = {k}"
            )
            quiet = {name: value for name, value in options.items() if name not in ("key", "gate_x", "priors")}
            quiet["progress_bar"] = False
            with column_names_in_warnings(expert_names):
                scale, scale_table = _choose_prior_scale(
                    x, y, gate_x, fit_key, k, list(AUTO_PRIOR_SCALES), 5, {}, quiet
                )
                if scale != 1.0:  # the sd-1 fit above stands otherwise
                    fit = fit_moe(x, y, num_experts=k, **{**options, "priors": _expert_priors(scale)})
            say(format_scale_selection(scale_table, scale))
        # The default prior checks itself against the data (prior-data conflict, Evans and
        # Moshonov 2006): while a fitted coefficient lies beyond BINDING_PRIOR_SDS of it, the prior
        # is informative where it was meant to be weak, and it widens (refitting at the chosen k).
        # On data of at most AUTO_PRIOR_SCALE_ROWS rows a step is taken only when the wider prior
        # also predicts held-out rows better (5-fold cross-validation, the folds of --expert-prior-scale
        # auto): a coefficient beyond 2 sd is a sign of conflict, not a proof.
        widened, deviances, kept_despite = [], {}, None

        def deviance(value: float) -> float:
            if value not in deviances:
                quiet = {name: option for name, option in options.items() if name not in ("key", "gate_x", "priors")}
                with column_names_in_warnings(expert_names):
                    deviances[value] = _prior_scale_deviance(
                        x, y, gate_x, fit_key, k, value, 5, {}, {**quiet, "progress_bar": False}
                    )
            return deviances[value]

        while widen and scale < WIDER_PRIOR_SCALES[-1]:
            binding = _binding_coefficient(fit.params, scale, expert_names)
            if binding is None:
                break
            wider = next(value for value in WIDER_PRIOR_SCALES if value > scale)
            step = {"from": scale, "to": wider, "coefficient": binding[0], "value": binding[1]}
            if n <= AUTO_PRIOR_SCALE_ROWS:
                step["cv_deviance"] = {"from": deviance(scale), "to": deviance(wider)}
                if not deviance(wider) < deviance(scale):
                    say(
                        f"{binding[0]} coefficient is {binding[1]:.3g}, beyond {BINDING_PRIOR_SDS:g} sd of the "
                        f"experts' Normal(0, {scale:g}) prior, but Normal(0, {wider:g}) predicts held-out rows no "
                        f"better (5-fold cross-validated deviance {deviance(wider):.2f} against "
                        f"{deviance(scale):.2f}): keeping Normal(0, {scale:g})"
                    )
                    kept_despite = step
                    break
            widened.append(step)
            say(
                f"{binding[0]} coefficient is {binding[1]:.3g}, beyond {BINDING_PRIOR_SDS:g} sd of the experts' "
                f"Normal(0, {scale:g}) prior: refitting with Normal(0, {wider:g})"
            )
            scale = wider
            with column_names_in_warnings(expert_names):
                fit = fit_moe(x, y, num_experts=k, **{**options, "priors": _expert_priors(scale)})
        priors = _expert_priors(scale)
        accelerated = 0
        if not fit.converged:
            # Where experts overlap EM crawls and the cap stops it still climbing: the chosen fit
            # continues to convergence, SQUAREM-accelerated (`finish_em`), so the point fit and
            # NUTS's start are the posterior mode (the fits compared while choosing k are not).
            capped = int(fit.iterations)
            with column_names_in_warnings(expert_names):
                fit = finish_em(
                    x, y, fit, shared_noise=shared_noise, priors=priors, family=family, df=df, gate_x=gate_x
                )
            accelerated = int(fit.iterations) - capped
            say(
                f"EM stopped at its {max_iterations}-iteration cap before converging; SQUAREM-accelerated EM "
                f"continued the chosen fit: {'converged' if fit.converged else 'not converged'} after "
                f"{accelerated} more iterations"
            )
        params = fit.params
        say(f"fitted {k} {params.link.name} experts")
        save_result(staging / "fit.npz", fit)
        (staging / "parameters.csv").write_text(_parameter_table(params, expert_names, gate_names))
        model = {
            "format": FORMAT,
            "package": "numpyro-moe",
            "version": numpyro_moe.__version__,
            "data": str(path),
            "rows": n,
            "missing": missing,
            "notes": notes,
            "columns": data.columns,
            "one_hot": data.levels,
            "features": data.feature_names,
            "expert_features": expert_names,
            "gate_features": gate_names,
            "target": data.target,
            "standardization": {
                "feature_mean": x_mean.tolist(),
                "feature_scale": x_scale.tolist(),
                "target_mean": float(y_mean[0]),
                "target_scale": float(y_scale[0]),
            },
            "training_range": {
                "feature_min": data.x.min(axis=0).tolist(),
                "feature_max": data.x.max(axis=0).tolist(),
            },
            "num_experts": k,
            "link": params.link.name,
            "noise": family,
            "df": None if family == "normal" else ("estimated" if df is None else float(df)),
            "shared_noise": bool(shared_noise),
            "expert_prior_scale": scale,
            "expert_prior_scale_widened": widened or None,
            "expert_prior_scale_kept": kept_despite,
            "expert_prior_scale_selection": None
            if scale_table is None
            else {"method": "5-fold cross-validation", "table": scale_table},
            "intercepts": True,
            "seed": seed,
            "num_starts": num_starts,
            "num_finalists": num_finalists,
            "design": design,
            "fit": {
                "method": fit.method,
                "log_likelihood": _finite(fit.log_likelihood),
                "iterations": int(fit.iterations),
                "converged": bool(fit.converged),
                "accelerated_iterations": accelerated,
                "start": int(fit.start),
                "start_labels": list(fit.start_labels),
                "start_objectives": None
                if fit.start_objectives is None
                else [_finite(value) for value in fit.start_objectives],
                "tensor_gap": None if fit.tensor_gap is None else _finite(fit.tensor_gap),
            },
            "selection": None
            if selection is None
            else {
                "criterion": criterion,
                "candidates": list(candidates),
                "chosen": int(selection.num_experts),
                "table": [_selection_row(row) for row in selection.table],
            },
            "nuts": None,
        }
        (staging / "model.json").write_text(json.dumps(model, indent=2) + "\n")
        noise = "one noise sd" if shared_noise else "a noise sd per expert"
        if family != "normal":
            noise = f"Student-t experts ({'estimated' if df is None else df} degrees of freedom), {noise}"
        summary = [
            f"data: {path} ({n} rows, features {data.feature_names}, target {data.target!r}), standardised",
            *notes,
            f"model: {k} experts, link {params.link.name}, {noise}, expert and gate intercepts"
            + ("" if gate_names is None else f"; experts on {expert_names}, gate on {gate_names}")
            + f"; experts' prior Normal(0, {scale:g})"
            + (" (chosen by cross-validation)" if scale_table is not None else "")
            + (
                f" (widened from Normal(0, 1): {widened[0]['coefficient']} coefficient was {widened[0]['value']:.3g})"
                if widened else ""
            )
            + (
                f" (kept: Normal(0, {kept_despite['to']:g}) predicted held-out rows no better, 5-fold "
                f"cross-validated deviance {kept_despite['cv_deviance']['to']:.2f} against "
                f"{kept_despite['cv_deviance']['from']:.2f})"
                if kept_despite is not None else ""
            ),
            (
                f"fit: {num_starts} EM starts"
                + ("" if num_finalists is None else f", the best {num_finalists} after a short EM continued")
                + f" ({', '.join(fit.start_labels)}); start {fit.start} "
                f"({fit.start_labels[fit.start]}) won; mean log-likelihood per point {fit.log_likelihood:.4f}; "
                f"EM iterations {fit.iterations}"
                + (f" (the last {accelerated} SQUAREM-accelerated, after the {max_iterations}-iteration cap)"
                   if accelerated else "")
                + f", converged {fit.converged}"
                + _tensor_note(fit)
            ),
        ]
        # Given sds are the user's: the note says when one holds a coefficient back (as the default's
        # widest may still).
        binding = None if auto_scale or kept_despite is not None else _binding_prior_note(params, scale, expert_names)
        if binding is not None:
            summary.append(binding)
        summary_table = None
        if selection is not None:
            summary_table = format_selection(selection.table, int(selection.num_experts), criterion)
            summary.append(summary_table)
        if scale_table is not None:
            summary.append(format_scale_selection(scale_table, scale))
        if gate_x is None:
            plot_gates(params, x, expert_names, staging / "gate_probabilities.png")
        else:
            plot_gates(params, gate_x, gate_names, staging / "gate_probabilities.png")
        if nuts:
            import arviz as az  # only here: its import alone takes seconds

            say(
                f"NUTS: {num_chains} chains x ({num_warmup} warmup + {num_samples} draws, more up to {max_samples} "
                "while the chains disagree)"
            )
            with column_names_in_warnings(expert_names):
                result = run_nuts(
                    x,
                    y,
                    fit,
                    key=nuts_key,
                    shared_noise=shared_noise,
                    priors=priors,
                    family=family,
                    df=df,
                    gate_x=gate_x,
                    num_chains=num_chains,
                    num_warmup=num_warmup,
                    num_samples=num_samples,
                    max_samples=max_samples,
                    target_accept_prob=target_accept_prob,
                    progress_bar=bars,
                )
            datatree = result.datatree
            datatree.to_netcdf(staging / "posterior.nc", engine="h5netcdf")
            model["nuts"] = {
                "chains": num_chains,
                "warmup": num_warmup,
                "draws": num_samples,
                "target_accept_prob": target_accept_prob,
                **{name: _finite(value) for name, value in result.diagnostics.items()},
            }
            (staging / "model.json").write_text(json.dumps(model, indent=2) + "\n")
            table = az.summary(datatree)
            table.to_csv(staging / "summary.csv")
            summary.append(_nuts_line(result.diagnostics, num_chains, num_warmup))
            summary.append("posterior summary (az.summary):\n" + table.to_string())
            plot_trace(datatree, staging / "trace.png")
            save_plot(az.plot_ppc_dist(datatree, backend="matplotlib"), staging / "ppc.png")
        else:
            # A plug-in predictive check: replicated y drawn from the point estimate, 50 draws in
            # one call, on at most PPC_ROWS rows evenly spread (a histogram of more shows nothing
            # more, and 50 draws of every row would hold 50 x n x k numbers at once).
            rows = np.linspace(0, n - 1, min(n, PPC_ROWS)).astype(int)
            draws = sample_response(
                params, x[rows], key=check_key, gate_x=None if gate_x is None else gate_x[rows], num_draws=50
            )
            plot_predictive_check(np.asarray(y)[rows], np.asarray(draws), staging / "ppc.png")
            summary.append("parameters (standardised units): see parameters.csv")
        (staging / "summary.txt").write_text("\n".join(summary) + "\n")
    # The data line, the notes and the selection table were said on the way.
    say("\n".join(line for line in summary[1 + len(notes) :] if line != summary_table))
    say(f"outputs written to {out}/")
    return out
