"""downloader: hostile names, every HTTP outcome against a real fake Webex, atomic no-overwrite commits."""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import itertools
import threading
import time
import unicodedata

import pytest

import webex
from downloader import (FALLBACK_STEM, MAX_NAME_BYTES, PARTIAL_DIR, Failed, Fetched, Interrupted, Retry,
                        candidate_names, commit, download, fallback_name, fetch, parse_content_disposition,
                        safe_filename)
from tests.fakewebex import PatternBody, Reply

MB = 1000**2


def xfail_bug(reason: str):
    return pytest.mark.xfail(reason=f"BUG: {reason}", strict=True)


def latin1_mojibake(text: str) -> str:
    """``text`` sent as raw UTF-8 in a header, as http.client hands it over (decoded as Latin-1)."""
    return text.encode("utf-8").decode("latin-1")


# --- parse_content_disposition ----------------------------------------------------------------

CD_CASES = [
    # plain filename=
    ("quoted", 'attachment; filename="report.pdf"', "report.pdf"),
    ("token", "attachment; filename=report.pdf", "report.pdf"),
    ("inline", 'inline; filename="x.txt"', "x.txt"),
    ("no-space-after-semicolon", 'attachment;filename="nospace.pdf"', "nospace.pdf"),
    ("spaces-around-equals", 'attachment; filename =  "spaced.pdf" ', "spaced.pdf"),
    ("escaped-quote", r'attachment; filename="a\"b.pdf"', 'a"b.pdf'),
    ("escaped-backslash", r'attachment; filename="a\\b.pdf"', "a\\b.pdf"),
    ("semicolon-in-quotes", 'attachment; filename="a;b.pdf"', "a;b.pdf"),
    ("escaped-quote-then-semicolon", r'attachment; filename="a\";b.pdf"', 'a";b.pdf'),
    ("upper-param-name", 'attachment; FILENAME="a.pdf"', "a.pdf"),
    ("other-params-first", 'form-data; name="field"; filename="real.pdf"', "real.pdf"),
    ("filename-inside-other-param", 'attachment; foo="a; filename=evil.exe"; filename="good.pdf"', "good.pdf"),
    ("first-of-duplicates", 'attachment; filename="a.pdf"; filename="b.pdf"', "a.pdf"),
    ("traversal-returned-raw", 'attachment; filename="../../etc/passwd"', "../../etc/passwd"),
    ("percent-not-decoded-in-filename", 'attachment; filename="%E2%82%AC.pdf"', "%E2%82%AC.pdf"),
    # filename* (RFC 5987 / 8187) wins
    ("star-wins-when-after", "attachment; filename=\"eur.pdf\"; filename*=UTF-8''%E2%82%AC%20rates.pdf",
     "€ rates.pdf"),
    ("star-wins-when-before", "attachment; filename*=UTF-8''%E2%82%AC%20rates.pdf; filename=\"eur.pdf\"",
     "€ rates.pdf"),
    ("star-utf8-cjk", "attachment; filename*=UTF-8''%E6%97%A5%E6%9C%AC.txt", "日本.txt"),
    ("star-utf8-emoji", "attachment; filename*=utf-8''%F0%9F%93%84.pdf", "📄.pdf"),
    ("star-utf8-arabic", "attachment; filename*=UTF-8''%D8%AA%D9%82%D8%B1%D9%8A%D8%B1.pdf", "تقرير.pdf"),
    ("star-latin1-with-language", "attachment; filename*=iso-8859-1'en'%A3%20rates.pdf", "£ rates.pdf"),
    ("star-latin1-upper-charset", "attachment; filename*=ISO-8859-1''%E9t%E9.txt", "été.txt"),
    ("star-us-ascii", "attachment; filename*=us-ascii''plain.txt", "plain.txt"),
    ("star-encoded-percent", "attachment; filename*=UTF-8''100%25.pdf", "100%.pdf"),
    ("star-quoted-lenient", "attachment; filename*=\"UTF-8''a%20b.pdf\"", "a b.pdf"),
    ("star-mixed-case-name", "attachment; FileName*=utf-8''x.pdf", "x.pdf"),
    ("star-all-upper", "ATTACHMENT; FILENAME*=UTF-8''X.PDF", "X.PDF"),
    # broken filename* falls back to filename
    ("star-invalid-utf8-falls-back", "attachment; filename*=UTF-8''%FF.pdf; filename=\"ok.pdf\"", "ok.pdf"),
    ("star-truncated-utf8-falls-back", "attachment; filename*=UTF-8''%E2%82; filename=ok.pdf", "ok.pdf"),
    ("star-invalid-percent-falls-back", "attachment; filename*=UTF-8''%ZZ.pdf; filename=\"ok.pdf\"", "ok.pdf"),
    ("star-lone-percent-falls-back", "attachment; filename*=UTF-8''%; filename=\"ok.pdf\"", "ok.pdf"),
    ("star-unknown-charset-falls-back", "attachment; filename*=koi8-r''%C1.pdf; filename=\"ok.pdf\"", "ok.pdf"),
    ("star-utf16-falls-back", "attachment; filename*=utf-16''%FF%FE; filename=fb.txt", "fb.txt"),
    ("star-no-charset-falls-back", "attachment; filename*=''x.pdf; filename=\"ok.pdf\"", "ok.pdf"),
    ("star-empty-falls-back", "attachment; filename*=UTF-8''; filename=\"ok.pdf\"", "ok.pdf"),
    ("star-bad-and-no-filename", "attachment; filename*=koi8-r''%C1.pdf", None),
    # raw UTF-8 arriving as Latin-1 mojibake is repaired; real Latin-1 is kept
    ("mojibake-accents", f'attachment; filename="{latin1_mojibake("résumé.pdf")}"', "résumé.pdf"),
    ("mojibake-cjk", f'attachment; filename="{latin1_mojibake("日本語.txt")}"', "日本語.txt"),
    ("mojibake-emoji", f"attachment; filename={latin1_mojibake('📄.pdf')}", "📄.pdf"),
    ("real-latin1-kept", 'attachment; filename="caf\xe9.pdf"', "café.pdf"),
    ("already-unicode-kept", 'attachment; filename="日本.txt"', "日本.txt"),
    # nothing usable
    ("none", None, None),
    ("empty", "", None),
    ("type-only", "attachment", None),
    ("garbage", "garbage", None),
    ("only-semicolons", ";;;", None),
    ("empty-token", "attachment; filename=", None),
    ("empty-quoted", 'attachment; filename=""', None),
    ("lookalike-param", 'attachment; xfilename="no.pdf"', None),
]
CD_BUGS: dict[str, str] = {}  # case id -> known bug (strict xfail); empty: all fixed


