"""Everything a reconciler needs, passed explicitly instead of living in globals."""

from __future__ import annotations

from dataclasses import dataclass

from kakuremichi.control.kube import Kube
from kakuremichi.control.mirror import Mirror
from kakuremichi.control.presence import Presence
from kakuremichi.control.settings import ControlSettings
from kakuremichi.control.state import ControlState


@dataclass
class Context:
    settings: ControlSettings
    state: ControlState
    kube: Kube
    mirror: Mirror
    presence: Presence
