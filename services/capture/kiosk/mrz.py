"""Passport machine readable zone (ICAO Doc 9303 part 4, TD3): parsing, check digits and OCR confusion repair.

A TD3 MRZ is two lines of 44 characters from ``A-Z``, ``0-9`` and the filler ``<``:

    line 1: P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<
            document code (2), issuing state (3), name (39): surname ``<<`` given names, ``<`` between words
    line 2: L898902C36UTO7408122F1204159ZE184226B<<<<<10
            document number (9) + check, nationality (3), birth date YYMMDD + check, sex, expiry date YYMMDD +
            check, optional data (14) + check, composite check

Check digits (Doc 9303 part 3, 4.9): each character's value (``0-9`` as is, ``A-Z`` = 10-35, ``<`` = 0) times the
repeating weights 7, 3, 1, summed, modulo 10. The composite check covers the document number, birth date, expiry
date and optional data, each with its own check digit.

OCR mixes up look-alike characters (O/0, I/1, B/8, S/5, Z/2, G/6, Q/0, D/0). Fields whose alphabet is fixed are
repaired without guessing: a letter in a date or a check digit can only be a digit, a digit in a name or a country
code can only be a letter. The alphanumeric fields (document number, optional data) are searched: when a field's
check digit fails, the fewest look-alike substitutions that make it pass are applied, but only if exactly one such
substitution exists and every check digit passes afterwards. Note that G/6 can never be resolved this way: their
values (16 and 6) differ by 10, which no weight can see modulo 10.

:func:`find_td3_lines` picks the two MRZ lines out of OCR output and fixes what OCR typically gets wrong about
fillers (``«``, ``K`` inside filler runs, too few or too many ``<``), accepting a length correction only when it is
unambiguous.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date

LINE_LENGTH = 44
FILLER = "<"
_ALPHABET = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789<")
_WEIGHTS = (7, 3, 1)

# Look-alikes, both directions. Q and D are only ever misreadings of 0 (a Q or D in a numeric field).
_LETTER_TO_DIGIT = {"O": "0", "Q": "0", "D": "0", "I": "1", "B": "8", "S": "5", "Z": "2", "G": "6"}
_DIGIT_TO_LETTER = {"0": "O", "1": "I", "8": "B", "5": "S", "2": "Z", "6": "G"}
_ALTERNATIVES: dict[str, tuple[str, ...]] = {
    "0": ("O", "Q", "D"),
    "O": ("0",),
    "Q": ("0",),
    "D": ("0",),
    "1": ("I",),
    "I": ("1",),
    "8": ("B",),
    "B": ("8",),
    "5": ("S",),
    "S": ("5",),
    "2": ("Z",),
    "Z": ("2",),
    "6": ("G",),
    "G": ("6",),
}
# The search stops at this many substitutions in one field: beyond it nearly anything passes a mod-10 check.
_MAX_SUBSTITUTIONS = 2

# Line 2 field positions (start, end) -- end exclusive.
_DOC_NUMBER, _DOC_CHECK = (0, 9), 9
_NATIONALITY = (10, 13)
_BIRTH, _BIRTH_CHECK = (13, 19), 19
_SEX = 20
_EXPIRY, _EXPIRY_CHECK = (21, 27), 27
_OPTIONAL, _OPTIONAL_CHECK = (28, 42), 42
_COMPOSITE_CHECK = 43
# Line 1 field positions.
_DOC_CODE = (0, 2)
_ISSUER = (2, 5)
_NAME = (5, 44)


def char_value(char: str) -> int:
    """ICAO 9303 value of one MRZ character: digits as is, A-Z = 10-35, ``<`` = 0."""
    if char.isdigit():
        return int(char)
    if "A" <= char <= "Z":
        return ord(char) - ord("A") + 10
    if char == FILLER:
        return 0
    raise ValueError(f"not an MRZ character: {char!r}")


def check_digit(text: str) -> int:
    """ICAO 9303 check digit of ``text``: sum of values times weights 7, 3, 1 repeating, modulo 10."""
    return sum(char_value(c) * _WEIGHTS[i % 3] for i, c in enumerate(text)) % 10


@dataclass
class MrzResult:
    """A parsed TD3 MRZ. ``valid`` only when every format rule and check digit passes.

    Dates are kept as printed (``YYMMDD``); :attr:`birth` and :attr:`expiry` turn them into dates. ``repairs``
    lists every character changed from what was read, ``errors`` every reason the MRZ is not valid.
    """

    document_type: str = ""
    issuing_state: str = ""
    surname: str = ""
    given_names: str = ""
    document_number: str = ""
    nationality: str = ""
    birth_date: str = ""
    sex: str = ""
    expiry_date: str = ""
    optional_data: str = ""
    line1: str = ""
    line2: str = ""
    valid: bool = False
    errors: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)

    @property
    def birth(self) -> date | None:
        """Birth date; a two-digit year after this year's is taken as 19xx."""
        return _to_date(self.birth_date, pivot=date.today().year % 100)

    @property
    def expiry(self) -> date | None:
        """Expiry date; two-digit years are 20xx unless that is more than 50 years ahead."""
        return _to_date(self.expiry_date, pivot=(date.today().year + 50) % 100)

    def expired(self, today: date | None = None) -> bool:
        """True when the document expired before ``today``; expiry is the caller's policy, not a parse error."""
        expiry = self.expiry
        return expiry is not None and expiry < (today or date.today())