@pytest.mark.parametrize("header, expected", [
    pytest.param(header, expected, id=case_id,
                 marks=[xfail_bug(CD_BUGS[case_id])] if case_id in CD_BUGS else [])
    for case_id, header, expected in CD_CASES
])
def test_parse_content_disposition(header, expected):
    assert parse_content_disposition(header) == expected


# --- safe_filename -----------------------------------------------------------------------------

def cut(text: str, ext: str) -> str:
    """The longest prefix of ``text`` that fits with ``ext`` in MAX_NAME_BYTES, whole characters only."""
    while len((text + ext).encode()) > MAX_NAME_BYTES:
        text = text[:-1]
    return text + ext


SAFE_CASES = [
    # path traversal and absolute paths: only the last segment survives
    ("traversal-posix", "../../etc/passwd", "passwd"),
    ("traversal-windows", "..\\..\\win.ini", "win.ini"),
    ("absolute", "/abs/path", "path"),
    ("nested", "a/b/c.txt", "c.txt"),
    ("windows-absolute", "C:\\Users\\x\\evil.bat", "evil.bat"),
    ("windows-drive-relative", "C:evil.bat", "C_evil.bat"),
    # nothing left → fallback
    ("dotdot", "..", FALLBACK_STEM),
    ("dot", ".", FALLBACK_STEM),
    ("dots", "...", FALLBACK_STEM),
    ("empty", "", FALLBACK_STEM),
    ("none", None, FALLBACK_STEM),
    ("slash", "/", FALLBACK_STEM),
    ("backslash", "\\", FALLBACK_STEM),
    ("blank", "   ", FALLBACK_STEM),
    ("only-invisible", "\u202e\u200b", FALLBACK_STEM),
    # hidden files and option-like names
    ("hidden", ".bashrc", "bashrc"),
    ("hidden-many-dots", "...hidden.txt", "hidden.txt"),
    ("hidden-behind-zero-width", "\u200b.bashrc", "bashrc"),
    ("leading-dashes", "--help.txt", "help.txt"),
    # control, format and bidi characters
    ("nul", "a\x00b.txt", "ab.txt"),
    ("control", "a\x01\x1fb.txt", "ab.txt"),
    ("del", "a\x7fb.txt", "ab.txt"),
    ("tab-newline", "a\tb\nc.txt", "abc.txt"),
    ("rlo-override", "evil\u202etxt.exe", "eviltxt.exe"),
    ("lro-and-isolate", "in\u202dvoice\u2066.pdf", "invoice.pdf"),
    ("zero-width", "zero\u200bwidth\u200d.txt", "zerowidth.txt"),
    ("bom", "\ufeffbom.txt", "bom.txt"),
    ("line-separator", "a\u2028b.txt", "ab.txt"),
    ("tag-character", "\U000e0041tag.txt", "tag.txt"),
    ("lone-surrogate", "a\ud800b.txt", "ab.txt"),
    ("private-use", "a\ue000b.txt", "ab.txt"),
    # Windows device names
    ("CON", "CON", "_CON"),
    ("con.txt", "con.txt", "_con.txt"),
    ("LPT1", "LPT1", "_LPT1"),
    ("nul-lower", "nul", "_nul"),
    ("Nul-trailing-dot", "Nul.", "_Nul"),
    ("CON-space-before-ext", "CON .txt", "_CON .txt"),
    ("COM-superscript", "COM¹.txt", "_COM¹.txt"),
    ("prn-trailing-dots", "prn..", "_prn"),
    ("COM1.tar.gz", "COM1.tar.gz", "_COM1.tar.gz"),
    ("aux.tar.gz", "aux.tar.gz", "_aux.tar.gz"),
    ("not-reserved-conference", "conference.txt", "conference.txt"),
    ("not-reserved-com10", "com10.txt", "com10.txt"),
    # characters Windows forbids, trailing dots and spaces
    ("windows-forbidden", 'a<b>c:d"e|f?g*h.txt', "a_b_c_d_e_f_g_h.txt"),
    ("trailing-dots", "trailing...", "trailing"),
    ("trailing-spaces", "trailing   ", "trailing"),
    ("trailing-space-dot", "trail .", "trail"),
    ("spaces-collapsed", "  spaced  .txt", "spaced .txt"),
    # long names: ≤ 255 UTF-8 bytes, extension kept, whole characters
    ("long-ascii", "x" * 300 + ".pdf", "x" * 251 + ".pdf"),
    ("long-no-extension", "x" * 300, "x" * 255),
    ("long-2-byte", "é" * 200 + ".pdf", cut("é" * 200, ".pdf")),
    ("long-3-byte", "日本語" * 50 + ".txt", cut("日本語" * 50, ".txt")),
    ("long-4-byte", "😀" * 100 + ".png", cut("😀" * 100, ".png")),
    ("long-not-an-extension", "x." + "y" * 20, "x." + "y" * 20),
    # international names pass through, NFC-normalised
    ("nfc", "e\u0301te\u0301.pdf", "été.pdf"),
    ("emoji", "📄 report.pdf", "📄 report.pdf"),
    ("cjk", "报告.docx", "报告.docx"),
    ("arabic", "تقرير.pdf", "تقرير.pdf"),
    ("hebrew", "דוח.pdf", "דוח.pdf"),
    ("plain", "report.pdf", "report.pdf"),
]
SAFE_BUGS: dict[str, str] = {}


