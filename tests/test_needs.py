"""tests/needs.py: a need of the dev install that is missing fails in CI and skips elsewhere."""

import pytest

from tests.needs import require, require_path


@pytest.mark.parametrize("ci,outcome", [("true", pytest.fail.Exception),
                                        ("", pytest.skip.Exception)])
def test_a_missing_module_or_file_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci,
                                                                  outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no_such_module_of_lamp_jax"):
        require("no_such_module_of_lamp_jax")
    with pytest.raises(outcome, match="the data file not found"):
        require_path(tmp_path / "absent.txt", "the data file")


def test_what_is_there_is_returned(tmp_path):
    assert require("json").dumps([1]) == "[1]"
    (tmp_path / "present.txt").write_text("x")
    assert require_path(tmp_path / "present.txt", "a file") == tmp_path / "present.txt"
