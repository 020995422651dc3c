"""storage/url_guard.py: the address classifier, host parsing and the allowlist. No traffic is sent:
the only lookups are of literal addresses and of ``localhost`` (answered from /etc/hosts)."""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from storage.url_guard import (
    NOT_ALLOWED,
    FetchProblem,
    SystemResolver,
    address_problem,
    allowlist_from,
    check_target,
    inet_aton,
    parse_allowlist,
    parse_host,
    parse_url,
    redact_url,
)

REFUSED = [
    # IPv4
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.0.0.8", "IETF protocol assignments"),
    ("192.0.2.1", "documentation"),
    ("192.88.99.1", "6to4 relay"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    # IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "IPv4-mapped"),
    ("::ffff:8.8.8.8", "IPv4-mapped"),  # never a real AAAA answer: refused whatever it carries
    ("::127.0.0.1", "IPv4-compatible"),
    ("::10.0.0.1", "IPv4-compatible"),
    ("64:ff9b::7f00:1", "NAT64 address embedding 127.0.0.1: loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 address embedding 169.254.169.254: link-local"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("100::1", "discard-only"),
    ("2001:2::1", "benchmarking"),
    ("2001:db8::1", "documentation"),
    ("2001:10::1", "IETF protocol assignments"),
    ("2002:7f00:1::1", "6to4 address embedding 127.0.0.1: loopback"),
    ("2002:c0a8:101::1", "6to4 address embedding 192.168.1.1: private"),
    # Teredo: server 10.0.0.1, client obfuscated (XOR) 8.8.8.8 / server 8.8.8.8, client 192.168.1.1.
    ("2001:0:a00:1::f7f7:f7f7", "Teredo server address embedding 10.0.0.1"),
    ("2001:0:808:808::3f57:fefe", "Teredo client address embedding 192.168.1.1"),
    ("3fff::1", "documentation"),
    ("fc00::1", "unique local"),
    ("fd12:3456:789a::1", "unique local"),
    ("fe80::1", "link-local"),
    ("febf::1", "link-local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("5f00::1", "reserved"),
    ("4000::1", "reserved"),
    ("fe80::1%2", "zone id"),
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above CGNAT
    "172.15.255.255",
    "172.32.0.0",
    "198.17.255.255",
    "198.20.0.0",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "2a00:1450:4001:80b::200e",
    "64:ff9b::808:808",  # NAT64 to a public host: how IPv6-only networks reach IPv4 sites
    "2002:808:808::1",  # 6to4 of a public host
    "2001:0:808:808::f7f7:f7f7",  # Teredo, server and client both public
]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_special_addresses_are_refused_with_the_reason(address: str, reason: str):
    problem = address_problem(ipaddress.ip_address(address))
    assert problem is not None and reason in problem


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str):
    assert address_problem(ipaddress.ip_address(address)) is None


@settings(max_examples=400, deadline=None)
@given(st.ip_addresses(v=4))
def test_every_ipv4_in_a_special_range_is_refused(address: ipaddress.IPv4Address):
    special = [
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    ]  # fmt: skip
    in_special = any(address in ipaddress.ip_network(net) for net in special)
    problem = address_problem(address)
    if in_special:
        assert problem is not None
    # Whatever it is, mapping or embedding it in IPv6 never makes it more acceptable.
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert address_problem(mapped) is not None
    nat64 = ipaddress.IPv6Address((0x0064FF9B << 96) | int(address))
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80) | 1)
    for embedded in (nat64, sixtofour):
        if problem is not None:
            assert address_problem(embedded) is not None


# --- numeric IPv4 hosts, read as libc reads them ------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7F000001", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x0", "0.0.0.0"),
        ("000000000177.0x0.0.01", "127.0.0.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("3232235777", "192.168.1.1"),
        ("127.0.0.1.", "127.0.0.1"),  # a trailing dot is the root, not another part
    ],
)
def test_numeric_ipv4_forms_are_normalised(host: str, expected: str):
    assert parse_host(host) == ipaddress.IPv4Address(expected)
    assert address_problem(parse_host(host)) is not None


