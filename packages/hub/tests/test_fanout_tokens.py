"""Fan-out cursors and resume tokens (pure): sealing, binding, tampering, keys, age and size."""

from __future__ import annotations

import base64
import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otterscale.common import parse_config
from otterscale.hub._fanout import token_keys
from otterscale.hub._fanout.errors import REFUSED_MESSAGE, InvalidTokenError
from otterscale.hub._fanout.listing import ACTIVE, DONE, Entry
from otterscale.hub._fanout.tokens import CURSOR, RESUME, TokenSealer, binding_digest, derive_token_key

KEY = derive_token_key(b"a" * 32)
OTHER_KEY = derive_token_key(b"b" * 32)
BINDING = binding_digest("MultiList", ["east", "west"], "", ["", "v1", "configmaps", "", "", ""], 1)
REFUSED = REFUSED_MESSAGE.format(what="cursor")


def _sealer(key: bytes = KEY, previous: tuple[bytes, ...] = (), now: float = 1_000_000.0) -> TokenSealer:
    return TokenSealer(key, previous, clock=lambda: now)


def _refused(sealer: TokenSealer, token: str, subject: str = "alice", binding: bytes = BINDING) -> str:
    with pytest.raises(InvalidTokenError) as caught:
        sealer.open(CURSOR, token, subject, binding, max_age=600)
    return str(caught.value)


def test_a_sealed_token_opens_for_its_caller_and_query() -> None:
    sealer = _sealer()
    token = sealer.seal(CURSOR, "alice", BINDING, {"e": [["east", "d", "42"]], "n": 3})
    assert token.startswith("mlc1.")
    payload = sealer.open(CURSOR, token, "alice", BINDING, max_age=600)
    assert payload["e"] == [["east", "d", "42"]]
    assert payload["n"] == 3
    # Nothing of the content is readable in the token.
    assert b"east" not in base64.urlsafe_b64decode(token[5:] + "==")


def test_another_caller_another_query_another_kind_and_tampering_look_the_same() -> None:
    sealer = _sealer()
    token = sealer.seal(CURSOR, "alice", BINDING, {"n": 0})
    other_query = binding_digest("MultiList", ["east", "west"], "", ["", "v1", "secrets", "", "", ""], 1)
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    messages = {
        _refused(sealer, token, subject="bob"),
        _refused(sealer, token, binding=other_query),
        _refused(sealer, token.replace("mlc1.", "mwr1.")),
        _refused(sealer, flipped),
        _refused(sealer, token[:40]),
        _refused(sealer, "garbage"),
        _refused(sealer, ""),
    }
    assert messages == {REFUSED}
    # A resume token is not a cursor either (the kind is authenticated).
    resume = sealer.seal(RESUME, "alice", BINDING, {"r": {}})
    assert _refused(sealer, "mlc1." + resume.partition(".")[2]) == REFUSED


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_change_to_a_token_is_refused(data: st.DataObject) -> None:
    sealer = _sealer()
    token = sealer.seal(
        CURSOR, "alice", BINDING, {"e": [["east", "a", "7", "c0ntinue", 5, 0, 900, -1]], "n": 5}
    )
    raw = bytearray(base64.urlsafe_b64decode(token[5:] + "=" * (-len(token[5:]) % 4)))
    position = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    raw[position] ^= 1 << bit
    tampered = "mlc1." + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert _refused(sealer, tampered) == REFUSED


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=3000))
def test_arbitrary_text_is_refused_with_the_one_message(text: str) -> None:
    assert _refused(_sealer(), text) == REFUSED
    assert _refused(_sealer(), "mlc1." + text) == REFUSED


def test_a_token_of_an_old_key_is_refused_unless_the_key_is_still_accepted() -> None:
    old = _sealer(OTHER_KEY)
    token = old.seal(CURSOR, "alice", BINDING, {"n": 1})
    assert _refused(_sealer(KEY), token) == REFUSED
    rotated = _sealer(KEY, previous=(OTHER_KEY,))
    assert rotated.open(CURSOR, token, "alice", BINDING, max_age=600)["n"] == 1
    # New tokens are sealed with the current key only.
    fresh = rotated.seal(CURSOR, "alice", BINDING, {"n": 2})
    assert _refused(_sealer(OTHER_KEY), fresh) == REFUSED


