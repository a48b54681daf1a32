"""app.py, the web demo: served in a subprocess on a free loopback port and driven through gradio's
client (the API) and a real headless browser (Debian's ``chromium`` + ``chromium-driver``, with
selenium), against ``SegmentationPipeline`` run here on the same input.

The server stops by itself (``--stop-after``) even when this process dies; every request has a
timeout. Without chromium the browser tests are skipped, except under CI (``CI`` set), where
they fail: ``.ci/run`` installs chromium first.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from datasets.toy import ToySpec, generate_image
from model.pipeline import SegmentationPipeline
from scripts.chat import answer, compared_strategies, load_bundle, resolve_preset

REPO = Path(__file__).resolve().parents[1]

QUERY = "What is {} in this image? Please output segmentation mask."
START_TIMEOUT = 600  # s: torch and gradio imports took minutes on a 2-core machine under load 8-12
REQUEST_TIMEOUT = 300  # s per request (two methods' chat under heavy load)
SERVER_LIFETIME = 1800  # s: the server stops by itself after this, whatever happens here
SCREENSHOT = REPO / "docs" / "app_demo.png"


# ------------------------------------------------------------------ fast checks (no server)

def test_bad_inputs_are_user_messages(tmp_path: Path) -> None:
    from csp.strategies.seg_first import _import_ultralytics_offline

    _import_ultralytics_offline()  # patches PIL's Image.open (a HEIF retry): a non-image must still be a message
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(app.InputError, match="not an image"):
        app.check_image(str(not_image))
    with pytest.raises(app.InputError, match="Upload an image"):
        app.check_image(None)
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(app.InputError, match="megapixels"):
        app.check_image(str(big), max_pixels=300 * 200 - 1)
    assert app.check_image(str(big)).size == (300, 200)
    for query in ("", "   \n", None):
        with pytest.raises(app.InputError, match="Type a query"):
            app.check_query(query)
    with pytest.raises(app.InputError, match="characters"):
        app.check_query("x" * (app.MAX_QUERY_CHARS + 1))


def test_flags_as_chat_and_loopback_by_default() -> None:
    args = app.parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    assert (args.version, args.vision_tower, args.precision) == (None, None, None)
    args = app.parse_args(["--version", "/x/LISA-7B-v1", "--vision_tower", "/x/clip", "--precision", "bf16"])
    assert (args.version, args.vision_tower, args.precision) == ("/x/LISA-7B-v1", "/x/clip", "bf16")
    with pytest.raises(SystemExit, match="needs --version"):
        app.main(["--vision-tower", "/x/clip"])


def test_the_listed_presets_fit_the_toy_model_and_cover_every_method() -> None:
    presets = app.list_presets(8, 64)  # assets/toy_lisa: L = 8, N = 64
    names = {p.name for p in presets}
    assert {"toy_p70", "toy_mild", "toy_aggressive", "toy_table1_fastv", "toy_n10_prumerge"} <= names
    assert not names & {"llava7b_224_p70", "table1_prumerge", "t4_nc16_seg_first"}  # too deep / needs YOLO weights
    from csp.methods import METHODS

    assert {p.method for p in presets} == set(METHODS)


@pytest.mark.slow
def test_the_quick_listing_agrees_with_hydra_for_every_listed_preset() -> None:
    """The listing reads YAML directly; what runs is composed by Hydra: both select the same method."""
    from csp.config import method_from_config

    for preset in app.list_presets(8, 64):
        quick = method_from_config(app.quick_method_nodes(preset.kind, preset.name), build=False)
        assert quick.key() == resolve_preset(preset.name).key(), preset.name


# ------------------------------------------------------------------ the served app

def server_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               SE_OFFLINE="true", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("app") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", "0",
                                 "--stop-after", str(SERVER_LIFETIME)], cwd=REPO, env=server_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    url = None
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+/)", log.read_text())
            url = url or (found and found.group(1))
            try:
                if url is None:
                    raise OSError("not yet serving")
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not serve within {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def toy_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A toy-world val image (PNG) and a query about one of its shapes."""
    toy = generate_image(ToySpec(), "val", 1)
    path = tmp_path_factory.mktemp("toy") / "toy_val_01.png"
    Image.fromarray(toy.pixels).save(path)
    return path, QUERY.format(toy.refs[0][1].text())