def _to_date(yymmdd: str, pivot: int) -> date | None:
    """YYMMDD as a date: years up to ``pivot`` are 20xx, later ones 19xx (the MRZ prints no century)."""
    if not re.fullmatch(r"\d{6}", yymmdd):
        return None
    yy, mm, dd = int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:])
    century = 2000 if yy <= pivot else 1900
    try:
        return date(century + yy, mm, dd)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------


def parse_td3(line1: str, line2: str) -> MrzResult:
    """Parse and validate a TD3 MRZ, repairing OCR look-alikes where the check digits make it unambiguous."""
    result = MrzResult(line1=line1, line2=line2)
    shape_ok = [_check_shape(line1, "line 1", result), _check_shape(line2, "line 2", result)]  # all reasons
    if not all(shape_ok):
        return result
    l1, l2 = list(line1), list(line2)
    _force_alphabets(l1, l2, result.repairs)
    l2_before_search = l2.copy()
    search_repairs: list[str] = []
    ambiguities = _search_alphanumeric(l2, search_repairs)
    errors = ambiguities + _format_errors(l1, l2) + _check_digit_errors(l2)
    if errors and search_repairs:
        # A field repair is only accepted when everything passes afterwards: report against what was read.
        l2 = l2_before_search
        errors = ambiguities + _format_errors(l1, l2) + _check_digit_errors(l2)
        search_repairs = []
    result.repairs += search_repairs
    result.errors = errors
    _fill_fields(result, "".join(l1), "".join(l2))
    result.valid = not errors
    return result


def _check_shape(line: str, what: str, result: MrzResult) -> bool:
    """Length and alphabet; appends the reasons to ``result.errors``."""
    ok = True
    if len(line) != LINE_LENGTH:
        result.errors.append(f"{what} has {len(line)} characters, a TD3 line has {LINE_LENGTH}")
        ok = False
    bad = sorted(set(line) - _ALPHABET)
    if bad:
        result.errors.append(f"{what} contains characters outside A-Z, 0-9 and '<': {''.join(bad)!r}")
        ok = False
    return ok


def _force_alphabets(l1: list[str], l2: list[str], repairs: list[str]) -> None:
    """Fix look-alikes in fields whose alphabet leaves a single possibility (no check digit needed)."""
    letter_fields = [
        (l1, _DOC_CODE, "document code"),
        (l1, _ISSUER, "issuing state"),
        (l1, _NAME, "name"),
        (l2, _NATIONALITY, "nationality"),
    ]
    for chars, (start, end), name in letter_fields:
        _replace(chars, range(start, end), _DIGIT_TO_LETTER, name, repairs)
    digit_positions = [(_BIRTH, "birth date"), (_EXPIRY, "expiry date")]
    for (start, end), name in digit_positions:
        _replace(l2, range(start, end), _LETTER_TO_DIGIT, name, repairs)
    for position, name in (
        (_DOC_CHECK, "document number check digit"),
        (_BIRTH_CHECK, "birth date check digit"),
        (_EXPIRY_CHECK, "expiry date check digit"),
        (_OPTIONAL_CHECK, "optional data check digit"),
        (_COMPOSITE_CHECK, "composite check digit"),
    ):
        _replace(l2, [position], _LETTER_TO_DIGIT, name, repairs)


def _replace(
    chars: list[str], positions: Iterable[int], mapping: dict[str, str], name: str, repairs: list[str]
) -> None:
    for i in positions:
        if chars[i] in mapping:
            repairs.append(f"{name}: {chars[i]!r} read as {mapping[chars[i]]!r} (position {i + 1})")
            chars[i] = mapping[chars[i]]


