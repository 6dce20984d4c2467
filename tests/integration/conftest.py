"""Integration fixtures: a real PostgreSQL and a real ledger process, talked to over gRPC.

PostgreSQL: a fresh database on TF_DATABASE_URL if it is set, else an embedded server
(pgserver) in a temporary folder. The ledger: `tokenforge serve ledger` as a subprocess on a
free port. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest

from tokenforge.batching import Coalescer, StreamBatches, UnaryBatches
from tokenforge.ledger import core, migrations, store
from tokenforge.ledger.writer import WriterGroup
from tokenforge.money import Bucket
from tokenforge.rpc import client_channel, wait_healthy
from tokenforge.v1 import ledger_pb2 as L
from tokenforge.v1 import ledger_pb2_grpc

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_database(url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("TF_DATABASE_URL")
    if url:
        yield url
        return
    from tokenforge.pg import start_embedded

    pg = start_embedded(tmp_path_factory.mktemp("pg"))
    try:
        yield pg.url
    finally:
        pg.stop()


async def _create_database(server_url: str) -> tuple[str, str]:
    name = "tf_ledger_test_" + secrets.token_hex(4)
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, _with_database(server_url, name)


async def _drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh database for this test session (dropped at the end)."""
    name, url = await _create_database(pg_server_url)
    try:
        yield url
    finally:
        await _drop_database(pg_server_url, name)