def _libc_inet_aton(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


_PART = st.one_of(
    st.integers(0, 2**32 + 5).map(str),
    st.integers(0, 2**32 + 5).map(lambda n: "0" + format(n, "o")),
    st.integers(0, 2**32 + 5).map(lambda n: "0x" + format(n, "x")),
    st.integers(0, 2**32 + 5).map(lambda n: "0X" + format(n, "X")),
    st.integers(0, 300).map(lambda n: "00" + str(n)),  # octal-looking with 8s and 9s
    st.text("0123456789xXabcdefgABCDEF", min_size=0, max_size=6),  # junk
)


@settings(max_examples=600, deadline=None)
@given(st.lists(_PART, min_size=1, max_size=5).map(".".join))
@example("0x")
@example("08")
@example("1..1")
@example("0x.1")
@example("4294967295")
@example("4294967296")
@example("1.16777215")
@example("1.16777216")
@example("1.1.65535")
@example("1.1.65536")
@example("256.1")
def test_inet_aton_agrees_with_libc(text: str):
    """The parser reads every numeric string exactly as the C library's inet_aton (the oracle) does."""
    assert inet_aton(text) == _libc_inet_aton(text)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.sampled_from(["dec", "oct", "hex"]))
def test_every_spelling_of_an_address_parses_to_it(number: int, parts: int, base: str):
    values = [(number >> (8 * (3 - i))) & 0xFF for i in range(parts - 1)]
    values.append(number & ((1 << (8 * (5 - parts))) - 1))
    spell = {"dec": str, "oct": lambda v: "0" + format(v, "o"), "hex": lambda v: "0x" + format(v, "x")}[base]
    text = ".".join(spell(v) for v in values)
    assert parse_host(text) == ipaddress.IPv4Address(number)


@pytest.mark.parametrize(
    "host",
    ["1.2.3.4.5", "0x", "08", "256.256.256.256", "1.2.3.0x", "example.0x1", "a..b", "-a.com", "a_b$.com"],
)
def test_ambiguous_or_malformed_hosts_are_refused(host: str):
    with pytest.raises(FetchProblem):
        parse_host(host)


def test_dns_names_are_lowercased_and_idna_encoded():
    assert parse_host("Example.COM.") == "example.com"
    assert parse_host("bücher.example") == "xn--bcher-kva.example"
    assert parse_host("1.2.3.example") == "1.2.3.example"  # numeric labels are fine before the last one


# --- URLs ------------------------------------------------------------------------------------------------------


def test_parse_url_splits_and_canonicalises():
    target = parse_url("http://0x7f.1:8080/a/b.png?x=1#frag")
    assert (target.scheme, str(target.host), target.port, target.target) == (
        "http",
        "127.0.0.1",
        8080,
        "/a/b.png?x=1",
    )
    assert target.host_header == "127.0.0.1:8080"
    v6 = parse_url("https://[2606:4700:4700::1111]/")
    assert (v6.port, v6.host_header) == (443, "[2606:4700:4700::1111]")
    assert parse_url("HTTPS://Example.com:443").host_header == "example.com"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://example.com/a.png", NOT_ALLOWED),
        ("gopher://127.0.0.1/", NOT_ALLOWED),
        ("http://user:pw@example.com/a.png", "credentials"),
        ("http://example.com@127.0.0.1/a.png", "credentials"),
        ("http://[fe80::1%25eth0]/", "zone ids"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com:0/", "port 0"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http:///path-only", "no host"),
        ("http://[::1/", "not a valid URL"),
        ("http://1.2.3.4.5/", "not a valid IPv4 address"),
    ],
)
def test_bad_urls_are_refused(url: str, problem: str):
    with pytest.raises(FetchProblem) as info:
        parse_url(url)
    assert problem in info.value.public


# --- the allowlist and the check ---------------------------------------------------------------------------------


