"""LoRA Workbench's frontend (js/) in ComfyUI's real editor: Debian's headless Chromium, driven by
Selenium, against a ComfyUI server on 127.0.0.1 with the pack in ``custom_nodes``.

- train_then_generate, queued from the editor on the tiny checkpoint: the Train LoRA node's loss
  chart draws a point per step and the latest preview image appears beside the baseline (before training); the
  screenshot is kept in ``tests/host/artifacts/`` (git-ignored).
- the LoRA Stack editor: rows added, picked, toggled, moved and removed by clicking, then queued;
  the prompt ComfyUI received carries exactly those rows, and the trigger words show under them.
- every example workflow, loaded in the editor with this frontend, queues exactly the prompt
  ``ui_to_api`` gives, and saves back the widget values it was loaded with.
- stack_and_merge lays out with no node over another and every group title clear.

Each test runs in the classic canvas and, on frontends that offer it as a setting, in Nodes 2.0
(``Comfy.VueNodes.Enabled``), where nodes and their widgets are DOM elements. Workflow persistence
(``Comfy.Workflow.Persist``) is off, so a reload does not restore the last workflow over the one a test loads.

Needs ``chromium``, ``chromium-driver`` (apt) and ``selenium`` (pip); skipped with one line otherwise.
Selenium Manager never downloads anything here: the driver's path is given.
"""

from __future__ import annotations

import importlib.util
import json
import time
from importlib import metadata
from pathlib import Path

import pytest

import test_example_workflows
from comfy_harness import REPO_ROOT, make_photos, start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
LORAS = {"character": "lw_examples/character.safetensors", "style": "lw_examples/style.safetensors",
         "lighting": "lw_examples/lighting.safetensors"}
SERVER_WAIT_SECONDS = 240
example_loras = test_example_workflows.example_loras  # fixture: small LoRAs with trigger phrases, for the tiny model
RUN_WAIT_SECONDS = 900
# Nodes 2.0 became a user setting after frontend 1.27 (1.27.10 declares Comfy.VueNodes.Enabled "hidden;
# toggle via Experimental keybinding"): from 1.28 on, every test runs with it off and on.
NODES_2_FROM = (1, 28)
BADGE_HEIGHT = 24  # the node-source badge ("lora-workbench") the canvas draws above a node's title bar


def _frontend_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in metadata.version("comfyui-frontend-package").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)


MODES = ["classic", "nodes2"] if _frontend_version() >= NODES_2_FROM else ["classic"]


def _missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} missing (apt-get install chromium)"
    if not CHROMEDRIVER.is_file():
        return f"{CHROMEDRIVER} missing (apt-get install chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium missing (pip install selenium)"
    return None


