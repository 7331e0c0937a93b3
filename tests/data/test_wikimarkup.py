import importlib.util
import os

import pytest

from eexit.data.wikimarkup import iter_pages, load_wikipedia_articles, strip_markup


def test_nested_templates_removed():
    text = "Alpha {{Infobox|a={{nested|b={{deep}}}}|c=d}}beta {{{param|x}}}gamma."
    assert strip_markup(text) == "Alpha beta gamma."


def test_multiline_infobox_and_table_removed():
    text = (
        "{{Infobox person\n| name = X\n| born = {{birth date|1900|1|1}}\n}}\n"
        "'''X''' was a ''painter''.\n"
        '{| class="wikitable"\n|-\n| cell\n|-\n{|\n| inner\n|}\n| more\n|}\n'
        "After table."
    )
    assert strip_markup(text) == "X was a painter.\n\nAfter table."


def test_links_labels_kept():
    text = (
        "The [[cat|domestic cat]] and [[dog]]s live with [[:Category:Pets|pets]]. "
        "See [http://example.com the site] or [http://example.org].[[de:Katze]]"
    )
    assert strip_markup(text) == ("The domestic cat and dogs live with pets. See the site or.")


def test_file_links_with_nested_links_removed():
    text = (
        "Before. [[File:Cat.jpg|thumb|left|A [[cat]] with [[Dog|a dog]] [above], "
        "see Bicyclo[1.1.0]butane.]] After.\n"
        "[[Image:X.png|[[Y]] ]][[Category:Animals]]\n"
        "Tail [[category:Stubs|Z]] end."
    )
    assert strip_markup(text) == "Before. After.\n\nTail end."


def test_refs_comments_and_tags():
    text = (
        'Water<ref name="a">Cite {{cite web|url=x}}</ref> is H<sub>2</sub>O'
        '<ref name="b" /> <!-- hidden\ncomment --> and <b>wet</b>'
        "<math>x^2</math>.<br/>Next &amp;nbsp;done&nbsp;here."
    )
    assert strip_markup(text) == "Water is H2O and wet. Next &nbsp;done here."


def test_headings_lists_and_paragraphs():
    text = (
        "Intro line one.\n\n== History ==\n=== Early ===\n"
        "* First   item\n# Second item\n: indented\n; term\n"
        "*\n----\n\n\nLast   paragraph."
    )
    assert strip_markup(text) == (
        "Intro line one.\n\nFirst item\n\nSecond item\n\nindented\n\nterm\n\nLast paragraph."
    )


def test_references_section_cut():
    text = (
        "Body text.\n== Life ==\nMore text.\n== References ==\n{{reflist}}\n"
        "* A book\n== External links ==\n* [http://x.org Site]\n"
    )
    assert strip_markup(text) == "Body text.\n\nMore text."
    assert strip_markup("Body.\n==See also==\n* [[Other]]") == "Body."


def test_iter_pages_filters_namespace_and_redirects():
    xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Good &amp; Fine</title><ns>0</ns><id>1</id>
    <revision><text xml:space="preserve">'''Good''' &lt;ref&gt;x&lt;/ref&gt;text</text>
    </revision></page>
  <page><title>Redir</title><ns>0</ns><id>2</id>
    <revision><text xml:space="preserve">#redirect [[Good]]</text></revision></page>
  <page><title>Talk:Good</title><ns>1</ns><id>3</id>
    <revision><text xml:space="preserve">talk</text></revision></page>
</mediawiki>"""
    pages = list(iter_pages(xml))
    assert pages == [("Good & Fine", "'''Good''' <ref>x</ref>text")]
    assert strip_markup(pages[0][1]) == "Good text"


GENSIM_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _dump_path():
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), GENSIM_DUMP)
    return path if os.path.exists(path) else None


def test_real_gensim_dump():
    path = _dump_path()
    if path is None:
        pytest.skip("gensim test dump not available")
    articles = load_wikipedia_articles(path)
    assert len(articles) >= 90
    assert sum(len(prose) for _, prose in articles) >= 2_000_000
    for title, prose in articles:
        assert len(prose) >= 200
        for bad in ("{{", "}}", "[[", "]]", "<ref", "|}"):
            assert bad not in prose, (title, bad)
    titles = {t for t, _ in articles}
    assert "Anarchism" in titles and "AccessibleComputing" not in titles


def test_lead_parentheses_cleanup():
    lead = "'''Al''' ({{IPA|/x/}}; 26 July) was ({{lang|fr|y}}) here ({{a}}, b)."
    assert strip_markup(lead) == "Al (26 July) was here (b)."
