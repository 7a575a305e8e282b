"""E2E NLG Challenge data: (MR, reference) pairs from the official CSVs or tfds `e2e_cleaned`.

Local files are the official release's `trainset.csv`, `devset.csv`, `testset_w_refs.csv`
(comma-separated, quoted, header `mr,ref`). Training uses every (MR, reference) pair;
evaluation uses `Split.by_mr()`: one entry per distinct MR in first-appearance order with all
its references, which is how the official scorer groups a reference CSV (it groups consecutive
equal MRs; in the dev and test files every MR's rows are consecutive, so the two agree). A
malformed row raises `E2EDataError` naming the file and the 1-based line.

tfds `e2e_cleaned` is Dušek et al.'s cleaned re-annotation (fixed MRs, overlapping MRs removed),
not the data the VeRA paper (and its E2E numbers) used; its records come in tfds's order.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re

from .common import DataUnavailableError, reachable

SPLIT_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
TFDS_NAME = "e2e_cleaned"
# Mojibake the official scorer repairs in reference files before scoring (none in the release).
_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))
_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


class E2EDataError(ValueError):
    """An E2E file or split that cannot be read; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Parallel lists of MRs and references, one per (MR, reference) pair; `source` says where from."""

    mrs: list
    refs: list
    source: str

    def __len__(self) -> int:
        return len(self.mrs)

    def by_mr(self) -> tuple[list[str], list[list[str]]]:
        """(distinct MRs in first-appearance order, each MR's references in file order)."""
        grouped: dict[str, list[str]] = {}
        for mr, ref in zip(self.mrs, self.refs):
            grouped.setdefault(mr, []).append(ref)
        return list(grouped), list(grouped.values())


def _fix(text: str) -> str:
    for bad, good in _FIXES:
        text = text.replace(bad, good)
    return text.strip()


def read_csv(path: str) -> Split:
    """Every (mr, ref) row of an official E2E CSV; the columns are found by header name."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise E2EDataError(f"{path}: empty file") from None
        except csv.Error as e:
            raise E2EDataError(f"{path}:1: {e}") from None
        missing = [c for c in ("mr", "ref") if c not in header]
        if missing:
            raise E2EDataError(f"{path}:1: header {header} lacks column(s) {missing} (need mr,ref)")
        i_mr, i_ref = header.index("mr"), header.index("ref")
        mrs, refs = [], []
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise E2EDataError(f"{path}:{line}: {e}") from None
            if not row:
                continue
            if len(row) != len(header):
                raise E2EDataError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
            mr, ref = _fix(row[i_mr]), _fix(row[i_ref])
            if not mr or not ref:
                raise E2EDataError(f"{path}:{line}: empty {'mr' if not mr else 'ref'}")
            mrs.append(mr)
            refs.append(ref)
    if not mrs:
        raise E2EDataError(f"{path}: no rows")
    return Split(mrs, refs, path)


def read_local(data_dir: str, split: str) -> Split:
    """`split` ("train" | "dev" | "test") from a directory holding the official CSVs."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    path = os.path.join(data_dir, SPLIT_FILES[split])
    if not os.path.isfile(path):
        raise E2EDataError(f"{path}: no such file (expected the official {SPLIT_FILES[split]})")
    return read_csv(path)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_tfds(split: str, data_dir: str | None = None, download: bool = True, timeout: float = 5.0) -> Split:
    """`split` of tfds `e2e_cleaned` through `tfds.data_source`; its MR table (`input_text.table`:
    column_header, content) is written back as `name[value], ...`. Offline and unprepared, fails
    within `timeout` seconds saying how to use the local CSVs instead."""
    import tensorflow_datasets as tfds

    tfds_split = {"train": "train", "dev": "validation", "test": "test"}[split]
    try:
        source = tfds.data_source(TFDS_NAME, split=tfds_split, data_dir=data_dir, download=False)
    except Exception as missing:
        reason = reachable("https://github.com", timeout) if download else "download=False"
        if reason is not None:
            raise DataUnavailableError(
                f"tfds {TFDS_NAME} is not prepared in {data_dir or '~/tensorflow_datasets'} and cannot be "
                f"downloaded ({reason}). Offline, point data.dir at a directory holding the official "
                f"{', '.join(SPLIT_FILES.values())}, e.g. ../shared/data/e2e") from missing
        source = tfds.data_source(TFDS_NAME, split=tfds_split, data_dir=data_dir, download=True)
    mrs, refs = [], []
    for ex in source:
        table = ex["input_text"]["table"]
        mrs.append(", ".join(f"{_text(h)}[{_text(c)}]" for h, c in zip(table["column_header"], table["content"])))
        refs.append(_text(ex["target_text"]))
    if not mrs:
        raise E2EDataError(f"tfds {TFDS_NAME}[{tfds_split}]: no examples")
    return Split(mrs, refs, f"tfds {TFDS_NAME}[{tfds_split}]")


def load_split(split: str, *, data_dir: str = "", tfds_data_dir: str | None = None,
               download: bool = True, timeout: float = 5.0) -> Split:
    """The official CSVs from `data_dir` when given, else tfds `e2e_cleaned`."""
    return read_local(data_dir, split) if data_dir else read_tfds(split, tfds_data_dir, download, timeout)


def parse_mr(mr: str) -> dict[str, str]:
    """`name[The Eagle], food[French]` -> {"name": "The Eagle", "food": "French"}, in MR order."""
    slots = {}
    pos = 0
    for m in _SLOT.finditer(mr):
        if m.start() != pos:
            break
        slots[m.group(1)] = m.group(2)
        pos = m.end()
    if pos != len(mr) or not slots:
        raise E2EDataError(f"MR {mr!r}: not a comma-separated list of slot[value] at character {pos}")
    return slots


def template(mr: str) -> str:
    """A fixed-template realisation of an MR: the trivial baseline a trained model must beat."""
    s = parse_mr(mr)
    text = f"{s.get('name', 'It')} is a {s.get('eatType', 'place')}"
    if "food" in s:
        text += f" serving {s['food']} food"
    if "area" in s:
        text += f" in the {s['area']}"
    text += "."
    if "priceRange" in s:
        text += f" Its price range is {s['priceRange']}."
    if "customer rating" in s:
        text += f" Its customer rating is {s['customer rating']}."
    if "familyFriendly" in s:
        text += " It is family friendly." if s["familyFriendly"] == "yes" else " It is not family friendly."
    if "near" in s:
        text += f" It is near {s['near']}."
    return text
