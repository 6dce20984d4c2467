"""Coalesced calls keep their trace parents: under concurrent requests (the router's Quote,
Hold, Rate and Settle travel in shared Batch RPCs), each request's ledger and metering spans
hang under that request's own span, never under a neighbour's."""

from __future__ import annotations

import concurrent.futures

from tests.conftest import Customer
from tests.e2e.helpers import chat, receipt
from tests.otlp_receiver import Receiver

BATCHED = {"tokenforge.v1.LedgerService/Hold", "tokenforge.v1.LedgerService/Settle",
           "tokenforge.v1.MeteringService/Quote", "tokenforge.v1.MeteringService/Rate"}


def test_concurrent_requests_keep_their_own_trace_parents(customer: Customer, otlp: Receiver) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: chat(customer, "gpt-4o-mini", f"question {i}"), range(32)))
    for _, headers in answers:
        r = receipt(customer, headers["x-tf-receipt-id"])

        def complete(spans: list) -> bool:
            return BATCHED <= {s.name for s in spans}

        spans = otlp.wait_for(r["trace_id"], complete)
        by_id = {s.span_id: s for s in spans}
        request = [s for s in spans if s.name == "chat gpt-4o-mini"]
        assert len(request) == 1
        for s in spans:
            if s.name in BATCHED:
                assert s.parent_span_id in by_id, s.name
                # walk up: the request's own span is an ancestor
                node = s
                while node.parent_span_id in by_id and node.span_id != request[0].span_id:
                    node = by_id[node.parent_span_id]
                assert node.span_id == request[0].span_id, s.name