def test_allowlist_entries_are_canonical():
    allow = parse_allowlist(["127.0.0.1", " minio.internal:9000 ", "[::1]:8080", "::1", "0x7f.0.0.2", ""])
    assert allow == {
        ("127.0.0.1", None),
        ("minio.internal", 9000),
        ("::1", 8080),
        ("::1", None),
        ("127.0.0.2", None),
    }
    for bad in ["host:port", "[::1]x", "a..b", "host:70000"]:
        with pytest.raises(ValueError, match="allowlist entry"):
            parse_allowlist([bad])


def test_environment_allowlist_wins_even_when_empty():
    assert allowlist_from(["a.example"], {}) == {("a.example", None)}
    assert allowlist_from(["a.example"], {"HWGP_INPUT_URL_ALLOW": "b.example:81,c.example"}) == {
        ("b.example", 81),
        ("c.example", None),
    }
    assert allowlist_from(["a.example"], {"HWGP_INPUT_URL_ALLOW": ""}) == frozenset()
    with pytest.raises(ValueError, match="HWGP_INPUT_URL_ALLOW"):
        allowlist_from([], {"HWGP_INPUT_URL_ALLOW": "bad host"})


@pytest.fixture(scope="module")
def resolve():
    with ThreadPoolExecutor(2) as pool:
        yield SystemResolver(pool)


def test_check_target_refuses_names_resolving_to_loopback(resolve):
    # localhost resolves from /etc/hosts: no DNS traffic.
    with pytest.raises(FetchProblem) as info:
        check_target(parse_url("http://localhost:8080/x"), frozenset(), resolve, 5)
    assert info.value.public == NOT_ALLOWED and "loopback" in info.value.detail

    checked = check_target(
        parse_url("http://localhost:8080/x"), parse_allowlist(["localhost:8080"]), resolve, 5
    )
    assert checked.allowlisted and all(a.is_loopback for a in checked.addresses)
    # The allowlist names a port: another port of the same host is checked as usual.
    with pytest.raises(FetchProblem):
        check_target(parse_url("http://localhost:8081/x"), parse_allowlist(["localhost:8080"]), resolve, 5)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://0.0.0.0/",
        "http://0/",
        "http://[::]/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://[64:ff9b::a00:1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/",
    ],
)
def test_literal_internal_addresses_are_refused_without_lookups(url: str, resolve):
    with pytest.raises(FetchProblem) as info:
        check_target(parse_url(url), frozenset(), resolve, 5)
    assert info.value.public == NOT_ALLOWED


def test_allowlisted_address_matches_every_spelling(resolve):
    allow = parse_allowlist(["127.0.0.1"])
    for url in ["http://127.0.0.1:9/", "http://2130706433:9/", "http://0x7f.0.0.1:9/"]:
        assert check_target(parse_url(url), allow, resolve, 5).addresses == (
            ipaddress.IPv4Address("127.0.0.1"),
        )


def test_logged_urls_lose_credentials_and_query():
    assert redact_url("https://u:secret@cdn.example.com/a/b.png?X-Amz-Signature=abc#f") == (
        "https://cdn.example.com/a/b.png?..."
    )
    assert redact_url("http://example.com/x.png") == "http://example.com/x.png"


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=60),
        st.builds(
            lambda scheme, netloc, path: f"{scheme}://{netloc}{path}",
            st.sampled_from(["http", "https", "HTTP", "ftp", "file", ""]),
            st.text(alphabet="abcxyz0123456789.:[]@%-_/\\ \t\x00é", max_size=30),
            st.text(max_size=10),
        ),
    )
)
def test_parse_url_only_ever_refuses_with_a_fetch_problem(url: str):
    """Whatever a client posts, the parser answers with a Target or a FetchProblem (a 422), never a crash."""
    try:
        target = parse_url(url)
    except FetchProblem as problem:
        assert problem.public
    else:
        assert target.scheme in ("http", "https") and 0 < target.port < 65536
        assert isinstance(target.host, str | ipaddress.IPv4Address | ipaddress.IPv6Address)
        assert target.target.startswith("/")
