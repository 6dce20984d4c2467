"""Which channels a key may use for a model, in order (pure: no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenforge.catalog import Catalog, ModelChannel
from tokenforge.errors import TFError

POLICIES = ("routed", "direct", "auto")


@dataclass(frozen=True)
class Eligible:
    channel: ModelChannel
    role: str  # primary | backup


def eligible_channels(
    catalog: Catalog, model_name: str, route_policy: str, allowed_models: tuple[str, ...]
) -> list[Eligible]:
    """The model's channels filtered by the key's policy, in catalog order (auto: routed
    channels first, then direct). The first is the primary, the rest are backups."""
    assert route_policy in POLICIES, route_policy
    model = catalog.model(model_name)
    if model is None:
        raise TFError(
            "model_not_found",
            f"The model `{model_name}` does not exist. GET /v1/models lists the models your key may use.",
            "model",
        )
    if allowed_models and model_name not in allowed_models:
        raise TFError(
            "model_not_allowed",
            f"This API key may not use the model `{model_name}`; it may use: {', '.join(allowed_models)}.",
            "model",
        )
    if route_policy == "auto":
        ordered = [mc for mc in model.channels if mc.channel.route == "routed"] + [
            mc for mc in model.channels if mc.channel.route == "direct"
        ]
    else:
        ordered = [mc for mc in model.channels if mc.channel.route == route_policy]
    if not ordered:
        raise TFError(
            "route_not_allowed",
            f"The model `{model_name}` has no {route_policy} channel, and this key's route policy "
            f"is `{route_policy}`. Use a key with another route policy or another model.",
            "model",
        )
    return [Eligible(mc, "primary" if i == 0 else "backup") for i, mc in enumerate(ordered)]


def visible_models(catalog: Catalog, route_policy: str, allowed_models: tuple[str, ...]) -> list[str]:
    names = []
    for name, model in catalog.models.items():
        if allowed_models and name not in allowed_models:
            continue
        routes = {mc.channel.route for mc in model.channels}
        if route_policy == "auto" or route_policy in routes:
            names.append(name)
    return names