def _search_alphanumeric(l2: list[str], repairs: list[str]) -> list[str]:
    """Repair the document number and optional data against their own check digits; returns ambiguity errors."""
    errors: list[str] = []
    for (start, end), check_pos, name in (
        (_DOC_NUMBER, _DOC_CHECK, "document number"),
        (_OPTIONAL, _OPTIONAL_CHECK, "optional data"),
    ):
        value, check = "".join(l2[start:end]), l2[check_pos]
        if not check.isdigit() and not (check == FILLER and name == "optional data"):
            continue  # the check digit itself is unreadable: reported by the check-digit pass
        if _field_check_ok(value, check):
            continue
        candidates = _minimal_repairs(value, check)
        if len(candidates) == 1:
            repaired = candidates[0]
            for i, (old, new) in enumerate(zip(value, repaired, strict=True)):
                if old != new:
                    repairs.append(f"{name}: {old!r} read as {new!r} (position {start + i + 1})")
            l2[start:end] = list(repaired)
        elif len(candidates) > 1:
            errors.append(
                f"{name} {value!r} fails its check digit and could be repaired "
                f"{len(candidates)} ways ({', '.join(sorted(candidates))}): refused as ambiguous"
            )
    return errors


def _field_check_ok(value: str, check: str) -> bool:
    if check == FILLER:  # an all-filler optional data field may carry '<' as its check digit
        return set(value) == {FILLER}
    return check.isdigit() and check_digit(value) == int(check)


def _minimal_repairs(value: str, check: str) -> list[str]:
    """Every variant with the fewest look-alike substitutions that passes the check digit."""
    positions = [i for i, c in enumerate(value) if c in _ALTERNATIVES]
    for count in range(1, _MAX_SUBSTITUTIONS + 1):
        found: list[str] = []
        for chosen in itertools.combinations(positions, count):
            for replacement in itertools.product(*(_ALTERNATIVES[value[i]] for i in chosen)):
                candidate = list(value)
                for i, char in zip(chosen, replacement, strict=True):
                    candidate[i] = char
                text = "".join(candidate)
                if _field_check_ok(text, check):
                    found.append(text)
        if found:
            return found
    return []


def _format_errors(l1: Sequence[str], l2: Sequence[str]) -> list[str]:
    errors: list[str] = []
    code = "".join(l1[slice(*_DOC_CODE)])
    if code[0] != "P":
        errors.append(f"document code {code!r} is not a passport (TD3 documents start with 'P')")
    _letters_only("".join(l1[slice(*_ISSUER)]), "issuing state", errors)
    _letters_only("".join(l2[slice(*_NATIONALITY)]), "nationality", errors)
    name_field = "".join(l1[slice(*_NAME)])
    if any(c.isdigit() for c in name_field):
        errors.append(f"name field contains digits: {name_field!r}")
    if not name_field.strip(FILLER):
        errors.append("name field is empty")
    for (start, end), what in ((_BIRTH, "birth date"), (_EXPIRY, "expiry date")):
        value = "".join(l2[start:end])
        if not re.fullmatch(r"\d{6}", value):
            errors.append(f"{what} {value!r} is not six digits")
        elif not (1 <= int(value[2:4]) <= 12 and 1 <= int(value[4:]) <= 31):
            errors.append(f"{what} {value!r} is not a valid YYMMDD date")
    if l2[_SEX] not in "MFX<":
        errors.append(f"sex {l2[_SEX]!r} is not M, F, X or '<'")
    return errors


def _letters_only(value: str, name: str, errors: list[str]) -> None:
    if not re.fullmatch(r"[A-Z<]{3}", value):
        errors.append(f"{name} {value!r} must be three letters")


def _check_digit_errors(l2: Sequence[str]) -> list[str]:
    """One clear reason per failing check digit: what is printed and what the data gives."""
    line = "".join(l2)
    composite_data = line[0:10] + line[13:20] + line[21:43]
    checks = (
        ("document number", line[slice(*_DOC_NUMBER)], line[_DOC_CHECK]),
        ("birth date", line[slice(*_BIRTH)], line[_BIRTH_CHECK]),
        ("expiry date", line[slice(*_EXPIRY)], line[_EXPIRY_CHECK]),
        ("optional data", line[slice(*_OPTIONAL)], line[_OPTIONAL_CHECK]),
        ("composite", composite_data, line[_COMPOSITE_CHECK]),
    )
    errors = []
    for name, data, printed in checks:
        if _field_check_ok(data, printed):
            continue
        computed = check_digit(data)
        if printed.isdigit() or printed == FILLER:
            errors.append(f"{name} check digit is {printed}, computed {computed}")
        else:
            errors.append(f"{name} check digit {printed!r} is not a digit (computed {computed})")
    return errors


def _fill_fields(result: MrzResult, l1: str, l2: str) -> None:
    result.line1, result.line2 = l1, l2
    result.document_type = l1[0:2].rstrip(FILLER)
    result.issuing_state = l1[slice(*_ISSUER)].replace(FILLER, "")
    surname, _, given = l1[slice(*_NAME)].partition(FILLER * 2)
    result.surname = _words(surname)
    result.given_names = _words(given)
    result.document_number = l2[slice(*_DOC_NUMBER)].rstrip(FILLER)
    result.nationality = l2[slice(*_NATIONALITY)].replace(FILLER, "")
    result.birth_date = l2[slice(*_BIRTH)]
    result.sex = l2[_SEX]
    result.expiry_date = l2[slice(*_EXPIRY)]
    result.optional_data = l2[slice(*_OPTIONAL)].rstrip(FILLER)


