"""In-process fuzzing (hypothesis) of everything that reads untrusted bytes or text: image decoding, MRZ parsing,
event decoding, bearer tokens and the tokens file, configuration files and variables.

Each target has one contract: it returns a value with the documented shape, or raises its own documented error
(``ImageError``, ``MalformedEvent``, ``AccessDenied``, ``TokensFileError``, ``ValueError``). Any other exception is a
crash and fails the test, with hypothesis's shrunk input. Inputs come from ``sightline.tooling.hostile`` driven by
hypothesis's ``st.randoms()`` (so they shrink and replay) and from plain ``st.binary``/``st.text``.

Budget: ``SIGHTLINE_FUZZ_EXAMPLES`` examples per target (fuzz_budget.py), derandomized, no deadline (the tests assert
behaviour, not speed; a slow input shows up in the suite's wall time).
"""

from __future__ import annotations

import importlib
import random
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from fuzz_budget import FUZZ_EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sightline.capture.kiosk.mrz import LINE_LENGTH, check_digit, find_td3_lines, looks_like_mrz, parse_td3
from sightline.cli.config import SETTINGS_CLASSES
from sightline.common import auth, cloudevents, codec
from sightline.common.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, looks_like_image
from sightline.common.stage import InputEvent, dead_letter_record, may_copy_payload
from sightline.common.topics import ALL_TOPICS
from sightline.decision.policy import EChannelPolicy, Policy, load_policy
from sightline.tooling.hostile import (
    HostileImages,
    corrupt,
    hostile_headers,
    hostile_message,
    hostile_text,
    hostile_yaml,
    mutate,
)

pytestmark = pytest.mark.fuzz

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
RANDOMS = st.randoms(use_true_random=False)
# Text a process can be given (no surrogates, no NUL: neither can be in an environment variable or a gRPC header).
PLAIN_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)


# --- image decoding ---------------------------------------------------------------------------------------------------

IMAGE_REASONS = {"empty_image", "undecodable_image", "truncated_image", "image_too_large"}


@FUZZ
@given(rng=RANDOMS, raw=st.none() | st.binary(max_size=96), small_limit=st.booleans())
def test_image_bytes_decode_to_rgb_or_an_image_error_with_a_reason(
    hostile_images: HostileImages, rng: random.Random, raw: bytes | None, small_limit: bool
) -> None:
    data = raw if raw is not None else hostile_images.image(rng)
    max_pixels = 4096 if small_limit else DEFAULT_MAX_PIXELS
    looks_like_image(data)  # must never raise, whatever the bytes
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an undefined numpy cast is a wrong image, not a warning
        try:
            rgb = decode_image(data, max_pixels)
        except ImageError as error:
            assert error.reason in IMAGE_REASONS
            return
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    assert 0 < rgb.shape[0] * rgb.shape[1] <= max_pixels


# --- MRZ parsing ------------------------------------------------------------------------------------------------------

# The specimen of ICAO Doc 9303 part 4, and what OCR puts in its place.
LINE1 = "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<"
LINE2 = "L898902C36UTO7408122F1204159ZE184226B<<<<<10"
OCR_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789<<<<«‹＜〈く≪ KkOoIlQDSZGB0158ß٣é\t\n\x00"


def ocr_misread(line: str, rng: random.Random) -> str:
    """The line as a bad OCR reads it: characters replaced, dropped, doubled, the end cut off."""
    chars = list(line)
    for _ in range(rng.randint(0, 6)):
        operation = rng.randrange(4)
        if operation == 0 and chars:
            chars[rng.randrange(len(chars))] = rng.choice(OCR_CHARACTERS)
        elif operation == 1 and chars:
            del chars[rng.randrange(len(chars))]
        elif operation == 2:
            chars.insert(rng.randrange(len(chars) + 1), rng.choice(OCR_CHARACTERS))
        else:
            chars = chars[: rng.randrange(len(chars) + 1)] if rng.random() < 0.3 else chars
    return "".join(chars)