@pytest.fixture(scope="module")
def reference_bundle():
    """The model app.py loads without arguments (the committed toy LISA), loaded here."""
    return load_bundle(argparse.Namespace(version=None, vision_tower=None, precision=None, device=None, seed=0))


def reference(bundle, preset: str | None, image_path: Path, query: str):
    """What SegmentationPipeline answers for ``preset`` (None: plain LISA), and the token map drawn from it."""
    method = resolve_preset(preset)
    pipe = SegmentationPipeline(bundle, method.method)
    image = Image.open(image_path).convert("RGB")
    direct = pipe.chat(image, query)  # the pipeline itself, not through scripts.chat
    out = answer(pipe, image, query, strategies=compared_strategies("auto", pipe))
    assert out.text == direct.text
    np.testing.assert_array_equal(out.masks, direct.masks)
    assert [list(k.indices.flatten().tolist()) for k in out.result.kept_image_tokens] == \
        [list(k.indices.flatten().tolist()) for k in direct.kept_image_tokens]
    return out, direct


def rgb(source: str | Path | bytes) -> np.ndarray:
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(data) as img:
        return np.asarray(img.convert("RGB"))


def check_against_reference(answer_text: str, overlay: np.ndarray, tmap: np.ndarray, stats: dict, out, direct,
                            bundle) -> None:
    from csp.accounting import ModelDims, TokenRecord

    assert answer_text == direct.text
    assert len(direct.masks) >= 1, "the toy LISA answers this query with a [SEG]"
    np.testing.assert_array_equal(overlay, out.overlay_images[0])
    np.testing.assert_array_equal(tmap, np.asarray(out.token_map_obj.figure()))
    tokens = TokenRecord(direct.image_tokens, direct.total_tokens).summarize(ModelDims.from_config(bundle.model.config))
    assert stats["image tokens per layer"] == direct.image_tokens
    assert stats["Navg"] == pytest.approx(tokens["Navg"], abs=1e-3)
    assert stats["TFLOPs"] == pytest.approx(tokens["TFLOPs"], rel=1e-5)
    assert stats["mask pixels"] == [int(m.sum()) for m in direct.masks]
    assert stats["LLM ms"] > 0


@pytest.mark.slow
def test_api_answers_as_the_pipeline_and_survives_bad_input(server: str, toy_image: tuple[Path, str],
                                                            reference_bundle, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False, download_files=str(tmp_path))
    path, query = toy_image

    def segment(image, text, method="csp", preset="toy_p70", side_by_side=False):
        job = client.submit(image, text, method, preset, side_by_side, api_name="/segment")
        return job.result(timeout=REQUEST_TIMEOUT)

    result = segment(handle_file(str(path)), query, side_by_side=True)
    message, a_text, a_overlay, a_map, a_stats, b_text, b_overlay, b_map, b_stats = result
    assert message.startswith("Done"), message
    out, direct = reference(reference_bundle, "toy_p70", path, query)
    check_against_reference(a_text, rgb(a_overlay), rgb(a_map), a_stats, out, direct, reference_bundle)
    assert a_stats["Navg"] == 23.0 and a_stats["image tokens per layer"] == [20, 20, 64, 64, 4, 4, 4, 4]
    plain_out, plain_direct = reference(reference_bundle, None, path, query)
    check_against_reference(b_text, rgb(b_overlay), rgb(b_map), b_stats, plain_out, plain_direct, reference_bundle)
    assert b_stats["Navg"] == 64.0 and b_stats["method"] == "plain LISA"

    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"this is not an image")
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 4000)).save(huge)  # 20 megapixels, a small file
    bad = [
        ((handle_file(str(not_image)), query), "not an image"),
        ((handle_file(str(huge)), query), "megapixels"),
        ((handle_file(str(path)), "   "), "Type a query"),
        ((None, query), "Upload an image"),
    ]
    for args, needle in bad:
        message, *rest = segment(*args)
        assert needle in message, message
        assert rest[0] is None and rest[1] is None
    message, *_ = segment(handle_file(str(path)), query, "fastv", "toy_p70")  # not a fastv preset
    assert "not a preset of 'fastv'" in message
    # still serving, and a baseline preset runs
    message, text, overlay, tmap, stats, *_ = segment(handle_file(str(path)), query, "fastv", "toy_table1_fastv")
    assert message.startswith("Done") and stats["method"].startswith("fastv")
    out, direct = reference(reference_bundle, "toy_table1_fastv", path, query)
    check_against_reference(text, rgb(overlay), rgb(tmap), stats, out, direct, reference_bundle)