if _missing():
    pytest.skip(f"browser tests skipped: {_missing()}", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import ElementNotInteractableException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(comfyui_path, comfy_host, tiny_sd15_checkpoint, example_loras, tmp_path_factory):
    base = tmp_path_factory.mktemp("browser_base")
    (base / "models" / "loras").mkdir(parents=True)
    folder = comfy_host.base_directory / "models" / "loras" / "lw_examples"  # the examples' small LoRAs
    (base / "models" / "loras" / "lw_examples").symlink_to(folder, target_is_directory=True)
    make_photos(base / "input" / "lora_workbench_example", caption="a photo of [trigger] ball")
    srv = start_server(comfyui_path, base, REPO_ROOT, checkpoints=[tiny_sd15_checkpoint],
                       wait_seconds=SERVER_WAIT_SECONDS)
    try:
        _post(srv.url + "/settings", {"Comfy.TutorialCompleted": True})  # no first-run template dialog
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1200", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def editor(browser, server, mode):
    """The editor freshly opened on the server in ``mode`` (classic canvas or Nodes 2.0), our extension loaded."""
    _post(server.url + "/settings", {"Comfy.VueNodes.Enabled": mode == "nodes2", "Comfy.Workflow.Persist": False})
    browser.get(server.url)
    WebDriverWait(browser, 120, 0.5).until(lambda d: d.execute_script(
        "return !!(window.comfyAPI?.app?.app?.graph && document.getElementById('lora-workbench-style'))"))
    settings = js(browser, "const s = app.extensionManager.setting;"
                           "return [s.get('Comfy.VueNodes.Enabled'), s.get('Comfy.Workflow.Persist')];")
    assert settings == [mode == "nodes2", False], settings
    browser.lw_mode = mode
    browser.get_log("browser")  # start each test with an empty console log
    return browser


# ---- helpers ----------------------------------------------------------------------------------------------
def _post(url: str, body) -> None:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()


def _get(url: str):
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def js(driver, body: str, *args):
    """Run ``body`` (an async function body with ``app``, ``api`` and ``args``) in the page."""
    script = ("const done = arguments[arguments.length - 1];"
              "const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;"
              "const args = Array.from(arguments).slice(0, -1);"
              f"(async () => {{ {body} }})().then(r => done({{ok: r === undefined ? null : r}}),"
              " e => done({error: String(e && e.stack || e)}));")
    result = driver.execute_async_script(script, *args)
    assert "error" not in result, result.get("error")
    return result["ok"]


def load(driver, workflow: dict) -> None:
    js(driver, "await app.loadGraphData(args[0]);"
               "document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());", workflow)
    if getattr(driver, "lw_mode", "classic") == "nodes2":  # every node drawn as a DOM element
        WebDriverWait(driver, 30, 0.2).until(lambda d: d.execute_script(
            "const app = window.comfyAPI.app.app;"
            "return app.graph.nodes.every(n => document.querySelector(`[data-node-id=\"${n.id}\"]`));"),
            message="Nodes 2.0 did not draw the workflow's nodes as DOM elements")
    time.sleep(0.5)  # views size themselves on the next frames


def set_widgets(driver, node_id, values: dict) -> None:
    js(driver, """
        const node = app.graph.getNodeById(args[0]);
        for (const [name, value] of Object.entries(args[1])) {
            const w = node.widgets.find(w => w.name === name);
            if (!w) throw new Error(`node ${args[0]} has no widget ${name}`);
            w.value = value; w.callback?.(value);
        }
        app.graph.setDirtyCanvas(true, true);""", node_id, values)


def click(driver, element) -> None:
    """Click as a user does once the element shows: a DOM widget is drawn with its node on a later canvas
    frame, which a loaded machine may not have reached yet."""
    def clicked(_):
        try:
            element.click()
            return True
        except ElementNotInteractableException:
            return False
    WebDriverWait(driver, 30, 0.2).until(clicked, message=f"{element.get_attribute('class')} never became clickable")


def show_node(driver, node_id, scale=1.0) -> None:
    """Put the node at the top left of the view, at ``scale``, as a user would by panning."""
    js(driver, """
        const node = app.graph.getNodeById(args[0]);
        app.canvas.ds.scale = args[1];
        app.canvas.ds.offset = [120 / args[1] - node.pos[0], 110 / args[1] - node.pos[1]];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);""", node_id, scale)
    time.sleep(0.5)  # DOM widgets follow the canvas on the next frames


def view_fit(driver, node_id, widget_name) -> dict:
    """How one of our views sits on its node, in graph units: ``view`` its height, ``content`` the height
    its visible parts need, ``below`` the node's height left under it (the node's own footer and badge
    in Nodes 2.0)."""
    return js(driver, """
        const node = app.graph.getNodeById(args[0]);
        const el = node.widgets.find(w => w.name === args[1]).element;
        const scale = app.canvas.ds.scale;
        const shown = [...el.children].filter(c => getComputedStyle(c).display !== 'none');
        const gap = parseFloat(getComputedStyle(el).rowGap) || 0;
        const content = shown.reduce((t, c) => t + c.offsetHeight, 0) + gap * Math.max(0, shown.length - 1);
        const r = el.getBoundingClientRect();
        const vue = document.querySelector(`[data-node-id="${node.id}"]`);
        const canvasTop = app.canvas.canvas.getBoundingClientRect().top;
        const below = vue ? (vue.getBoundingClientRect().bottom - r.bottom) / scale
            : node.pos[1] + node.size[1] - ((r.bottom - canvasTop) / scale - app.canvas.ds.offset[1]);
        return {view: el.offsetHeight, content, below, visible: r.height > 0};""", node_id, widget_name)


def assert_sized_to_content(driver, node_id, widget_name, below=40) -> dict:
    fit = view_fit(driver, node_id, widget_name)
    assert fit["visible"], fit
    assert abs(fit["view"] - fit["content"]) <= 4, f"the view is not as tall as its content: {fit}"
    assert -2 <= fit["below"] <= below, f"the node is taller than what it shows: {fit}"
    return fit


def queue(driver, server) -> set:
    """Press Queue (app.queuePrompt, what the button calls); returns the prompt ids in the history before."""
    before = set(_get(server.url + "/history"))
    js(driver, "await app.queuePrompt(0, 1);")
    return before


def wait_for_run(driver, server, before: set, seconds=RUN_WAIT_SECONDS) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        history = _get(server.url + "/history")
        new = [v for k, v in history.items() if k not in before]
        if new and new[0].get("status", {}).get("completed") is not None:
            return new[0]
        time.sleep(1)
    raise AssertionError(f"the queued prompt did not finish in {seconds} s:\n{server.log()[-3000:]}")


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def assert_no_errors_of_ours(driver) -> None:
    errors = console_errors(driver)
    ours = [e for e in errors if "lora_workbench" in e or "lora-workbench" in e or "lw." in e or "LoRA Workbench" in e]
    assert not ours, "\n".join(ours)


# ---- tests ------------------------------------------------------------------------------------------------
def test_training_shows_a_live_loss_chart_and_previews(editor, server, tiny_sd15_checkpoint):
    CPU_OVERRIDES = test_example_workflows.CPU_OVERRIDES
    steps, preview_every = 8, 3
    workflow = json.loads((REPO_ROOT / "example_workflows" / "train_then_generate.json").read_text())
    load(editor, workflow)
    by_type = {}
    for node in workflow["nodes"]:
        by_type.setdefault(node["type"], []).append(node["id"])
    set_widgets(editor, by_type["CheckpointLoaderSimple"][0], {"ckpt_name": tiny_sd15_checkpoint.name})
    for cls, values in CPU_OVERRIDES.items():
        for node_id in by_type.get(cls, []):
            set_widgets(editor, node_id, values)
    for node_id in by_type["EmptyLatentImage"]:
        set_widgets(editor, node_id, {"batch_size": 1})
    train_id = by_type["LW_TrainLoRA"][0]
    # Its own output name in each mode: the server would otherwise answer the second mode's run from its cache.
    output_name = f"sks_person_{editor.lw_mode}"
    set_widgets(editor, train_id, {"steps": steps, "preview_every": preview_every, "save_every": 4,
                                   "output_name": output_name, "validation_split": 0.35})
    show_node(editor, train_id, scale=0.9)
    before_run = assert_sized_to_content(editor, train_id, "lw_train_view")
    assert before_run["view"] < 260, before_run  # status and an empty chart: no room kept for what is not there

    chart = editor.find_element(By.CSS_SELECTOR, ".lw-loss-chart")
    assert chart.get_attribute("data-points") == "0"
    js(editor, """window.lwSeen = {};
        for (const name of ['b_preview', 'b_preview_with_metadata', 'lw.train.preview', 'lw.train.step'])
            api.addEventListener(name, (e) => { window.lwSeen[name] = [(window.lwSeen[name]?.[0] ?? 0) + 1,
                                                JSON.stringify(e.detail?.displayNodeId ?? e.detail?.node ?? null)]; });""")
    before = queue(editor, server)
    WebDriverWait(editor, RUN_WAIT_SECONDS, 1).until(
        lambda d: int(chart.get_attribute("data-points") or 0) >= steps,
        message=f"the loss chart did not get {steps} points:\n{server.log()[-3000:]}")
    entry = wait_for_run(editor, server, before)
    assert entry["status"]["status_str"] == "success", entry["status"]
    WebDriverWait(editor, 60, 0.5).until(lambda d: d.execute_script(
        "const img = document.querySelector('.lw-train-preview');"
        "return !!img && img.dataset.loaded === '1' && img.complete && img.naturalWidth > 0;"),
        message="no preview image appeared on the Train LoRA node: " + str(editor.execute_script(
            "return [window.lwSeen, document.querySelector('.lw-train-view')?.outerHTML.slice(0, 600)]")))

    # The chart really drew: blue points for the raw loss, the orange smoothed curve and the green validation line.
    colours = editor.execute_script("""
        const c = document.querySelector('.lw-loss-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let blue = 0, orange = 0, green = 0;
        for (let i = 0; i < d.length; i += 4) {
            if (d[i + 2] > 200 && d[i] < 160 && d[i + 1] > 130) blue++;
            if (d[i] > 220 && d[i + 1] > 120 && d[i + 1] < 190 && d[i + 2] < 110) orange++;
            if (d[i + 1] > 170 && d[i] < 110 && d[i + 2] > 70 && d[i + 2] < 150) green++;
        }
        return {blue, orange, green, w: c.width, h: c.height};""")
    assert colours["blue"] > 30 and colours["orange"] > 30 and colours["green"] > 15, colours
    # the validation line: one point per validation (every steps // 20 = 1 step here), as the node reported them
    assert int(chart.get_attribute("data-validation-points")) == steps, chart.get_attribute("data-validation-points")
    status = editor.find_element(By.CSS_SELECTOR, ".lw-train-status").text
    assert status.startswith(f"step {steps}/{steps}"), status
    caption = editor.find_element(By.CSS_SELECTOR, ".lw-preview-caption").get_attribute("textContent")
    assert caption.startswith("preview at step 6 (left: before training)"), caption
    # The baseline (step 0, before training) beside the latest preview, both drawn side by side
    baseline = editor.execute_script("""
        const [b, p] = ['.lw-train-baseline', '.lw-train-preview'].map(s => document.querySelector(s));
        const [rb, rp] = [b.getBoundingClientRect(), p.getBoundingClientRect()];
        return {loaded: b.dataset.loaded === '1' && b.complete && b.naturalWidth > 0, left: rb.right <= rp.left + 1,
                top: Math.abs(rb.top - rp.top), w: rb.width};""")
    assert baseline["loaded"] and baseline["left"] and baseline["top"] < 2 and baseline["w"] > 20, baseline
    saved = editor.find_element(By.CSS_SELECTOR, ".lw-saved").get_attribute("textContent")
    assert saved.startswith(f"saved at step 4: {output_name}-step000004"), saved  # save_every 4

    # The memory estimate shows once on the page, whole: wrapped, not cut off.
    time.sleep(0.5)
    memory = editor.execute_script("""
        const shown = [];
        const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
        while (walker.nextNode()) {
            const el = walker.currentNode.parentElement;
            if (walker.currentNode.textContent.includes('expected peak memory') && el.getClientRects().length)
                shown.push(el.className);
        }
        for (const t of document.querySelectorAll('textarea, input'))
            if ((t.value ?? '').includes('expected peak memory') && t.getClientRects().length) shown.push(t.tagName);
        const line = document.querySelector('.lw-memory');
        return {shown, text: line.textContent, sw: line.scrollWidth, cw: line.clientWidth,
                sh: line.scrollHeight, ch: line.clientHeight};""")
    assert memory["text"].startswith("expected peak memory ~"), memory
    assert memory["shown"] == ["lw-memory"], memory
    assert memory["sw"] <= memory["cw"] and memory["sh"] <= memory["ch"], memory
    assert_sized_to_content(editor, train_id, "lw_train_view", below=10_000)  # ComfyUI's own preview may follow

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"train_then_generate_{editor.lw_mode}.png"
    show_node(editor, train_id, scale=0.9)
    editor.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert_no_errors_of_ours(editor)


def _stack_graph(ckpt_name: str) -> dict:
    """Load Checkpoint -> Apply LoRA Stack (rows from an empty LoRA Stack) -> Preview Any of the trigger words."""
    def node(id, type, pos, values, inputs=(), outputs=()):
        return {"id": id, "type": type, "pos": pos, "size": [400, 120], "flags": {}, "order": id, "mode": 0,
                "inputs": [{"name": n, "type": t, "link": lk} for n, t, lk in inputs],
                "outputs": [{"name": n, "type": t, "links": lks} for n, t, lks in outputs],
                "properties": {}, "widgets_values": values}

    empty_rows = ["None", True, 1.0, 1.0] * 6
    return {"last_node_id": 4, "last_link_id": 4, "version": 0.4, "groups": [], "config": {}, "extra": {},
            "nodes": [
                node(1, "CheckpointLoaderSimple", [40, 420], [ckpt_name],
                     outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2]), ("VAE", "VAE", [])]),
                node(2, "LW_LoraStack", [40, 60], empty_rows, inputs=[("lora_stack", "LORA_STACK", None)],
                     outputs=[("lora_stack", "LORA_STACK", [3])]),
                node(3, "LW_ApplyLoraStack", [560, 60], [""],
                     inputs=[("model", "MODEL", 1), ("clip", "CLIP", 2), ("lora_stack", "LORA_STACK", 3)],
                     outputs=[("model", "MODEL", []), ("clip", "CLIP", []), ("trigger_words", "STRING", [4])]),
                node(4, "PreviewAny", [1000, 60], [], inputs=[("source", "*", 4)]),
            ],
            "links": [[1, 1, 0, 3, 0, "MODEL"], [2, 1, 1, 3, 1, "CLIP"], [3, 2, 0, 3, 2, "LORA_STACK"],
                      [4, 3, 2, 4, 0, "STRING"]]}


