"""Who may claim a node's gateway identity with an InCluster pool's key: only the pool's
DaemonSet pod on that node, proven by its pod-bound token."""

from __future__ import annotations

import dataclasses

import pytest

from kakuremichi.control.pod_identity import (
    NODE_NAME,
    POD_NAME,
    POD_UID,
    ExpectedGatewayPod,
    PodFacts,
    ReviewedToken,
    bound_pod,
    refusal,
)

EXPECTED = ExpectedGatewayPod(
    namespace="kakuremichi-system",
    service_account="kakuremichi-gateway-edge",
    daemonset_uid="ds-uid",
    audience="kakuremichi",
)
REVIEW = ReviewedToken(
    authenticated=True,
    username="system:serviceaccount:kakuremichi-system:kakuremichi-gateway-edge",
    audiences=("kakuremichi",),
    extra={POD_NAME: ("gw-abcde",), POD_UID: ("pod-uid",), NODE_NAME: ("node-a",)},
)
POD = PodFacts(
    name="gw-abcde",
    uid="pod-uid",
    node_name="node-a",
    service_account="kakuremichi-gateway-edge",
    controller_kind="DaemonSet",
    controller_uid="ds-uid",
    deleting=False,
)


def test_the_pools_pod_on_its_node_is_proven() -> None:
    assert bound_pod(REVIEW, EXPECTED) == "gw-abcde"
    assert refusal(REVIEW, POD, EXPECTED, "node-a") is None


def test_a_token_without_the_api_servers_node_binding_relies_on_the_pod() -> None:
    older = dataclasses.replace(REVIEW, extra={POD_NAME: ("gw-abcde",), POD_UID: ("pod-uid",)})
    assert refusal(older, POD, EXPECTED, "node-a") is None
    assert refusal(older, POD, EXPECTED, "node-b") is not None


@pytest.mark.parametrize(
    ("review", "pod", "node", "why"),
    [
        # The pool's key alone, or a token the API server did not accept.
        (ReviewedToken(False, error="invalid bearer token"), None, "node-a", "not accepted"),
        # A token of another ServiceAccount (say the operator's own, or a tenant's).
        (dataclasses.replace(REVIEW, username="system:serviceaccount:team-a:default"), POD,
         "node-a", "not the pool's ServiceAccount"),
        # A token for another audience (e.g. the API server's own): replayed here.
        (dataclasses.replace(REVIEW, audiences=("https://kubernetes.default.svc",)), POD,
         "node-a", "audience"),
        # Not bound to any pod (kubectl create token without --bound-object-*).
        (dataclasses.replace(REVIEW, extra={}), POD, "node-a", "not bound to a pod"),
        # Bound to a pod that is gone, or to another pod than the one read back.
        (REVIEW, None, "node-a", "gone"),
        (REVIEW, dataclasses.replace(POD, uid="other-uid"), "node-a", "gone"),
        (REVIEW, dataclasses.replace(POD, deleting=True), "node-a", "being deleted"),
        # A pod of the namespace that borrowed the pool's ServiceAccount but is not the pool's.
        (REVIEW, dataclasses.replace(POD, controller_kind="", controller_uid=""), "node-a",
         "not one of the pool's DaemonSet"),
        (REVIEW, dataclasses.replace(POD, controller_uid="another-ds"), "node-a",
         "not one of the pool's DaemonSet"),
        (REVIEW, dataclasses.replace(POD, controller_kind="ReplicaSet"), "node-a",
         "not one of the pool's DaemonSet"),
        (REVIEW, dataclasses.replace(POD, service_account="default"), "node-a",
         "another ServiceAccount"),
        # The pool's pod on node-a claiming node-b's identity (and its private key).
        (REVIEW, POD, "node-b", "does not run on node node-b"),
        (REVIEW, dataclasses.replace(POD, node_name=""), "node-a", "does not run on"),
        (REVIEW, dataclasses.replace(POD, node_name="node-b"), "node-b", "does not run on"),
        (REVIEW, POD, "", "does not run on"),
    ],
)  # fmt: skip
def test_everything_else_is_refused(
    review: ReviewedToken, pod: PodFacts | None, node: str, why: str
) -> None:
    reason = refusal(review, pod, EXPECTED, node)
    assert reason is not None and why in reason


def test_nothing_more_is_read_for_a_token_that_is_not_the_pools() -> None:
    assert bound_pod(ReviewedToken(False), EXPECTED) is None
    other = dataclasses.replace(REVIEW, username="system:serviceaccount:x:y")
    assert bound_pod(other, EXPECTED) is None
    assert bound_pod(dataclasses.replace(REVIEW, audiences=()), EXPECTED) is None


def test_ambiguous_claims_are_not_a_pod() -> None:
    two = dataclasses.replace(REVIEW, extra={**REVIEW.extra, POD_NAME: ("a", "b")})
    assert bound_pod(two, EXPECTED) is None
    assert refusal(two, POD, EXPECTED, "node-a") == "the token is not bound to a pod"
