"""The catalog file (SPEC §3): channels and the models they serve, validated at start.

A bad catalog stops start-up with a message naming the file, the entry and the field.
`${VAR}` in a `base_url` is replaced from the environment (the bundled demo catalog points at
the simulator that `tokenforge up` starts on a free port through `${TF_SIM_URL}`).
"""

from __future__ import annotations

import difflib
import os
import pathlib
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from tokenforge.money import Bucket, MoneyError, parse_amount_nano

ROUTES = ("routed", "direct")
DEFAULT_OUTPUT_CAP_TOKENS = 4096
MAX_RETRIES = 10
MAX_TIMEOUT_S = 600
# The fields each entry may have (SPEC §3); anything else is refused, with a suggestion.
TOP_FIELDS = ("channels", "models")
CHANNEL_FIELDS = ("id", "route", "base_url", "api_key_env", "timeout_s", "retries")
MODEL_FIELDS = ("name", "channels", "max_output_tokens", "encoding")
ENTRY_FIELDS = ("channel", "upstream_model", "price")
PRICE_FIELDS = ("input", "output", "cached_input")
SECRET_FIELDS = frozenset({"api_key", "apikey", "key", "secret", "token", "password", "authorization"})
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class CatalogError(ValueError):
    """A catalog that cannot be used; the message names file, entry and field."""


@dataclass(frozen=True)
class Channel:
    id: str
    route: str
    base_url: str
    api_key_env: str
    timeout_s: float
    retries: int

    @property
    def bucket(self) -> Bucket:
        return Bucket.for_route(self.route)

    def api_key(self) -> str:
        """The upstream credential, read from the environment at call time; never stored."""
        return os.environ.get(self.api_key_env, "")


@dataclass(frozen=True)
class PriceNano:
    """Per 1,000,000 tokens, in nano-units of the channel's bucket unit."""

    input: int
    output: int
    cached_input: int


@dataclass(frozen=True)
class ModelChannel:
    channel: Channel
    upstream_model: str
    price: PriceNano


@dataclass(frozen=True)
class Model:
    name: str
    channels: tuple[ModelChannel, ...]
    max_output_tokens: int = DEFAULT_OUTPUT_CAP_TOKENS
    encoding: str = "o200k_base"

    def channel(self, channel_id: str) -> ModelChannel:
        for mc in self.channels:
            if mc.channel.id == channel_id:
                return mc
        raise KeyError(channel_id)


@dataclass(frozen=True)
class Catalog:
    source: str
    channels: dict[str, Channel]
    models: dict[str, Model] = field(default_factory=dict)

    def model(self, name: str) -> Model | None:
        return self.models.get(name)


def bundled_catalog_path() -> pathlib.Path:
    return pathlib.Path(str(resources.files("tokenforge") / "catalogs" / "demo.yaml"))