@pytest.mark.parametrize("name, expected", [
    pytest.param(name, expected, id=case_id,
                 marks=[xfail_bug(SAFE_BUGS[case_id])] if case_id in SAFE_BUGS else [])
    for case_id, name, expected in SAFE_CASES
])
def test_safe_filename(name, expected):
    assert safe_filename(name) == expected


@pytest.mark.parametrize("name", [name for _, name, _ in SAFE_CASES],
                         ids=[case_id for case_id, _, _ in SAFE_CASES])
def test_safe_filename_properties(name):
    result = safe_filename(name)
    assert result
    assert "/" not in result and "\\" not in result
    assert not result.startswith(".") and not result.endswith((".", " "))
    assert len(result.encode("utf-8")) <= MAX_NAME_BYTES
    assert not any(ch in '<>:"|?*' or unicodedata.category(ch) in ("Cc", "Cf") for ch in result)
    assert result == unicodedata.normalize("NFC", result)
    assert safe_filename(result) == result  # idempotent


@pytest.mark.parametrize("fallback, expected", [
    ("report.pdf", "report.pdf"),
    ("../x.pdf", "x.pdf"),
    ("..", FALLBACK_STEM),
    ("", FALLBACK_STEM),
], ids=["plain", "traversal", "dotdot", "empty"])
def test_safe_filename_fallback_is_made_safe_too(fallback, expected):
    assert safe_filename("..", fallback=fallback) == expected


