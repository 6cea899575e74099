"""Rocket.Chat's REST API: the version at ROCKETCHAT_URL, and whether presenced can log in.

Owns:
- the supported range of Rocket.Chat versions (``SUPPORTED``) and the comparison of a
  reported version with it (``parse_version``, ``version_supported``: pure functions);
- :class:`RocketChat`: one check (``GET /api/info``, then with credentials
  ``POST /api/v1/login`` and ``GET /api/v1/me``) turned into a :class:`RestReport`, the
  re-check every ``RECHECK_S``, the log lines when the outcome changes, and the
  ``details()`` that ``/ready`` shows.

Must never:
- block or fail presence: the daemon runs :meth:`RocketChat.run` as a background task and
  nothing waits on it; every request has a deadline, and what the network or Rocket.Chat
  answers (refused connections, timeouts, HTTP errors, HTML, JSON of the wrong shape)
  becomes a problem sentence in the report, never an exception;
- let the password or the auth token reach a log line, a problem, an exception, a repr or
  ``details()``: answers are never quoted, only the ``error``/``message`` fields of a JSON
  error, with every secret masked; URLs are shown with their password masked;
- send credentials to another host: redirects are followed only on the same host and never
  from https to http.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn
from urllib.parse import unquote, urlsplit

import httpx
import trio
from loguru import logger

from presenced import __version__
from presenced.clock import Clock
from presenced.config import Settings
from presenced.log import add_secrets, mask_url, redact

__all__ = [
    "ADMIN_ROLE",
    "MAX_REDIRECTS",
    "RECHECK_S",
    "REQUEST_TIMEOUT_S",
    "SUPPORTED",
    "RestReport",
    "RocketChat",
    "parse_version",
    "supported_text",
    "version_supported",
]

SUPPORTED: Final = (">=6.0", "<8.0")
"""The Rocket.Chat versions presenced is built against: 6.x and 7.x. The presence contract
it mirrors is 7.x's ``ee/packages/presence`` and its ``network-broker``; 6.x writes the same
``usersSessions`` and ``users`` fields. Each bound is an operator and a version."""

RECHECK_S: Final = 600.0
"""Seconds between two checks in :meth:`RocketChat.run`."""
REQUEST_TIMEOUT_S: Final = 10.0
"""Deadline of one request, redirects and reading the answer included."""
MAX_REDIRECTS: Final = 3
"""Redirects followed per request (same host only, never https to http)."""
MAX_BODY_BYTES: Final = 1 << 20
"""Longer answers are refused: /api/info, /login and /me answer a few kilobytes."""
MAX_DETAIL: Final = 200
"""Characters kept of Rocket.Chat's own error text in a problem sentence."""
ADMIN_ROLE: Final = "admin"

Version = tuple[int, int, int]

