import asyncio
import shutil

import pytest

from asyncwebrl import load


@pytest.fixture(scope="session")
def env_mod():
    return load("01_env")


@pytest.fixture
def browser_env(env_mod):
    """Run `async def body(env, store, server)` against a fresh chromium, one env slot, and the task server."""
    if shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is missing: run `bash install.sh`")

    def run(body, config=None, server_root=None):
        async def main():
            with env_mod.TaskServer(server_root) as server:
                browser, store = env_mod.Browser(config), env_mod.ScreenshotStore()
                env = env_mod.BrowserEnv(browser, store, server.base)
                try:
                    return await body(env, store, server)
                finally:
                    await env.close()
                    await browser.close()

        return asyncio.run(main())

    return run
