"""A learner's progress through the dojo's questions, kept in their own directory
(`.handgrad-questions.json`, written atomically with io.atomic_write_bytes): per question the parts
answered right, the hints shown (so the next wrong answer gives the next one), attempts, whether it is
done and whether the explanation was asked for before it was.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from handgrad import io

FILE = ".handgrad-questions.json"
FORMAT, VERSION = "handgrad-questions", 1
MAX_BYTES = 1 << 20


class ProgressError(ValueError):
    """The progress file cannot be read or written: one line naming it."""


@dataclass
class Record:
    """One question's state."""

    parts: dict[str, bool] = field(default_factory=dict)  # part -> right at its latest answer
    hints: dict[str, int] = field(default_factory=dict)  # part -> hints shown so far (0..3)
    attempts: int = 0  # answers graded
    solved: bool = False  # every part right (once solved, it stays done)
    explained: bool = False  # the explanation was shown before it was solved

    def status(self) -> str:
        """For `dojo list`: done, tried, or new."""
        if self.solved:
            return "done" + (" (after the explanation)" if self.explained else "")
        if self.attempts or any(self.hints.values()) or self.explained:
            right = sum(self.parts.values())
            shown = sum(self.hints.values())
            return (f"tried {self.attempts}x, {right} part{'s' if right != 1 else ''} right"
                    + (f", {shown} hint{'s' if shown != 1 else ''}" if shown else ""))
        return ""


@dataclass
class Progress:
    path: Path
    records: dict[str, Record]  # question key ("q4") -> its record

    @classmethod
    def load(cls, directory: str | Path) -> Progress:
        """The progress kept in `directory` (none yet: empty). Raises ProgressError for a file that is
        not a progress file, so that it is never overwritten by mistake."""
        path = Path(directory) / FILE
        try:
            raw = io.read_regular(path, MAX_BYTES)
        except FileNotFoundError:
            return cls(path, {})
        except io.UnsafeFileError as e:  # names the file already
            raise ProgressError(f"{e} (the questions' progress file)") from None
        except OSError as e:
            raise ProgressError(f"{path}: cannot read the questions' progress ({io.describe(e)})") from None
        return cls(path, _parse(raw, path))

    def record(self, key: str) -> Record:
        return self.records.setdefault(key, Record())

    def done(self) -> list[str]:
        return [k for k, r in self.records.items() if r.solved]

    def save(self) -> None:
        """Write atomically (a kill leaves the old file or the new one)."""
        data = {"format": FORMAT, "version": VERSION,
                "questions": {k: asdict(r) for k, r in sorted(self.records.items())}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            io.atomic_write_bytes(self.path, (json.dumps(data, indent=1) + "\n").encode())
        except OSError as e:
            raise ProgressError(f"{self.path}: cannot save the questions' progress "
                                f"({io.describe(e)})") from None


def _parse(raw: bytes, path: Path) -> dict[str, Record]:
    bad = f"{path}: not a handgrad questions progress file"
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProgressError(f"{bad} ({str(e).splitlines()[0][:80]}); move it away to start afresh") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProgressError(f"{bad} (no '{FORMAT}' format); move it away to start afresh")
    if not isinstance(data.get("questions"), dict):
        raise ProgressError(f"{bad} (no '{FORMAT}' format); move it away to start afresh")
    if data.get("version") != VERSION:
        raise ProgressError(f"{path}: version {data.get('version')!r:.20} of the progress file; this "
                            f"handgrad reads version {VERSION}")
    records = {}
    for key, r in data["questions"].items():
        if not isinstance(r, dict):
            raise ProgressError(f"{bad} (question {key!r:.20} is not a record)")
        try:
            records[str(key)] = Record(
                parts={str(k): bool(v) for k, v in _mapping(r.get("parts", {})).items()},
                hints={str(k): _count(v) for k, v in _mapping(r.get("hints", {})).items()},
                attempts=_count(r.get("attempts", 0)), solved=bool(r.get("solved", False)),
                explained=bool(r.get("explained", False)))
        except (TypeError, ValueError) as e:
            raise ProgressError(f"{bad} (question {key!r:.20}: {e})") from None
    return records


def _mapping(v: object) -> dict:
    if not isinstance(v, dict):
        raise TypeError(f"expected a mapping, got {type(v).__name__}")
    return v


def _count(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v > 10**9:
        raise ValueError(f"expected a count, got {v!r:.20}")
    return int(v)
