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
    ("TF_REQUEST_DEADLINE_S", "-1", "TF_REQUEST_DEADLINE_S must be more than 0, got -1"),
    ("TF_REQUEST_DEADLINE_S", "0", "TF_REQUEST_DEADLINE_S must be more than 0, got 0"),
    ("TF_REQUEST_DEADLINE_S", "nan", "TF_REQUEST_DEADLINE_S must be a finite number, got 'nan'"),
    ("TF_HOLD_TTL_S", "0", "TF_HOLD_TTL_S must be at least 1, got 0"),
    ("TF_EDGE_PORT", "70000", "TF_EDGE_PORT must be from 0 to 65535, got 70000"),
    ("TF_DB_POOL_SIZE", "0", "TF_DB_POOL_SIZE must be at least 1, got 0"),
    ("TF_KEY_CACHE_TTL_S", "-0.5", "TF_KEY_CACHE_TTL_S must be at least 0, got -0.5"),
    ("TF_MAX_BODY_BYTES", "10", "TF_MAX_BODY_BYTES must be at least 1024, got 10"),
])
def test_a_malformed_or_out_of_range_value_names_its_variable_and_range(name, value, says):
    with pytest.raises(SystemExit) as exc:
        Settings.from_env({name: value})
    assert str(exc.value) == says


def test_edge_values_in_range_are_taken():
    s = Settings.from_env({"TF_KEY_CACHE_TTL_S": "0", "TF_REQUEST_DEADLINE_S": "0.5", "TF_EDGE_PORT": "65535"})
    assert (s.key_cache_ttl_s, s.request_deadline_s, s.edge_port) == (0.0, 0.5, 65535)