@pytest.fixture
async def fresh_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh database for one test."""
    name, url = await _create_database(pg_server_url)
    try:
        yield url
    finally:
        await _drop_database(pg_server_url, name)


@dataclass
class LedgerProcess:
    addr: str
    database_url: str
    proc: subprocess.Popen[bytes]
    log_path: pathlib.Path

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _tokenforge_command() -> list[str]:
    """The installed `tokenforge` command (as a container runs it)."""
    script = pathlib.Path(sys.executable).parent / "tokenforge"
    if script.exists():
        return [str(script)]
    found = shutil.which("tokenforge")
    return [found] if found else [sys.executable, "-m", "tokenforge.cli"]


def _spawn(env: dict[str, str], log_path: pathlib.Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [*_tokenforge_command(), "serve", "ledger"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def start_ledger(
    database_url: str, log_path: pathlib.Path, *, port: int | None = None, extra_env: dict[str, str] | None = None
) -> LedgerProcess:
    addr = f"127.0.0.1:{port or free_port()}"
    env = dict(os.environ)
    env.update(
        TF_DATABASE_URL=database_url,
        TF_LEDGER_ADDR=addr,
        TF_LEDGER_REAP_INTERVAL_S="0.2",
        **(extra_env or {}),
    )
    proc = _spawn(env, log_path)
    ledger = LedgerProcess(addr, database_url, proc, log_path)
    try:
        await wait_healthy(addr, START_TIMEOUT_S)
    except TimeoutError:
        ledger.stop()
        raise RuntimeError(f"ledger did not start:\n{ledger.log()}") from None
    return ledger


@pytest.fixture(scope="session")
async def ledger(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LedgerProcess]:
    proc = await start_ledger(database_url, tmp_path_factory.mktemp("ledger") / "ledger.log")
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"ledger exited with {code}:\n{proc.log()[-4000:]}"


@pytest.fixture(scope="session")
async def stub(ledger: LedgerProcess) -> AsyncIterator[ledger_pb2_grpc.LedgerServiceStub]:
    channel = client_channel(ledger.addr)
    try:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)
    finally:
        await channel.close()


def error_word(exc: grpc.aio.AioRpcError) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key == "tf-error-code":
            return str(value)
    return None


async def expect_error(call, status: grpc.StatusCode, word: str) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == status, info.value
    assert error_word(info.value) == word, (info.value.details(), info.value.trailing_metadata())
    return info.value


@dataclass
class Customer:
    account_id: str
    key_id: str
    secret: str


async def new_customer(
    stub: ledger_pb2_grpc.LedgerServiceStub,
    *,
    wallet_nano: int = 0,
    credit_nano: int = 0,
    limits: L.KeyLimits | None = None,
    name: str = "test",
) -> Customer:
    account = await stub.CreateAccount(L.CreateAccountRequest(name=name))
    for bucket, amount in ((1, wallet_nano), (2, credit_nano)):
        if amount:
            await stub.TopUp(
                L.TopUpRequest(
                    account_id=account.id, bucket=bucket, amount_nano=amount,
                    idempotency_key="seed-" + secrets.token_hex(8),
                )
            )
    created = await stub.CreateKey(
        L.CreateKeyRequest(account_id=account.id, name=name, route_policy=3, limits=limits)
    )
    return Customer(account.id, created.key.id, created.secret)


@pytest.fixture(params=["stream", "unary"])
def kind(request: pytest.FixtureRequest) -> str:
    """How batches travel: messages on one BatchStream call (the router's way) or unary Batch calls."""
    return str(request.param)


def coalescer(stub: Any, kind: str, call_cls: type, request_cls: type) -> Coalescer:
    """A Coalescer over `stub`'s BatchStream (kind "stream") or its unary Batch."""
    transport = StreamBatches(stub.BatchStream) if kind == "stream" else UnaryBatches(stub.Batch)
    return Coalescer(transport, call_cls, request_cls)


# ---- the ledger's writers in this process, on a fresh database (no gRPC) -----------------------


@pytest.fixture
async def pool(fresh_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated fresh database and a pool for WriterGroups to take connections from."""
    conn = await asyncpg.connect(fresh_database_url)
    await migrations.migrate(conn)
    assert await migrations.migrate(conn) == []  # applied once
    await conn.close()
    pool = await store.create_pool(fresh_database_url, min_size=1, max_size=6, writer=True)
    yield pool
    await pool.close()


async def writer_customer(pool: asyncpg.Pool, group: WriterGroup, wallet_nano: int = 1000) -> tuple[str, str]:
    """An account with an `auto` key and `wallet_nano` in its wallet: (account id, key id)."""
    account_id, key_id = core.new_id("acct"), core.new_id("key")
    async with pool.acquire() as conn:
        await store.create_account(conn, account_id, "test")
        await store.create_key(conn, key_id=key_id, account_id=account_id, name="k", secret=secrets.token_urlsafe(),
                               prefix="sk", route_policy="auto", allowed_models=[], limits=core.KeyLimitsNano())
    await group.submit(core.TopUpOp(account_id, Bucket.WALLET, wallet_nano, "seed-" + secrets.token_hex(4)))
    return account_id, key_id


def settle_op(account_id: str, request_id: str, key_id: str, rated: int, bucket: Bucket | None = Bucket.WALLET,
              run_id: str | None = None) -> core.SettleOp:
    """A `settled` settlement of `rated` nano with a small receipt body."""
    return core.SettleOp(account_id, request_id, key_id, bucket, rated, "settled", {"note": "writer test"}, run_id)


async def bucket_row(pool: asyncpg.Pool, account_id: str, bucket: Bucket = Bucket.WALLET) -> tuple[int, int]:
    """(balance, held) of one bucket, in nano, as stored."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT balance_nano, held_nano FROM buckets WHERE account_id = $1 AND bucket = $2",
                                  account_id, bucket.value)
    return row["balance_nano"], row["held_nano"]


async def audit_clean(pool: asyncpg.Pool) -> None:
    """The ledger's own audit of the database finds nothing."""
    async with pool.acquire() as conn:
        problems, _ = await store.audit(conn)
    assert problems == []


async def audit_ok(stub: ledger_pb2_grpc.LedgerServiceStub) -> None:
    result = await stub.Audit(L.AuditRequest())
    assert result.ok, list(result.problems)


__all__ = ["asyncio"]
