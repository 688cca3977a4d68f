"""Leader election for coordinator replicas: a lease in storage (compare-and-swap) or a Kubernetes Lease
(against kmock's emulator, driven by the official client). Only one replica leads; when it dies another
takes over with a higher generation."""

from __future__ import annotations

import asyncio
import time

import kmock
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dreamframe.storage import LocalStore
from services.coordinator.leader import KubernetesLease, Leadership, StorageLease


def test_storage_lease_one_leader_then_failover(tmp_path):
    async def scenario() -> None:
        store = LocalStore(tmp_path / "store", "dreamframe")
        events: list[tuple[str, object]] = []

        def replica(name: str) -> Leadership:
            async def elected(generation: int) -> None:
                events.append((name, generation))

            async def deposed() -> None:
                events.append((name, "deposed"))

            return Leadership(StorageLease(store), name, duration=0.6, on_elected=elected, on_deposed=deposed)

        a, b = replica("a"), replica("b")
        await a.step()
        await b.step()
        assert a.is_leader and not b.is_leader and a.generation == 1
        await a.step()  # a renewal keeps the generation
        assert a.generation == 1 and events == [("a", 1)]
        # a dies without releasing (kill -9): nobody renews; b takes over once the lease expired
        await asyncio.sleep(0.7)
        assert not a.is_leader  # a's own clock already says it must not lead
        await b.step()
        assert b.is_leader and b.generation == 2 and events[-1] == ("b", 2)
        await a.step()  # a comes back: deposed, b keeps the lease
        assert not a.is_leader and ("a", "deposed") in events and b.is_leader
        await b.stop()  # a clean shutdown releases: a takes over at once
        await a.step()
        assert a.is_leader and a.generation == 3

    asyncio.run(scenario())


def test_kubernetes_lease_against_the_api():
    async def scenario() -> None:
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            api = client.ApiClient(client.Configuration(host=str(server.url).rstrip("/")))
            a = KubernetesLease(api, "dreamframe", "dreamframe-coordinator")
            b = KubernetesLease(api, "dreamframe", "dreamframe-coordinator")
            assert (await asyncio.to_thread(a.try_acquire, "a", 1)).generation == 1
            assert await asyncio.to_thread(b.try_acquire, "b", 1) is None
            assert (await asyncio.to_thread(a.try_acquire, "a", 1)).generation == 1  # renewed
            await asyncio.sleep(1.3)
            term = await asyncio.to_thread(b.try_acquire, "b", 1)
            assert term is not None and term.holder == "b" and term.generation == 2
            assert await asyncio.to_thread(a.try_acquire, "a", 1) is None
            lease = await asyncio.to_thread(
                a.api.read_namespaced_lease, "dreamframe-coordinator", "dreamframe"
            )
            assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions == 2
            # every change is a patch conditioned on the resourceVersion that was read
            assert all("resourceVersion" in p.data["metadata"] for p in k8s["patch"])

    asyncio.run(scenario())


def test_a_conflict_from_the_api_server_means_someone_else_won():
    class Racing:
        def read_namespaced_lease(self, name, namespace):
            past = client.V1Lease(
                metadata=client.V1ObjectMeta(name=name, resource_version="7"),
                spec=client.V1LeaseSpec(holder_identity="", lease_transitions=4),
            )
            return past

        def patch_namespaced_lease(self, name, namespace, body):
            assert body["metadata"]["resourceVersion"] == "7"
            raise ApiException(status=409, reason="Conflict")

    lease = KubernetesLease(client.ApiClient(client.Configuration(host="http://127.0.0.1:9")), "ns", "l")
    lease.api = Racing()
    assert lease.try_acquire("a", 5) is None


def test_an_unreachable_lease_store_keeps_a_live_term_until_it_lapses():
    class Flaky:
        fail = False

        def try_acquire(self, identity, duration):
            if self.fail:
                raise ConnectionError("lease store down")
            from services.coordinator.leader import Term

            return Term(identity, 1, time.time())

        def release(self, identity):
            pass

    async def scenario() -> None:
        lease = Flaky()
        leader = Leadership(lease, "a", duration=0.6)
        await leader.step()
        lease.fail = True
        await leader.step()
        assert leader.is_leader  # within its term
        await asyncio.sleep(0.45)
        await leader.step()
        assert not leader.is_leader and leader.term is None

    asyncio.run(scenario())