def load_catalog(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Catalog:
    source = str(path)
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{source}: cannot read the catalog: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{source}: not valid YAML: {exc}") from exc
    return parse_catalog(data, source=source, env=os.environ if env is None else env)


def parse_catalog(data: Any, *, source: str, env: Any) -> Catalog:
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: the catalog must be a mapping with `channels` and `models`")
    _only_known(data, TOP_FIELDS, f"{source}: top level")
    raw_channels = _require(data, "channels", list, f"{source}: top level")
    raw_models = _require(data, "models", list, f"{source}: top level")
    if not raw_models:
        raise CatalogError(f"{source}: top level: field `models`: needs at least one model (a gateway with "
                           "nothing to sell would answer every request with 404)")

    channels: dict[str, Channel] = {}
    for index, raw in enumerate(raw_channels):
        where = f"{source}: channels[{index}]"
        if not isinstance(raw, dict):
            raise CatalogError(f"{where}: must be a mapping")
        cid = _require(raw, "id", str, where)
        where = f"{source}: channel {cid!r}"
        _only_known(raw, CHANNEL_FIELDS, where)
        if cid in channels:
            raise CatalogError(f"{where}: field `id`: duplicate channel id")
        route = _require(raw, "route", str, where)
        if route not in ROUTES:
            raise CatalogError(f"{where}: field `route`: must be `routed` or `direct`, got {route!r}")
        base_url = _expand(_require(raw, "base_url", str, where), env, where)
        if not base_url.startswith(("http://", "https://")):
            raise CatalogError(f"{where}: field `base_url`: must start with http:// or https://")
        api_key_env = _require(raw, "api_key_env", str, where)
        timeout_s = raw.get("timeout_s", 20)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise CatalogError(f"{where}: field `timeout_s`: must be a number in (0, {MAX_TIMEOUT_S}]")
        retries = raw.get("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
            raise CatalogError(f"{where}: field `retries`: must be an integer in [0, {MAX_RETRIES}]")
        channels[cid] = Channel(cid, route, base_url.rstrip("/"), api_key_env, float(timeout_s), retries)

    models: dict[str, Model] = {}
    for index, raw in enumerate(raw_models):
        where = f"{source}: models[{index}]"
        if not isinstance(raw, dict):
            raise CatalogError(f"{where}: must be a mapping")
        name = _require(raw, "name", str, where)
        where = f"{source}: model {name!r}"
        _only_known(raw, MODEL_FIELDS, where)
        if name in models:
            raise CatalogError(f"{where}: field `name`: duplicate model name")
        cap = raw.get("max_output_tokens", DEFAULT_OUTPUT_CAP_TOKENS)
        if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
            raise CatalogError(f"{where}: field `max_output_tokens`: must be a positive integer")
        encoding = raw.get("encoding", "o200k_base")
        if encoding not in ("o200k_base", "cl100k_base"):
            raise CatalogError(f"{where}: field `encoding`: must be o200k_base or cl100k_base")
        entries = _require(raw, "channels", list, where)
        if not entries:
            raise CatalogError(f"{where}: field `channels`: needs at least one channel")
        model_channels: list[ModelChannel] = []
        seen: set[str] = set()
        for cindex, entry in enumerate(entries):
            cwhere = f"{where}, channels[{cindex}]"
            if not isinstance(entry, dict):
                raise CatalogError(f"{cwhere}: must be a mapping")
            _only_known(entry, ENTRY_FIELDS, cwhere)
            ref = _require(entry, "channel", str, cwhere)
            if ref not in channels:
                raise CatalogError(f"{cwhere}: field `channel`: unknown channel {ref!r}")
            if ref in seen:
                raise CatalogError(f"{cwhere}: field `channel`: channel {ref!r} listed twice")
            seen.add(ref)
            upstream_model = _require(entry, "upstream_model", str, cwhere)
            price = _require(entry, "price", dict, cwhere)
            model_channels.append(
                ModelChannel(channels[ref], upstream_model, _parse_price(price, cwhere))
            )
        models[name] = Model(name, tuple(model_channels), cap, encoding)
    return Catalog(source=source, channels=channels, models=models)


def _parse_price(price: dict[str, Any], where: str) -> PriceNano:
    _only_known(price, PRICE_FIELDS, where, prefix="price.")
    values: dict[str, int] = {}
    for name in ("input", "output", "cached_input"):
        if name not in price:
            if name == "cached_input":
                continue
            raise CatalogError(f"{where}: field `price.{name}`: missing")
        raw = price[name]
        if isinstance(raw, float):
            raise CatalogError(
                f"{where}: field `price.{name}`: write prices as quoted decimal strings (\"1.20\"), not floats"
            )
        try:
            values[name] = parse_amount_nano(raw)
        except MoneyError as exc:
            raise CatalogError(f"{where}: field `price.{name}`: {exc}") from exc
    cached = values.get("cached_input", values["input"])
    return PriceNano(values["input"], values["output"], cached)


def _only_known(raw: dict[str, Any], known: tuple[str, ...], where: str, prefix: str = "") -> None:
    """A misspelt field must not be silently ignored: `retires: 2` would leave retries at 0."""
    for key in raw:
        if key in known:
            continue
        name = f"`{prefix}{key}`"
        if isinstance(key, str) and key.lower() in SECRET_FIELDS:
            raise CatalogError(f"{where}: field {name}: credentials never go in the catalog; put the key in an "
                               "environment variable and name that variable in `api_key_env`")
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" (did you mean `{prefix}{close[0]}`?)" if close else f"; known fields: {', '.join(known)}"
        raise CatalogError(f"{where}: field {name}: unknown field{hint}")


def _require(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in raw or raw[key] is None:
        raise CatalogError(f"{where}: field `{key}`: missing")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CatalogError(f"{where}: field `{key}`: must be a {kind.__name__}")
    if kind is str and not value.strip():
        raise CatalogError(f"{where}: field `{key}`: must not be empty")
    return value


def _expand(text: str, env: Any, where: str) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise CatalogError(f"{where}: field `base_url`: environment variable {name} is not set")
        return str(env[name])

    return _ENV_REF.sub(sub, text)
