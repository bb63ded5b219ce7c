"""The gateway's web view (mesh.gateway.web) in a real headless Chromium (Playwright), on a
real server with auth on: agents whose work waits for an approval, a gateway on a loopback
port, people signing in with their tokens, the list and the tree updating by themselves, an
approver's click finishing the work, and a hostile body shown as text.

Chromium is the system's (`make test` installs it; or MESH_BROWSER=/path/to/chromium)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from mesh_user_streaming import agent as streamer
from mesh_user_tools import REFUNDS
from mesh_user_tools import agent as clerk
from playwright.async_api import Browser, Page, async_playwright, expect
from sample_agents.webview import intake

from mesh.gateway.app import Gateway
from mesh.gateway.auth import GatewayAuth
from mesh.gateway.session import Sessions
from mesh.gateway.web import WebConfig
from mesh.gateway.wire import idempotent_ids
from mesh.llm.offline import OfflineLLM
from mesh.llm.streaming import LLMChunk
from mesh.llm.types import Delta, Request, StreamEvent
from mesh.observability import history
from mesh.runtime.client import MeshClient
from mesh.testing import running_agent
from mesh.transport.identities import with_role
from mesh.wire import subjects
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

ALICE = "alice-token-0123456789-approver"  # may decide approvals
BOB = "bob-token-0123456789-watcher"  # may only watch
TRACE_URL = "http://jaeger.example:16686/trace/{trace_id}"
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT = 20_000  # ms: generous, for a loaded machine


def _chromium() -> str:
    found = os.environ.get("MESH_BROWSER") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(found).is_file():
        pytest.fail(
            f"no Chromium at {found}: `make test` installs it (apt-get install chromium), "
            "or set MESH_BROWSER=/path/to/chromium"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    gateway: Gateway


@pytest.fixture
def served(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    """A real gateway on a loopback port (uvicorn in a thread, with its own event loop), with
    alice as an approver and the operator's credentials for her decisions (and a trace UI,
    unless the test's parameter says ``trace_url=""``)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice={ALICE}\nbob={BOB}\n")
    publisher = with_role(settings, "publisher")
    operator_creds = with_role(settings, "operator").nats_creds
    auth = GatewayAuth.load(tokens, environ={})
    web = WebConfig.load(
        publisher,
        auth,
        approvers="alice",
        decider_creds=operator_creds,
        trace_url=getattr(request, "param", {}).get("trace_url", TRACE_URL),
    )
    gateway = Gateway(publisher, auth, web=web)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(gateway.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        assert server.started, "the gateway did not start within 10 s"
        yield Served(f"http://127.0.0.1:{port}", gateway)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def _signed_in(browser: Browser, url: str, token: str) -> Page:
    page = await (await browser.new_context()).new_page()
    page.set_default_timeout(WAIT)
    await page.goto(f"{url}/ui/")
    await expect(page).to_have_url(f"{url}/ui/login")  # no session: the form
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(f"{url}/ui/")
    return page


async def test_the_web_view_follows_a_conversation_live_and_an_approver_finishes_it(
    served: Served, browser: Browser, settings: Settings, client: MeshClient, tmp_path: Path
) -> None:
    REFUNDS.clear()
    url = served.url
    async with running_agent(intake, settings), running_agent(clerk, settings):
        alice = await _signed_in(browser, url, ALICE)
        # the session: a cookie the page's scripts cannot read, sent to this site only
        [cookie] = await alice.context.cookies()
        assert cookie["name"] == "mesh_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert ALICE not in cookie["value"]
        page = await alice.request.get(f"{url}/ui/")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        await expect(alice.locator("#live")).to_have_text("live", timeout=WAIT)
        await alice.evaluate("window.stillTheSamePage = true")

        # a conversation started over HTTP appears in the list without a reload
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            started = await http.post(
                "/v1/agents/intake?type=test.web_order",
                json={"order": "W-42", "note": HOSTILE},
                headers={"Authorization": f"Bearer {ALICE}"},
            )
            assert started.status_code == 202, started.text
            conv = started.json()["conversation"]
            # a token that may not decide is refused, with what it takes
            refused = await http.post(
                "/ui/api/approvals/any-approval",
                json={"approved": True},
                headers={"Authorization": f"Bearer {BOB}"},
            )
            assert refused.status_code == 403 and refused.json()["error"] == "not_an_approver"
            assert "MESH_GATEWAY_APPROVERS" in refused.json()["detail"]
        row = alice.locator(f'tr[data-conversation="{conv}"]')
        await expect(row).to_be_visible(timeout=WAIT)
        assert await alice.evaluate("window.stillTheSamePage") is True
        ARTIFACTS.mkdir(exist_ok=True)
        await alice.screenshot(path=str(ARTIFACTS / "webview-list.png"))

        # open it: the tree shows the work up to the approval it waits for
        await row.locator("a").click()
        await expect(alice).to_have_url(f"{url}/ui/c/{conv}")
        await alice.evaluate("window.stillTheSamePage = true")
        await expect(alice.locator('.node[data-type="approval.request"]')).to_be_visible(timeout=WAIT)
        approve = alice.locator("#waiting button.approve")
        await expect(approve).to_be_visible(timeout=WAIT)
        await expect(alice.locator("#status")).to_have_text("waiting", timeout=WAIT)
        before = await alice.locator(".node").count()

        # bob watches the same conversation: the approval is shown, with no button for him
        bob = await _signed_in(browser, url, BOB)
        await bob.goto(f"{url}/ui/c/{conv}")
        await expect(bob.locator("#waiting .approval")).to_be_visible(timeout=WAIT)
        await expect(bob.locator("#waiting")).to_contain_text("an approver decides")
        assert await bob.locator("#waiting button").count() == 0
        # and his list shows it waiting; it will change by itself
        watching = await bob.context.new_page()
        await watching.goto(f"{url}/ui/")
        listed = watching.locator(f'tr[data-conversation="{conv}"]')
        await expect(listed.locator(".status")).to_have_text("waiting", timeout=WAIT)
        counted = int(await listed.locator("td.messages").inner_text())
        # a POST with alice's cookie but without the CSRF token is refused
        forged = await alice.request.post(f"{url}/ui/api/approvals/any-approval", data={"approved": True})
        assert forged.status == 403 and (await forged.json())["error"] == "csrf"

        # alice approves: the work finishes and the tree grows in front of her
        await approve.click()
        resolved_node = alice.locator('.node[data-type="approval.resolved"]')
        await expect(resolved_node).to_contain_text('"person": "token:alice"', timeout=WAIT)
        await expect(alice.locator("#waiting")).to_be_hidden(timeout=WAIT)  # nothing waits any more
        await expect(alice.locator('.node[data-type="test.web_done"]')).to_be_visible(timeout=WAIT)
        await expect(alice.locator("#status")).to_have_text("done", timeout=WAIT)
        after = await alice.locator(".node").count()
        await expect(listed.locator(".status")).to_have_text("done", timeout=WAIT)
        assert int(await listed.locator("td.messages").inner_text()) > counted
        assert after > before, (before, after)
        assert await alice.evaluate("window.stillTheSamePage") is True
        assert REFUNDS and REFUNDS[0].order_id == "W-42"

        # the hostile body is text: shown as written, no element made of it, no script run
        await expect(alice.locator("#tree").get_by_text("<img src=x onerror=").first).to_be_visible()
        assert await alice.locator("#tree img").count() == 0
        assert "pwned" not in await alice.title()
        # timings and the trace link
        await expect(alice.locator(".delivery").first).to_contain_text("handled")
        link = alice.locator("a.trace-link").first
        assert (await link.get_attribute("href") or "").startswith("http://jaeger.example:16686/trace/")

        shot = tmp_path / "webview.png"
        await alice.screenshot(path=str(shot), full_page=True)
        shutil.copy(shot, ARTIFACTS / "webview.png")
        print(f"\nscreenshot of the conversation page: {shot} (and {ARTIFACTS / 'webview.png'})")
        png = shot.read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000

    # the decision is recorded as alice's, through her token's name
    msgs = await history.conversation(client.transport, conv)
    [resolved] = [m for m in msgs if m.type == "approval.resolved"]
    assert resolved.body()["status"] == "approved" and resolved.body()["person"] == "token:alice"


class HeldLLM(OfflineLLM):
    """The offline model, streaming its first words and then holding the rest until `go`."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        n = 0
        async for event in super().stream(request):
            if isinstance(event, Delta) and n == 3:
                await self.go.wait()
            n += 1
            yield event


@pytest.mark.parametrize("served", [{"trace_url": ""}], indirect=True)
async def test_a_streamed_answer_grows_on_the_page_until_it_is_final(
    served: Served, browser: Browser, settings: Settings
) -> None:
    held = HeldLLM()
    # the conversation's id is known before it starts (from the Idempotency-Key): the page
    # is open first, since streamed chunks are live only, never recorded
    conv = idempotent_ids("token:alice", "stream-1")[1]
    assert conv is not None
    async with running_agent(streamer, settings, llm=held) as runtime:
        alice = await _signed_in(browser, served.url, ALICE)
        await alice.goto(f"{served.url}/ui/c/{conv}")
        await expect(alice.locator("#live")).to_have_text("live", timeout=WAIT)
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
            started = await http.post(
                "/v1/agents/streamer?type=test.question",
                json={"text": "The web view shows a streamed answer while it is written."},
                headers={"Authorization": f"Bearer {ALICE}", "Idempotency-Key": "stream-1"},
            )
        assert started.status_code == 202 and started.json()["conversation"] == conv
        growing = alice.locator('.node[data-type="llm.chunk"]')
        await expect(growing).to_contain_text("streaming…", timeout=WAIT)
        await expect(growing.locator("pre.body")).to_have_text("The web view ")
        # a chunk placed four billion slots on would have the page join that many every redraw
        hostile = LLMChunk(stream="hostile", seq=4_294_967_294, text="x", agent="streamer")
        await runtime.client.emit(subjects.Address.live(conv, "llm.chunk"), hostile)
        held.go.set()
        final = alice.locator('.node[data-type="llm.final"]')
        await expect(final).to_contain_text("a streamed answer while it is written.", timeout=WAIT)
        await expect(growing).to_have_count(0)  # the final answer replaces the chunks
        # no trace UI configured: the trace id, and the command that shows it
        await expect(alice.locator("#trace code.trace-id")).to_have_count(1, timeout=WAIT)
        await expect(alice.locator("#trace")).to_contain_text(f"mesh trace {conv}")
        assert await alice.locator("a.trace-link").count() == 0
        # signing out ends the session: the pages ask for a token again
        await alice.click("#logout")
        await expect(alice).to_have_url(f"{served.url}/ui/login", timeout=WAIT)
        assert await alice.context.cookies() == []
        await alice.goto(f"{served.url}/ui/c/{conv}")
        await expect(alice).to_have_url(f"{served.url}/ui/login")


def test_approvals_from_the_web_view_are_configured_whole_or_not_at_all(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice={ALICE}\n")
    creds = tmp_path / "operator.creds"
    creds.write_text("not read here\n")
    auth = GatewayAuth.load(tokens, environ={})
    settings = Settings.load(environ={})
    assert WebConfig.load(settings, auth) == WebConfig()
    with pytest.raises(ConfigError, match="give both, or neither"):
        WebConfig.load(settings, auth, approvers="alice")
    with pytest.raises(ConfigError, match="give both, or neither"):
        WebConfig.load(settings, auth, decider_creds=creds)
    with pytest.raises(ConfigError, match="carol are not names"):
        WebConfig.load(settings, auth, approvers="alice,carol", decider_creds=creds)
    with pytest.raises(ConfigError, match=r"\{trace_id\}"):
        WebConfig.load(settings, auth, trace_url="javascript:alert(1)//{trace_id}")
    from_env = Settings.load(
        environ={"MESH_GATEWAY_APPROVERS": "alice", "MESH_GATEWAY_DECIDER_CREDS": str(creds)}
    )
    assert WebConfig.load(from_env, auth).approvers == {"alice"}


def test_a_session_cookie_is_refused_when_forged_expired_or_from_another_process() -> None:
    now = [1_000_000.0]
    sessions = Sessions(key=b"k" * 32, lifetime=60, clock=lambda: now[0])
    value = sessions.issue("alice")
    session = sessions.read(value)
    assert session is not None and session.principal == "token:alice" and session.csrf
    name, expires, nonce, mac = value.split(".")
    assert sessions.read(f"bob.{expires}.{nonce}.{mac}") is None  # another name, same MAC
    assert sessions.read(f"{name}.{int(expires) + 999}.{nonce}.{mac}") is None  # extended
    assert Sessions(key=b"o" * 32, clock=lambda: now[0]).read(value) is None  # a restarted gateway
    # signed out: a copy of the cookie kept elsewhere is refused too; others still work
    other = sessions.issue("alice")
    sessions.end(value)
    assert sessions.read(value) is None and sessions.read(other) is not None
    sessions.end("garbage.1.2.3")  # nothing to end: ignored
    now[0] += 61
    assert sessions.read(other) is None  # expired
    sessions.end(other)  # expired already: not remembered
    sessions.end(sessions.issue("bob"))  # and the expired sign-outs are forgotten
    assert len(sessions._ended) == 1


async def test_the_pages_need_a_session_and_say_so_with_security_headers(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=10) as http:
        page = await http.get("/ui/c/anything")
        assert page.status_code == 303 and page.headers["location"] == "/ui/login"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        api = await http.get("/ui/api/conversations")
        assert api.status_code == 401
        wrong = await http.post("/ui/login", data={"token": "not-a-token-of-this-gateway"})
        assert wrong.status_code == 303 and wrong.headers["location"] == "/ui/login#failed"
        assert "set-cookie" not in wrong.headers
        elsewhere = {"Origin": "https://evil.example"}  # another site's form, with a good token
        planted = await http.post("/ui/login", data={"token": BOB}, headers=elsewhere)
        assert planted.status_code == 303 and "set-cookie" not in planted.headers
        good = await http.post("/ui/login", data={"token": BOB})
        assert good.status_code == 303 and good.headers["location"] == "/ui/"
        assert "mesh_session=" in good.headers["set-cookie"] and BOB not in good.headers["set-cookie"]
        assert (await http.get("/ui/static/../web.py")).status_code == 404
        assert (
            (await http.get("/ui/static/conversation.js"))
            .headers["content-type"]
            .startswith("text/javascript")
        )


async def test_a_huge_sign_in_body_is_read_only_as_far_as_a_token_goes(served: Served) -> None:
    """Anyone may post to the sign-in form: the gateway stops reading past 4 KiB."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1  # 1 KiB a time, 100 MiB were it all read
        return {"type": "http.request", "body": b"token=" + b"x" * 1018, "more_body": pulled < 100_000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/ui/login",
        "raw_path": b"/ui/login",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"gw"), (b"content-type", b"application/x-www-form-urlencoded")],
        "server": ("gw", 80),
        "client": ("127.0.0.1", 50000),
    }
    await served.gateway.app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 303 and (b"location", b"/ui/login#failed") in start["headers"]
    assert pulled <= 5, f"{pulled} KiB of a sign-in body were read"


async def test_too_many_wrong_tokens_from_one_address_are_throttled(served: Served) -> None:
    from mesh.gateway.session import Attempts

    async with httpx.AsyncClient(base_url=served.url, timeout=10) as http:
        for _ in range(10):
            wrong = await http.post("/ui/login", data={"token": "a-wrong-token-guessed-here"})
            assert wrong.headers["location"] == "/ui/login#failed"
        right = await http.post("/ui/login", data={"token": BOB})  # the right one, but too late
        assert right.status_code == 303 and right.headers["location"] == "/ui/login#throttled"
        assert "set-cookie" not in right.headers
    now = [0.0]
    attempts = Attempts(limit=2, window=60, clock=lambda: now[0])
    attempts.failed("10.0.0.1")
    attempts.failed("10.0.0.1")
    assert attempts.blocked("10.0.0.1") and not attempts.blocked("10.0.0.2")
    now[0] = 61.0  # a minute on, the address may try again
    assert not attempts.blocked("10.0.0.1")
