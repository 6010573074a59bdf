"""Everything a reconciler needs, passed explicitly instead of living in globals."""

from __future__ import annotations

from dataclasses import dataclass

from kakuremichi.control.kube_api import KubeApi
from kakuremichi.control.mirror import Mirror
from kakuremichi.control.presence import Presence
from kakuremichi.control.settings import ControlSettings
from kakuremichi.control.state import ControlState
from kakuremichi.control.status_writer import StatusWriter


@dataclass
class Context:
    settings: ControlSettings
    state: ControlState
    kube: KubeApi
    mirror: Mirror
    presence: Presence
    statuses: StatusWriter
    """The one way status is written: one writer at a time per object (see its table of who
    writes what)."""