# ------------------------------------------------------------------ the real page, in a headless browser

def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    why = "Debian's chromium and chromium-driver are not installed (sudo apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the browser test (.ci/run installs them)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium, chromedriver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1900", "--no-first-run", "--disable-extensions",
                 "--disable-background-networking", "--disable-component-update"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _image_src(driver, elem_id: str) -> str | None:
    found = driver.find_elements("css selector", f"#{elem_id} img")
    return found[0].get_attribute("src") if found else None


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@pytest.mark.slow
def test_the_page_in_a_real_browser(server: str, browser, toy_image: tuple[Path, str], reference_bundle,
                                    tmp_path: Path) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    path, query = toy_image
    t0 = time.monotonic()

    def mark(what: str) -> None:
        print(f"[browser test] {time.monotonic() - t0:6.1f} s: {what}", flush=True)

    wait = WebDriverWait(driver, REQUEST_TIMEOUT)
    driver.get(server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    mark("page loaded")
    preset = driver.find_element(By.CSS_SELECTOR, "#preset input").get_attribute("value")
    assert preset in app.Demo.presets_of(_demo_stub(), "csp"), preset

    # an empty query: a message in the page
    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    driver.find_element(By.CSS_SELECTOR, "#submit").click()
    wait.until(lambda d: "Type a query" in d.find_element(By.CSS_SELECTOR, "#message").text)
    mark("empty query answered")

    # the query, side by side with plain LISA
    driver.find_element(By.CSS_SELECTOR, "#query textarea").send_keys(query)
    driver.find_element(By.CSS_SELECTOR, "#compare input").click()
    assert driver.find_element(By.CSS_SELECTOR, "#compare input").is_selected()
    driver.find_element(By.CSS_SELECTOR, "#submit").click()
    try:
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message").text.startswith("Done"))
        wait.until(lambda d: all(_image_src(d, e) for e in ("a_overlay", "a_token_map", "b_overlay", "b_token_map")))
    except Exception:
        shot = tmp_path / "timeout.png"
        driver.save_screenshot(str(shot))
        pytest.fail(f"no result in the page within {REQUEST_TIMEOUT} s; the message reads "
                    f"{driver.find_element(By.CSS_SELECTOR, '#message').text!r} (screenshot {shot})")
    mark("results shown")
    # everything the page shows is read now, the screenshot taken, before the (slow) references are computed
    text = driver.find_element(By.CSS_SELECTOR, "#a_answer textarea").get_attribute("value")
    shown = {e: rgb(_fetch(_image_src(driver, e))) for e in ("a_overlay", "a_token_map", "b_token_map")}
    assert "Navg" in driver.find_element(By.CSS_SELECTOR, "#a_stats").text
    shot = tmp_path / "page.png"
    for attempt in range(3):  # a renderer on a loaded machine can miss chromedriver's 10 s screenshot deadline
        try:
            driver.save_screenshot(str(shot))
            break
        except TimeoutException:
            if attempt == 2:
                raise
            time.sleep(5)
    assert rgb(shot).shape[1] >= 1000
    out, direct = reference(reference_bundle, preset, path, query)
    assert text == direct.text
    np.testing.assert_array_equal(shown["a_overlay"], out.overlay_images[0])
    np.testing.assert_array_equal(shown["a_token_map"], np.asarray(out.token_map_obj.figure()))
    plain_out, _ = reference(reference_bundle, None, path, query)
    np.testing.assert_array_equal(shown["b_token_map"], np.asarray(plain_out.token_map_obj.figure()))
    mark("checked against the pipeline")
    if os.environ.get("UPDATE_APP_SCREENSHOT"):  # refresh docs/app_demo.png (a 64-colour palette PNG)
        with Image.open(shot) as page:
            page.convert("RGB").quantize(colors=64).save(SCREENSHOT, optimize=True)


def _demo_stub() -> app.Demo:
    """A Demo's preset listing without a model (presets_of reads only ``presets``)."""
    stub = app.Demo.__new__(app.Demo)
    stub.presets = app.list_presets(8, 64)
    return stub
