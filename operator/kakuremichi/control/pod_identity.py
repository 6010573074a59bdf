"""Whether a connection presenting an InCluster pool's key comes from one of that pool's pods.

The pool's key is shared by every pod of the DaemonSet, so it proves membership of the pool at
most; a node's identity (its own key and WireGuard keypair) is handed only to a pod that also
presents its projected ServiceAccount token. The API server vouches for the token (TokenReview:
signed by it, for our audience, bound to a pod that still exists); these rules check the rest
from the token's facts and the pod's own object:

- the token is the pool's ServiceAccount's, in the operator's namespace;
- the pod it is bound to is the one read back (name and uid), not being deleted;
- that pod is controlled by the pool's current DaemonSet (by uid);
- it runs on the node claimed (the API server's node binding, when the token carries one, and
  the pod's ``spec.nodeName``).

Pure: the adapter in ``kube.py`` turns API objects into these facts. A refusal says why for the
operator's log only; the edge gets 4401 and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
NODE_NAME = "authentication.kubernetes.io/node-name"


@dataclass(frozen=True)
class ReviewedToken:
    """What the API server's TokenReview said of a token."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""

    def single(self, key: str) -> str | None:
        values = self.extra.get(key, ())
        return values[0] if len(values) == 1 and values[0] else None


@dataclass(frozen=True)
class PodFacts:
    """The parts of a Pod that decide whether it is a pool's gateway on a node."""

    name: str
    uid: str
    node_name: str
    service_account: str
    controller_kind: str
    controller_uid: str
    deleting: bool


@dataclass(frozen=True)
class ExpectedGatewayPod:
    """What a pod of one pool must be."""

    namespace: str
    service_account: str
    daemonset_uid: str
    audience: str

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def bound_pod(review: ReviewedToken, expected: ExpectedGatewayPod) -> str | None:
    """The name of the pod the token is bound to, if it is a valid token of the pool's
    ServiceAccount for our audience (else None: read nothing more)."""
    if not review.authenticated or review.username != expected.username:
        return None
    if expected.audience not in review.audiences:
        return None
    return review.single(POD_NAME)


def refusal(
    review: ReviewedToken, pod: PodFacts | None, expected: ExpectedGatewayPod, node: str
) -> str | None:
    """Why the token does not prove a pod of the pool on ``node``; None when it does."""
    if not review.authenticated:
        return f"the token was not accepted ({review.error or 'no reason given'})"
    if review.username != expected.username:
        return f"the token is {review.username!r}'s, not the pool's ServiceAccount's"
    if expected.audience not in review.audiences:
        return f"the token is not for the audience {expected.audience!r}"
    name, uid = review.single(POD_NAME), review.single(POD_UID)
    if name is None or uid is None:
        return "the token is not bound to a pod"
    if pod is None or pod.name != name or pod.uid != uid:
        return f"the token's pod {name} is gone"
    if pod.deleting:
        return f"pod {name} is being deleted"
    if pod.service_account != expected.service_account:
        return f"pod {name} runs as another ServiceAccount"
    if pod.controller_kind != "DaemonSet" or pod.controller_uid != expected.daemonset_uid:
        return f"pod {name} is not one of the pool's DaemonSet"
    bound_node = review.single(NODE_NAME)
    if not pod.node_name or pod.node_name != node or (bound_node and bound_node != node):
        return f"pod {name} does not run on node {node}"
    return None
