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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny offline Qwen3-VL, built once per test session in a temporary folder."""
    return load("02_policy").build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def shot_store(env_mod):
    """A ScreenshotStore with two distinct synthetic screenshots, keys "ep:0" and "ep:1" (no browser needed)."""
    import io

    from PIL import Image, ImageDraw

    store = env_mod.ScreenshotStore()
    for n, color in enumerate(("white", "black")):
        img = Image.new("RGB", (160, 210), color)
        ImageDraw.Draw(img).rectangle((20 + 40 * n, 50, 90, 80), fill="red")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=60)
        store.put("ep", buf.getvalue())
    return store
