"""The catalog behind the price book: a bad one stops start-up naming file, entry and field."""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tokenforge.catalog import CatalogError, bundled_catalog_path, load_catalog
from tokenforge.config import Settings
from tokenforge.metering import core, server
from tokenforge.money import Bucket

GOOD = {
    "channels": [
        {"id": "cheap-a", "route": "routed", "base_url": "http://127.0.0.1:9101/v1",
         "api_key_env": "CHEAP_A_KEY", "timeout_s": 20, "retries": 1},
        {"id": "openai-direct", "route": "direct", "base_url": "http://127.0.0.1:9101/v1",
         "api_key_env": "OPENAI_DIRECT_KEY"},
    ],
    "models": [
        {"name": "gpt-4o-mini", "channels": [
            {"channel": "cheap-a", "upstream_model": "gpt-4o-mini-compat",
             "price": {"input": "1.20", "output": "4.80", "cached_input": "0.60"}},
            {"channel": "openai-direct", "upstream_model": "gpt-4o-mini",
             "price": {"input": "0.15", "output": "0.60"}},
        ]},
    ],
}


def write(tmp_path: pathlib.Path, data: object) -> str:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def mutate(fn: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    fn(data)
    return data


def test_good_catalog_builds_a_price_book(tmp_path: pathlib.Path) -> None:
    book = core.PriceBook(load_catalog(write(tmp_path, GOOD)))
    mc = book.entry("gpt-4o-mini", "cheap-a")
    assert (mc.price.input, mc.price.output, mc.price.cached_input) == (1_200_000_000, 4_800_000_000, 600_000_000)
    assert book.entry("gpt-4o-mini", "openai-direct").channel.bucket is Bucket.CREDIT


def test_bundled_catalog_loads_for_metering_without_the_sim_url() -> None:
    book = server.load_price_book(Settings.from_env({}))
    assert book.catalog.source == str(bundled_catalog_path())
    assert {"gpt-4o-mini", "gpt-4o"} <= set(book.catalog.models)


@pytest.mark.parametrize(
    "change, entry, field",
    [
        (lambda d: d["models"][0]["channels"][0].update(channel="nope"),
         "model 'gpt-4o-mini', channels[0]", "field `channel`: unknown channel 'nope'"),
        (lambda d: d["channels"].append(dict(d["channels"][0])),
         "channel 'cheap-a'", "field `id`: duplicate channel id"),
        (lambda d: d["models"][0]["channels"][1]["price"].update(output="-0.60"),
         "model 'gpt-4o-mini', channels[1]", "field `price.output`: '-0.60' is negative"),
        (lambda d: d["models"][0]["channels"][0]["price"].pop("input"),
         "model 'gpt-4o-mini', channels[0]", "field `price.input`: missing"),
        (lambda d: d["channels"][1].pop("route"),
         "channel 'openai-direct'", "field `route`: missing"),
        (lambda d: d["models"][0]["channels"][0].pop("upstream_model"),
         "model 'gpt-4o-mini', channels[0]", "field `upstream_model`: missing"),
        (lambda d: d["models"][0]["channels"][0]["price"].update(input=1.2),
         "model 'gpt-4o-mini', channels[0]", "field `price.input`: write prices as quoted decimal strings"),
        (lambda d: d["channels"][0].update(retires=2),
         "channel 'cheap-a'", "field `retires`: unknown field (did you mean `retries`?)"),
        (lambda d: d["channels"][1].update(api_key="sk-live-123"),
         "channel 'openai-direct'", "field `api_key`: credentials never go in the catalog; put the key in an "
                                    "environment variable and name that variable in `api_key_env`"),
        (lambda d: d["models"][0].update(max_tokens=100),
         "model 'gpt-4o-mini'", "field `max_tokens`: unknown field (did you mean `max_output_tokens`?)"),
        (lambda d: d["models"][0]["channels"][0].update(upstream="x"),
         "model 'gpt-4o-mini', channels[0]", "field `upstream`: unknown field (did you mean `upstream_model`?)"),
        (lambda d: d["models"][0]["channels"][0]["price"].update(cache_input="0.30"),
         "model 'gpt-4o-mini', channels[0]", "field `price.cache_input`: unknown field (did you mean `price.cached_input`?)"),
        (lambda d: d.update(modles=[]),
         "top level", "field `modles`: unknown field (did you mean `models`?)"),
        (lambda d: d["channels"][0].update(weight=3),
         "channel 'cheap-a'", "field `weight`: unknown field; known fields: id, route, base_url, api_key_env, timeout_s, retries"),
        (lambda d: d.update(models=[]),
         "top level", "field `models`: needs at least one model"),
    ],
    ids=["unknown-channel", "duplicate-id", "negative-price", "missing-price", "missing-route",
         "missing-upstream-model", "float-price", "misspelt-retries", "inline-secret", "misspelt-model-field",
         "misspelt-entry-field", "misspelt-price-field", "misspelt-top-level", "unknown-field", "no-models"],
)
def test_bad_catalog_names_file_entry_and_field(
    tmp_path: pathlib.Path, change: Callable[[dict[str, Any]], object], entry: str, field: str
) -> None:
    path = write(tmp_path, mutate(change))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {entry}: "), message
    assert field in message


def test_metering_refuses_to_start_on_a_bad_catalog(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, mutate(lambda d: d["channels"].append(dict(d["channels"][0]))))
    settings = Settings.from_env({"TF_CATALOG": path, "TF_METERING_ADDR": "127.0.0.1:1"})
    assert server.run(settings) == 2
    assert "duplicate channel id" in capsys.readouterr().out
