"""Shared fixtures: one real stack (`tokenforge up` subprocess) per test session for e2e."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import httpx
import pytest

from tests.otlp_receiver import Receiver
from tests.stackproc import RunningStack, start_stack

E2E_CATALOG = pathlib.Path(__file__).parent / "e2e" / "catalog.yaml"


@pytest.fixture(scope="session")
def otlp() -> Iterator[Receiver]:
    receiver = Receiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, otlp: Receiver) -> Iterator[RunningStack]:
    data_dir = tmp_path_factory.mktemp("stack") / "data"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    running = start_stack(data_dir, catalog=E2E_CATALOG, env=env)
    try:
        yield running
    finally:
        running.stop()


@dataclass
class Customer:
    account_id: str
    key_id: str
    secret: str
    stack: RunningStack

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.stack.url, headers={"authorization": f"Bearer {self.secret}"}, timeout=60)

    def openai(self):  # noqa: ANN201 - the openai client type
        import openai

        return openai.OpenAI(base_url=self.stack.url + "/v1", api_key=self.secret, max_retries=0, timeout=60)

    def balance(self) -> dict:
        with self.client() as c:
            resp = c.get("/v1/balance")
            assert resp.status_code == 200, resp.text
            return resp.json()

    def wallet(self) -> Decimal:
        return Decimal(self.balance()["buckets"]["wallet"]["balance"])


def make_customer(stack: RunningStack, *, wallet: str | None = "10.00", credit: str | None = None,
                  route_policy: str = "routed", **key_fields) -> Customer:
    with stack.admin() as admin:
        acct = admin.post("/admin/v1/accounts", json={"name": f"acct-{uuid.uuid4().hex[:6]}"})
        assert acct.status_code == 201, acct.text
        account_id = acct.json()["id"]
        for bucket, amount in (("wallet", wallet), ("credit", credit)):
            if amount is not None:
                top = admin.post(f"/admin/v1/accounts/{account_id}/topups",
                                 json={"bucket": bucket, "amount": amount, "idempotency_key": uuid.uuid4().hex})
                assert top.status_code == 201, top.text
        key = admin.post("/admin/v1/keys", json={"account_id": account_id, "name": "test-bot",
                                                 "route_policy": route_policy, **key_fields})
        assert key.status_code == 201, key.text
        body = key.json()
        return Customer(account_id, body["id"], body["key"], stack)


@pytest.fixture
def customer(stack: RunningStack) -> Customer:
    return make_customer(stack)