# --- fallback_name and candidate_names ---------------------------------------------------------

@pytest.mark.parametrize("url, content_type, expected", [
    ("https://webexapis.com/v1/contents/ABC", "application/pdf", "ABC.pdf"),
    ("https://webexapis.com/v1/contents/ABC", "image/jpeg; charset=binary", "ABC.jpg"),
    ("https://webexapis.com/v1/contents/ABC", "IMAGE/PNG", "ABC.png"),
    ("https://webexapis.com/v1/contents/ABC", None, "ABC"),
    ("https://webexapis.com/v1/contents/ABC", "application/x-no-such-type", "ABC"),
    ("https://webexapis.com/v1/contents/ABC/", "text/plain", "ABC.txt"),
    ("https://webexapis.com/v1/contents/ABC?allow=unscannable", "text/plain", "ABC.txt"),
    ("https://webexapis.com/", "application/pdf", FALLBACK_STEM + ".pdf"),
    ("https://webexapis.com/v1/contents/" + "Z" * 100, "application/pdf", "Z" * 64 + ".pdf"),
], ids=["pdf", "jpeg-with-params", "uppercase-type", "no-type", "unknown-type", "trailing-slash",
        "query-ignored", "no-id", "long-id-cut"])
def test_fallback_name(url, content_type, expected):
    assert fallback_name(url, content_type) == expected


@pytest.mark.parametrize("name, expected", [
    ("report.pdf", ["report.pdf", "report (1).pdf", "report (2).pdf", "report (3).pdf"]),
    ("notes", ["notes", "notes (1)", "notes (2)", "notes (3)"]),
    ("报告.docx", ["报告.docx", "报告 (1).docx", "报告 (2).docx", "报告 (3).docx"]),
], ids=["with-extension", "without-extension", "cjk"])
def test_candidate_names(name, expected):
    assert list(itertools.islice(candidate_names(name), 4)) == expected


@pytest.mark.parametrize("name", [safe_filename("x" * 300 + ".pdf"), safe_filename("é" * 200 + ".pdf"),
                                  safe_filename("😀" * 100), safe_filename("日本語" * 50 + ".txt")],
                         ids=["ascii", "2-byte", "4-byte-no-ext", "3-byte"])
def test_candidate_names_for_long_names_stay_within_limit(name):
    names = list(itertools.islice(candidate_names(name), 120))
    assert len(set(names)) == len(names)
    assert all(len(n.encode()) <= MAX_NAME_BYTES for n in names)
    ext = name[name.rfind("."):] if "." in name else ""
    assert all(n.endswith(ext) for n in names)
    assert names[10].endswith(f" (10){ext}") and names[119].endswith(f" (119){ext}")


# --- fetch and download against the fake Webex --------------------------------------------------

@pytest.fixture
def session(fake):
    s = webex.new_session(fake.api_url, fake.token)
    yield s
    s.close()


@pytest.fixture
def dest(tmp_path):
    return tmp_path / "downloads"


@pytest.fixture
def part(dest):
    return dest / PARTIAL_DIR / "job.part"


@pytest.fixture
def get(fake, session, part):
    """``fetch`` with the fake's API URL, the token session and a part file under DOWNLOAD_DIR/.partial."""
    def get(url, **kwargs):
        kwargs.setdefault("max_size", 10 * MB)
        return fetch(url, session=session, api_url=fake.api_url, part_path=part, **kwargs)
    return get