# "7.5.1", "7.5" (what /api/info tells a caller without view-statistics), "v7.5.1",
# "7.6.0-develop", "7.5.1-rc.0", "7.5.1+build". A pre-release counts as its release.
_VERSION: Final = re.compile(
    r"v?(?P<major>\d+)\.(?P<minor>\d+)(?:\.(?P<patch>\d+))?(?:[-+][0-9A-Za-z.+-]*)?"
)
_BOUND: Final = re.compile(r"(?P<op>>=|<=|==|>|<)\s*(?P<version>\S+)")
_COMPARE: Final[Mapping[str, Callable[[Version, Version], bool]]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


def parse_version(text: str) -> Version | None:
    """``(major, minor, patch)`` of a Rocket.Chat version, or None when it is not one.

    A missing patch is 0 (``"7.5"`` is ``(7, 5, 0)``); a pre-release or build suffix is
    dropped (``"8.0.0-rc.1"`` is ``(8, 0, 0)``, so it is outside ``<8.0``).
    """
    match = _VERSION.fullmatch(text.strip())
    if match is None:
        return None
    return int(match["major"]), int(match["minor"]), int(match["patch"] or 0)


def version_supported(version: str, supported: Sequence[str] = SUPPORTED) -> bool | None:
    """Whether ``version`` satisfies every bound of ``supported`` (e.g. ``(">=6.0",
    "<8.0")``); None when ``version`` cannot be read. A malformed bound is a bug:
    ValueError."""
    parsed = parse_version(version)
    bounds = [_parse_bound(bound) for bound in supported]
    if parsed is None:
        return None
    return all(_COMPARE[op](parsed, limit) for op, limit in bounds)


def supported_text(supported: Sequence[str] = SUPPORTED) -> str:
    """The range as people read it: ``>=6.0, <8.0``."""
    return ", ".join(supported)


def _parse_bound(bound: str) -> tuple[str, Version]:
    match = _BOUND.fullmatch(bound.strip())
    limit = parse_version(match["version"]) if match else None
    if match is None or limit is None:
        raise ValueError(f"version bound {bound!r} is not an operator and a version")
    return match["op"], limit


@dataclass(frozen=True)
class RestReport:
    """What one check found. ``problems`` is empty when everything checked worked; an
    unsupported version or a missing admin role is not a problem (``version_ok``,
    ``admin``), only a warning."""

    reachable: bool
    """Rocket.Chat answered ``/api/info`` over HTTP (whatever it answered)."""
    version: str | None
    """As /api/info reports it (without view-statistics, only major.minor: ``"7.5"``)."""
    version_ok: bool | None
    """Inside ``SUPPORTED``; None when there is no version or it cannot be read."""
    logged_in: bool | None
    """None when no credentials are set, or Rocket.Chat could not be reached."""
    admin: bool | None
    """The user has the admin role; None unless ``/api/v1/me`` answered."""
    problems: list[str] = field(default_factory=list)
    checked_at_ms: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class _Failed(Exception):
    """A step of the check failed; ``problem`` is the sentence for the report."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class _Unreachable(_Failed):
    """No HTTP answer at all: refused, timed out, TLS or protocol failure."""


class _Unauthorized(_Failed):
    """/api/v1/me answered 401: the token is no longer valid."""


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str
    content_type: str
    body: bytes


@dataclass(frozen=True, repr=False)
class _Session:
    user_id: str
    token: str

    def __repr__(self) -> str:
        return f"_Session(user_id={self.user_id!r}, token='****')"


def _default_client(timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,  # followed by hand: same host only (see _redirect)
        headers={"User-Agent": f"presenced/{__version__}", "Accept": "application/json"},
    )


class RocketChat:
    """The REST check of one Rocket.Chat. Build it with :meth:`from_settings`.

    ``client_factory`` makes the ``httpx.AsyncClient`` of one check (a test may hand in one
    with its own transport); it is entered and closed by each check. Checks must not run
    concurrently (``run`` runs them one after the other).
    """

    def __init__(
        self,
        url: str,
        username: str | None,
        password: str | None,
        *,
        clock: Clock,
        client_factory: Callable[[], httpx.AsyncClient] | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self._base = url.rstrip("/")
        self._username = username
        self._password = password
        self._clock = clock
        self._timeout_s = timeout_s
        self._recheck_s = recheck_s
        self._client_factory = client_factory or (lambda: _default_client(timeout_s))
        self._secrets = _url_secrets(url) + ([password] if password else [])
        self._session: _Session | None = None
        self._last: RestReport | None = None
        self._failing_since: float | None = None
        self._warned_version: str | None = None
        self._warned_admin = False
        self.shown_url = mask_url(self._base)
        """ROCKETCHAT_URL with its password, if any, masked."""

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock) -> RocketChat | None:
        """The check for ROCKETCHAT_URL and its credentials; None when it is unset."""
        if settings.rocketchat_url is None:
            return None
        return cls(
            settings.rocketchat_url,
            settings.rocketchat_username,
            settings.rocketchat_password,
            clock=clock,
        )

    def __repr__(self) -> str:
        return f"RocketChat(url={self.shown_url!r}, username={self._username!r})"

    @property
    def credentials(self) -> bool:
        return bool(self._username and self._password)

    @property
    def last(self) -> RestReport | None:
        """The report of the last check; None before the first."""
        return self._last

    # -- the check ------------------------------------------------------------------------
    async def check(self) -> RestReport:
        """Ask Rocket.Chat its version, then log in and read the user's roles (when
        credentials are set). Never raises for what the network or Rocket.Chat answers."""
        problems: list[str] = []
        reachable = False
        version: str | None = None
        logged_in: bool | None = None
        admin: bool | None = None
        async with self._client_factory() as client:
            try:
                version = await self._info(client)
                reachable = True
            except _Failed as failed:
                problems.append(failed.problem)
                reachable = not isinstance(failed, _Unreachable)
            if reachable and self.credentials:
                logged_in = False
                try:
                    roles = await self._roles(client)
                    logged_in = True
                    admin = ADMIN_ROLE in roles
                except _Failed as failed:
                    problems.append(failed.problem)
        version_ok = None if version is None else version_supported(version)
        report = RestReport(
            reachable=reachable,
            version=version,
            version_ok=version_ok,
            logged_in=logged_in,
            admin=admin,
            problems=problems,
            checked_at_ms=self._clock.now_ms(),
        )
        self._last = report
        return report

    async def _info(self, client: httpx.AsyncClient) -> str:
        what = "GET /api/info"
        answer = await self._send(client, "GET", "/api/info", what=what)
        if answer.status == 404:
            raise _Failed(
                f"{self.shown_url} answered {what} with HTTP 404: it does not look like"
                " Rocket.Chat; set ROCKETCHAT_URL to Rocket.Chat's address (the one its web"
                " client uses)"
            )
        if answer.status != 200:
            raise _Failed(self._http_problem(what, answer))
        body = self._json_object(what, answer)
        version = body.get("version")
        if body.get("success") is False or not isinstance(version, str) or not version:
            raise _Failed(
                f"{self.shown_url} answered {what} without a version string; is ROCKETCHAT_URL"
                " Rocket.Chat's address?"
            )
        return version

    async def _roles(self, client: httpx.AsyncClient) -> list[str]:
        """The user's roles from /api/v1/me, logging in first if needed and once more when
        Rocket.Chat says the token is no longer valid."""
        if self._session is None:
            self._session = await self._login(client)
        try:
            return await self._me(client, self._session)
        except _Unauthorized:
            self._session = None
        self._session = await self._login(client)
        try:
            return await self._me(client, self._session)
        except _Unauthorized:
            self._session = None
            raise _Failed(
                f"{self.shown_url} refused the token it had just issued to user"
                f" {self._username!r} (GET /api/v1/me answered HTTP 401 twice); check that"
                " no proxy in front of Rocket.Chat drops the X-Auth-Token and X-User-Id"
                " headers"
            ) from None

    async def _login(self, client: httpx.AsyncClient) -> _Session:
        what = "POST /api/v1/login"
        answer = await self._send(
            client,
            "POST",
            "/api/v1/login",
            what=what,
            body={"user": self._username, "password": self._password},
        )
        if answer.status == 401:
            detail = self._error_detail(answer)
            if "totp" in detail.lower():
                raise _Failed(
                    f"{self.shown_url} asks user {self._username!r} for a two-factor code"
                    f" ({detail}); presenced cannot give one: set ROCKETCHAT_USERNAME to an"
                    " account without two-factor authentication"
                )
            raise _Failed(
                f"{self.shown_url} refused the login of user {self._username!r} (HTTP 401"
                f"{': ' + detail if detail else ''}); check ROCKETCHAT_USERNAME and"
                " ROCKETCHAT_PASSWORD (or ROCKETCHAT_PASSWORD_FILE)"
            )
        if answer.status != 200:
            raise _Failed(self._http_problem(what, answer))
        data = self._json_object(what, answer).get("data")
        token = data.get("authToken") if isinstance(data, dict) else None
        user_id = data.get("userId") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token or not isinstance(user_id, str):
            raise _Failed(
                f"{self.shown_url} answered {what} with HTTP 200 but without data.authToken"
                " and data.userId; is ROCKETCHAT_URL Rocket.Chat's address?"
            )
        self._secrets.append(token)
        add_secrets([token])
        return _Session(user_id=user_id, token=token)

    async def _me(self, client: httpx.AsyncClient, session: _Session) -> list[str]:
        what = "GET /api/v1/me"
        answer = await self._send(
            client,
            "GET",
            "/api/v1/me",
            what=what,
            headers={"X-Auth-Token": session.token, "X-User-Id": session.user_id},
        )
        if answer.status == 401:
            raise _Unauthorized(self._http_problem(what, answer))
        if answer.status != 200:
            raise _Failed(self._http_problem(what, answer))
        roles = self._json_object(what, answer).get("roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise _Failed(
                f"{self.shown_url} answered {what} without a list of roles; is ROCKETCHAT_URL"
                " Rocket.Chat's address?"
            )
        return roles

    # -- HTTP -----------------------------------------------------------------------------
    async def _send(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        *,
        what: str,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Answer:
        """One request under the deadline, its same-host redirects followed, its answer
        read up to ``MAX_BODY_BYTES``. Network failures become :class:`_Failed`."""
        try:
            url = httpx.URL(self._base + path)
            with trio.fail_after(self._timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    request = client.build_request(
                        method, url, json=body, headers=dict(headers or {})
                    )
                    response = await client.send(request, stream=True)
                    try:
                        if response.status_code in _REDIRECTS:
                            url = self._redirect(what, url, response)
                            if response.status_code == 303:
                                method, body = "GET", None
                            continue
                        return _Answer(
                            status=response.status_code,
                            reason=response.reason_phrase,
                            content_type=response.headers.get("content-type", ""),
                            body=await self._read(what, response),
                        )
                    finally:
                        await response.aclose()
        except (trio.TooSlowError, httpx.TimeoutException):
            raise _Unreachable(
                f"{self.shown_url} did not answer {what} within {self._timeout_s:g} s;"
                " check ROCKETCHAT_URL and that Rocket.Chat is running"
            ) from None
        except httpx.ConnectError as exc:
            raise _Unreachable(
                f"cannot connect to {self.shown_url} ({what}): {self._reason(exc)}; check"
                " ROCKETCHAT_URL and that Rocket.Chat is running"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise _Unreachable(
                f"{what} to {self.shown_url} failed: {self._reason(exc)}"
            ) from None
        raise _Failed(
            f"{self.shown_url} redirected {what} more than {MAX_REDIRECTS} times; set"
            " ROCKETCHAT_URL to the address Rocket.Chat answers at"
        )

    def _redirect(self, what: str, current: httpx.URL, response: httpx.Response) -> httpx.URL:
        location = response.headers.get("location", "")
        try:
            target = current.join(location) if location else None
        except httpx.InvalidURL:
            target = None
        if (
            target is None
            or target.host.lower() != current.host.lower()
            or (current.scheme == "https" and target.scheme != "https")
        ):
            shown = mask_url(str(target)) if target is not None else "nowhere"
            raise _Failed(
                f"{self.shown_url} redirected {what} to {shown}, which presenced does not"
                " follow with credentials (another host, or https to http); set"
                " ROCKETCHAT_URL to the address Rocket.Chat answers at"
            )
        return target

    async def _read(self, what: str, response: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _Failed(
                    f"{self.shown_url} answered {what} with more than {MAX_BODY_BYTES} bytes;"
                    " is ROCKETCHAT_URL Rocket.Chat's address?"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    # -- reading answers ------------------------------------------------------------------
    def _json_object(self, what: str, answer: _Answer) -> dict[str, Any]:
        try:
            parsed = _parse_json(answer.body)
        except ValueError:
            looks_html = "html" in answer.content_type.lower() or answer.body.lstrip()[
                :1
            ] == b"<"
            kind = "an HTML page" if looks_html else "a body that is not JSON"
            raise _Failed(
                f"{self.shown_url} answered {what} with {kind} (HTTP {answer.status},"
                f" {answer.content_type or 'no content type'}); is ROCKETCHAT_URL"
                " Rocket.Chat's address, not a proxy's or a login page's?"
            ) from None
        if not isinstance(parsed, dict):
            raise _Failed(
                f"{self.shown_url} answered {what} with JSON that is not an object; is"
                " ROCKETCHAT_URL Rocket.Chat's address?"
            )
        return parsed

    def _error_detail(self, answer: _Answer) -> str:
        """Rocket.Chat's own ``error``/``message`` of a JSON error answer, one line, secrets
        masked; empty when there is none. The rest of the answer is never shown."""
        try:
            parsed = _parse_json(answer.body)
        except ValueError:
            return ""
        if not isinstance(parsed, dict):
            return ""
        parts: list[str] = []
        for key in ("error", "message"):
            value = parsed.get(key)
            if isinstance(value, str) and value.strip() and value.strip() not in parts:
                parts.append(value.strip())
        return self._clean(": ".join(parts))

    def _http_problem(self, what: str, answer: _Answer) -> str:
        detail = self._error_detail(answer)
        return (
            f"{self.shown_url} answered {what} with HTTP {answer.status}"
            f"{' ' + answer.reason if answer.reason else ''}{' (' + detail + ')' if detail else ''}"
        )

    def _reason(self, exc: BaseException) -> str:
        return self._clean(str(exc)) or type(exc).__name__

    def _clean(self, text: str) -> str:
        line = redact(" ".join(text.split()), self._secrets)
        return line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 1] + "…"

    # -- the loop, its log and /ready -----------------------------------------------------
    async def run(self) -> NoReturn:
        """Check now and every ``RECHECK_S`` for ever, logging only what changed: the first
        failure (and a different one), the recovery, an unsupported version, a user
        without the admin role. Cancel it to stop."""
        while True:
            previous = self._last
            try:
                report = await self.check()
            except Exception:
                logger.exception(
                    "the Rocket.Chat REST check at {} failed unexpectedly (a bug in"
                    " presenced); presence is not affected; trying again in {:g} s",
                    self.shown_url, self._recheck_s,
                )
            else:
                self._log_change(previous, report)
            await self._clock.sleep(self._recheck_s)

    def _log_change(self, previous: RestReport | None, report: RestReport) -> None:
        now = self._clock.monotonic()
        if report.problems:
            if previous is None or previous.problems != report.problems:
                if self._failing_since is None:
                    self._failing_since = now
                logger.warning(
                    "Rocket.Chat REST check failed: {}; checking again every {:g} s"
                    " (presence is not affected)",
                    "; ".join(report.problems), self._recheck_s,
                )
        elif previous is None or previous.problems:
            if self._failing_since is None:
                logger.info("Rocket.Chat REST API at {}: {}", self.shown_url,
                            self._summary(report))
            else:
                logger.info(
                    "Rocket.Chat REST API at {} works again after {:.0f} s: {}",
                    self.shown_url, now - self._failing_since, self._summary(report),
                )
            self._failing_since = None

        if report.version is not None and not report.version_ok:
            if report.version != self._warned_version:
                self._warned_version = report.version
                self._warn_version(report.version, report.version_ok)
        elif report.version_ok:
            self._warned_version = None

        if report.admin is False and not self._warned_admin:
            self._warned_admin = True
            logger.warning(
                "Rocket.Chat user {!r} at {} does not have the admin role: presenced cannot"
                " use Rocket.Chat's admin-only REST endpoints with it (such as the full"
                " server information); presence is not affected. Give the user the admin"
                " role (Administration > Users) if you need them",
                self._username, self.shown_url,
            )
        elif report.admin:
            self._warned_admin = False

    def _warn_version(self, version: str, version_ok: bool | None) -> None:
        if version_ok is None:
            logger.warning(
                "Rocket.Chat at {} reports version {!r}, which presenced cannot read;"
                " presenced supports Rocket.Chat {}: check that ROCKETCHAT_URL is"
                " Rocket.Chat's address",
                self.shown_url, version, supported_text(),
            )
        else:
            logger.warning(
                "Rocket.Chat {} at {} is outside the versions presenced supports ({}):"
                " presence is computed as Rocket.Chat 7.x computes it, which this version"
                " may not; run a supported Rocket.Chat or a presenced release that"
                " supports this one",
                version, self.shown_url, supported_text(),
            )

    def _summary(self, report: RestReport) -> str:
        support = {True: "supported", False: "unsupported", None: "unreadable"}
        text = f"version {report.version} ({support[report.version_ok]})"
        if report.logged_in:
            role = "with" if report.admin else "without"
            text += f", logged in as {self._username!r} ({role} the admin role)"
        elif not self.credentials:
            text += ", login not checked (ROCKETCHAT_USERNAME and ROCKETCHAT_PASSWORD unset)"
        return text

    def details(self) -> dict[str, Any]:
        """The REST check for ``/ready``'s JSON: no secret, URL password masked."""
        report = self._last
        if report is None:
            return {
                "url": self.shown_url,
                "supported": supported_text(),
                "version": None,
                "version_ok": None,
                "logged_in": None,
                "admin": None,
                "problem": None,
                "checked_at": None,
            }
        return {
            "url": self.shown_url,
            "supported": supported_text(),
            "version": report.version,
            "version_ok": report.version_ok,
            "logged_in": report.logged_in,
            "admin": report.admin,
            "problem": "; ".join(report.problems) if report.problems else None,
            "checked_at": _iso(report.checked_at_ms),
        }


def _parse_json(body: bytes) -> Any:
    """``json.loads``; ValueError for anything that is not JSON, a nesting too deep for the
    parser included (a garbage answer must not escape as RecursionError)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def _url_secrets(url: str) -> list[str]:
    password = urlsplit(url).password
    return list(dict.fromkeys([password, unquote(password)])) if password else []


def _iso(at_ms: int) -> str:
    instant = dt.datetime.fromtimestamp(at_ms / 1000, tz=dt.UTC)
    return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")
