"""A small asyncio Kubernetes API client for the operator's own calls.

Kopf watches and patches through its own aiohttp session but does not expose it; the
operator's few direct calls (get/list/create/patch of trainings, Jobs, Pods, claims and
ConfigMaps) go through this client instead. It authenticates exactly as Kopf does, with
Kopf's login functions (in-cluster service account, else kubeconfig via the official
client's loaders), sends and receives plain JSON dicts (no client-side models), and
logs in again once on 401 (rotated service-account tokens, expiring exec credentials).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
RETRYABLE = (408, 429, 500, 502, 503, 504)


class ApiError(Exception):
    """A failed API call: `status` is the HTTP status (0 when the server was unreachable)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return (self.status == 0 and self.reason != "ClientClosed") or self.status in RETRYABLE


def default_login() -> kopf.ConnectionInfo:
    """Credentials the way Kopf finds them: in-cluster first, then the kubeconfig."""
    settings = kopf.OperatorSettings()
    errors = []
    for login in (kopf.login_via_client, kopf.login_with_service_account,
                  kopf.login_with_kubeconfig):
        try:
            info = login(logger=logger, settings=settings)
        except Exception as exc:  # noqa: BLE001 - try the next way of logging in
            errors.append(f"{login.__name__}: {exc}")
            continue
        if info is not None:
            return info
    raise kopf.LoginError("Cannot find Kubernetes credentials: " + "; ".join(errors))


def path(
    group: str,
    version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The API path of a collection or an object, e.g. path('batch', 'v1', 'jobs', 'ns')."""
    parts = ["/api", version] if not group else ["/apis", group, version]
    if namespace:
        parts += ["namespaces", quote(namespace, safe="")]
    parts.append(plural)
    if name:
        parts.append(quote(name, safe=""))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


class KubeClient:
    def __init__(
        self,
        login: Callable[[], kopf.ConnectionInfo] = default_login,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self._login = login
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retries = retries
        self._backoff = backoff
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._session_lock = asyncio.Lock()
        self._closed = False

    async def _connect(self, fresh: bool = False) -> aiohttp.ClientSession:
        async with self._session_lock:
            if self._closed:
                raise ApiError(0, "ClientClosed", "the operator is shutting down")
            if self._session is not None and not fresh:
                return self._session
            info = await asyncio.to_thread(self._login)
            old, self._session = self._session, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    ssl=info.as_ssl_context() if info.server.startswith("https") else False),
                headers={**info.as_http_headers(), "User-Agent": "chatbot-operator"},
                timeout=self._timeout,
            )
            self._server = info.server.rstrip("/")
            if old is not None:
                await old.close()
            return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        relogged = False
        attempt = 0
        while True:
            session = await self._connect()
            try:
                async with session.request(
                    method, self._server + url, json=body, params=params,
                    headers={"Content-Type": content_type} if body is not None else None,
                ) as response:
                    if response.status == 401 and not relogged:
                        relogged = True
                        await self._connect(fresh=True)
                        continue
                    if response.status >= 400:
                        raise await _api_error(response)
                    return await response.json(content_type=None)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                error = ApiError(0, type(exc).__name__, str(exc) or "connection failed")
            except ApiError as exc:
                error = exc
            if not error.retryable or attempt >= self._retries:
                raise error
            attempt += 1
            await asyncio.sleep(self._backoff * 2 ** (attempt - 1))

    # ----------------------------------------------------------------- conveniences

    async def get(self, url: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", url)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, url: str, label_selector: str | None = None,
                   field_selector: str | None = None) -> list[dict[str, Any]]:
        params = {key: value for key, value in (("labelSelector", label_selector),
                                                ("fieldSelector", field_selector)) if value}
        result = await self.request("GET", url, params=params or None)
        return list((result or {}).get("items") or [])

    async def create(self, url: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """POST; the created object, or None when an object of that name already exists."""
        try:
            return await self.request("POST", url, body=dict(body)) or {}
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

    async def delete(self, url: str) -> dict[str, Any] | None:
        """DELETE (background cascade); None when the object does not exist."""
        try:
            return await self.request("DELETE", url)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(self, url: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386)."""
        return await self.request("PATCH", url, body=dict(body), content_type=MERGE_PATCH)


async def gather(*calls: Any) -> list[Any]:
    """The results of concurrent calls, or the first error. The calls run in tasks that never
    end with an exception of their own (so none can fail unobserved, e.g. while the operator
    stops): each hands its outcome back to this caller."""
    async def outcome(call: Any) -> tuple[bool, Any]:
        try:
            return True, await call
        except Exception as exc:  # noqa: BLE001 - raised below, in the caller
            return False, exc

    results = await asyncio.gather(*(outcome(call) for call in calls))
    for ok, value in results:
        if not ok:
            raise value
    return [value for _, value in results]


async def _api_error(response: aiohttp.ClientResponse) -> ApiError:
    reason, message = response.reason or "", ""
    try:
        payload = await response.json(content_type=None)
    except Exception:  # noqa: BLE001 - not a Status object
        payload = None
    if isinstance(payload, dict):
        reason = str(payload.get("reason") or reason)
        message = str(payload.get("message") or "")
    if not message:
        message = (await response.text())[:500]
    return ApiError(response.status, reason, message)
