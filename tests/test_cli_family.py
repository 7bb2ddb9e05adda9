"""`numpyro-moe fit --family student_t` end to end: the fit folder records the family and the
degrees of freedom, and `numpyro-moe predict` uses them."""

import json

import numpy as np
import pytest

from numpyro_moe.apps.cli import main
from numpyro_moe.io import load_result


@pytest.fixture(scope="module")
def outlier_csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 300
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    first = rng.random(n) < 1 / (1 + np.exp(-2 * x2))
    y = np.where(first, 1.0 + 2 * x1, -1.0 - x1) + 0.2 * rng.normal(size=n)
    gross = rng.random(n) < 0.05
    y[gross] += rng.choice([-1, 1], gross.sum()) * rng.uniform(8, 15, gross.sum())
    path = tmp_path_factory.mktemp("family") / "outliers.csv"
    np.savetxt(path, np.column_stack([x1, x2, y]), delimiter=",", header="x1,x2,y", comments="")
    return path


def test_student_t_experts_from_the_command_line(outlier_csv, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["fit", str(outlier_csv), "--target", "y", "--experts", "2", "--family", "student_t",
                 "--df", "4", "--starts", "2", "--out", str(out), "--quiet"]) == 0
    model = json.loads((out / "model.json").read_text())
    assert (model["noise"], model["df"]) == ("student_t", 4.0)
    fit = load_result(out / "fit.npz")
    np.testing.assert_array_equal(fit.params.df, [4.0, 4.0])
    assert (out / "parameters.csv").read_text().splitlines()[-1] == "df,4,4"
    predictions = tmp_path / "predictions.csv"
    assert main(["predict", str(out), str(outlier_csv), "--out", str(predictions), "--quiet"]) == 0
    table = np.genfromtxt(predictions, delimiter=",", names=True)
    assert np.isfinite(table["log_density"]).all() and len(table) == 300


@pytest.mark.parametrize("value", ["0", "-1", "many", "inf"])
def test_a_bad_df_names_the_flag(outlier_csv, tmp_path, capsys, value):
    assert main(["fit", str(outlier_csv), "--target", "y", "--experts", "2", "--family", "student_t",
                 "--df", value, "--out", str(tmp_path / "fit")]) == 2
    assert "--df: expected a positive number or auto" in capsys.readouterr().err
