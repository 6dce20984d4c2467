"""The metering gRPC service: a thin adapter from protobuf to the pure core.

Quote and Rate sit on every request's path, so they do no parsing beyond the request: the
price book is built once at start, and prompt token counts are cached (see `tokens.py`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import grpc

from tokenforge.catalog import CatalogError, bundled_catalog_path, load_catalog
from tokenforge.config import Settings
from tokenforge.errors import TFError
from tokenforge.metering import core, tokens
from tokenforge.money import Bucket
from tokenforge.rpc import answer_batch, answer_batch_stream, install_uvloop, rpc_method, serve
from tokenforge.v1 import common_pb2, metering_pb2, metering_pb2_grpc

log = logging.getLogger("tokenforge.metering")

_POLICY_NAMES = {
    common_pb2.ROUTE_POLICY_ROUTED: "routed",
    common_pb2.ROUTE_POLICY_DIRECT: "direct",
    common_pb2.ROUTE_POLICY_AUTO: "auto",
}


def _price_pb(rating: core.Rating) -> common_pb2.Price:
    price = rating.channel.price
    return common_pb2.Price(
        bucket=rating.bucket.to_pb(),
        input_nano=price.input,
        output_nano=price.output,
        cached_input_nano=price.cached_input,
    )


def _prompt_tokens(messages_json: bytes, encoding_name: str) -> int:
    try:
        return tokens.count_messages_json(messages_json, encoding_name)
    except ValueError as exc:
        raise TFError("invalid_request", f"Cannot count the prompt: {exc}.", "messages") from exc


# MeteringCall's oneof fields → the methods they stand for
_BATCHED = {"quote": "Quote", "rate": "Rate"}


class MeteringServicer(metering_pb2_grpc.MeteringServiceServicer):
    def __init__(self, book: core.PriceBook) -> None:
        self.book = book

    @rpc_method
    async def Quote(
        self, request: metering_pb2.QuoteRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.QuoteResponse:
        model = self.book.model(request.model)
        self.book.entry(request.model, request.channel_id)  # fail before counting
        prompt = _prompt_tokens(request.messages_json or b"[]", model.encoding)
        q = core.quote(self.book, request.model, request.channel_id, prompt, request.max_tokens)
        for other in request.cover_channel_ids:
            c = core.quote(self.book, request.model, other, prompt, request.max_tokens)
            if c.bucket is not q.bucket:
                raise TFError("invalid_request", f"channel `{other}` is paid from another bucket; a hold covers one bucket.",
                              "cover_channel_ids")
            if c.amount_nano > q.amount_nano:
                q = core.Quote(c.amount_nano, q.bucket, q.prompt_tokens, q.max_output_tokens)
        return metering_pb2.QuoteResponse(
            amount_nano=q.amount_nano,
            bucket=q.bucket.to_pb(),
            prompt_tokens=q.prompt_tokens,
            max_output_tokens=q.max_output_tokens,
        )

    @rpc_method
    async def Rate(
        self, request: metering_pb2.RateRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.RateResponse:
        u = request.usage
        usage = core.Usage(u.input_tokens, u.output_tokens, u.cached_input_tokens, u.reasoning_tokens)
        r = core.rate(self.book, request.model, request.channel_id, usage, request.compare_channel_id)
        response = metering_pb2.RateResponse(
            amount_nano=r.amount_nano, bucket=r.bucket.to_pb(), price=_price_pb(r)
        )
        if r.compare_bucket is not None:
            assert r.compare_amount_nano is not None
            response.compare_amount_nano = r.compare_amount_nano
            response.compare_bucket = r.compare_bucket.to_pb()
        return response

    async def Batch(
        self, request: metering_pb2.MeteringBatchRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.MeteringBatchResponse:
        outcomes = await answer_batch(self, request.calls, _BATCHED, metering_pb2.MeteringOutcome, context)
        return metering_pb2.MeteringBatchResponse(outcomes=outcomes)

    async def BatchStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await answer_batch_stream(
            self, context, _BATCHED, metering_pb2.MeteringOutcome, metering_pb2.MeteringBatchResponse)

    @rpc_method
    async def CountTokens(
        self, request: metering_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.CountTokensResponse:
        model = self.book.model(request.model)
        if request.messages_json and request.text:
            raise TFError("invalid_request", "Give either `messages_json` or `text`, not both.", "text")
        if request.messages_json:
            return metering_pb2.CountTokensResponse(tokens=_prompt_tokens(request.messages_json, model.encoding))
        return metering_pb2.CountTokensResponse(tokens=tokens.count_text(request.text, model.encoding))

    @rpc_method
    async def EstimateRun(
        self, request: metering_pb2.EstimateRunRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.EstimateRunResponse:
        policy = _POLICY_NAMES.get(request.route_policy)
        if policy is None:
            raise TFError("invalid_request", "Set `route_policy` to routed, direct or auto.", "route_policy")
        plan = [
            core.PlanStep(s.model, s.calls, s.input_tokens, s.output_tokens, s.step) for s in request.plan
        ]
        available = None
        if request.HasField("balances"):
            available = {
                Bucket.WALLET: request.balances.wallet.available_nano,
                Bucket.CREDIT: request.balances.credit.available_nano,
            }
        budgets = {Bucket.WALLET: request.budget_wallet_nano, Bucket.CREDIT: request.budget_credit_nano}
        for bucket, amount in budgets.items():
            if amount < 0:
                raise TFError("invalid_request", "A budget cannot be negative.", f"budget.{bucket.value}")
        est = core.estimate_run(self.book, plan, policy, request.allowed_models, available, budgets)

        def pb(b: Bucket) -> metering_pb2.BucketEstimate:
            e = est.buckets[b]
            return metering_pb2.BucketEstimate(
                low_nano=e.low_nano, expected_nano=e.expected_nano, high_nano=e.high_nano
            )

        return metering_pb2.EstimateRunResponse(
            wallet=pb(Bucket.WALLET),
            credit=pb(Bucket.CREDIT),
            warnings=[metering_pb2.Warning(code=w.code, message=w.message) for w in est.warnings],
        )


def load_price_book(settings: Settings) -> core.PriceBook:
    """The price book from the configured catalog (the bundled demo one when none is set)."""
    path = settings.catalog_path or str(bundled_catalog_path())
    env = dict(os.environ)
    # Metering never calls an upstream, so base URLs only need to parse: the bundled catalog's
    # `${TF_SIM_URL}` may be unset when metering runs alone.
    env.setdefault("TF_SIM_URL", "http://127.0.0.1:9")
    return core.PriceBook(load_catalog(path, env=env))


def warm_up(book: core.PriceBook) -> dict[str, float]:
    """Load every encoding the catalog uses now, so no request pays for it."""
    for name in sorted({m.encoding for m in book.catalog.models.values()}):
        tokens.encoding(name)
    return tokens.load_seconds()


def run(settings: Settings) -> int:
    try:
        book = load_price_book(settings)
    except CatalogError as exc:
        print(f"metering: {exc}", flush=True)
        return 2
    for name, seconds in warm_up(book).items():
        log.info("tokenizer %s loaded in %.0f ms", name, seconds * 1000)
    servicer = MeteringServicer(book)

    def register(server: grpc.aio.Server) -> list[str]:
        metering_pb2_grpc.add_MeteringServiceServicer_to_server(servicer, server)
        return [metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name]

    install_uvloop()
    asyncio.run(serve(name="metering", bind=settings.metering_addr, register=register))
    return 0
