"""Redis ledger: one control plane for producers and trainers on many hosts.

``redis://[[user]:password@]host:port/db?namespace=run1&secret=...`` (``rediss://``
for TLS). Every state change is one Lua script (see
:mod:`torch_dataflow.ledger.redis_scripts`), so clients on different hosts never
race on a read-modify-write; expired leases are reclaimed by any client's
:meth:`~RedisLedger.lease` / :meth:`~RedisLedger.claim_step` call, as in the
SQLite ledger. The behaviour (return values, errors, lease ids) is the SQLite
reference's.

Clocks: lease deadlines and expiry use the **Redis server's clock** (``TIME``
inside the script) by default, so clients on hosts with skewed clocks agree on
who holds what; ``Lease.deadline`` is then in server time. ``clock=client`` uses
each caller's ``time.time()`` instead (one host, or well-synchronised hosts).

Failures: a dropped connection is retried with exponential backoff
(``retries``, ``retry_cap``); a Redis that stays down raises
:class:`~torch_dataflow.errors.BackendUnavailable`. A mutating call whose reply
was lost is answered from a 60 s reply cache when retried, so a retry never
leases, claims or frees twice; ``ack`` and ``renew`` are idempotent anyway.

Example:
    >>> from torch_dataflow.ledger import open_ledger
    >>> led = open_ledger("redis://127.0.0.1:6379/0?namespace=doc")  # doctest: +SKIP
    >>> led.reserve(["a", "b"])                                       # doctest: +SKIP
    [1, 1]
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..auth import SecretGuard, make_verifier
from ..errors import AuthError, BackendUnavailable, ConfigError, SampleAborted
from ..refs import Lease, SampleRef, validate_sample_id
from ..uri import parse_uri
from . import fencing, retention
from ._refcodec import ref_from_json, ref_json
from ._sqlite_schema import SCHEMA_VERSION, _td_ord
from .base import (
    CommitResult,
    Ledger,
    LedgerCounts,
    Plan,
    ReconcileReport,
    StepClaim,
    check_step,
    format_lease_id,
    parse_lease_id,
    resume_floor_message,
)
from .fencing import DEFAULT_SESSION_TTL
from .free_queue import RedisFreeQueue
from .heartbeats import RedisProducers, pid_gone
from .ordering import RedisOrdering
from .redis_scripts import SCRIPTS

__all__ = ["INSTALL_HINT", "RedisLedger"]

INSTALL_HINT = ("the Redis ledger needs the redis client: `pip install 'torch-dataflow[redis]'`, "
                "and a server: `apt-get install -y redis-server`")
_BEGIN_ROUNDS = 20  # begin_epoch retries while producers keep committing


@functools.lru_cache(maxsize=16384)
def _ref(text: str) -> SampleRef:
    # Refs are frozen: one parse serves the lease and the later free of a sample.
    return ref_from_json(text)


def _refs(text: str) -> list[SampleRef]:
    return [_ref(t) for t in text.split("\n")] if text else []


class RedisLedger(RedisFreeQueue, RedisProducers, RedisOrdering, Ledger):
    """The ledger in a Redis database (see module docs). Thread-safe; fork-safe.

    Args:
        host, port, db: the Redis server and database number.
        username, password: Redis ACL user / ``requirepass`` password.
        namespace: prefix of every key (several runs can share one database).
        secret: the ledger's shared secret (DESIGN invariant 5).
        ssl, ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs: TLS, passed to redis-py.
        socket_timeout, connect_timeout: seconds per command / connection attempt.
        retries, retry_cap: bounded exponential backoff on a dropped connection.
        clock: ``"server"`` (Redis ``TIME``) or ``"client"`` (``time.time()``) for deadlines.
    """

    URI_SCHEMES = ("redis", "rediss")
    _QUERY = {"namespace": str, "secret": str, "ssl": bool, "ssl_ca_certs": str, "ssl_certfile": str,
              "ssl_keyfile": str, "ssl_cert_reqs": str, "socket_timeout": float, "connect_timeout": float,
              "retries": int, "retry_cap": float, "clock": str}

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, db: int = 0, *, username: str | None = None,
                 password: str | None = None, namespace: str = "td", secret: str | None = None, ssl: bool = False,
                 ssl_ca_certs: str | None = None, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                 ssl_cert_reqs: str = "required", socket_timeout: float = 30.0, connect_timeout: float = 5.0,
                 retries: int = 10, retry_cap: float = 1.0, clock: str = "server") -> None:
        if clock not in ("server", "client"):
            raise ConfigError(f"clock must be 'server' or 'client', got {clock!r}")
        if not namespace or any(c in namespace for c in "{}: \t\n"):
            raise ConfigError(f"namespace must be non-empty without braces, colons or spaces, got {namespace!r}")
        if retries < 0 or db < 0:
            raise ConfigError(f"retries and db must be >= 0, got {retries} and {db}")
        self.host, self.port, self.db = host, int(port), int(db)
        self.username, self._password = username, password
        self.namespace, self._secret = namespace, secret
        self.ssl, self.ssl_ca_certs, self.ssl_certfile, self.ssl_keyfile = ssl, ssl_ca_certs, ssl_certfile, ssl_keyfile
        self.ssl_cert_reqs = ssl_cert_reqs
        self.socket_timeout, self.connect_timeout = float(socket_timeout), float(connect_timeout)
        self.retries, self.retry_cap, self.clock = int(retries), float(retry_cap), clock
        scheme = "rediss" if ssl else "redis"
        self.uri = f"{scheme}://{host}:{self.port}/{self.db}" + ("" if namespace == "td" else f"?namespace={namespace}")
        # One hash tag: every key of a run lands in one cluster slot.
        self._prefix = "{" + namespace + "}:"
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._errors: Any = None
        self._lock = threading.Lock()
        self._last_token = ""

    @classmethod
    def from_uri(cls, uri: str, **overrides: Any) -> RedisLedger:
        """Build from ``redis://[[user]:password@]host:port/db?key=value``.

        Example:
            >>> RedisLedger.from_uri("redis://10.0.0.5:6380/2?namespace=run7")
            RedisLedger('redis://10.0.0.5:6380/2?namespace=run7')
        """
        u = parse_uri(uri, cls._QUERY)
        if u.scheme not in cls.URI_SCHEMES:
            raise ConfigError(f"not a redis URI: {uri!r}")
        path = u.path.strip("/")
        if path and not path.isdigit():
            raise ConfigError(f"redis URI path must be a database number (redis://host:port/0), got {u.path!r}")
        kw: dict[str, Any] = {"host": u.host or "127.0.0.1", "port": u.port or 6379, "db": int(path or 0),
                              "username": u.username or None, "password": u.password, **u.query}
        if u.scheme == "rediss":
            kw["ssl"] = True
        return cls(**{**kw, **overrides})

    def _config_state(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "db": self.db, "username": self.username,
                "password": self._password, "namespace": self.namespace, "secret": self._secret, "ssl": self.ssl,
                "ssl_ca_certs": self.ssl_ca_certs, "ssl_certfile": self.ssl_certfile, "ssl_keyfile": self.ssl_keyfile,
                "ssl_cert_reqs": self.ssl_cert_reqs, "socket_timeout": self.socket_timeout,
                "connect_timeout": self.connect_timeout, "retries": self.retries, "retry_cap": self.retry_cap,
                "clock": self.clock}

    # ------------------------------------------------------------ connection
    def _attach(self) -> None:
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                return
            try:
                import redis
                from redis.backoff import ExponentialBackoff
                from redis.retry import Retry
            except ImportError as e:
                raise ConfigError(INSTALL_HINT) from e
            kw: dict[str, Any] = {}
            if self.ssl:
                kw = {"ssl": True, "ssl_ca_certs": self.ssl_ca_certs, "ssl_certfile": self.ssl_certfile,
                      "ssl_keyfile": self.ssl_keyfile, "ssl_cert_reqs": self.ssl_cert_reqs}
            client = redis.Redis(
                host=self.host, port=self.port, db=self.db, username=self.username, password=self._password,
                socket_timeout=self.socket_timeout, socket_connect_timeout=self.connect_timeout,
                retry=Retry(ExponentialBackoff(cap=self.retry_cap, base=0.05), self.retries),
                retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
                decode_responses=True, **kw)
            self._errors = redis.exceptions
            scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}
            self._client, self._scripts = client, scripts
            self._pid = os.getpid()  # set before the first call: _call checks it
            try:
                meta = self._prefix + "meta"
                found = self._call(lambda: client.hmget(meta, "schema", "verifier"))
                if found[0] is None:
                    verifier = make_verifier(self._secret) if self._secret is not None else ""
                    found = self._call(lambda: scripts["init"](args=[self._prefix, SCHEMA_VERSION, verifier]))
                if found[0] != SCHEMA_VERSION:
                    raise ConfigError(f"namespace {self.namespace!r} of {self.uri} is not a torch_dataflow ledger "
                                      f"of schema {SCHEMA_VERSION} (found {found[0]!r})")
                self._guard = SecretGuard.attach(self._secret, found[1] or None, f"ledger {self.uri}")
            except BaseException:
                client.close()
                self._client, self._pid, self._guard, self._scripts = None, None, None, {}
                raise

    def _call(self, fn: Any) -> Any:
        err = self._errors
        try:
            return fn()
        except (err.AuthenticationError, err.AuthorizationError) as e:
            raise AuthError(f"redis refused the credentials for ledger {self.uri}: {e}") from e
        except (err.ConnectionError, err.TimeoutError) as e:
            raise BackendUnavailable(f"ledger {self.uri} unreachable after {self.retries} retries: {e}") from e
        except err.ResponseError as e:
            if str(e).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise AuthError(f"redis refused ledger {self.uri}: {e}") from e
            raise BackendUnavailable(f"ledger {self.uri} failed: {e}") from e
        except err.InvalidResponse as e:  # something answers on the port, but not in Redis's protocol
            raise ConfigError(f"{self.host}:{self.port} of ledger {self.uri} does not answer as a Redis server "
                              f"({e}): check the URI's host and port") from e

    def _run(self, name: str, args: Sequence[Any], *, cache: bool = False) -> Any:
        """Run script ``name``; ``cache``: answer a retry from the reply cache."""
        self._check_auth()
        token = secrets.token_hex(8) if cache else ""
        now = repr(time.time()) if self.clock == "client" else ""
        script = self._scripts[name]
        reply = self._call(lambda: script(args=[self._prefix, token, self._last_token, now, *args]))
        if cache:
            self._last_token = token  # the server may forget the previous reply now
        return reply

    def _cmd(self, fn: Any) -> Any:
        self._check_auth()
        return self._call(lambda: fn(self._client))

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client, self._guard, self._scripts = None, None, {}

    # ------------------------------------------------------------ producer
    def reserve(self, sample_ids: Sequence[str]) -> list[int]:
        ids = [validate_sample_id(s) for s in sample_ids]
        if len(set(ids)) != len(ids):
            raise ConfigError("reserve() got the same sample id twice in one call")
        return [int(g) for g in self._run("reserve", ids, cache=True)]

    def commit(self, refs: Sequence[SampleRef], *, if_absent: bool = False) -> list[SampleRef]:
        self._commit_ids(refs)
        # One argument of lines: ids hold no control characters and ref JSON no raw newline or tab.
        lines = "\n".join(f"{r.sample_id}\t{r.generation}\t{ref_json(r)}" for r in refs)
        if not refs:
            self._check_auth()
            return CommitResult()
        reply = self._run("commit", [lines, "1" if if_absent else "0"], cache=True)
        if isinstance(reply, list) and reply[0] == "ok":
            out = CommitResult(_refs(reply[1]))
            given = {r.sample_id: r for r in refs}
            for line in reply[2].split("\n") if reply[2] else ():
                sid, _, text = line.split("\t", 2)
                out.refused.append(given[sid])
                if text:
                    out.existing[sid] = _ref(text)
            return out
        if isinstance(reply, list):
            _, kind, sid, gen, sup = reply
            if kind == "aborted":
                raise SampleAborted(f"sample {sid!r} generation {gen} was aborted")
            if kind == "stale":
                raise ConfigError(f"stale commit of {sid!r} generation {gen}: generation {sup} supersedes it")
            raise ConfigError(f"commit of {sid!r} generation {gen}, which was never "
                              "reserved (call reserve() before writing the bytes)")
        return CommitResult(_refs(reply))

    def register_producer(self, name: str, info: dict[str, Any] | None = None) -> None:
        self._register_beat(name, info)

    def producer_done(self, name: str) -> None:
        self._cmd(lambda c: c.hset(self._prefix + "prod", name, 1))

    def reopen(self) -> None:
        self._cmd(lambda c: c.delete(self._prefix + "prod", self._prefix + "hb"))

    def is_closed(self) -> bool:
        done = self._cmd(lambda c: c.hvals(self._prefix + "prod"))
        return bool(done) and all(v == "1" for v in done)

    # ------------------------------------------------------------ consumer
    def begin_epoch(self, epoch: int, seed: int = 0, shuffle: bool = True) -> None:
        epoch, tag = int(epoch), f"{seed}:{int(shuffle)}"
        ords: dict[str, int] = {}
        if shuffle:
            def snapshot(c: Any) -> list[Any]:
                p = c.pipeline(transaction=True)
                p.hexists(self._prefix + "meta", f"ep:{epoch}")
                p.smembers(self._prefix + "live")
                p.zrange(f"{self._prefix}p:{epoch}", 0, -1)
                return p.execute()

            begun, live, pending = self._cmd(snapshot)
            if begun:
                return
            ords = {s: _td_ord(seed, epoch, s) for s in (*live, *pending)}
        for _ in range(_BEGIN_ROUNDS):
            flat: list[Any] = []
            for s, o in ords.items():
                flat += (s, str(o))
            reply = self._run("begin_epoch", [str(epoch), tag, "1" if shuffle else "0", *flat])
            if reply[0] == "done":
                return
            ords.update((s, _td_ord(seed, epoch, s)) for s in reply[1])
        raise BackendUnavailable(f"begin_epoch({epoch}) on {self.uri} did not settle while samples kept arriving")

    @staticmethod
    def _lease_objs(epoch: int, deadline: float, text: str, owner: str | None) -> list[Lease]:
        # Lines "sid\tgen\tnonce[\towner]\tref" (see redis_scripts).
        out = []
        for line in text.split("\n") if text else ():
            if owner is None:
                sid, gen, nonce, own, ref = line.split("\t", 4)
            else:
                (sid, gen, nonce, ref), own = line.split("\t", 3), owner
            out.append(Lease(format_lease_id(epoch, int(gen), nonce, sid), epoch, own, deadline, _ref(ref)))
        return out

    def lease(self, owner: str, n: int, ttl: float, *, epoch: int = 0, fence: int | None = None) -> list[Lease]:
        if n < 1:
            return []
        epoch = int(epoch)
        reply = self._run("lease", [str(epoch), str(int(n)), owner, repr(float(ttl)), secrets.token_hex(4),
                                    _fence(fence), fencing.me()], cache=True)
        dl, rows = self._refused(reply, fence, "lease")
        return self._lease_objs(epoch, float(dl), rows, owner)

    def _refused(self, reply: Any, fence: int | None, what: str) -> Any:
        """Raise the typed error of a gate refusal (see redis_scripts ``gate``), else pass the reply on."""
        if isinstance(reply, list) and reply and reply[0] == "!fenced":
            raise fencing.fenced(self.uri, -1 if fence is None else int(fence), int(reply[1]),
                                 fencing.parse_record(reply[2]), what)
        if isinstance(reply, list) and reply and reply[0] == "!session":
            raise fencing.conflict(self.uri, json.loads(reply[1]), float(reply[2]), float(reply[3]), None, what)
        return reply

    def claim_step(self, plan: Plan, step: int, rank: int, ttl: float, *, wait_for_stream: bool,
                   fence: int | None = None) -> StepClaim:
        if not 0 <= rank < plan.world:
            raise ConfigError(f"rank {rank} outside world size {plan.world}")
        reply = self._run("claim_step", [plan.key, str(plan.epoch), str(plan.world), str(plan.batch), str(int(step)),
                                         str(int(rank)), repr(float(ttl)), "1" if wait_for_stream else "0",
                                         secrets.token_hex(4), str(plan.attempt), _fence(fence), fencing.me()],
                          cache=True)
        reply = self._refused(reply, plan.attempt if fence is None else fence, f"claim of step {step} of plan {plan.key}")
        if reply[0] != "ready":
            return StepClaim(reply[0], tail=int(reply[1]))
        return StepClaim("ready", tuple(self._lease_objs(plan.epoch, float(reply[1]), reply[2], None)))

    def _by_lease(self, name: str, lease_ids: Sequence[str], extra: Sequence[str], cache: bool) -> list[str]:
        """Run a per-lease script; return the lost ids once each, in input order.

        A repeated id is sent (and handled) once, as in the SQLite reference."""
        lost, parsed, lines = [], [], []
        for lid in dict.fromkeys(lease_ids):
            try:
                e, g, n, s = parse_lease_id(lid)
            except Exception:
                lost.append(lid)
                continue
            if any(c in s or c in n for c in "\t\n"):
                lost.append(lid)  # no sample id or nonce holds a control character
                continue
            parsed.append(lid)
            lines.append(f"{e}\t{s}\t{g}\t{n}")
        if not parsed:
            self._check_auth()
            return lost
        idx = self._run(name, [*extra, "\n".join(lines)], cache=cache)
        if idx and idx[0] == "!floor":  # an ack before the step this run resumed from: nothing changed
            raise ConfigError(resume_floor_message(int(extra[0]), int(idx[1])))
        gone = set(lost) | {parsed[int(i) - 1] for i in idx}
        return [lid for lid in dict.fromkeys(lease_ids) if lid in gone]

    def renew(self, lease_ids: Sequence[str], ttl: float) -> list[str]:
        return self._by_lease("renew", lease_ids, [repr(float(ttl))], False)

    def ack(self, lease_ids: Sequence[str], step: int) -> list[str]:
        return self._by_lease("ack", lease_ids, [str(check_step(step))], False)

    def fail(self, lease_ids: Sequence[str], *, retryable: bool = True, reason: str = "") -> list[str]:
        return self._by_lease("fail", lease_ids, ["1" if retryable else "0", reason or "failed"], True)

    def abort(self, sample_ids: Sequence[str]) -> list[SampleRef]:
        ids = [validate_sample_id(s) for s in sample_ids]
        return _refs(self._run("abort", ids, cache=True))

    def mark_durable(self, step: int, *, free: bool = True, retain: bool = True,
                     fence: int | None = None) -> list[SampleRef]:
        step = check_step(step)
        reply = self._run("mark_durable", [str(step), "1" if free else "0", "1" if retain else "0", _fence(fence),
                                           fencing.me()], cache=True)
        return _refs(self._refused(reply, fence, f"durable mark of step {step}"))

    def reconcile(self, resume_step: int | None, *, free: bool = True, strict: bool = True,
                  session: dict[str, Any] | None = None, takeover: bool = False,
                  session_ttl: float = DEFAULT_SESSION_TTL) -> ReconcileReport:
        rs = "" if resume_step is None else str(check_step(resume_step))
        record = "" if session is None else json.dumps(fencing.holder_record(session, 0, session_ttl))
        cur = self.session()
        if cur and cur["live"] and cur.get("me") != fencing.me() and not takeover:  # e.g. alive on this host
            now = float(cur.get("last_beat") or 0) + float(cur.get("age_s") or 0)
            raise fencing.conflict(self.uri, cur, cur.get("last_beat"), now, None, "reconcile")
        dead = str(cur["fence"]) if cur and pid_gone(cur.get("host"), cur.get("pid")) else ""
        reply = self._run("reconcile", [rs, "1" if free else "0", "1" if strict else "0", record,
                                        "1" if takeover else "0", dead, fencing.me(), repr(float(session_ttl))],
                          cache=True)
        if reply[0] == "!old":
            _, n, lo, hi, marks = reply
            raise retention.too_old(self.uri, None if rs == "" else int(rs), int(n), int(lo), int(hi),
                                    _marks(marks))
        reply = self._refused(reply, None, "reconcile")
        attempt, replayed, durable, released, freed = reply
        return ReconcileReport(int(attempt), int(replayed), int(durable), int(released),
                               tuple(_refs(freed)))

    # ------------------------------------------------------------ sessions (fencing.py)
    def session(self) -> dict[str, Any] | None:
        text, beat, attempt, now = self._run("session_get", [])
        if not text:
            return None
        rec, b = json.loads(text), (float(beat) if beat else None)
        return {**rec, "last_beat": b, "age_s": None if b is None else round(max(0.0, float(now) - b), 3),
                "live": fencing.is_live(rec, b, int(attempt), float(now)), "current": int(rec["fence"]) == int(attempt)}

    def session_heartbeat(self, fence: int) -> None:
        self._refused(self._run("session_beat", [str(int(fence)), fencing.me()]), fence, "session heartbeat")

    def close_session(self, fence: int) -> None:
        self._run("session_close", [str(int(fence))])

    def checkpoints(self) -> list[int]:
        return _marks(self._cmd(lambda c: c.hget(self._prefix + "meta", "marks")) or "[]")

    # ------------------------------------------------------------ queries
    def attempt(self) -> int:
        return int(self._cmd(lambda c: c.hget(self._prefix + "meta", "attempt")) or 0)

    def counts(self, epoch: int | None = None) -> LedgerCounts:
        by, st, closed, epochs = self._run("counts", ["" if epoch is None else str(int(epoch))])
        aborted, quarantined, freed, committed = (int(v or 0) for v in st)
        return LedgerCounts(pending=int(by[0]), leased=int(by[1]), trained=int(by[2]), durable=int(by[3]),
                            aborted=aborted, quarantined=quarantined, freed=freed, committed=committed,
                            closed=bool(closed), extra={"epochs": sorted(int(e) for e in epochs)})

    def get_ref(self, sample_id: str) -> SampleRef | None:
        text = self._cmd(lambda c: c.hget(f"{self._prefix}s:{sample_id}", "ref"))
        return _ref(text) if text else None

    def leases(self, owner_prefix: str = "") -> list[Lease]:
        rows = self._run("leases", [owner_prefix])
        return [Lease(format_lease_id(int(e), int(g), n, s), int(e), o, float(dl), _ref(ref))
                for e, s, g, n, o, dl, ref in rows]

    def quarantined(self) -> list[tuple[SampleRef | None, str]]:
        return [(_ref(r) if r else None, why) for r, why in self._run("quarantined", [])]

    def trained_steps(self, epoch: int | None = None) -> dict[str, int]:
        rows = self._run("trained_steps", ["" if epoch is None else str(int(epoch))])
        return {s: int(step) for s, step in rows}

    # ------------------------------------------------------------ run metadata and requeue (issue 15)
    def get_meta(self, key: str) -> str | None:
        return self._cmd(lambda c: c.hget(self._prefix + "meta", _user_meta(key)))

    def claim_meta(self, key: str, value: str) -> str:
        field = _user_meta(key)

        def claim(c: Any) -> Any:
            p = c.pipeline(transaction=True)
            p.hsetnx(self._prefix + "meta", field, str(value))
            p.hget(self._prefix + "meta", field)
            return p.execute()[1]

        return str(self._cmd(claim))

    def requeue_quarantined(self, sample_ids: Sequence[str] | None = None) -> int:
        ids = [] if sample_ids is None else [validate_sample_id(s) for s in sample_ids]
        return int(self._run("requeue_quarantined", ["1" if sample_ids is None else "0", *ids], cache=True))

    def set_meta(self, key: str, value: str) -> None:
        field = _user_meta(key)
        self._cmd(lambda c: c.hset(self._prefix + "meta", field, str(value)))


def _fence(fence: int | None) -> str:
    return "" if fence is None else str(int(fence))


def _marks(text: str) -> list[int]:
    got = json.loads(text)
    return sorted(int(m) for m in got) if isinstance(got, list) else []  # cjson writes an empty list as {}


def _user_meta(key: str) -> str:
    """The meta-hash field of run metadata ``key`` (kept apart from the ledger's own fields)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"a ledger meta key must be a non-empty str, got {key!r}")
    return "x:" + key
