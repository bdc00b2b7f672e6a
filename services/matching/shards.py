"""Gallery shards: which shard holds a subject, the fan-out of searches to the other shards, and the merge.

A gallery too large for one replica's memory is split by subject into ``shards`` shards (``SIGHTLINE_MATCHING_SHARDS``).
A subject belongs to shard ``shard_of(subject_id, shards)``, a stable hash of its id, so every replica agrees without
asking anyone; each shard's replicas hold only its subjects. The gallery database stays whole: every replica reads and
writes all of it, and only the in-memory index is split.

- **1:N**: every probe is searched on every shard. A replica searches its own shard and asks one replica of each other
  shard (``RemoteShards.search``, in parallel, with a deadline); the per-shard top-k lists are merged by distance, ties
  by subject id (``merge``), before any threshold applies. As each shard returns its own exact top k, the merged top k
  is the top k one shard holding everything would give. A shard that cannot be reached fails the whole search
  (``ShardUnavailable``: UNAVAILABLE on the request path, a retried frame on the stream path), never a partial result:
  a missed watchlist hit is worse than a retry.
- **1:1**: a verification goes to the subject's own shard (``RemoteShards.verify``).
- **Writes**: an enrolment or deletion written by a replica of another shard is followed by ``SyncSubjects`` to the
  owner (``RemoteShards.sync``), which reads those subjects from the database at once, so the write is visible there
  when the writer's call returns; the owner's other replicas see it through the change log.

``ShardServicer`` serves ``sightline.v1.ShardService`` (protos/sightline/v1/shard.proto) on every replica of a sharded
gallery. Only matching replicas call it: a call by any other principal is refused (PERMISSION_DENIED) and reported like
the server's own refusals (``denials.py``). The calls are not audited one by one: the replica that took the request
audits the search or verification (and stream searches are audited in aggregate), as without shards.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc
import numpy as np

from sightline.common import auth, rpc
from sightline.common.models.descriptor_spec import DESCRIPTOR_SIZE
from sightline.common.transient import TransientError
from sightline.matching.index import Candidate
from sightline.matching.names import check_subject_id, check_watchlist_name
from sightline.matching.settings import MatchingSettings
from sightline.v1 import shard_pb2, shard_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = shard_pb2.DESCRIPTOR.services_by_name["ShardService"].full_name
CALLER = auth.service_principal("matching")  # the only principal that may call ShardService
MAX_TOP_K = 1000
MAX_SYNC_IDS = 1000  # subject ids per SyncSubjects request: the field limit of every request list (limits.py)
_FLOAT32_LE = np.dtype("<f4")


class ShardUnavailable(rpc.Unavailable, TransientError):
    """A shard could not answer (down, behind its database, refusing our credentials, misaddressed): the search or
    verification cannot be complete, so it fails. UNAVAILABLE on the request path; on the stream path a transient
    failure, so the frame is retried later, as for ``GalleryUnavailable``."""


def shard_of(subject_id: str, shards: int) -> int:
    """The shard of a subject: the first 8 bytes of the SHA-256 of its UTF-8 id, big-endian, modulo ``shards``.

    Stable across processes, machines and versions (unlike ``hash()``), and spread evenly whatever the ids look like.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    digest = hashlib.sha256(subject_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def merge(per_shard: Sequence[Sequence[Sequence[Candidate]]], top_k: int) -> list[list[Candidate]]:
    """One top-k list per probe from every shard's per-probe lists: nearest first, ties by subject id.

    ``per_shard[s][p]`` is shard ``s``'s candidates for probe ``p``. A subject lives in one shard, so no subject should
    appear twice; if one does (shards configured inconsistently), only its nearest entry is kept, as one shard would.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if not per_shard:
        return []
    probes = {len(lists) for lists in per_shard}
    if len(probes) != 1:
        raise ValueError(f"the shards answered for different numbers of probes: {sorted(probes)}")
    return [_merged([lists[p] for lists in per_shard], top_k) for p in range(probes.pop())]


def _merged(lists: Sequence[Sequence[Candidate]], top_k: int) -> list[Candidate]:
    ranked = sorted((c for found in lists for c in found), key=lambda c: (c.distance, c.subject_id))
    merged: list[Candidate] = []
    seen: set[str] = set()
    for candidate in ranked:
        if candidate.subject_id not in seen:
            seen.add(candidate.subject_id)
            merged.append(candidate)
            if len(merged) == top_k:
                break
    return merged


# -- the wire form ------------------------------------------------------------------------------------------------


def pack(vectors: np.ndarray) -> shard_pb2.Probes:
    """Descriptors ([dim] or [n, dim]) as the wire's ``Probes``: float32 little-endian, row-major."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"expected vectors of shape (dim,) or (n, dim), got {array.shape}")
    return shard_pb2.Probes(vectors=array.astype(_FLOAT32_LE, copy=False).tobytes(), dim=array.shape[1])


def unpack(probes: shard_pb2.Probes) -> np.ndarray:
    """The [n, dim] float32 array of a ``Probes``; InvalidInput when it is not whole rows of finite descriptors."""
    if probes.dim != DESCRIPTOR_SIZE:
        raise rpc.InvalidInput(f"probes.dim is {probes.dim}, expected {DESCRIPTOR_SIZE}")
    row_bytes = probes.dim * _FLOAT32_LE.itemsize
    if not probes.vectors or len(probes.vectors) % row_bytes:
        raise rpc.InvalidInput(f"probes.vectors must be whole rows of {probes.dim} float32 values ({row_bytes} bytes)")
    array = np.frombuffer(probes.vectors, dtype=_FLOAT32_LE).reshape(-1, probes.dim).astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise rpc.InvalidInput("probes.vectors holds NaN or infinite values")
    return array


def candidate_proto(candidate: Candidate) -> shard_pb2.ShardCandidate:
    return shard_pb2.ShardCandidate(
        subject_id=candidate.subject_id,
        distance=candidate.distance,
        watchlists=list(candidate.watchlists),
        template_id=candidate.template_id,
    )


def candidate_of(message: shard_pb2.ShardCandidate) -> Candidate:
    return Candidate(message.subject_id, message.distance, tuple(message.watchlists), message.template_id)


# -- calling the other shards -------------------------------------------------------------------------------------


class RemoteShards:
    """This replica's view of the other shards: one channel to each (``addresses[s]`` reaches shard ``s``; the own
    entry is never called). Calls carry matching's own token and TLS as ``rpc.channel`` does, and run in parallel
    (gRPC futures), each with a deadline of ``timeout_s``. Thread-safe; ``close`` when done."""

    def __init__(self, shard: int, addresses: Sequence[str], timeout_s: float) -> None:
        if len(addresses) < 2:
            raise ValueError(f"a sharded gallery needs the addresses of at least 2 shards, got {len(addresses)}")
        if not 0 <= shard < len(addresses):
            raise ValueError(f"shard {shard} is not one of the {len(addresses)} shards")
        self.shard = shard
        self.shards = len(addresses)
        self.addresses = list(addresses)
        self._timeout = timeout_s
        self._channels = {s: rpc.channel(a) for s, a in enumerate(self.addresses) if s != shard}
        stub: Callable[[grpc.Channel], Any] = shard_pb2_grpc.ShardServiceStub  # generated without annotations
        self._stubs = {s: stub(ch) for s, ch in self._channels.items()}

    @classmethod
    def from_settings(cls, settings: MatchingSettings) -> RemoteShards:
        """The other shards of a sharded replica's settings (shards > 1), with ``peer_timeout_s`` as deadline."""
        return cls(settings.shard, settings.shard_addresses, settings.peer_timeout_s)

    @property
    def others(self) -> list[int]:
        """The other shards, in shard order."""
        return sorted(self._stubs)

    def owner(self, subject_id: str) -> int:
        return shard_of(subject_id, self.shards)

    def search(
        self,
        vectors: np.ndarray,
        top_k: int,
        watchlists: Sequence[str] = (),
        local: Callable[[], list[list[Candidate]]] | None = None,
    ) -> list[list[list[Candidate]]]:
        """Each other shard's per-probe top-k lists, in shard order (``merge`` them with this shard's own), after
        ``local()``'s own lists when given: it runs while the other shards search. ShardUnavailable when any shard
        does not answer: never a partial result."""
        probes = pack(vectors)
        count = len(probes.vectors) // (probes.dim * _FLOAT32_LE.itemsize)
        if count == 0:
            return [*([] if local is None else [local()]), *([] for _ in self.others)]
        calls = {
            (s, 0): self._stubs[s].SearchShard.future(
                shard_pb2.SearchShardRequest(
                    target=self._target(s), probes=probes, top_k=top_k, watchlists=list(watchlists)
                ),
                timeout=self._timeout,
            )
            for s in self.others
        }
        results = [] if local is None else [local()]
        responses = self._gather(calls, "search")
        for s in self.others:
            found = responses[(s, 0)].results
            if len(found) != count:
                raise ShardUnavailable(f"shard {s} ({self.addresses[s]}) answered {len(found)} probes of {count}")
            results.append([[candidate_of(c) for c in probe.candidates] for probe in found])
        return results

    def verify(self, subject_id: str, vector: np.ndarray) -> float | None:
        """The distance from the probe to the subject's nearest template, asked of the subject's own shard; None when
        it holds none. For a subject of this shard, use the local index instead (ValueError)."""
        owner = self.owner(subject_id)
        if owner == self.shard:
            raise ValueError(f"subject {subject_id!r} is this shard's ({owner}): verify it locally")
        request = shard_pb2.VerifyShardRequest(target=self._target(owner), subject_id=subject_id, probe=pack(vector))
        call = self._stubs[owner].VerifyShard.future(request, timeout=self._timeout)
        reply = self._gather({(owner, 0): call}, "verification")[(owner, 0)]
        return reply.distance if reply.found else None

    def sync(self, subject_ids: Sequence[str]) -> None:
        """Asks the owner of each subject of another shard to read it from the database now (after this replica
        wrote it). ShardUnavailable when an owner does not answer: the write is in the database all the same, and
        the owner's change log brings it there within its refresh interval."""
        by_owner: dict[int, list[str]] = {}
        for subject_id in dict.fromkeys(subject_ids):
            if (owner := self.owner(subject_id)) != self.shard:
                by_owner.setdefault(owner, []).append(subject_id)
        calls = {}
        for owner, ids in by_owner.items():
            for start in range(0, len(ids), MAX_SYNC_IDS):
                request = shard_pb2.SyncSubjectsRequest(
                    target=self._target(owner), subject_ids=ids[start : start + MAX_SYNC_IDS]
                )
                calls[(owner, start)] = self._stubs[owner].SyncSubjects.future(request, timeout=self._timeout)
        self._gather(calls, "sync")

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def _target(self, shard: int) -> shard_pb2.ShardTarget:
        return shard_pb2.ShardTarget(shard=shard, shards=self.shards)

    def _gather(self, calls: dict[tuple[int, int], grpc.Future[Any]], what: str) -> dict[tuple[int, int], Any]:
        """Every call's response, by (shard, batch); once all calls have ended (none is left running behind the
        caller's back), the failure of the first shard that failed is raised."""
        responses, failures = {}, {}
        for key, call in calls.items():
            try:
                responses[key] = call.result()
            except grpc.RpcError as error:
                failures[key] = error
        if failures:
            key = min(failures)
            raise self._failure(key[0], failures[key], what)
        return responses

    def _failure(self, shard: int, error: grpc.RpcError, what: str) -> Exception:
        code, details = error.code(), error.details()
        where = f"shard {shard} of {self.shards} ({self.addresses[shard]})"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            # The shard found our own request wrong: retrying the same request cannot help.
            return rpc.InvalidInput(f"{where} refused the {what}: {details}")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            details = f"matching's own credentials were refused ({details}); check its SIGHTLINE_AUTH_TOKEN"
        log.warning("a shard did not answer", extra={"shard": shard, "code": code.name, "call": what})
        return ShardUnavailable(f"{where} did not answer the {what} ({code.name}: {details}); retry later")


# -- serving this shard -------------------------------------------------------------------------------------------


class LocalShard(Protocol):
    """What ShardServicer needs of the gallery: this shard's own search, verification and re-reading of subjects."""

    def local_search(self, vectors: np.ndarray, top_k: int, watchlists: Sequence[str]) -> list[list[Candidate]]: ...

    def local_verify(self, vector: np.ndarray, subject_id: str) -> float | None: ...

    def sync_subjects(self, subject_ids: Sequence[str]) -> None: ...


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    """``sightline.v1.ShardService`` for shard ``shard`` of ``shards``, on this replica's gallery.

    ``on_denied``: where a refused caller is reported (a ``DenialAudit``, as the server reports its own refusals).
    """

    def __init__(
        self,
        gallery: LocalShard,
        shard: int,
        shards: int,
        on_denied: Callable[[auth.Denial], None] | None = None,
    ) -> None:
        self._gallery = gallery
        self._shard = shard
        self._shards = shards
        self._on_denied = on_denied

    @rpc.rpc_errors
    def SearchShard(
        self, request: shard_pb2.SearchShardRequest, context: grpc.ServicerContext
    ) -> shard_pb2.SearchShardResponse:
        self._admit("SearchShard", request.target, context)
        if not 1 <= request.top_k <= MAX_TOP_K:
            raise rpc.InvalidInput(f"top_k must be 1 to {MAX_TOP_K}, got {request.top_k}")
        watchlists = [check_watchlist_name(name) for name in request.watchlists]
        found = self._gallery.local_search(unpack(request.probes), request.top_k, watchlists)
        response = shard_pb2.SearchShardResponse()
        for candidates in found:
            response.results.add(candidates=[candidate_proto(c) for c in candidates])
        return response

    @rpc.rpc_errors
    def VerifyShard(
        self, request: shard_pb2.VerifyShardRequest, context: grpc.ServicerContext
    ) -> shard_pb2.VerifyShardResponse:
        self._admit("VerifyShard", request.target, context)
        subject_id = self._owned(check_subject_id(request.subject_id))
        vector = unpack(request.probe)
        if len(vector) != 1:
            raise rpc.InvalidInput(f"a verification takes one probe, got {len(vector)}")
        distance = self._gallery.local_verify(vector[0], subject_id)
        if distance is None:
            return shard_pb2.VerifyShardResponse(found=False)
        return shard_pb2.VerifyShardResponse(found=True, distance=distance)

    @rpc.rpc_errors
    def SyncSubjects(
        self, request: shard_pb2.SyncSubjectsRequest, context: grpc.ServicerContext
    ) -> shard_pb2.SyncSubjectsResponse:
        self._admit("SyncSubjects", request.target, context)
        subject_ids = [self._owned(check_subject_id(subject_id)) for subject_id in request.subject_ids]
        self._gallery.sync_subjects(subject_ids)
        return shard_pb2.SyncSubjectsResponse()

    def _admit(self, method: str, target: shard_pb2.ShardTarget, context: grpc.ServicerContext) -> None:
        """Only matching replicas may call (anyone when authentication is off), and only for this very shard."""
        caller = auth.current_caller()
        if caller is not None and caller.principal != CALLER:
            self._refuse(f"/{SERVICE}/{method}", caller.principal, context)
        if (target.shard, target.shards) != (self._shard, self._shards):
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this replica holds shard {self._shard} of {self._shards}, the call was meant for shard "
                f"{target.shard} of {target.shards}: the replicas' SIGHTLINE_MATCHING_SHARDS or SHARD_ADDRESSES differ",
            )

    def _owned(self, subject_id: str) -> str:
        if (owner := shard_of(subject_id, self._shards)) != self._shard:
            raise rpc.InvalidInput(f"subject {subject_id!r} belongs to shard {owner}, not to this shard {self._shard}")
        return subject_id

    def _refuse(self, method: str, principal: str, context: grpc.ServicerContext) -> None:
        reason = f"{principal} may not call {method.lstrip('/')}: only {CALLER} (other matching replicas) may"
        log.warning("call refused", extra={"method": method, "code": "PERMISSION_DENIED", "principal": principal})
        if self._on_denied is not None:
            try:
                self._on_denied(auth.Denial("PERMISSION_DENIED", principal, method, reason, context.peer() or ""))
            except Exception:
                log.error("could not report a refused call", exc_info=True, extra={"method": method})
        context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