@pytest.fixture
def no_length(fake):
    """Make the fake send file bodies without Content-Length (the body ends when the connection closes)."""
    class Handler(fake.server.RequestHandlerClass):
        def send_header(self, key, value):
            if key.lower() == "content-length" and self.path.startswith("/v1/contents/"):
                self.close_connection = True
                return
            super().send_header(key, value)
    fake.server.RequestHandlerClass = Handler
    return fake


def leftovers(root) -> list[str]:
    """Every file under ``root`` (relative), e.g. a part file that should have been cleaned up."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def content_requests(fake, url):
    return fake.requests_for(url.rsplit("/", 1)[-1])


def test_a_file_of_many_chunks_is_saved_intact(fake, session, dest):
    body = PatternBody(40 * MB + 12345, seed=11)
    url = fake.add_file(body, name="big.bin")
    result = download(url, dest, session=session, api_url=fake.api_url, max_size=200 * MB)
    assert isinstance(result, Fetched) and result.size == body.size
    assert hashlib.sha256((dest / "big.bin").read_bytes()).hexdigest() == body.sha256() == result.sha256


def test_download_saves_complete_file_with_hash_and_size(fake, session, dest):
    body = PatternBody(2_500_000, seed=7)
    url = fake.add_file(body, name="report.pdf", content_type="application/pdf")

    result = download(url, dest, session=session, api_url=fake.api_url, max_size=10 * MB)

    assert isinstance(result, Fetched)
    assert result.part_path == dest / "report.pdf" and result.name == "report.pdf"
    assert result.size == body.size == result.part_path.stat().st_size
    assert result.sha256 == body.sha256() == hashlib.sha256(result.part_path.read_bytes()).hexdigest()
    assert result.content_type == "application/pdf"
    assert leftovers(dest) == ["report.pdf"]
    assert [r.authorization for r in content_requests(fake, url)] == [f"Bearer {fake.token}"]


def test_download_twice_never_overwrites(fake, session, dest):
    url = fake.add_file(b"first", name="report.pdf")
    first = download(url, dest, session=session, api_url=fake.api_url, max_size=MB)
    fake.script(url, Reply(200, {"Content-Disposition": 'attachment; filename="report.pdf"'}, b"second"))
    second = download(url, dest, session=session, api_url=fake.api_url, max_size=MB)

    assert (first.name, second.name) == ("report.pdf", "report (1).pdf")
    assert (dest / "report.pdf").read_bytes() == b"first"
    assert (dest / "report (1).pdf").read_bytes() == b"second"


@pytest.mark.parametrize("disposition, expected", [
    ('attachment; filename="report.pdf"', "report.pdf"),
    ("attachment; filename*=UTF-8''%E2%82%AC%20rates.pdf; filename=\"eur.pdf\"", "€ rates.pdf"),
    (f'attachment; filename="{latin1_mojibake("résumé 日本.pdf")}"', "résumé 日本.pdf"),
    ('attachment; filename="../../etc/passwd"', "passwd"),
    ('attachment; filename="CON.txt"', "_CON.txt"),
    ('attachment; filename=".."', "CONTENTID.pdf"),
    ("attachment", "CONTENTID.pdf"),
    (None, "CONTENTID.pdf"),
], ids=["quoted", "filename-star", "raw-utf8", "traversal", "device-name", "dotdot-falls-back",
        "no-filename-falls-back", "no-header-falls-back"])
def test_fetch_names_the_file_from_the_headers(fake, get, disposition, expected):
    headers = {"Content-Disposition": disposition} if disposition else {}
    url = fake.add_file(b"%PDF-1.7", name=None, content_type="application/pdf", headers=headers,
                        content_id="CONTENTID")
    result = get(url)
    assert isinstance(result, Fetched)
    assert result.name == expected


@pytest.mark.parametrize("reply, expected", [
    (Reply(423, {"Retry-After": "5"}), Retry("scanning", "", 5.0)),
    (Reply(423), Retry("scanning", "", webex.RETRY_AFTER_DEFAULT)),
    (Reply(429, {"Retry-After": "30"}), Retry("rate_limited", "", 30.0)),
    (Reply(429, {"Retry-After": "99999"}), Retry("rate_limited", "", webex.RETRY_AFTER_CAP)),
    (Reply(408), Retry("timeout", "", None)),
    (Reply(500), Retry("server_error", "", None)),
    (Reply(502), Retry("server_error", "", None)),
    (Reply(503, {"Retry-After": "7"}), Retry("server_error", "", 7.0)),
    (Reply(504), Retry("server_error", "", None)),
    (Reply(410), Failed("infected", "")),
    (Reply(428), Failed("unscannable", "")),
    (Reply(401), Failed("unauthorized", "")),
    (Reply(403), Failed("forbidden", "")),
    (Reply(404), Failed("not_found", "")),
    (Reply(400), Failed("http_400", "")),
    (Reply(302), Failed("redirect", "")),
], ids=["423-retry-after", "423-default-delay", "429", "429-capped", "408", "500", "502", "503-retry-after",
        "504", "410-infected", "428-unscannable", "401", "403", "404", "400", "302-without-location"])
def test_fetch_classifies_statuses(fake, get, dest, reply, expected):
    url = fake.add_file(b"data")
    fake.script(url, reply)

    result = get(url)

    assert type(result) is type(expected)
    assert result.reason == expected.reason
    assert getattr(result, "delay", None) == getattr(expected, "delay", None)
    assert str(reply.status) in result.detail
    assert len(content_requests(fake, url)) == 1  # a permanent failure is never retried inside fetch
    assert leftovers(dest) == []


def test_rate_limit_with_http_date(fake, get):
    url = fake.add_file(b"data")
    fake.script(url, Reply(429, {"Retry-After": email.utils.formatdate(time.time() + 120, usegmt=True)}))
    result = get(url)
    assert isinstance(result, Retry) and result.reason == "rate_limited"
    assert 110 < result.delay <= 120


def test_scanning_then_ready(fake, get):
    url = fake.add_file(b"clean file", name="scan.txt")
    fake.script(url, Reply(423, {"Retry-After": "1"}), Reply(423, {"Retry-After": "2"}))
    assert [get(url).delay, get(url).delay] == [1.0, 2.0]
    result = get(url)
    assert isinstance(result, Fetched) and result.part_path.read_bytes() == b"clean file"


def test_unknown_content_is_not_found(fake, get):
    result = get(f"{fake.api_url}/contents/NO-SUCH-ID")
    assert result.reason == "not_found"


def test_wrong_token_is_unauthorized(fake, part):
    url = fake.add_file(b"data")
    with webex.new_session(fake.api_url, "wrong-token") as bad:
        result = fetch(url, session=bad, api_url=fake.api_url, part_path=part, max_size=MB)
    assert isinstance(result, Failed) and result.reason == "unauthorized"


def test_unscannable_is_refused_without_opt_in(fake, get):
    url = fake.add_file(b"encrypted zip")
    fake.script(url, Reply(428))
    assert get(url).reason == "unscannable"
    assert len(content_requests(fake, url)) == 1


def test_unscannable_with_opt_in_asks_again_with_allow(fake, get):
    url = fake.add_file(b"encrypted zip", name="secret.zip")
    fake.script(url, Reply(428))

    result = get(url, allow_unscannable=True)

    assert isinstance(result, Fetched)
    assert result.part_path.read_bytes() == b"encrypted zip" and result.name == "secret.zip"
    first, second = content_requests(fake, url)
    assert first.query == {} and second.query == {"allow": ["unscannable"]}
    assert second.authorization == f"Bearer {fake.token}"


def test_infected_is_not_retried_even_with_opt_in(fake, get):
    url = fake.add_file(b"eicar")
    fake.script(url, Reply(410))
    assert get(url, allow_unscannable=True).reason == "infected"
    assert len(content_requests(fake, url)) == 1


def test_too_large_by_content_length_reads_no_body(fake, get, dest):
    url = fake.add_file(PatternBody(2 * MB))
    chunks = []

    result = get(url, max_size=MB, should_stop=lambda: chunks.append(1) or False)

    assert isinstance(result, Failed) and result.reason == "too_large"
    assert str(2 * MB) in result.detail
    assert chunks == []  # decided from the header: not one chunk of the body was read
    assert len(content_requests(fake, url)) == 1
    assert leftovers(dest) == []


def test_too_large_without_content_length_stops_streaming(no_length, get, dest):
    url = no_length.add_file(PatternBody(3 * MB))
    result = get(url, max_size=MB, chunk_size=64 * 1024)
    assert isinstance(result, Failed) and result.reason == "too_large"
    assert leftovers(dest) == []


def test_missing_content_length_is_fine_below_the_limit(no_length, get):
    body = PatternBody(300_000, seed=3)
    url = no_length.add_file(body, name="nolength.bin")
    result = get(url, max_size=MB)
    assert isinstance(result, Fetched)
    assert (result.size, result.sha256) == (body.size, body.sha256())


def test_body_exactly_at_the_limit_is_accepted(fake, get):
    url = fake.add_file(b"x" * 1000)
    assert isinstance(get(url, max_size=1000), Fetched)
    assert get(url, max_size=999).reason == "too_large"


@pytest.mark.parametrize("reply", [
    Reply(200, {}, b"x" * 100, length=1000),
    Reply(200, {}, PatternBody(3 * MB), cut_after=1_500_000),
    Reply(200, {}, PatternBody(3 * MB), cut_after=1),
], ids=["lying-content-length", "cut-mid-body", "cut-after-first-byte"])
def test_incomplete_body_is_retried_and_cleaned_up(fake, get, dest, reply):
    url = fake.add_file(b"data")
    fake.script(url, reply)
    result = get(url)
    assert isinstance(result, Retry) and result.reason in ("connection", "incomplete")
    assert leftovers(dest) == []


def test_slow_server_is_a_timeout_retry(fake, get, dest):
    url = fake.add_file(b"data")
    fake.script(url, Reply(200, {}, b"data", delay=0.3))
    result = get(url, timeout=(2, 0.05))
    assert isinstance(result, Retry) and result.reason == "timeout"
    assert leftovers(dest) == []


def test_content_encoding_does_not_make_a_file_undownloadable(fake, get):
    data = b"hello world " * 1000
    url = fake.add_file(gzip.compress(data), name="a.txt", headers={"Content-Encoding": "gzip"})
    result = get(url)
    assert isinstance(result, Fetched)
    assert result.part_path.read_bytes() in (data, gzip.compress(data))


# --- the token and the trusted-host rule -------------------------------------------------------

def test_untrusted_host_gets_no_request(fake, stranger, get):
    url = stranger.add_file(b"bait")
    result = get(url)
    assert isinstance(result, Failed) and result.reason == "untrusted_host"
    assert stranger.requests == []


@pytest.mark.parametrize("make_url", [
    lambda fake: fake.api_url.replace("http://", "https://") + "/contents/X",
    lambda fake: f"http://localhost:{fake.server.server_address[1]}/v1/contents/X",
    lambda fake: fake.api_url.replace("http://", "http://user@") + "/contents/X",
    lambda fake: "http://webexapis.com/v1/contents/X",
], ids=["other-scheme", "other-name-for-loopback", "userinfo", "webex-over-http"])
def test_other_untrusted_urls_are_refused_before_any_request(fake, get, make_url):
    result = get(make_url(fake))
    assert result.reason == "untrusted_host"
    assert fake.requests == []


def test_redirect_to_another_host_is_refused_and_not_followed(fake, stranger, get):
    url = fake.add_file(b"data")
    fake.script(url, Reply(302, {"Location": stranger.add_file(b"bait")}))

    result = get(url)

    assert isinstance(result, Failed) and result.reason == "untrusted_host"
    assert "redirected to" in result.detail
    assert [r.authorization for r in content_requests(fake, url)] == [f"Bearer {fake.token}"]
    assert stranger.requests == []


def test_redirect_loop_gives_up(fake, get):
    url = fake.add_file(b"data")
    fake.script(url, *[Reply(302, {"Location": url})] * 10)
    result = get(url)
    assert isinstance(result, Failed) and result.reason == "redirect"
    assert len(content_requests(fake, url)) == 6


def test_redirect_within_the_api_origin_keeps_the_token(fake, get):
    target = fake.add_file(b"moved here", name="moved.txt")
    url = fake.add_file(b"data")
    fake.script(url, Reply(302, {"Location": target}))

    result = get(url)

    assert isinstance(result, Fetched) and result.part_path.read_bytes() == b"moved here"
    assert [r.authorization for r in content_requests(fake, target)] == [f"Bearer {fake.token}"]


# --- interruption and the "complete or nothing" invariant --------------------------------------

def test_should_stop_interrupts_and_removes_the_part_file(fake, get, dest, part):
    url = fake.add_file(PatternBody(2 * MB))
    calls = []

    def stop():
        calls.append(part.exists())
        return True

    with pytest.raises(Interrupted):
        get(url, should_stop=stop, chunk_size=64 * 1024)
    assert calls == [True]  # asked after the first chunk was written
    assert leftovers(dest) == []


def test_final_name_appears_only_when_complete(fake, get, dest, part):
    body = PatternBody(1_000_000, seed=5)
    url = fake.add_file(body, name="big.bin")
    seen = []

    def look():
        seen.append((sorted(p.name for p in dest.iterdir()), sorted(p.name for p in part.parent.iterdir()),
                     part.stat().st_size))
        return False

    result = get(url, should_stop=look, chunk_size=64 * 1024)

    assert len(seen) > 1
    assert all(top == [PARTIAL_DIR] and inside == [part.name] for top, inside, _ in seen)
    sizes = [size for _, _, size in seen]
    assert sizes == sorted(sizes) and sizes[0] < body.size
    final = commit(result.part_path, dest, result.name)
    assert sorted(p.name for p in dest.iterdir()) == [PARTIAL_DIR, "big.bin"]
    assert leftovers(dest) == ["big.bin"]
    assert hashlib.sha256(final.read_bytes()).hexdigest() == body.sha256()


# --- commit ------------------------------------------------------------------------------------

def make_part(dest, data: bytes, name: str = "job.part"):
    path = dest / PARTIAL_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_commit_never_overwrites(dest):
    dest.mkdir()
    (dest / "report.pdf").write_bytes(b"old")
    linked = []

    first = commit(make_part(dest, b"new 1"), dest, "report.pdf", before_link=linked.append)
    second = commit(make_part(dest, b"new 2"), dest, "report.pdf", before_link=linked.append)

    assert (first.name, second.name) == ("report (1).pdf", "report (2).pdf")
    assert linked == [first, second]
    assert [(dest / n).read_bytes() for n in ("report.pdf", "report (1).pdf", "report (2).pdf")] == \
        [b"old", b"new 1", b"new 2"]
    assert leftovers(dest) == ["report (1).pdf", "report (2).pdf", "report.pdf"]


def test_commit_skips_symlinks_and_folders(dest, tmp_path):
    dest.mkdir()
    outside = tmp_path / "outside.pdf"
    (dest / "report.pdf").symlink_to(outside)  # dangling: must not be written through
    (dest / "report (1).pdf").mkdir()

    final = commit(make_part(dest, b"data"), dest, "report.pdf")

    assert final.name == "report (2).pdf" and final.read_bytes() == b"data"
    assert not outside.exists()


def test_commit_creates_the_folder(tmp_path):
    src = make_part(tmp_path, b"data")
    final = commit(src, tmp_path / "new" / "folder", "a.txt")
    assert final.read_bytes() == b"data" and not src.exists()


@pytest.mark.parametrize("threads", [2, 4])
def test_concurrent_commits_of_one_name_all_survive(tmp_path, threads):
    for round_ in range(40):
        dest = tmp_path / f"round-{round_}"
        parts = [make_part(dest, f"writer {i}".encode(), f"{i}.part") for i in range(threads)]
        barrier = threading.Barrier(threads)
        results, errors = [], []

        def run(part):
            try:
                barrier.wait(timeout=5)
                results.append(commit(part, dest, "report.pdf"))
            except Exception as exc:  # surfaced by the assertion below
                errors.append(exc)

        workers = [threading.Thread(target=run, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=10)

        assert errors == []
        assert sorted(r.name for r in results) == sorted(itertools.islice(candidate_names("report.pdf"), threads))
        assert sorted(r.read_bytes() for r in results) == sorted(f"writer {i}".encode() for i in range(threads))
        assert list((dest / PARTIAL_DIR).iterdir()) == []
