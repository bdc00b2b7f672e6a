"""The audit API (``AuditService`` on decision): the hash-chained audit trail, read and verified over gRPC.

Needs a token with the auditor role. ``sightline audit verify`` checks the database itself, with the MACs and the
signed checkpoints; this API is what a remote auditor or a SIEM job can call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from sightline.common.codec import enum_value
from sightline.sdk.connection import Connection
from sightline.v1 import audit_pb2, audit_pb2_grpc

PAGE_SIZE = 500
AuditAction = audit_pb2.AuditAction


def audit_action(action: AuditAction | str | None) -> AuditAction:
    """An audit action from its name (``"ENROL"``, ``"AUDIT_ACTION_ENROL"``) or value; None is every action."""
    if action is None:
        return audit_pb2.AUDIT_ACTION_UNSPECIFIED
    if isinstance(action, str):
        return cast(AuditAction, enum_value(audit_pb2.AuditAction, action, "AUDIT_ACTION_"))
    return action


class AuditApi:
    """The audit trail: ``client.audit``."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def _stub(self) -> audit_pb2_grpc.AuditServiceStub:
        return self._connection.stub(audit_pb2_grpc.AuditServiceStub)

    def records(
        self,
        *,
        after_sequence: int = 0,
        action: AuditAction | str | None = None,
        principal: str = "",
        subject_id: str = "",
    ) -> Iterator[audit_pb2.AuditRecord]:
        """Records in sequence order after ``after_sequence``, optionally only one action, principal or subject,
        page after page."""
        request = audit_pb2.ListAuditRecordsRequest(
            after_sequence=after_sequence,
            page_size=PAGE_SIZE,
            action=audit_action(action),
            principal=principal,
            subject_id=subject_id,
        )
        while True:
            reply = self._connection.call(self._stub(), "ListAuditRecords", request)
            yield from reply.records
            if not reply.next_after_sequence:
                return
            request.after_sequence = reply.next_after_sequence

    def verify(self) -> audit_pb2.VerifyChainResponse:
        """Recompute the whole chain: ``reply.intact``, else the first broken record and why."""
        reply: audit_pb2.VerifyChainResponse = self._connection.call(
            self._stub(), "VerifyChain", audit_pb2.VerifyChainRequest()
        )
        return reply