def _words(field_text: str) -> str:
    return " ".join(w for w in field_text.split(FILLER) if w)


# --------------------------------------------------------------------------------------------------------------------
# Finding the MRZ in OCR output
# --------------------------------------------------------------------------------------------------------------------

# OCR models trained on general text read the filler as look-alike symbols; « is two fillers.
_FILLER_LOOKALIKES = {"«": "<<", "‹": "<", "＜": "<", "〈": "<", "く": "<", "≪": "<<"}
_MIN_LENGTH, _MAX_LENGTH = 42, 46
# Line 1 often loses part of its trailing filler run (the text detector cuts long runs of small glyphs); padding
# the run back is unambiguous, so line 1 is accepted from this length when it ends in a filler.
_MIN_LINE1_WITH_FILLER_TAIL = 20


def normalise_ocr_line(text: str) -> str:
    """Upper case, no spaces, filler look-alikes turned into ``<``, K inside filler runs turned into ``<``."""
    text = text.upper().replace(" ", "").replace("\t", "")
    for look_alike, filler in _FILLER_LOOKALIKES.items():
        text = text.replace(look_alike, filler)
    # A K between fillers (or between a filler and the end) is a misread filler: <K<, <<K, <K$.
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"(?<=<)K(?=<|$)", "<", text)
    return text


def find_td3_lines(text_lines: Iterable[str]) -> tuple[str, str] | None:
    """The two TD3 lines (44 characters each, corrected) in OCR output lines in reading order, or None.

    Line 1 is a line starting with ``P``, a letter or filler and three state characters (``P<UTO...``) that fits
    44 characters; line 2 is the line right after it, 42-46 characters, fitted to 44 only when unambiguous.
    """
    lines = [normalise_ocr_line(t) for t in text_lines]
    lines = [t for t in lines if t]
    for i, text in enumerate(lines[:-1]):
        line1 = _fit_line1(text)
        if line1 is None:
            continue
        line2 = _fit_line2(lines[i + 1], line1)
        if line2 is not None:
            return line1, line2
    return None


def looks_like_mrz(text: str) -> bool:
    """A line that is probably part of an MRZ (used to tell "no MRZ" from "MRZ unreadable")."""
    text = normalise_ocr_line(text)
    return len(text) >= 20 and text.count(FILLER) >= 2 and sum(c in _ALPHABET for c in text) >= 0.9 * len(text)


def _fit_line1(text: str) -> str | None:
    if not re.match(r"P[A-Z<][A-Z0-9<]{3}", text):
        return None
    if len(text) > LINE_LENGTH:
        extra = text[LINE_LENGTH:]
        # Only surplus fillers at the end can be dropped without guessing.
        return text[:LINE_LENGTH] if set(extra) == {FILLER} else None
    if len(text) < LINE_LENGTH:
        if len(text) >= _MIN_LENGTH or (len(text) >= _MIN_LINE1_WITH_FILLER_TAIL and text.endswith(FILLER)):
            if text.endswith(FILLER):
                return text.ljust(LINE_LENGTH, FILLER)
        return None
    return text


def _fit_line2(text: str, line1: str) -> str | None:
    if not _MIN_LENGTH <= len(text) <= _MAX_LENGTH:
        return None
    if len(text) == LINE_LENGTH:
        return text
    # Wrong length: OCR miscounted a filler run. Try every way of growing or shrinking filler runs to 44 and keep
    # the result only if exactly one variant passes every check digit.
    passing = {
        candidate for candidate in _filler_variants(text, LINE_LENGTH - len(text)) if parse_td3(line1, candidate).valid
    }
    return passing.pop() if len(passing) == 1 else None


def _filler_variants(text: str, delta: int) -> set[str]:
    """All strings made from ``text`` by adding (delta > 0) or removing (delta < 0) ``|delta`` fillers in runs."""
    variants = {text}
    for _ in range(abs(delta)):
        grown: set[str] = set()
        for variant in variants:
            for i, char in enumerate(variant):
                if delta > 0 and (char == FILLER or (i > 0 and variant[i - 1] == FILLER)):
                    grown.add(variant[:i] + FILLER + variant[i:])
                elif delta < 0 and char == FILLER:
                    grown.add(variant[:i] + variant[i + 1 :])
            if delta > 0 and variant.endswith(FILLER):
                grown.add(variant + FILLER)
        variants = grown
    return variants
