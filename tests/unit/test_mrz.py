"""TD3 (passport) MRZ parsing: ICAO 9303 check digits, look-alike repairs, picking the MRZ out of OCR lines."""

from __future__ import annotations

from datetime import date

import pytest

from sightline.capture.kiosk.mrz import check_digit, find_td3_lines, looks_like_mrz, normalise_ocr_line, parse_td3

# The specimen passport of ICAO Doc 9303 part 4 (Utopia, Anna Maria Eriksson).
LINE1 = "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<"
LINE2 = "L898902C36UTO7408122F1204159ZE184226B<<<<<10"

CHECK_POSITIONS = {  # 0-based position of each check digit in line 2 -> the field its reason must name
    9: "document number",
    19: "birth date",
    27: "expiry date",
    42: "optional data",
    43: "composite",
}


def _with(line: str, position: int, char: str) -> str:
    return line[:position] + char + line[position + 1 :]


def _line2(document_number: str) -> str:
    """The specimen's line 2 with another document number and correct check digits."""
    doc = document_number.ljust(9, "<")
    body = doc + str(check_digit(doc)) + LINE2[10:43]
    composite = body[0:10] + body[13:20] + body[21:43]
    return body + str(check_digit(composite))


def test_check_digit_examples_from_doc_9303() -> None:
    assert check_digit("L898902C3") == 6
    assert check_digit("740812") == 2
    assert check_digit("120415") == 9
    assert check_digit("ZE184226B<<<<<") == 1
    assert check_digit("<<<<") == 0


def test_specimen_parses_with_every_check_digit_valid() -> None:
    result = parse_td3(LINE1, LINE2)
    assert result.valid, result.errors
    assert result.errors == [] and result.repairs == []
    assert (result.document_type, result.issuing_state, result.nationality) == ("P", "UTO", "UTO")
    assert (result.surname, result.given_names) == ("ERIKSSON", "ANNA MARIA")
    assert result.document_number == "L898902C3"
    assert (result.birth_date, result.expiry_date, result.sex) == ("740812", "120415", "F")
    assert result.optional_data == "ZE184226B"
    assert result.birth == date(1974, 8, 12)
    assert result.expiry == date(2012, 4, 15)
    assert result.expired(today=date(2012, 4, 16)) and not result.expired(today=date(2012, 4, 15))


@pytest.mark.parametrize("position", sorted(CHECK_POSITIONS))
def test_each_wrong_check_digit_is_rejected_naming_the_field(position: int) -> None:
    printed = str((int(LINE2[position]) + 3) % 10)
    result = parse_td3(LINE1, _with(LINE2, position, printed))
    assert not result.valid
    field = CHECK_POSITIONS[position]
    assert any(e.startswith(f"{field} check digit is {printed}, computed {LINE2[position]}") for e in result.errors), (
        result.errors
    )
    assert result.document_number == "L898902C3"  # a wrong check digit never "repairs" the data into agreement


def test_every_wrong_check_digit_value_is_rejected() -> None:
    for position in CHECK_POSITIONS:
        for digit in "0123456789":
            if digit != LINE2[position]:
                assert not parse_td3(LINE1, _with(LINE2, position, digit)).valid, (position, digit)


def test_o_for_zero_in_dates_and_check_digits_is_repaired_and_reported() -> None:
    read = _with(_with(_with(LINE2, 23, "O"), 43, "O"), 10 + 2, "0")  # expiry 12O415, composite O, UT0
    result = parse_td3(LINE1, read)
    assert result.valid, result.errors
    assert (result.expiry_date, result.nationality) == ("120415", "UTO")
    assert "expiry date: 'O' read as '0' (position 24)" in result.repairs
    assert "composite check digit: 'O' read as '0' (position 44)" in result.repairs
    assert "nationality: '0' read as 'O' (position 13)" in result.repairs


def test_birth_date_look_alikes_are_repaired() -> None:
    read = LINE2[:13] + "74O8I2" + LINE2[19:]
    result = parse_td3(LINE1, read)
    assert result.valid, result.errors
    assert result.birth_date == "740812"
    assert len([r for r in result.repairs if r.startswith("birth date")]) == 2


def test_o_for_zero_in_the_document_number_is_repaired_by_its_check_digit() -> None:
    result = parse_td3(LINE1, _with(LINE2, 5, "O"))  # L8989O2C3
    assert result.valid, result.errors
    assert result.document_number == "L898902C3"
    assert result.repairs == ["document number: 'O' read as '0' (position 6)"]