def test_lora_stack_editor_rows_reach_the_queued_prompt(editor, server, tiny_sd15_checkpoint):
    load(editor, _stack_graph(tiny_sd15_checkpoint.name))
    show_node(editor, 2)
    editor_root = editor.find_element(By.CSS_SELECTOR, ".lw-stack-editor")

    def rows():
        return editor_root.find_elements(By.CSS_SELECTOR, ".lw-stack-row")

    def row(i):
        return rows()[i - 1]

    def pick(i, name):
        Select(row(i).find_element(By.CSS_SELECTOR, "select")).select_by_value(name)

    def type_number(i, cls, value):
        box = row(i).find_element(By.CSS_SELECTOR, cls)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)

    add = editor_root.find_element(By.CSS_SELECTOR, ".lw-stack-add")
    for _ in range(3):
        click(editor, add)
    assert len(rows()) == 3
    pick(1, LORAS["character"])
    pick(2, LORAS["style"])
    pick(3, LORAS["lighting"])
    type_number(2, ".lw-model", 0.6)
    type_number(2, ".lw-clip", 0.3)
    click(editor, row(3).find_element(By.CSS_SELECTOR, ".lw-enabled"))  # lighting off
    click(editor, row(3).find_element(By.CSS_SELECTOR, ".lw-up"))  # character, lighting, style
    click(editor, row(2).find_element(By.CSS_SELECTOR, ".lw-up"))  # lighting, character, style
    click(editor, row(2).find_element(By.CSS_SELECTOR, ".lw-remove"))  # lighting, style
    click(editor, add)
    pick(3, LORAS["character"])  # lighting (off), style (0.6 / 0.3), character
    assert [Select(r.find_element(By.CSS_SELECTOR, "select")).first_selected_option.get_attribute("value")
            for r in rows()] == [LORAS["lighting"], LORAS["style"], LORAS["character"]]

    # trigger words from each file's metadata, under its row
    WebDriverWait(editor, 30, 0.5).until(
        lambda d: row(3).find_element(By.CSS_SELECTOR, ".lw-triggers").text == "trigger: chrctr",
        message="the trigger words of the picked LoRA did not show")
    assert row(2).find_element(By.CSS_SELECTOR, ".lw-triggers").text == "trigger: wtrclr"
    # The node is as tall as its rows, and each LoRA's name shows whole (the full file name as a tooltip).
    time.sleep(0.5)
    fit = assert_sized_to_content(editor, 2, "lw_stack_editor")
    assert fit["view"] < 60 + 3 * 45, fit
    names = editor.execute_script("""
        const ctx = document.createElement('canvas').getContext('2d');
        return [...document.querySelectorAll('.lw-stack-editor .lw-lora-select')].map(s => {
            ctx.font = getComputedStyle(s).font;
            const label = s.selectedOptions[0].textContent;
            return {label, title: s.title, text: Math.ceil(ctx.measureText(label).width), room: s.clientWidth - 22};
        });""")
    assert [n["label"] for n in names] == ["lw_examples/lighting", "lw_examples/style", "lw_examples/character"], names
    for name, full in zip(names, (LORAS["lighting"], LORAS["style"], LORAS["character"])):
        assert name["text"] <= name["room"], f"the LoRA name is cut off: {name}"
        assert full in name["title"], name
    ARTIFACTS.mkdir(exist_ok=True)
    editor.save_screenshot(str(ARTIFACTS / f"lora_stack_editor_{editor.lw_mode}.png"))

    before = queue(editor, server)
    entry = wait_for_run(editor, server, before, seconds=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    queued = entry["prompt"][2]
    (stack,) = [n["inputs"] for n in queued.values() if n["class_type"] == "LW_LoraStack"]
    assert {k: stack[k] for k in sorted(stack) if k != "lora_stack"} == {
        "lora_1": LORAS["lighting"], "enabled_1": False, "model_strength_1": 1.0, "clip_strength_1": 1.0,
        "lora_2": LORAS["style"], "enabled_2": True, "model_strength_2": 0.6, "clip_strength_2": 0.3,
        "lora_3": LORAS["character"], "enabled_3": True, "model_strength_3": 1.0, "clip_strength_3": 1.0,
        **{f"{k}_{i}": v for i in range(4, 7) for k, v in
           (("lora", "None"), ("enabled", True), ("model_strength", 1.0), ("clip_strength", 1.0))}}
    assert not any(k.startswith("lw_") for n in queued.values() for k in n["inputs"]), "an editor widget was queued"
    (preview,) = [k for k, n in queued.items() if n["class_type"] == "PreviewAny"]
    assert entry["outputs"][preview]["text"] == ["wtrclr, chrctr"]  # the rows that are on, in their order
    time.sleep(1)  # the Preview Any node shows its text
    editor.save_screenshot(str(ARTIFACTS / f"lora_stack_editor_queued_{editor.lw_mode}.png"))
    assert_no_errors_of_ours(editor)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_queue_what_ui_to_api_converts(editor, server, path):
    """With this frontend loaded, the editor's own prompt for each example is ui_to_api's, and saving the
    graph gives back the widget values it was loaded with (the added views are never serialised)."""
    from lora_workbench.app.workflow import ui_to_api

    workflow = json.loads(path.read_text())
    load(editor, workflow)
    exported = js(editor, "const p = await app.graphToPrompt(); return {output: p.output, workflow: p.workflow};")
    assert exported["output"] == ui_to_api(workflow, _get(server.url + "/object_info"))
    saved = {n["id"]: n.get("widgets_values") for n in exported["workflow"]["nodes"]}
    for node in workflow["nodes"]:
        if node.get("widgets_values") is not None:  # newer editors leave out an empty list
            assert (saved[node["id"]] or []) == node["widgets_values"], node["type"]
    assert_no_errors_of_ours(editor)


def test_stack_and_merge_lays_out_clear(editor, server):
    """No node over another, each node inside its group, and each group's title clear of the nodes and
    their source badges, as the editor lays the example out (node sizes as drawn, in either mode)."""
    workflow = json.loads((REPO_ROOT / "example_workflows" / "stack_and_merge.json").read_text())
    load(editor, workflow)
    show_node(editor, workflow["nodes"][0]["id"], scale=0.6)
    layout = js(editor, """
        const scale = app.canvas.ds.scale, [ox, oy] = app.canvas.ds.offset;
        const canvasBox = app.canvas.canvas.getBoundingClientRect();
        const nodes = app.graph.nodes.map(n => {
            const el = document.querySelector(`[data-node-id="${n.id}"]`);
            if (!el) return {id: n.id, title: n.title, box: Array.from(n.getBounding())};
            const r = el.getBoundingClientRect();  // Nodes 2.0: the node as drawn, title bar included
            return {id: n.id, title: n.title, box: [(r.left - canvasBox.left) / scale - ox,
                    (r.top - canvasBox.top) / scale - oy, r.width / scale, r.height / scale]};
        });
        const groups = (app.graph.groups ?? app.graph._groups).map(g => ({title: g.title,
            box: Array.from(g._bounding ?? g.bounding), titleHeight: g.titleHeight ?? g.font_size * 1.4}));
        return {nodes, groups};""")
    nodes, groups = layout["nodes"], layout["groups"]

    def overlap(a, b):
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    clashes = [(a["title"], b["title"]) for i, a in enumerate(nodes) for b in nodes[i + 1:]
               if overlap(a["box"], b["box"])]
    assert not clashes, f"nodes drawn over each other ({editor.lw_mode}): {clashes}\n{layout}"
    for node in nodes:
        x, y, w, h = node["box"]
        (group,) = [g for g in groups if overlap(g["box"], [x + w / 2, y + h / 2, 0.1, 0.1])] or [None]
        assert group, f"{node['title']} is in no group: {node}"
        gx, gy, gw, gh = group["box"]
        assert gx <= x and x + w <= gx + gw and y + h <= gy + gh, f"{node['title']} sticks out of {group}: {node}"
        assert y - BADGE_HEIGHT >= gy + group["titleHeight"], f"{node['title']} covers the title of {group}: {node}"
    ARTIFACTS.mkdir(exist_ok=True)
    editor.save_screenshot(str(ARTIFACTS / f"stack_and_merge_{editor.lw_mode}.png"))
    assert_no_errors_of_ours(editor)
