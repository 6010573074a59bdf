"""The open-file limit of an edge process (gateway, agent, HTTPS worker)."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)


def raise_file_limit() -> int:
    """Every connection is a file descriptor (two on the gateway): lift the soft limit (often
    1024) to the hard one, as nginx's worker_rlimit_nofile would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit above %d", soft)
    return soft