@FUZZ
@given(rng=RANDOMS, noise=st.lists(st.text(max_size=50), max_size=3))
def test_mrz_lines_parse_to_a_result_and_a_valid_one_passes_every_check(rng: random.Random, noise: list[str]) -> None:
    line1, line2 = ocr_misread(LINE1, rng), ocr_misread(LINE2, rng)
    result = parse_td3(line1, line2)
    if result.valid:
        assert not result.errors and len(result.line1) == len(result.line2) == LINE_LENGTH
        fixed = result.line2
        for start, end, check in ((0, 9, 9), (13, 19, 19), (21, 27, 27)):
            assert check_digit(fixed[start:end]) == int(fixed[check])
        assert result.birth is not None and result.expiry is not None
    else:
        assert result.errors
    found = find_td3_lines([*noise, line1, line2, ocr_misread(line2, rng)])
    assert found is None or all(len(line) == LINE_LENGTH for line in found)
    for text in (*noise, line1, line2):
        looks_like_mrz(text)


# --- event decoding ---------------------------------------------------------------------------------------------------


@FUZZ
@given(topic=st.sampled_from(ALL_TOPICS), rng=RANDOMS, raw=st.none() | st.binary(max_size=128))
def test_records_decode_to_their_event_or_a_malformed_event(
    hostile_images: HostileImages, topic: object, rng: random.Random, raw: bytes | None
) -> None:
    spec = topic  # a TopicSpec (sampled_from keeps its type)
    value = raw
    if value is None:
        value = hostile_message(codec.event_class(spec), rng, hostile_images).SerializeToString()  # type: ignore[arg-type]
        value = corrupt(value, rng) if rng.random() < 0.4 else value
    try:
        message = codec.parse(codec.event_class(spec), value)  # type: ignore[arg-type]
    except codec.MalformedEvent:
        message = None
    if message is not None:  # what a stage is given holds only dates a date can be
        assert codec.invalid_timestamp(message) is None
    _publishing_headers(spec.name, value, rng)  # type: ignore[attr-defined]
    letter = dead_letter_record(
        "fuzz",
        InputEvent(b"k", value, spec.name, 0, 7),
        codec.MalformedEvent("fuzz"),  # type: ignore[attr-defined]
    )
    if letter.payload:  # a dead letter copies only its topic's own event, never bytes of unknown content
        assert may_copy_payload(spec.name, value) and value.startswith(letter.payload)  # type: ignore[attr-defined]
    assert type(letter).FromString(letter.SerializeToString()) == letter


def _publishing_headers(topic: str, value: bytes, rng: random.Random) -> None:
    """The CloudEvents headers every publisher adds: never an exception."""
    cloudevents.with_event_headers(topic, value, hostile_headers(rng))


# --- bearer tokens and the tokens file --------------------------------------------------------------------------------

TOKEN = "fuzz-token-0123456789abcdefghijklmnopqrstuvwxyzABCDEF"
POLICY_PRINCIPALS = [
    auth.Principal("fuzz-operator", frozenset({auth.Role.OPERATOR}), auth.hash_token(TOKEN)),
    auth.Principal("fuzz-auditor", frozenset({auth.Role.AUDITOR}), client_cert_cn="fuzz-cn"),
]
METHODS = st.sampled_from([*auth.METHOD_ROLES, "/grpc.health.v1.Health/Check", "/x.Y/Z", "", "/"]) | PLAIN_TEXT
AUTHORIZATIONS = (
    st.none()
    | PLAIN_TEXT
    | PLAIN_TEXT.map(lambda text: f"Bearer {text}")
    | st.sampled_from([f"Bearer {TOKEN}", f"bearer   {TOKEN}  ", f"Bearer {TOKEN}x", f"Bearer {TOKEN} {TOKEN}", TOKEN])
)


@FUZZ
@given(method=METHODS, authorization=AUTHORIZATIONS, cn=st.sampled_from(["", "fuzz-cn", "fuzz-cn\n"]) | PLAIN_TEXT)
def test_bearer_tokens_admit_only_the_principal_they_name(method: str, authorization: str | None, cn: str) -> None:
    policy = auth.AccessPolicy(POLICY_PRINCIPALS, required=True)
    try:
        caller = policy.admit(method, authorization, cn)
    except auth.AccessDenied as denied:
        assert denied.code in ("UNAUTHENTICATED", "PERMISSION_DENIED") and denied.reason
        return
    if caller is None:  # only open methods go without a caller when credentials are required
        assert auth.is_open(method)
    elif caller.principal == "fuzz-operator":
        assert authorization is not None and authorization.split()[-1] == TOKEN
    else:
        assert caller.principal == "fuzz-auditor" and authorization is None and cn == "fuzz-cn"
    assert auth.bearer_of([("authorization", (authorization or "").encode()), (method, cn)]) is not None