def test_letter_o_in_the_document_number_read_as_zero_is_repaired() -> None:
    line2 = _line2("AO1234567")
    assert parse_td3(LINE1, line2).valid
    result = parse_td3(LINE1, _with(line2, 1, "0"))
    assert result.valid, result.errors
    assert result.document_number == "AO1234567"
    assert result.repairs == ["document number: '0' read as 'O' (position 2)"]


def test_an_ambiguous_document_number_repair_is_refused() -> None:
    # True number L89890ZC3; OCR reads the Z as 2. Changing that 2 back to Z, or the first 8 into B, both satisfy
    # the check digit (and so the composite): no way to tell which, so nothing is repaired.
    line2 = _line2("L89890ZC3")
    assert parse_td3(LINE1, line2).valid
    result = parse_td3(LINE1, _with(line2, 6, "2"))
    assert not result.valid
    assert result.repairs == []
    assert result.document_number == "L898902C3"
    assert any("refused as ambiguous" in e and "L89890ZC3" in e and "L89B902C3" in e for e in result.errors)


def test_g_and_6_cannot_be_told_apart_by_check_digits() -> None:
    # 'G' (16) and '6' differ by 10: every weight maps that to 0 modulo 10, so a G/6 misread passes unnoticed.
    assert check_digit("AB6123456") == check_digit("ABG123456")


@pytest.mark.parametrize(
    ("line1", "line2", "reason"),
    [
        (LINE1[:-1], LINE2, "line 1 has 43 characters"),
        (LINE1, LINE2 + "<", "line 2 has 45 characters"),
        (LINE1, LINE2[:40], "line 2 has 40 characters"),
        (LINE1, _with(LINE2, 30, "a"), "line 2 contains characters outside"),
    ],
)
def test_wrong_lengths_and_characters_are_rejected(line1: str, line2: str, reason: str) -> None:
    result = parse_td3(line1, line2)
    assert not result.valid
    assert any(e.startswith(reason) for e in result.errors), result.errors


def test_format_errors() -> None:
    assert "is not a passport" in " ".join(parse_td3("I" + LINE1[1:], LINE2).errors)
    bad_month = LINE2[:13] + "741312" + str(check_digit("741312")) + LINE2[20:]
    assert any("not a valid YYMMDD date" in e for e in parse_td3(LINE1, bad_month).errors)
    assert any(e.startswith("sex 'Q'") for e in parse_td3(LINE1, _with(LINE2, 20, "Q")).errors)


def test_ocr_noise_is_normalised() -> None:
    assert normalise_ocr_line("p<uto eriksson«anna<maria<K<<") == "P<UTOERIKSSON<<ANNA<MARIA<<<<"
    assert normalise_ocr_line("ZE184226B<<K<<10") == "ZE184226B<<<<<10"


def test_find_td3_lines_in_ocr_output() -> None:
    ocr = ["PASSPORT", "UTOPIA", "ERIKSSON", LINE1, LINE2]
    assert find_td3_lines(ocr) == (LINE1, LINE2)
    assert find_td3_lines(["PASSPORT", "nothing here"]) is None


def test_find_td3_lines_pads_a_truncated_filler_tail_of_line_1() -> None:
    # The text detector often cuts the long filler run at the end of line 1.
    assert find_td3_lines(["P<UTOERIKSSON<<ANNA<MARIA<<<<", LINE2]) == (LINE1, LINE2)
    assert find_td3_lines([LINE1 + "<<", LINE2]) == (LINE1, LINE2)


@pytest.mark.parametrize(
    "read",
    [
        LINE2.replace("B<<<<<1", "B<<<<1"),  # 43: one filler lost
        LINE2.replace("B<<<<<1", "B<<<1"),  # 42
        LINE2.replace("B<<<<<1", "B<<<<<<1"),  # 45: one filler too many
        LINE2.replace("B<<<<<1", "B<<<<<<<1"),  # 46
    ],
)
def test_find_td3_lines_fixes_miscounted_fillers_of_line_2(read: str) -> None:
    assert find_td3_lines([LINE1, read]) == (LINE1, LINE2)


def test_find_td3_lines_refuses_lengths_it_cannot_fix() -> None:
    assert find_td3_lines([LINE1, LINE2[:41]]) is None  # 41: too short to trust
    assert find_td3_lines([LINE1, LINE2 + "<<<"]) is None  # 47
    # 43 characters with a lost digit, not a filler: no filler insertion passes the check digits.
    assert find_td3_lines([LINE1, LINE2[:3] + LINE2[4:]]) is None


def test_looks_like_mrz_tells_mrz_noise_from_printed_text() -> None:
    assert looks_like_mrz("L898902C36UT07408122F12O4<<<<")
    assert not looks_like_mrz("Date of expiry 15 APR 2012")
