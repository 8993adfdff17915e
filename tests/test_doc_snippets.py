"""Every code block of README.md and docs/*.md either runs as written here or carries a skip
marker with its reason (most shell blocks do: they train, need data or a GPU); no block escapes both.

The ```python blocks run in a subprocess of this test's interpreter (the venv's python), one
after the other, each in a fresh namespace as a script (``__name__ == "__main__"``): importing
torch, detectron2 and both projects costs about 6 s of CPU, paid once instead of per block. Each
```bash / ```sh block runs in ``bash -e -o pipefail``. All run from the repository root, with
``python`` on PATH being this interpreter. A block that cannot run here (it trains for hours, needs a GPU,
downloads data or weights, runs the test suite itself) carries, on the line right before its
opening fence::

    <!-- doc-test: skip (REASON) -->

and is reported as skipped with REASON, which must not be empty. Other fenced blocks must name a
language (```text for output, ```yaml for configs: those are not run), so that no command
escapes the test unlabelled. Blocks that read the real data (``$DETECTRON2_DATASETS`` /
``$HISEG_SHARED_DATA``) get both set to the shared data folder, and skip when it is absent.

Test ids are ``FILE:LINE`` of the opening fence, so a failure names the block.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_LANGS = {"python": "python", "bash": "bash", "sh": "bash"}
TIMEOUT_S = 300
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*skip\s*\((?P<reason>.*)\)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
DATA_VARS = ("DETECTRON2_DATASETS", "HISEG_SHARED_DATA")


class Block(NamedTuple):
    file: str  # relative to ROOT
    line: int  # 1-based line of the opening fence
    lang: str  # first word of the info string, lower case ("" when none)
    code: str
    skip: Optional[str]  # the marker's reason, None without a marker
    problem: Optional[str]  # a malformed marker or unlabelled block


def doc_files() -> List[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse_blocks(path: Path) -> List[Block]:
    """The fenced blocks of one Markdown file (indented fences inside list items included)."""
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, fence, indent = i, m.group("fence"), len(m.group("indent"))
        lang = m.group("info").lower()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            j += 1
        body = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[start + 1:j]]
        code = textwrap.dedent("\n".join(body)) + "\n"
        prev = lines[start - 1] if start > 0 else ""
        skip = problem = None
        if "doc-test" in prev:
            mm = MARKER.match(prev)
            if mm is None:
                problem = f"malformed marker {prev.strip()!r}; write <!-- doc-test: skip (REASON) -->"
            elif not mm.group("reason").strip():
                problem = "doc-test skip marker without a reason; say why, e.g. (needs a GPU)"
            elif lang not in RUN_LANGS:
                problem = f"doc-test skip marker before a ```{lang} block, which is not run anyway"
            else:
                skip = mm.group("reason").strip()
        if not lang:
            problem = "fenced block without a language: use ```bash / ```python (run), ```text or ```yaml"
        blocks.append(Block(rel, start + 1, lang, code, skip, problem))
        i = j + 1
    return blocks


def all_blocks() -> List[Block]:
    return [b for f in doc_files() for b in parse_blocks(f)]


def stray_markers() -> List[str]:
    """``doc-test`` comments that are not right before an opening fence."""
    out = []
    for f in doc_files():
        lines = f.read_text(encoding="utf-8").splitlines()
        for k, ln in enumerate(lines):
            if "doc-test:" in ln and (k + 1 >= len(lines) or not FENCE.match(lines[k + 1])):
                out.append(f"{f.relative_to(ROOT).as_posix()}:{k + 1}: a doc-test marker must be on the "
                           f"line right before a code fence")
    return out


BLOCKS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in RUN_LANGS]


def test_blocks_are_labelled_and_markers_well_formed():
    problems = [f"{b.file}:{b.line}: {b.problem}" for b in BLOCKS if b.problem] + stray_markers()
    assert not problems, "\n".join(problems)


def test_parser_reads_markers_and_indented_fences(tmp_path, monkeypatch):
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text("a\n<!-- doc-test: skip (needs a GPU) -->\n```bash\nexit 1\n```\n"
                   "1. item\n\n   ```python\n   print(1)\n   ```\n"
                   "<!-- doc-test: skip () -->\n```sh\ntrue\n```\n```\nx\n```\n"
                   "<!-- doc-test: skip -->\n```bash\ntrue\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    got = parse_blocks(doc)
    assert [(b.line, b.lang, b.skip) for b in got] == [
        (3, "bash", "needs a GPU"), (8, "python", None), (12, "sh", None), (15, "", None), (19, "bash", None)]
    assert got[1].code == "print(1)\n"
    assert "without a reason" in got[2].problem and "without a language" in got[3].problem
    assert "malformed" in got[4].problem


def _env():
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    paths = [str(ROOT), str(ROOT / "projects" / "CAST"), str(ROOT / "projects" / "OAP")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "2")
    env["MPLBACKEND"] = "Agg"
    return env


# Runs the python blocks given as JSON on stdin, one after the other, each in a fresh namespace;
# appends one JSON line per block to the results file: {"id", "ok", "error"} (written before the
# next block starts, so a block that hangs or kills the interpreter is named by its absence).
_WORKER = r"""
import json, os, sys, traceback
blocks, results = json.load(sys.stdin), sys.argv[1]
for b in blocks:
    print(f"===== {b['id']}", flush=True)
    print(f"===== {b['id']}", file=sys.stderr, flush=True)
    os.chdir(b["cwd"])
    try:
        exec(compile(b["code"], b["id"], "exec"), {"__name__": "__main__", "__file__": b["id"]})
        rec = {"id": b["id"], "ok": True, "error": ""}
    except SystemExit as e:
        rec = {"id": b["id"], "ok": e.code in (None, 0), "error": f"SystemExit({e.code!r})"}
    except BaseException:
        rec = {"id": b["id"], "ok": False, "error": traceback.format_exc()}
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")
"""


def _block_id(b: Block) -> str:
    return f"{b.file}:{b.line}"


def _needs_data(b: Block) -> bool:
    return any(v in b.code for v in DATA_VARS) or "shared/data" in b.code


def _data_env(env):
    from hiseg.paths import shared_data_dir

    data = shared_data_dir()
    if data is not None:
        for v in DATA_VARS:
            env[v] = str(data)
    return data


@pytest.fixture(scope="module")
def python_results(request, tmp_path_factory):
    """Runs every selected, unmarked python block in one worker subprocess; id -> result."""
    selected = {item.callspec.params["block"] for item in request.session.items
                if getattr(item, "callspec", None) and "block" in item.callspec.params
                and item.module.__name__ == __name__}
    env = _env()
    has_data = _data_env(env) is not None
    todo = [b for b in RUNNABLE if b in selected and b.lang == "python" and not b.skip and not b.problem
            and (has_data or not _needs_data(b))]
    if not todo:
        return {}
    results = tmp_path_factory.mktemp("doc_python") / "results.jsonl"
    payload = json.dumps([{"id": _block_id(b), "code": b.code, "cwd": str(ROOT)} for b in todo])
    try:
        res = subprocess.run([sys.executable, "-c", _WORKER, str(results)], input=payload, cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT_S * len(todo))
        out, err, status = res.stdout, res.stderr, f"exit status {res.returncode}"
    except subprocess.TimeoutExpired as e:
        out, err = (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
        status = f"timeout after {TIMEOUT_S * len(todo)} s"
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            rec = json.loads(line)
            done[rec["id"]] = rec
    for b in todo:  # blocks the worker never finished: it hung or died in the first of them
        if _block_id(b) not in done:
            done[_block_id(b)] = {"id": _block_id(b), "ok": False,
                                  "error": f"the worker stopped ({status}) in or before this block:\n"
                                           f"{out[-2000:]}\n{err[-4000:]}"}
    return done


@pytest.mark.parametrize("block", RUNNABLE, ids=[_block_id(b) for b in RUNNABLE])
def test_doc_block_runs(block, tmp_path, python_results):
    bid = _block_id(block)
    if block.skip:
        pytest.skip(f"{bid}: {block.skip}")
    if block.problem:
        pytest.fail(f"{bid}: {block.problem}")
    env = _env()
    if _needs_data(block) and _data_env(env) is None:
        pytest.skip(f"{bid} reads the real data, which is absent")
    if block.lang == "python":
        rec = python_results[bid]
        assert rec["ok"], f"{bid} (python) failed:\n{block.code}\n{rec['error'][-5000:]}"
        return
    script = tmp_path / "block.sh"
    script.write_text(block.code)
    try:
        res = subprocess.run(["bash", "-e", "-o", "pipefail", str(script)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{bid} ran longer than {TIMEOUT_S} s; shorten it or mark it "
                    "<!-- doc-test: skip (REASON) -->")
    assert res.returncode == 0, (
        f"{bid} ({block.lang}) failed with exit status {res.returncode}:\n{block.code}\n"
        f"--- stdout (end) ---\n{res.stdout[-3000:]}\n--- stderr (end) ---\n{res.stderr[-5000:]}")
