"""Bulk-enrol a folder: one subject per sub-folder (or per image file), with a progress bar and a report.

FOLDER holds either a sub-folder per subject, named by the subject id, with that subject's photos (one face each:
``FOLDER/alice/1.jpg``, ``FOLDER/alice/2.jpg``), or single photos named by the subject id (``FOLDER/bob.jpg``), or
both. Each subject is enrolled through the gallery API with all its photos (``--batch`` per call), on the
``--watchlist`` lists if given. Every image's result is kept: photos the gallery refused (no face, too poor, not an
image) are listed with the reason. A subject that is already enrolled is skipped, so a run that stopped half-way
can simply be started again; ``--add-to-existing`` adds the photos to such subjects instead.

    python examples/bulk_enrol.py ./staff-photos --watchlist staff --purpose "building access" --local-stack

Exit status: 0 when every subject has at least one template, 1 when some did not (see the list, or ``--report``),
2 when FOLDER holds no photos or the client cannot be set up. The token is ``$SIGHTLINE_TOKEN`` (it needs the
enroller role); the gallery is ``--matching`` or ``$SIGHTLINE_SDK_MATCHING_ADDR``. Photos are sent to the gallery
only, never logged.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tqdm import tqdm

from sightline.sdk import ConfigurationError, NotFound, SightlineClient, SightlineError
from sightline.sdk.options import add_connection_options, client_from

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class SubjectResult:
    """What became of one subject."""

    subject_id: str
    images: int
    status: str = "enrolled"  # enrolled, skipped (already enrolled), failed
    templates_added: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"image": path, "reason": why}
    error: str = ""


def photos_by_subject(folder: Path) -> dict[str, list[Path]]:
    """Subject id -> its photos, in name order: a sub-folder per subject, or a photo named by the subject."""
    found: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            photos = sorted(p for p in entry.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
            if photos:
                found.setdefault(entry.name, []).extend(photos)
        elif entry.suffix.lower() in PHOTO_SUFFIXES:
            found.setdefault(entry.stem, []).append(entry)
    return found


def already_enrolled(client: SightlineClient, subject_id: str) -> bool:
    try:
        client.gallery.subject(subject_id)
    except NotFound:
        return False
    return True


def enrol_subject(
    client: SightlineClient, subject_id: str, photos: list[Path], args: argparse.Namespace
) -> SubjectResult:
    """Enrol one subject from its photos, ``args.batch`` a call; the failure of a call fails the subject only."""
    result = SubjectResult(subject_id, len(photos))
    expires = datetime.now(UTC) + timedelta(days=args.days) if args.days else None
    try:
        if not args.add_to_existing and already_enrolled(client, subject_id):
            result.status = "skipped"
            return result
        for start in range(0, len(photos), args.batch):
            batch = photos[start : start + args.batch]
            reply = client.gallery.enroll(
                subject_id, batch, watchlists=args.watchlist, purpose=args.purpose, membership_expires_at=expires
            )
            result.templates_added += reply.templates_added
            result.rejected += [
                {"image": str(batch[r.image_index]), "reason": r.reason} for r in reply.results if not r.accepted
            ]
    except ConfigurationError:
        raise  # the same for every subject: the run stops
    except SightlineError as error:  # a refused or failed call, an unreadable photo: this subject only
        result.status, result.error = "failed", str(error)
        return result
    if not result.templates_added:
        result.status = "failed"
        result.error = "no photo was accepted"
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="a sub-folder or a photo per subject")
    parser.add_argument("--watchlist", action="append", default=[], help="put every subject on this list (repeatable)")
    parser.add_argument("--purpose", default="", help="why the subjects are enrolled, e.g. a programme (audited)")
    parser.add_argument(
        "--days", type=int, default=0, help="watchlist memberships end after N days (default: the list's)"
    )
    parser.add_argument("--batch", type=int, default=10, help="photos per enrolment call (default 10; service max 20)")
    parser.add_argument("--jobs", type=int, default=1, help="subjects enrolled at once (default 1)")
    parser.add_argument("--add-to-existing", action="store_true", help="add photos to subjects already enrolled")
    parser.add_argument("--report", type=Path, help="write one JSON line per subject to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_connection_options(parser, kafka=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch < 1 or args.jobs < 1:
        print("error: --batch and --jobs must be at least 1", file=sys.stderr)
        return 2
    subjects = photos_by_subject(args.folder) if args.folder.is_dir() else {}
    if not subjects:
        print(f"error: no photos in {args.folder} (a sub-folder or a photo per subject)", file=sys.stderr)
        return 2
    total = sum(len(photos) for photos in subjects.values())
    try:
        results = enrol_all(args, subjects, total)
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.report:
        args.report.write_text("".join(json.dumps(asdict(result)) + "\n" for result in results))
    return summarise(results)


def enrol_all(args: argparse.Namespace, subjects: dict[str, list[Path]], total: int) -> list[SubjectResult]:
    """Every subject, ``args.jobs`` at a time, the progress bar advancing by photos."""
    results: list[SubjectResult] = []
    with (
        client_from(args) as client,
        ThreadPoolExecutor(max_workers=args.jobs) as pool,
        tqdm(total=total, unit="photo", desc="enrolling", disable=args.no_progress or None) as bar,
    ):
        work = [pool.submit(enrol_subject, client, subject, photos, args) for subject, photos in subjects.items()]
        for future in work:  # in subject order, each as soon as it and those before it are done
            result = future.result()
            results.append(result)
            bar.update(result.images)
            bar.set_postfix(templates=sum(r.templates_added for r in results), failed=_count(results, "failed"))
    return results


def summarise(results: list[SubjectResult]) -> int:
    """Print what happened (rejections and failures on stderr); the exit status."""
    for result in results:
        for refused in result.rejected:
            print(f"  {refused['image']}: rejected: {refused['reason']}", file=sys.stderr)
        if result.status == "failed":
            print(f"  {result.subject_id}: FAILED: {result.error}", file=sys.stderr)
    templates = sum(r.templates_added for r in results)
    rejected = sum(len(r.rejected) for r in results)
    print(
        f"{_count(results, 'enrolled')} subject(s) enrolled ({templates} template(s)), "
        f"{_count(results, 'skipped')} already enrolled and skipped, {_count(results, 'failed')} failed; "
        f"{rejected} photo(s) rejected"
    )
    return 1 if _count(results, "failed") else 0


def _count(results: list[SubjectResult], status: str) -> int:
    return sum(1 for result in results if result.status == status)


if __name__ == "__main__":
    sys.exit(main())