def test_an_old_cursor_is_refused_saying_so_but_only_to_its_owner() -> None:
    token = _sealer(now=1_000_000.0).seal(CURSOR, "alice", BINDING, {"n": 1})
    later = _sealer(now=1_000_000.0 + 601)
    assert "expired" in _refused(later, token)
    assert _refused(later, token, subject="mallory") == REFUSED
    assert later.open(CURSOR, token, "alice", BINDING)["n"] == 1  # resume tokens have no age limit


def test_replicas_sharing_the_configuration_share_the_key() -> None:
    text = """
keycloak: {realm_url: "http://127.0.0.1/realms/x", client_id: c}
tunnel: {server: {host: 127.0.0.1, port: 8300, key_seed: "seed-one-seed-one-seed-one-seed-one"}}
clusters:
  a: {agent: {auth: {user: u, pass: agent-password-for-the-fanout-key-test}, tunnel_port: 5001, api_port: 1}}
"""
    one, _ = token_keys(parse_config(text, "one"))
    two, _ = token_keys(parse_config(text, "two"))
    assert one == two
    other_seed = text.replace("seed-one-seed-one-seed-one-seed-one", "seed-two-seed-two-seed-two-seed-two")
    other, _ = token_keys(parse_config(other_seed, "x"))
    assert other != one
    explicit, previous = token_keys(
        parse_config(text + f"fanout: {{token_key: {'k' * 40}, previous_token_keys: [{'s' * 40}]}}\n", "x")
    )
    assert explicit not in (one, other)
    assert previous == [derive_token_key(b"s" * 40)]
    # The fan-out key is not the seed itself, nor a key of anything else derived from it.
    assert one != derive_token_key(b"seed-one-seed-one-seed-one-seed-one")


def _names(count: int, seed: int = 7) -> list[str]:
    """Realistic cluster names (region, environment, number), about 20 characters."""
    rng = random.Random(seed)
    regions = ["eu-west-1", "us-east-2", "ap-south-1", "eu-central-1", "us-west-2", "sa-east-1"]
    envs = ["prod", "staging", "dev", "qa"]
    names: set[str] = set()
    while len(names) < count:
        names.add(f"{rng.choice(envs)}-{rng.choice(regions)}-{rng.randrange(10_000):04d}")
    return sorted(names)


def _continue_token(rng: random.Random) -> str:
    """A Kubernetes continue token: base64 of {"v":"meta.k8s.io/v1","rv":...,"start":"ns/name\\u0000"}."""
    start = f"team-{rng.randrange(100)}/object-{rng.randrange(10**6):06d}"
    text = f'{{"v":"meta.k8s.io/v1","rv":{rng.randrange(10**9)},"start":"{start}\\u0000"}}'
    return base64.b64encode(text.encode()).decode()


def _mid_traversal(names: list[str], active: int) -> dict[str, object]:
    """Half the clusters done, ``active`` in progress with continue tokens, the rest not started."""
    rng = random.Random(11)
    entries = []
    for i, name in enumerate(names):
        if i < len(names) // 2:
            entries.append(Entry(DONE, rv=str(rng.randrange(10**9))).pack(name))
        elif i < len(names) // 2 + active:
            entry = Entry(ACTIVE, str(rng.randrange(10**9)), _continue_token(rng), 500, 0, 0, 1100, 400)
            entries.append(entry.pack(name))
    return {"e": entries, "n": 123456}


@pytest.mark.parametrize(("clusters", "limit"), [(20, 2 * 1024), (100, 5 * 1024), (1000, 16 * 1024)])
def test_cursor_and_resume_token_sizes(clusters: int, limit: int) -> None:
    """fanout.md 4.3 (tokens): at most 2 / 5 / 16 KiB at 20 / 100 / 1,000 clusters."""
    sealer = _sealer()
    names = _names(clusters)
    cursor = sealer.seal(CURSOR, "alice", BINDING, _mid_traversal(names, min(32, clusters // 2)))
    rng = random.Random(3)
    resume = sealer.seal(RESUME, "alice", BINDING, {"r": {name: str(rng.randrange(10**9)) for name in names}})
    assert len(cursor) <= limit, len(cursor)
    assert len(resume) <= limit, len(resume)
