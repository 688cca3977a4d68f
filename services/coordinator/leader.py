"""One active coordinator: leader election over a lease.

Any number of coordinator replicas may run (a rolling update always has two for a while); only the one
holding the lease runs jobs. The lease lives in a Kubernetes ``Lease`` (coordination.k8s.io) when the
coordinator runs in a cluster, elsewhere in an object in storage written with compare-and-swap
(``ObjectStore.put_if``). Either way a write that lost a race is refused, never last-writer-wins.

A term's ``generation`` grows with every change of holder: it is the fencing token logs and job records
carry. The job state itself is fenced by storage (``JobStore`` writes each job.binpb with compare-and-swap
against the version it last read or wrote), so a deposed leader's late write is refused even when it has
not yet noticed that it lost the lease.

Timing: a holder renews every ``duration / 3``; another replica takes over once ``duration`` has passed
without a renewal; a holder that could not renew for ``duration - margin`` stops leading on its own,
before anyone else can have taken over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from dreamframe.errors import Aborted, NotFound
from dreamframe.storage.base import ObjectStore

log = logging.getLogger(__name__)

LEASE_KEY = "coordinator/leader.json"


@dataclass(frozen=True)
class Term:
    holder: str
    generation: int
    renewed_at: float  # time.time() of the write that gave or renewed it


class Lease(Protocol):
    def try_acquire(self, identity: str, duration: float) -> Term | None:
        """Take or renew the lease for ``identity``: its term, or None while another holds it."""

    def release(self, identity: str) -> None:
        """Give the lease up now (shutdown), if ``identity`` holds it."""


class StorageLease:
    """The lease as a small JSON object in storage, changed only by compare-and-swap."""

    def __init__(self, store: ObjectStore, key: str = LEASE_KEY) -> None:
        self.store = store
        self.key = key

    def _read(self) -> tuple[dict | None, str | None]:
        try:
            data, version = self.store.get_versioned(self.key)
        except NotFound:
            return None, None
        return json.loads(data), version

    def try_acquire(self, identity: str, duration: float) -> Term | None:
        record, version = self._read()
        now = time.time()
        if record and record["holder"] not in (identity, "") and record["expires_at"] > now:
            return None  # someone else's live lease
        same = bool(record) and record["holder"] == identity
        generation = record["generation"] if same else (record["generation"] + 1 if record else 1)
        new = {"holder": identity, "generation": generation, "renewed_at": now, "expires_at": now + duration}
        try:
            self.store.put_if(
                self.key, json.dumps(new).encode(), version=version, content_type="application/json"
            )
        except Aborted:
            return None  # another replica wrote first
        return Term(identity, generation, now)

    def release(self, identity: str) -> None:
        record, version = self._read()
        if not record or record["holder"] != identity:
            return
        gone = {**record, "holder": "", "expires_at": 0.0}
        try:
            self.store.put_if(self.key, json.dumps(gone).encode(), version=version)
        except Aborted:
            pass


class KubernetesLease:
    """A coordination.k8s.io/v1 Lease, changed with the API server's optimistic concurrency
    (``resourceVersion``: a replace based on a stale read gets 409 Conflict)."""

    def __init__(self, api_client, namespace: str, name: str) -> None:
        from kubernetes import client

        self.api = client.CoordinationV1Api(api_client)
        self.client = client
        self.namespace = namespace
        self.name = name

    def try_acquire(self, identity: str, duration: float) -> Term | None:
        from kubernetes.client.exceptions import ApiException

        c = self.client
        stamp = datetime.now(UTC)
        seconds = max(1, round(duration))
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            spec = c.V1LeaseSpec(
                holder_identity=identity,
                lease_duration_seconds=seconds,
                acquire_time=stamp,
                renew_time=stamp,
                lease_transitions=1,
            )
            body = c.V1Lease(metadata=c.V1ObjectMeta(name=self.name, namespace=self.namespace), spec=spec)
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except ApiException as exc2:
                if exc2.status == 409:
                    return None  # created by another replica meanwhile
                raise
            return Term(identity, 1, stamp.timestamp())
        spec = lease.spec or c.V1LeaseSpec()
        holder = spec.holder_identity or ""
        renewed = spec.renew_time or spec.acquire_time
        live = renewed is not None and (
            renewed.timestamp() + (spec.lease_duration_seconds or seconds) > stamp.timestamp()
        )
        if holder not in (identity, "") and live:
            return None
        transitions = (spec.lease_transitions or 0) + (holder != identity)
        patch = {
            # The precondition: the API server refuses the patch (409) if the Lease changed since our read.
            "metadata": {"resourceVersion": lease.metadata.resource_version},
            "spec": {
                "holderIdentity": identity,
                "leaseDurationSeconds": seconds,
                "renewTime": _micro_time(stamp),
                "leaseTransitions": transitions,
                **({"acquireTime": _micro_time(stamp)} if holder != identity else {}),
            },
        }
        try:
            self.api.patch_namespaced_lease(self.name, self.namespace, patch)
        except ApiException as exc:
            if exc.status == 409:
                return None  # changed since we read it
            raise
        return Term(identity, transitions, stamp.timestamp())

    def release(self, identity: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != identity:
                return
            patch = {
                "metadata": {"resourceVersion": lease.metadata.resource_version},
                "spec": {"holderIdentity": "", "renewTime": None},
            }
            self.api.patch_namespaced_lease(self.name, self.namespace, patch)
        except ApiException as exc:
            log.warning("could not release lease %s: %s", self.name, exc.reason)


def _micro_time(stamp: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds."""
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Leadership:
    """Campaigns for the lease in the background and says whether this replica leads now.

    ``on_elected(generation)`` runs when this replica becomes leader, ``on_deposed()`` when it stops being
    one (lost the lease, or could not renew it in time)."""

    def __init__(
        self,
        lease: Lease,
        identity: str,
        *,
        duration: float = 15.0,
        on_elected: Callable[[int], Awaitable[None]] | None = None,
        on_deposed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.lease = lease
        self.identity = identity
        self.duration = duration
        self.margin = duration / 3
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.term: Term | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        """True while this replica's term is live by its own clock (with a margin before others may take
        over)."""
        return self.term is not None and time.time() < self.term.renewed_at + self.duration - self.margin

    @property
    def generation(self) -> int:
        return self.term.generation if self.term else 0

    async def step(self) -> None:
        """One campaign round: acquire or renew; call the hooks on a change."""
        try:
            term = await asyncio.to_thread(self.lease.try_acquire, self.identity, self.duration)
        except Exception as exc:  # noqa: BLE001 - an unreachable lease store: keep the term until it lapses
            log.warning("lease %s: %s", self.identity, exc)
            term = self.term if self.is_leader else None
        was = self.term is not None
        self.term = term
        if term is not None and not was:
            log.info("%s leads (generation %d)", self.identity, term.generation)
            if self.on_elected:
                await self.on_elected(term.generation)
        elif term is None and was:
            log.warning("%s no longer leads", self.identity)
            if self.on_deposed:
                await self.on_deposed()

    async def _run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self.duration / 3 if self.term else self.duration / 5)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.term is not None:
            await asyncio.to_thread(self.lease.release, self.identity)
            self.term = None
