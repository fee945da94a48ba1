"""The one CNI error: the spec's code, msg and details.

The agent answers a runtime with one (``CNIError(code, msg, details)``, its text is
``msg``); the lab's runtime raises one for a plugin that failed or could not run,
naming the plugin and the command (``plugin=``, ``command=``).
"""

from __future__ import annotations

from podnet.errors import PodnetError


class CNIError(PodnetError):
    def __init__(self, code: int, msg: str, details: str = "", *, plugin: str | None = None,
                 command: str | None = None):
        self.code = code
        self.msg = msg
        self.details = details
        self.plugin = plugin
        self.command = command
        self.version: str | None = None  # the request's cniVersion, once known (agent side)
        if plugin is None:
            super().__init__(msg)
            return
        text = f"CNI {command} failed in plugin {plugin}: {msg} (code {code})"
        if details:
            text += f": {details}"
        super().__init__(text)
