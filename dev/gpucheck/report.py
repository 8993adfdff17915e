"""The GPU check's markdown report: tables of rows with a status, written after every part (so a
run stopped at its limit leaves what it had measured), and which rows fail the run."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from hiseg.utils.atomic_io import atomic_write

__all__ = ["PASS", "FAIL", "ERROR", "SKIP", "INFO", "MET", "MISSED", "goal_status", "Table", "Report", "error_text"]

PASS, FAIL, ERROR, SKIP, INFO = "pass", "FAIL", "ERROR", "skipped", "info"
MET, MISSED = "met", "missed"


def goal_status(value: Optional[float], goal: float, at_most: bool = True) -> str:
    if value is None or value != value:
        return SKIP
    ok = value <= goal if at_most else value >= goal
    return MET if ok else MISSED


@dataclass
class Table:
    title: str
    columns: Sequence[str]
    intro: str = ""
    rows: List[List[str]] = field(default_factory=list)
    kind: str = "speed"  # "correctness" rows carry a pass/FAIL status in column "status"

    def add(self, *cells) -> List[str]:
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: {len(cells)} cells for {len(self.columns)} columns")
        row = [str(c).replace("|", "/").replace("\n", " ") for c in cells]
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.intro:
            out += [self.intro, ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "---|" * len(self.columns))
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if not self.rows:
            out.append("| " + " | ".join(["(not reached)"] + ["-"] * (len(self.columns) - 1)) + " |")
        return "\n".join(out)

    def statuses(self) -> List[str]:
        if "status" not in self.columns:
            return []
        i = list(self.columns).index("status")
        return [r[i] for r in self.rows]


class Report:
    """Markdown report written after every table, so a run stopped at its limit leaves what it
    had measured."""

    def __init__(self, path: Path, title: str):
        self.path = Path(path)
        self.title = title
        self.header: List[str] = []
        self.tables: List[Table] = []
        self.notes: List[str] = []
        self.footer: List[str] = []

    def table(self, title: str, columns: Sequence[str], intro: str = "", kind: str = "speed") -> Table:
        t = Table(title, list(columns), intro, kind=kind)
        self.tables.append(t)
        return t

    def failures(self) -> List[str]:
        """Rows with a FAIL status (correctness tables) or an ERROR in any cell (any table: a
        crash in a speed part is a broken device path too). Missed goals are not failures."""
        bad = []
        for t in self.tables:
            statuses = t.statuses() or [""] * len(t.rows)
            for r, s in zip(t.rows, statuses):
                errors = [c for c in r if c.startswith(ERROR)]
                if s.startswith(FAIL) or errors:
                    bad.append(f"{t.title}: {r[0]} ({s if s.startswith(FAIL) else errors[0]})")
        return bad

    def render(self) -> str:
        parts = [f"# {self.title}", "", *self.header, ""]
        parts += [t.markdown() + "\n" for t in self.tables]
        if self.notes:
            parts += ["## Notes", "", *[f"* {n}" for n in self.notes], ""]
        parts += self.footer
        return "\n".join(parts).rstrip() + "\n"

    def write(self):
        with atomic_write(self.path, "w") as f:
            f.write(self.render())


def error_text(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."
