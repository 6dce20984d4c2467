"""Settings from the environment: malformed values name their variable, risky ones warn."""

import pytest

from tokenforge.config import Settings


def test_defaults_give_no_warning():
    assert Settings.from_env({}).warnings() == []


def test_a_hold_cap_shorter_than_the_deadline_plus_a_minute_warns_with_both_figures():
    settings = Settings.from_env({"TF_HOLD_TTL_MAX_S": "150", "TF_REQUEST_DEADLINE_S": "120"})
    [warning] = settings.warnings()
    assert warning.startswith("TF_HOLD_TTL_MAX_S (150 s) is shorter than TF_REQUEST_DEADLINE_S + 60 s (180 s)")
    assert "uncollected" in warning
    assert Settings.from_env({"TF_HOLD_TTL_MAX_S": "180", "TF_REQUEST_DEADLINE_S": "120"}).warnings() == []


@pytest.mark.parametrize(("name", "value", "says"), [
    ("TF_HOLD_TTL_S", "ten", "TF_HOLD_TTL_S must be an integer, got 'ten'"),
    ("TF_REQUEST_DEADLINE_S", "2m", "TF_REQUEST_DEADLINE_S must be a number, got '2m'"),
])
def test_a_malformed_value_names_its_variable(name, value, says):
    with pytest.raises(SystemExit) as exc:
        Settings.from_env({name: value})
    assert str(exc.value) == says
