"""kopf's API access in tests: one login handler for whichever server a test runs the operator on.

kopf's defaults would read ~/.kube or $KUBECONFIG; tests point it at their own server instead.
Registered once per process (kopf's registry is global); `use()` swaps the credentials.
"""

from __future__ import annotations

import kopf

_CREDENTIALS: dict[str, str | None] = {}


def use(server: str, token: str | None = None, ca: str | None = None) -> None:
    _CREDENTIALS.clear()
    _CREDENTIALS.update(server=server, token=token, ca=ca)


@kopf.on.login()
def _login(**_) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(
        server=_CREDENTIALS["server"],
        ca_path=_CREDENTIALS["ca"],
        token=_CREDENTIALS["token"],
        scheme="Bearer" if _CREDENTIALS["token"] else None,
    )
