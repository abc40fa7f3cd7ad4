"""Prompt styles (webui/styles.py, webui/builtin/styles.py): A1111's styles.csv read, applied in
prepare_request, recorded and read back, saved; hostile files; the command line and the HTTP API."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest
from waiting import wait_until

from webui import styles as st
from webui.errors import InvalidRequestError
from webui.metadata import parse_infotext
from webui.request import GenerationRequest

CSV = (
    "name,prompt,negative_prompt\n"
    'oil,"{prompt}, oil painting, thick brush strokes","photo, blurry"\n'
    'neon,"neon lights",""\n'
    '"a ""quoted"", name","framed {prompt} scene","ugly, {prompt}"\n'
)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A data folder of its own, holding the styles file above."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "styles.csv").write_text(CSV, encoding="utf-8")
    monkeypatch.setenv("LATENT_STUDIO_DATA_DIR", str(folder))
    return folder


def style(name: str, prompt: str = "", negative: str = "") -> st.Style:
    return st.Style(name, prompt, negative)


# -- applying -------------------------------------------------------------------------------------


def test_a_style_wraps_at_its_placeholder_or_is_appended():
    assert st.apply_style("a cat", "{prompt}, oil painting") == "a cat, oil painting"
    assert st.apply_style("a cat", "best, {prompt}, detailed") == "best, a cat, detailed"
    assert st.apply_style("a cat", "neon lights") == "a cat, neon lights"
    assert st.apply_style("", "neon lights") == "neon lights"
    assert st.apply_style("a cat ", "") == "a cat"


def test_styles_apply_in_the_order_chosen_to_both_prompts():
    oil, neon = style("oil", "{prompt}, oil", "blurry"), style("neon", "neon, {prompt}", "")
    assert st.apply_styles("a cat", "", [oil, neon]) == ("neon, a cat, oil", "blurry")
    assert st.apply_styles("a cat", "ugly", [neon, oil]) == ("neon, a cat, oil", "ugly, blurry")


def test_a_prompt_that_carries_its_styles_already_is_not_styled_twice():
    oil, neon = style("oil", "{prompt}, oil", "blurry"), style("neon", "neon lights")
    prompt, negative = st.apply_styles("a cat", "dark", [oil, neon])
    assert (prompt, negative) == ("a cat, oil, neon lights", "dark, blurry")
    assert st.apply_styles(prompt, negative, [oil, neon]) == (prompt, negative)
    assert st.unwrap_style("a cat, oil", "{prompt}, oil") == "a cat"
    assert st.unwrap_style("a dog", "{prompt}, oil") is None


def test_unknown_names_are_refused_with_the_closest():
    styles = {"oil painting": style("oil painting"), "neon": style("neon")}
    with pytest.raises(InvalidRequestError, match="unknown style 'oil paintin'; did you mean 'oil painting'"):
        st.check_names(["neon", "oil paintin"], styles)
    with pytest.raises(InvalidRequestError, match="no styles are defined"):
        st.check_names(["x"], {})


# -- reading --------------------------------------------------------------------------------------


def test_a1111_file_with_quotes_commas_and_placeholders():
    styles, warnings = st.parse_styles(CSV)
    assert warnings == []
    assert list(styles) == ["oil", "neon", 'a "quoted", name']
    assert styles['a "quoted", name'].negative_prompt == "ugly, {prompt}"
    assert styles["oil"].prompt == "{prompt}, oil painting, thick brush strokes"


def test_bad_rows_are_skipped_naming_their_line_and_old_text_column_is_read():
    text = "name,text\nfine,one\n,no name\n" + "x" * 300 + ",long\n\nlast,two\n"
    styles, warnings = st.parse_styles(text, "s.csv")
    assert list(styles) == ["fine", "last"] and styles["last"].prompt == "two"
    assert warnings == [
        "s.csv: line 3: no name; row skipped",
        "s.csv: line 4: the name has 300 characters (at most 200); row skipped",
    ]


def test_a_file_without_a_header_or_with_a_broken_quote():
    styles, warnings = st.parse_styles("oil,thick paint\n")
    assert styles == {} and "must name the columns" in warnings[0]
    styles, warnings = st.parse_styles('name,prompt\nok,fine\nbad,"open quote\nnever closed,x\n')
    assert list(styles) == ["ok", "bad"]  # as csv reads it: the quote runs to the end
    assert styles["bad"].prompt.startswith("open quote")


def test_encodings_bom_and_latin1(tmp_path):
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfname,prompt\ncaf\xc3\xa9,cr\xc3\xa8me\n")
    assert st.read_styles_file(bom)[0]["café"].prompt == "crème"
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"name,prompt\ncaf\xe9,cr\xe8me\n")
    assert st.read_styles_file(latin)[0]["café"].prompt == "crème"


def test_huge_files_are_refused_whole_and_quickly(tmp_path):
    big = tmp_path / "big.csv"
    big.write_bytes(b"name,prompt\n" + b"a,b\n" * (st.MAX_BYTES // 4))
    styles, warnings = st.read_styles_file(big)
    assert styles == {} and "over the limit" in warnings[0]
    rows = "name,prompt\n" + "".join(f"s{n},p\n" for n in range(st.MAX_ROWS + 1))
    styles, warnings = st.parse_styles(rows, "rows.csv")
    assert styles == {} and warnings == [f"rows.csv has more than {st.MAX_ROWS} rows; no style read from it"]
    # hostile content under the size limit reads in linear time: one long quoted field, many quotes
    started = time.perf_counter()
    st.parse_styles('name,prompt\nq,"' + '""' * 400_000 + '"\n')
    st.parse_styles("name,prompt\n" + "," * 1_000_000)
    assert time.perf_counter() - started < 5


def test_files_are_read_again_when_they_change_and_a1111_folders_are_found(data_dir, tmp_path):
    a1111 = tmp_path / "stable-diffusion-webui"
    (a1111 / "models").mkdir(parents=True)
    (a1111 / "styles.csv").write_text("name,prompt\noil,from a1111\ntheirs,only there\n", encoding="utf-8")

    class Models:
        models_dir = tmp_path / "ours"
        extra_models_dirs = [a1111 / "models"]

    class Engine:
        models = Models()

    assert st.style_files(Engine()) == [data_dir / "styles.csv", a1111 / "styles.csv"]
    found = st.load_styles(Engine())
    assert found["oil"].prompt.startswith("{prompt}, oil painting")  # the data folder's wins
    assert found["theirs"].prompt == "only there"
    (data_dir / "styles.csv").write_text("name,prompt\nnew one,fresh\n", encoding="utf-8")
    assert list(st.load_styles(Engine())) == ["new one", "oil", "theirs"]


# -- saving ---------------------------------------------------------------------------------------


def test_save_replaces_a_style_of_the_same_name_and_quotes_everything(data_dir):
    path = st.save_style('my "best", style', "{prompt}, best\nquality", "worst")
    st.save_style("oil", "new oil", "")
    assert path == data_dir / "styles.csv"
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    assert rows[0] == ["name", "prompt", "negative_prompt"]
    assert [row[0] for row in rows[1:]] == ["oil", "neon", 'a "quoted", name', 'my "best", style']
    styles, warnings = st.read_styles_file(path)
    assert warnings == [] and styles["oil"].prompt == "new oil"
    assert styles['my "best", style'].prompt == "{prompt}, best\nquality"
    assert not list(data_dir.glob(".styles.csv.*"))  # no temporary file left behind
    with pytest.raises(InvalidRequestError, match="style name: no name"):
        st.save_style("  ", "x", "y")


def test_save_will_not_overwrite_a_file_it_cannot_read(data_dir):
    (data_dir / "styles.csv").write_bytes(b"just,some\x00words\n")
    with pytest.raises(InvalidRequestError, match="fix or move it"):
        st.save_style("x", "y", "")


# -- the field and the engine ---------------------------------------------------------------------


def test_the_field_is_a_repeatable_multi_choice(engine):
    from webui.cli import build_parser, field_values

    declared = engine.fields["styles"]
    assert declared.multiple and declared.tasks is None and declared.source == "styles"
    args = build_parser(engine.fields).parse_args(["generate", "--styles", "oil", "--styles", "a, b"])
    assert field_values(args, engine.fields) == {"styles": ("oil", "a, b")}
    assert declared.parse('["a", "b, c"]') == ("a", "b, c")
    assert declared.check("one") == ("one",)
    with pytest.raises(InvalidRequestError, match="styles must be a list of names"):
        declared.check(3)
    with pytest.raises(InvalidRequestError, match="not a JSON list"):
        declared.parse("[nope")


def test_styles_rewrite_the_prompts_and_are_recorded_and_read_back(engine, bundle, data_dir):
    request = GenerationRequest(
        prompt="a cat",
        negative_prompt="dark",
        steps=1,
        width=32,
        height=32,
        seed=3,
        extra={"styles": ["oil", 'a "quoted", name']},
    )
    result = engine.generate(request, bundle=bundle)
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Prompt"] == "framed a cat, oil painting, thick brush strokes scene"
    assert parsed["Negative prompt"] == "ugly, dark, photo, blurry"
    assert parsed["Styles array"] == '["oil", "a \\"quoted\\", name"]'
    values, notes = engine.fields.from_infotext(parsed, task="txt2img")
    assert notes == [] and values["styles"] == ("oil", 'a "quoted", name')
    # sent back with its styles, the image's final prompt gives the same image again
    again = GenerationRequest(
        prompt=values["prompt"],
        negative_prompt=values["negative_prompt"],
        steps=1,
        width=32,
        height=32,
        seed=3,
        extra={"styles": list(values["styles"])},
    )
    repeat = engine.generate(again, bundle=bundle)
    assert repeat.infotexts[0] == result.infotexts[0]
    assert repeat.images[0].image.tobytes() == result.images[0].image.tobytes()


def test_an_unknown_style_fails_the_request_with_one_line(engine, bundle, data_dir):
    request = GenerationRequest(prompt="x", steps=1, width=32, height=32, extra={"styles": ["nein"]})
    with pytest.raises(InvalidRequestError, match="unknown style 'nein'; did you mean 'neon'"):
        engine.generate(request, bundle=bundle)


def test_png_info_sends_the_styles_on_offer_and_names_the_others(engine):
    from webui.ui.infotext import fields_from_infotext

    parsed = parse_infotext('a cat\nSteps: 2, Sampler: Euler a, Styles array: "[\\"oil\\", \\"gone\\"]"')
    values, notes = fields_from_infotext(
        engine.fields, parsed, task="txt2img", names=["styles"], offered={"styles": ["oil", "neon"]}
    )
    assert values == {"styles": ("oil",)}
    assert notes == ["styles not available: 'gone'; left out"]


def test_a1111_bodies_take_styles(engine, data_dir):
    from webui.http.a1111 import parse_body

    parsed = parse_body({"prompt": "a cat", "styles": ["neon"], "steps": 1}, "txt2img", engine, {})
    assert parsed.request.extra["styles"] == ("neon",)
    with pytest.raises(InvalidRequestError, match="styles must be"):
        parse_body({"prompt": "a cat", "styles": {"a": 1}}, "txt2img", engine, {})


# -- the web app and the HTTP API (a real server) --------------------------------------------------

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_http_api_lists_styles_and_applies_them(server, data_dir):
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as api:
        listed = api.get("/sdapi/v1/prompt-styles")
        assert listed.status_code == 200
        assert listed.json()[:2] == [
            {
                "name": "oil",
                "prompt": "{prompt}, oil painting, thick brush strokes",
                "negative_prompt": "photo, blurry",
            },
            {"name": "neon", "prompt": "neon lights", "negative_prompt": ""},
        ]
        body = {"prompt": "a red circle", "styles": ["neon", "oil"], "steps": 2, "seed": 5}
        answer = api.post("/sdapi/v1/txt2img", json={**body, "width": 64, "height": 64})
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert info["styles"] == ["neon", "oil"]
        assert parse_infotext(info["infotexts"][0])["Prompt"] == (
            "a red circle, neon lights, oil painting, thick brush strokes"
        )
        refused = api.post("/sdapi/v1/txt2img", json={**body, "styles": ["nope"]})
        assert refused.status_code == 422 and "unknown style 'nope'" in refused.json()["detail"]


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_save_a_style_pick_it_and_generate(browser, server, data_dir):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server.url)
        page.locator("#txt2img-prompt textarea").wait_for(timeout=WAIT_MS)
        page.locator("#txt2img-prompt textarea").fill("{prompt}, on a blue background")
        page.locator("#txt2img-negative-prompt textarea").fill("green")
        page.locator("#txt2img-style-name input, #txt2img-style-name textarea").first.fill("blue ground")
        page.locator("#txt2img-save-style").click()
        saved = data_dir / "styles.csv"
        wait_until(lambda: "blue ground" in st.read_styles_file(saved)[0], timeout=60, what="the style saved")
        assert st.read_styles_file(saved)[0]["blue ground"].prompt == "{prompt}, on a blue background"
        # the picker offers the new style; pick it and generate with a plain prompt
        page.locator("#txt2img-prompt textarea").fill("a large red circle")
        page.locator("#txt2img-negative-prompt textarea").fill("")
        page.locator("#txt2img-styles input").first.click()
        page.get_by_role("option", name="blue ground").click()
        page.keyboard.press("Escape")
        page.locator("#txt2img-generate").click()
        page.locator("#txt2img-gallery img").first.wait_for(timeout=WAIT_MS)
        infotext = page.locator("#txt2img-infotext textarea").input_value()
        assert infotext.startswith("a large red circle, on a blue background\nNegative prompt: green\n")
        assert 'Styles array: "[\\"blue ground\\"]"' in infotext
        from ui_server import ROOT

        (ROOT / "test-artifacts" / "screenshots").mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ROOT / "test-artifacts" / "screenshots" / "styles.png"), full_page=True)
    finally:
        page.close()


def test_saving_styles_needs_a_local_server_or_a_login():
    from webui.ui.controls import style_saving_problem
    from webui.ui.server import PluginControl

    class Service:
        plugin_control = None

    service = Service()
    assert style_saving_problem(service, None) is None  # no server: a program or a test
    service.plugin_control = PluginControl(None)  # 127.0.0.1
    assert style_saving_problem(service, None) is None
    service.plugin_control = PluginControl("started with --listen")
    assert (
        style_saving_problem(service, None)
        == "Saving styles is off on a server others can reach without a login."
    )
    assert style_saving_problem(service, "ann") is None
