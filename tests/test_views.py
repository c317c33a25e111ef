"""app.views: the retention map's tick labels fit their share of the width (long SRT cue labels overlapped)
and are vector text (they were small raster text inside a PNG)."""

import xml.etree.ElementTree as ET

import numpy as np

from app import views


def test_long_tick_labels_are_cut_to_their_share_of_the_width():
    font = views._font(15)
    label = "00:41:07,120 --> 00:41:09,800 cue 734: and then the chairman said we adjourn"
    cut = views.fit_text(label, font, 120)
    assert cut.endswith("…") and font.getlength(cut) <= 120
    assert views.fit_text("1,024", font, 120) == "1,024"  # short labels stay whole


def test_the_map_draws_with_long_labels_and_stays_its_width():
    positions = np.arange(2 * 3 * 40).reshape(2, 3, 40)
    retention = {"positions": positions, "seen": 240, "layers": [0, 1]}
    labels = ["00:00:01,000 --> 00:00:04,000 cue 1 opening remarks"] * 5
    svg = ET.fromstring(views.retention_svg(retention, tick_labels=labels, width=400, ticks=5))
    assert svg.get("viewBox").split()[2] == "400"
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "layer 0" in texts[0] or texts[0] == "0"  # row labels are text, not pixels
    ticks = [t for t in texts if t and t[0].isdigit()]
    assert len(ticks) == 5 and ticks[0] == "0" and ticks[-1] == "240"  # the position always shows
    assert all(t.endswith("…") for t in ticks[1:-1])  # source labels cut, not printed over each other
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}image"))) == 1  # only the cells are pixels


def test_a_section_summary_shows_its_label_main_names_and_source():
    section = {"index": 0, "label": "Chapter 2", "summary": "Ruth gleans in the field of Boaz.", "cut": False,
               "names": ["Naomi", "Ruth", "Boaz"], "source": "Chapter 2", "start_char": 0, "end_char": 9}
    page = views.sections_html([section], "", "", "", planned=4)
    assert "<h4>Chapter 2</h4><div class='names'>about Naomi, Ruth, Boaz</div>" in page
    assert "Section summaries (1 of 4)" in page and "Ruth gleans" in page
    assert "about" not in views.sections_html([{**section, "names": []}], "", "", "")  # none given, none shown


def test_uneven_cascades_show_their_own_sizes():
    # a real cache: 4 sinks + 10 window slots in 3 cascades of 4, 3 and 3 (the window does not split evenly)
    from types import SimpleNamespace

    import torch
    from engine.cache import CacheConfig, make_cache

    config = CacheConfig(sinks=4, window=10, cascades=3)
    assert config.sizes == [4, 3, 3] and views.sizes_text(config.sizes) == "3-4"
    cache = make_cache(config, SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=4), batch=1)
    for _ in range(40):  # one token at a time, every token attended equally
        plan = cache.plan(1)
        k = torch.zeros(1, 1, 1, 4)
        cache.push(0, plan, k, k, torch.ones(1, 1, 14), torch.ones(1, 1, 1))
        cache.commit(plan)
    retention = {"positions": cache.pos[0].numpy(), "cascade": cache.cascade_of_slot().numpy()}
    rows = {r[0]: r[1] for r in views.occupancy_table(retention, 0, config.sizes, config.sinks)}
    assert rows["cascade 0"] == "4/4" and rows["cascade 1"] == "3/3" and rows["cascade 2"] == "3/3"
    assert "3 cascades of 3-4" in views.settings_note(config, 256)
