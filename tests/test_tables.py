"""Reading CSV files as users have them (`numpyro_moe.apps.tables`): row names, missing values, text
columns and one-hot encoding, new data for prediction; the command line's small helpers
(`numpyro_moe.apps.messages`, ``--experts`` parsing). No fits here: everything is fast."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from numpyro_moe import ReliabilityWarning
from numpyro_moe.apps import cli, csv_workflow, tables
from numpyro_moe.apps.cli import parse_experts
from numpyro_moe.apps.messages import column_names_in_warnings, short_warnings
from numpyro_moe.apps.tables import MISSING_VALUES, read_csv, read_new_csv


def _write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Row names


def test_r_write_csv_row_names_are_dropped_with_a_note(tmp_path):
    # R: write.csv(data.frame(a = c(1.5, 2, 3), y = c(4, 5, 6)), "d.csv") quotes everything and
    # writes the row names under an empty header cell.
    path = _write(tmp_path / "d.csv", '"","a","y"\n"1",1.5,4\n"2",2,5\n"3",3,6\n')
    data = read_csv(path, target="y")
    assert data.feature_names == ["a"] and data.columns == ["a"]
    np.testing.assert_array_equal(data.x[:, 0], [1.5, 2, 3])
    np.testing.assert_array_equal(data.y, [4, 5, 6])
    assert len(data.notes) == 1 and "row names" in data.notes[0] and "R's write.csv" in data.notes[0]
    # Row names that are text (R's rownames(mtcars)) are dropped the same way.
    path = _write(tmp_path / "cars.csv", '"","mpg","cyl"\n"Mazda RX4",21,6\n"Datsun 710",22.8,4\n')
    assert read_csv(path, target="mpg").feature_names == ["cyl"]


def test_r_write_table_row_names_are_dropped(tmp_path):
    # R's write.table(sep=","): no header cell above the row names, so every row has one field more.
    path = _write(tmp_path / "d.csv", '"a","y"\n"1",1.5,4\n"2",2,5\n')
    data = read_csv(path, target="y")
    assert data.feature_names == ["a"]
    np.testing.assert_array_equal(data.x[:, 0], [1.5, 2])
    assert "one field more than the header" in data.notes[0]


@pytest.mark.parametrize("name", ["Unnamed: 0", "index", "rownames", "row.names"])
@pytest.mark.parametrize("start", [0, 1])
def test_an_index_column_of_row_numbers_is_dropped(tmp_path, name, start):
    rows = "".join(f"{i + start},{0.5 * i},{i % 3}\n" for i in range(6))
    data = read_csv(_write(tmp_path / "d.csv", f"{name},a,y\n{rows}"), target="y")
    assert data.feature_names == ["a"]
    assert f"first column {name!r} holds the row numbers" in data.notes[0]


def test_an_index_named_column_is_kept_when_it_is_not_row_numbers_or_is_asked_for(tmp_path):
    # Not 1..n: a feature that happens to be called "index".
    data = read_csv(_write(tmp_path / "d.csv", "index,a,y\n3,1,2\n1,2,3\n2,3,5\n"), target="y")
    assert data.feature_names == ["index", "a"] and data.notes == []
    # Row numbers, but named in --features: kept.
    path = _write(tmp_path / "e.csv", "index,a,y\n1,1,2\n2,2,3\n3,3,5\n")
    assert read_csv(path, target="y", features=["index", "a"]).feature_names == ["index", "a"]
    # A column "x" of 1..n is an ordinary feature.
    path = _write(tmp_path / "f.csv", "x,y\n1,2\n2,3\n3,5\n")
    assert read_csv(path, target="y").feature_names == ["x"]


def test_excel_byte_order_mark_and_semicolons(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffa,y\n1,2\n3,4\n".encode())
    assert read_csv(path, target="y").feature_names == ["a"]
    path = _write(tmp_path / "semi.csv", "a;y\n1;2\n3;4\n")
    with pytest.raises(ValueError, match=r"^DATA: .* single column 'a;y'.*separated by semicolons.*commas"):
        read_csv(path, target="y")
    path = _write(tmp_path / "blank.csv", "a,,y\n1,2,3\n")
    with pytest.raises(ValueError, match=r"^DATA: .* has columns without a name \(numbers \[2\]\)"):
        read_csv(path, target="y")


# ---------------------------------------------------------------------------------------------
# Missing values


def test_missing_values_are_refused_naming_columns_rows_lines_and_the_flag(tmp_path):
    text = "a,b,y\n1,2,3\n4,NA,6\n7,8,\n\n10,?,12\n13,14,15\n"
    with pytest.raises(ValueError) as info:
        read_csv(_write(tmp_path / "d.csv", text), target="y")
    assert str(info.value) == (
        "DATA: 3 of 5 rows have missing values (columns 'b': 2 rows, 'y': 1 row; lines 3, 4, 6); "
        "pass --missing drop to leave those rows out"
    )


def test_missing_drop_leaves_the_rows_out_with_a_note(tmp_path):
    text = "a,b,y\n1,2,3\n4,NA,6\n7,8,nan\n10,11,12\n13,14,15\n"
    data = read_csv(_write(tmp_path / "d.csv", text), target="y", missing="drop")
    np.testing.assert_array_equal(data.x, [[1, 2], [10, 11], [13, 14]])
    np.testing.assert_array_equal(data.y, [3, 12, 15])
    np.testing.assert_array_equal(data.lines, [2, 5, 6])
    assert data.notes == [
        "DATA: 2 of 5 rows have missing values (columns 'b': 1 row, 'y': 1 row; lines 3, 4): left out (--missing drop)"
    ]
    # A missing value in a column that is not used is no concern.
    data = read_csv(_write(tmp_path / "e.csv", "a,b,y\n1,NA,3\n4,5,6\n"), target="y", features=["a"])
    np.testing.assert_array_equal(data.x[:, 0], [1, 4])
    with pytest.raises(ValueError, match=r"^DATA: 2 of 2 rows have missing values .*: no rows are left"):
        read_csv(_write(tmp_path / "f.csv", "a,y\nNA,1\n2,NA\n"), target="y", missing="drop")
    with pytest.raises(ValueError, match=r"^--missing: expected one of \['error', 'drop'\], got 'skip'"):
        read_csv(_write(tmp_path / "g.csv", "a,y\n1,2\n"), target="y", missing="skip")


def test_every_documented_missing_token_is_missing_in_any_case(tmp_path):
    tokens = [*MISSING_VALUES, "nan", "na", "null", " NA ", "n/a", "none", "#n/a"]
    rows = "".join(f"{i},{token},{i}\n" for i, token in enumerate(tokens))
    data = read_csv(_write(tmp_path / "d.csv", "a,b,y\n" + rows + "99,1,2\n"), target="y", missing="drop")
    np.testing.assert_array_equal(data.x, [[99, 1]])
    # Infinities are not missing: they are refused as before.
    with pytest.raises(ValueError, match=r"^column 'b': line 2 holds 'inf'; expected a finite number"):
        read_csv(_write(tmp_path / "e.csv", "a,b,y\n1,inf,2\n"), target="y", missing="drop")


# ---------------------------------------------------------------------------------------------
# Text columns and one-hot encoding

COLORS = "color,a,shape,y\nred,1,box,1.5\nblue,2,ball,2.5\nred,3,box,3.5\ngreen,4,box,4.5\n"


def test_text_columns_are_refused_naming_them_and_the_flag(tmp_path):
    path = _write(tmp_path / "d.csv", COLORS)
    with pytest.raises(ValueError) as info:
        read_csv(path, target="y")
    assert str(info.value) == (
        "DATA: columns ['color', 'shape'] hold text, not numbers ('red' on line 2); pass --one-hot color,shape "
        "(or --one-hot all) to encode them as 0/1 indicator columns, or leave them out with --features"
    )
    # Leaving them out works.
    assert read_csv(path, target="y", features=["a"]).feature_names == ["a"]
    # Encoding one of them is not enough.
    with pytest.raises(ValueError, match=r"^DATA: columns \['shape'\] hold text.*--one-hot shape "):
        read_csv(path, target="y", one_hot=["color"])


def test_one_hot_drops_the_first_level_and_records_the_levels(tmp_path):
    path = _write(tmp_path / "d.csv", COLORS)
    data = read_csv(path, target="y", one_hot="all")
    # Columns keep their place; levels are sorted, the first (blue, ball) is the reference.
    assert data.feature_names == ["color=green", "color=red", "a", "shape=box"]
    assert data.columns == ["color", "a", "shape"]
    assert data.levels == {"color": ["blue", "green", "red"], "shape": ["ball", "box"]}
    np.testing.assert_array_equal(data.x, [[0, 1, 1, 1], [0, 0, 2, 0], [0, 1, 3, 1], [1, 0, 4, 1]])
    assert read_csv(path, target="y", one_hot=["color", "shape"]).levels == data.levels
    # A numeric code column can be one-hot encoded on request; its levels sort by value.
    codes = _write(tmp_path / "codes.csv", "grade,y\n10,1\n9,2\n10,3\n2,4\n")
    data = read_csv(codes, target="y", one_hot=["grade"])
    assert data.levels == {"grade": ["2", "9", "10"]} and data.feature_names == ["grade=9", "grade=10"]


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        (COLORS, {"one_hot": ["size"]}, r"^--one-hot: columns \['size'\] are not among the features"),
        (COLORS, {"one_hot": ["y"]}, r"^--one-hot: 'y' is the target; the response must be numeric"),
        ("a,y\nx,1\nx,2\n", {"one_hot": "all"}, r"^--one-hot: column 'a' has the one level 'x'"),
        ("a,y\n1,low\n2,high\n", {}, r"^--target: column 'y' holds text, not numbers \('low' on line 2\)"),
        # A few bad cells in a numeric column: the first is named, with both ways out.
        ("a,b,y\n1,2,3\n4,abc,6\n", {},
         (r"^column 'b': line 3 holds 'abc', which is not numeric; correct it, write NA if it is missing, or "
          r"pass --one-hot b if the column is categorical")),
        ("a,y\n1,2\n3,x\n", {},
         r"^column 'y': line 3 holds 'x', which is not numeric; correct it, write NA if it is missing$"),
        ("a,a=v,y\nu,1,2\nv,2,3\n", {"one_hot": "all"}, r"^--one-hot: the indicator columns \['a=v'\] clash"),
    ],
)
def test_text_errors(tmp_path, text, kwargs, match):
    with pytest.raises(ValueError, match=match):
        read_csv(_write(tmp_path / "d.csv", text), target="y", **kwargs)


# ---------------------------------------------------------------------------------------------
# New data for prediction

MODEL = {"columns": ["color", "a"], "levels": {"color": ["blue", "green", "red"]}, "target": "y"}


def test_new_data_are_encoded_as_in_training(tmp_path):
    # Another column order, an extra column, R's row names, no target.
    path = _write(tmp_path / "new.csv", '"","extra","a","color"\n"1","x",5,"red"\n"2","y",6,"blue"\n')
    new = read_new_csv(path, **MODEL)
    np.testing.assert_array_equal(new.x, [[0, 1, 5], [0, 0, 6]])
    assert new.y is None and new.complete.all()
    np.testing.assert_array_equal(new.lines, [2, 3])
    assert "row names" in new.notes[0]
    # With the target: read, missing target cells are NaN and no error.
    path = _write(tmp_path / "scored.csv", "a,color,y\n5,green,1.5\n6,blue,NA\n")
    new = read_new_csv(path, **MODEL)
    np.testing.assert_array_equal(new.x, [[1, 0, 5], [0, 0, 6]])
    np.testing.assert_array_equal(new.y, [1.5, np.nan])


def test_new_data_errors(tmp_path):
    path = _write(tmp_path / "a.csv", "a,y\n1,2\n")
    with pytest.raises(ValueError, match=r"^NEW.csv: .* lacks the columns \['color'\] that the model needs \(it was "
                                         r"fitted on \['color', 'a'\]\); columns are \['a', 'y'\]"):
        read_new_csv(path, **MODEL)
    path = _write(tmp_path / "b.csv", "a,color\n1,red\n2,purple\n3,teal\n4,purple\n")
    with pytest.raises(ValueError) as info:
        read_new_csv(path, **MODEL)
    assert str(info.value) == (
        "column 'color': 3 rows hold levels not seen in training ['purple', 'teal'] (lines 3, 4, 5); the model "
        "knows ['blue', 'green', 'red'] and cannot predict for others"
    )
    path = _write(tmp_path / "c.csv", "a,color\n1,red\nlots,red\n")
    with pytest.raises(ValueError, match=r"^column 'a': line 3 holds 'lots', which is not numeric; the model was "
                                         "fitted on it as a number"):
        read_new_csv(path, **MODEL)
    path = _write(tmp_path / "d.csv", "a,color,y\n1,red,high\n")
    with pytest.raises(ValueError, match=r"^column 'y' \(the target\): line 2 holds 'high'"):
        read_new_csv(path, **MODEL)
    path = _write(tmp_path / "e.csv", "a,color\n1,red\n")
    with pytest.raises(FileNotFoundError, match=r"^NEW.csv: no such file"):
        read_new_csv(tmp_path / "none.csv", **MODEL)


def test_new_data_missing_values(tmp_path):
    path = _write(tmp_path / "m.csv", "a,color\n1,red\nNA,red\n3,\n4,blue\n")
    with pytest.raises(ValueError) as info:
        read_new_csv(path, **MODEL)
    assert str(info.value) == (
        "NEW.csv: 2 of 4 rows have missing values (columns 'a': 1 row, 'color': 1 row; lines 3, 4); pass "
        "--missing drop to leave their predictions empty"
    )
    new = read_new_csv(path, **MODEL, missing="drop")
    np.testing.assert_array_equal(new.complete, [True, False, False, True])
    np.testing.assert_array_equal(new.x[[0, 3]], [[0, 1, 1], [0, 0, 4]])
    assert np.isnan(new.x[[1, 2]]).all()
    assert "their predictions are left empty" in new.notes[0]


# ---------------------------------------------------------------------------------------------
# Plain numbers: read at once


NUMERIC = [
    "a,b,y\n1.5,2,3\n-4e-3,+5,6.25\n7,8,9\n",
    "\ufeffa, b ,y\r\n 1.5 ,2,3\r\n-4e-3,5,6.25\r\n7,8,9",  # a byte-order mark, CRLF, spaces, no last newline
    'a,"b",y\n1.5,2,3\n-4e-3,5,6.25\n7,8,9\n',  # a quoted name (R's write.csv without row names)
]


def _general_path(monkeypatch):
    """Reading cell by cell, whatever the file."""
    monkeypatch.setattr(tables, "_numeric_table", lambda text, keep: None)


@pytest.mark.parametrize("text", NUMERIC)
def test_a_file_of_numbers_is_read_at_once_as_cell_by_cell(tmp_path, monkeypatch, text):
    path = tmp_path / "d.csv"
    path.write_bytes(text.encode())
    with open(path, encoding="utf-8-sig", newline="") as handle:
        assert tables._numeric_table(handle.read(), set()) is not None  # the fast path reads it
    fast = read_csv(path, target="y", one_hot=["b"])
    new_fast = read_new_csv(path, columns=["a", "b"], target="y", levels=fast.levels)
    _general_path(monkeypatch)
    general = read_csv(path, target="y", one_hot=["b"])
    new_general = read_new_csv(path, columns=["a", "b"], target="y", levels=general.levels)
    np.testing.assert_array_equal(fast.x, general.x)
    np.testing.assert_array_equal(fast.y, general.y)
    np.testing.assert_array_equal(fast.lines, general.lines)
    # The one-hot levels are the cells' text ("+5" stays "+5"), as the general path has them.
    assert fast.levels == general.levels and fast.feature_names == general.feature_names
    assert fast.notes == general.notes == []
    np.testing.assert_array_equal(new_fast.x, new_general.x)
    np.testing.assert_array_equal(new_fast.y, new_general.y)


@pytest.mark.parametrize(
    "text",
    [
        "a,y\n1,2\n\n3,4\n",  # a blank line: the file's line numbers differ from the rows'
        "a,y\n1,2\nNA,4\n",  # a missing value
        "a,y\n1,2\ninf,4\n",  # not finite
        'a,y\n"1",2\n3,4\n',  # a quoted cell
        ",a,y\n1,1,2\n2,3,4\n",  # row names
        "index,a,y\n1,1,2\n2,3,4\n",  # an index-named first column
        "a,y\n1,2,3\n3,4,5\n",  # a field more than the header
        "a,a,y\n1,2,3\n",  # a repeated name
        "a,y\n",  # no data rows
    ],
)
def test_anything_but_plain_numbers_takes_the_general_path(text):
    assert tables._numeric_table(text, set()) is None


def test_a_blank_line_keeps_the_files_line_numbers_in_messages(tmp_path):
    path = _write(tmp_path / "d.csv", "a,y\n1,2\n\n3,4\nNA,5\n")
    with pytest.raises(ValueError, match=r"line 5\b"):
        read_csv(path, target="y")
    np.testing.assert_array_equal(read_csv(path, target="y", missing="drop").lines, [2, 4])


# ---------------------------------------------------------------------------------------------
# Command-line helpers


def test_the_cli_choices_are_the_modules():
    assert cli.MISSING_POLICIES == tables.MISSING_POLICIES
    assert cli.CRITERIA == csv_workflow.CRITERIA


@pytest.mark.parametrize(
    ("text", "expected"),
    [("auto", "auto"), ("3", 3), ("1-3", (1, 2, 3)), ("2-2", (2,)), ("4,2", (4, 2)), (" 2 ", 2), ("0", 0),
     ("-1", -1)],
)
def test_parse_experts(text, expected):
    # 0 and -1 pass here and are refused by fit_csv with its "--experts: expected an integer >= 1".
    assert parse_experts(text) == expected


@pytest.mark.parametrize("text", ["two", "1-", "3-1", "0-2", "1,a", "1-2-3"])
def test_parse_experts_refuses(text):
    with pytest.raises(ValueError, match=r"^--experts: expected auto, K, A-B or K1,K2,\.\.\."):
        parse_experts(text)


def test_warnings_name_columns_by_their_names():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with column_names_in_warnings(["age", "dose", "weight"]):
            warnings.warn("x: 2 of 3 columns look non-Gaussian (column 2: skewness 3.1)", ReliabilityWarning)
            warnings.warn("column 7 is not there", UserWarning)
            warnings.warn("k=2: num_experts: BIC chose k=2, the largest tried", ReliabilityWarning)
            warnings.warn("EM hit max_iterations=500 ...: raise max_iterations", ReliabilityWarning)
            warnings.warn("NUTS: max r_hat 1.1: run longer (max_samples), or set my_max_samples_x", ReliabilityWarning)
    assert [str(w.message) for w in caught] == [
        "x: 2 of 3 columns look non-Gaussian (column 'weight': skewness 3.1)",
        "column 7 is not there",
        "k=2: --experts: BIC chose k=2, the largest tried",
        # Advice that names an argument names the command's flag for it (whole words only).
        "EM hit --max-iterations=500 ...: raise --max-iterations",
        "NUTS: max r_hat 1.1: run longer (--max-draws), or set my_max_samples_x",
    ]
    assert caught[0].category is ReliabilityWarning and caught[1].category is UserWarning


def test_short_warnings(capsys):
    with short_warnings("fit", quiet=False):
        for _ in range(2):
            warnings.warn("EM hit max_iterations", ReliabilityWarning)
        warnings.warn("a user warning", UserWarning)
        warnings.warn("old API", DeprecationWarning)
    assert capsys.readouterr().err == (
        "numpyro-moe fit: warning: EM hit max_iterations\nnumpyro-moe fit: warning: a user warning\n"
    )
    with short_warnings("predict", quiet=True):
        warnings.warn("EM hit max_iterations", ReliabilityWarning)
        warnings.warn("a user warning", UserWarning)
    assert capsys.readouterr().err == "numpyro-moe predict: warning: EM hit max_iterations\n"