ENTRY_KEYS = ("principal", "roles", "token_sha256", "client_cert_cn")
PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


def tokens_file_text(rng: random.Random) -> str:
    """A tokens file: entries with real and hostile names, roles and hashes, or a hostile YAML document."""
    if rng.random() < 0.3:
        return hostile_yaml(rng, ENTRY_KEYS, ("admin", "operator"))
    entries = []
    for _ in range(rng.randint(0, 3)):
        entry: dict[object, object] = {
            "principal": rng.choice(["ops", "svc:capture", hostile_text(rng, 140), 0, ["a"], None]),
            "roles": rng.choice([["operator"], ["OPERATOR", "auditor"], ["root"], "operator", [], [["x"]], None]),
            "token_sha256": rng.choice([auth.hash_token(TOKEN), "A" * 64, "f" * 64 + "\n", "xyz", 12, None]),
        }
        if rng.random() < 0.3:
            entry[rng.choice(["client_cert_cn", "token", 1, None])] = hostile_text(rng, 30)
        entries.append(entry)
    return yaml.safe_dump(entries, allow_unicode=True)


@FUZZ
@given(rng=RANDOMS)
def test_tokens_files_load_valid_principals_or_fail_with_a_tokens_file_error(rng: random.Random) -> None:
    try:
        principals = auth.parse_principals(tokens_file_text(rng))
    except auth.TokensFileError as error:
        assert str(error)
        return
    for principal in principals:
        assert PRINCIPAL_NAME.fullmatch(principal.name), principal.name
        assert principal.roles and principal.roles <= set(auth.Role)
        assert principal.token_sha256 == "" or re.fullmatch(r"[0-9a-f]{64}", principal.token_sha256)
        assert principal.token_sha256 or principal.client_cert_cn


# --- configuration ----------------------------------------------------------------------------------------------------


def _settings_classes() -> list[type]:
    return [getattr(importlib.import_module(module), name) for _, module, name in SETTINGS_CLASSES]


SETTINGS = _settings_classes()
SECTIONS = sorted({cls.config_section for cls in SETTINGS if cls.config_section})
FIELD_NAMES = sorted({name for cls in SETTINGS for name in cls.model_fields})


@FUZZ
@given(cls=st.sampled_from(SETTINGS), rng=RANDOMS, env=st.lists(st.tuples(st.integers(0, 999), PLAIN_TEXT), max_size=3))
def test_settings_load_or_fail_with_a_value_error_naming_the_problem(
    cls: type, rng: random.Random, env: list[tuple[int, str]]
) -> None:
    fields = sorted(cls.model_fields)  # type: ignore[attr-defined]
    prefix = cls.model_config.get("env_prefix", "")  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        config = Path(folder) / "sightline.yaml"
        config.write_text(hostile_yaml(rng, [cls.config_section or "x", *SECTIONS[:3]], FIELD_NAMES), "utf-8")  # type: ignore[attr-defined]
        patch.setenv("SIGHTLINE_CONFIG_FILE", str(config))
        for index, value in env:
            patch.setenv(f"{prefix}{fields[index % len(fields)]}".upper(), value)
        try:
            cls()
        except ValueError as error:  # pydantic's ValidationError, or the YAML file's own (config.parse_yaml)
            assert str(error)


@FUZZ
@given(rng=RANDOMS, raw=st.none() | st.binary(max_size=64))
def test_policy_files_load_or_fail_with_a_value_error(rng: random.Random, raw: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "policy.yaml"
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text(hostile_yaml(rng, sorted(Policy.model_fields), sorted(EChannelPolicy.model_fields)))
        try:
            policy = load_policy(path)
        except ValueError as error:
            assert str(error)
            return
    assert 0 < policy.match_max_distance <= 2 and policy.version


# --- the generator itself ---------------------------------------------------------------------------------------------


def test_the_generators_are_reproducible_from_a_seed(hostile_images: HostileImages) -> None:
    def draw(seed: int) -> list[bytes]:
        rng = random.Random(seed)
        made = [hostile_images.image(rng), mutate(b"\x89PNG\r\n\x1a\n" * 4, rng)]
        messages = [hostile_message(codec.event_class(spec), rng, hostile_images) for spec in ALL_TOPICS]
        return made + [message.SerializeToString() for message in messages]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
