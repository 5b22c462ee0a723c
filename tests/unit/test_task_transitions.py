"""Only tierbatch/tasks/transitions.py writes `tasks.status`.

The scan reads every module of the tierbatch package (api/ and worker/ included) and looks for the three ways a status
can be written: SQL text (`UPDATE tasks … SET … status = …`), a Core update of the Task model
(`update(Task)….values(status=…)`), and an ORM assignment (`task.status = …`). The planted samples
below prove it would see each of them, and scanning the transitions module itself proves it sees
the real statements."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("tierbatch", "api", "worker")  # api/ and worker/ are tierbatch.api and tierbatch.worker
OWNER = ROOT / "tierbatch" / "tasks" / "transitions.py"

_SQL_UPDATE = re.compile(
    r"\bUPDATE\s+tasks\b(?:\s+(?:AS\s+)?\w+)?\s+SET\b(?P<set>.*?)(?=\bFROM\b|\bWHERE\b|\bRETURNING\b|$)",
    re.IGNORECASE | re.DOTALL)
_SET_STATUS = re.compile(r"(?:^|,)\s*(?:\w+\.)?\"?status\"?\s*=", re.IGNORECASE)


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal (adjacent literals are one), and every `a + b` of literals joined, since
    SQL text is often built in pieces."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            found.append((node.lineno, "".join(v.value for v in node.values
                                               if isinstance(v, ast.Constant) and isinstance(v.value, str))))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            parts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            if len(parts) > 1:
                found.append((node.lineno, " ".join(parts)))
    return found


def _root_call(node: ast.expr) -> ast.Call | None:
    """The first call of a method chain: `update(Task)` in `update(Task).where(…).values(…)`."""
    while True:
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                node = node.func.value
                continue
            return node
        if isinstance(node, ast.Attribute):
            node = node.value
            continue
        return None


def _is_update_of_task(call: ast.Call | None) -> bool:
    if call is None or not call.args:
        return False
    name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")
    target = call.args[0]
    return name == "update" and isinstance(target, ast.Name) and target.id == "Task"


def _writes_status(values: ast.Call) -> bool:
    for keyword in values.keywords:
        if keyword.arg == "status" or keyword.arg is None:  # `**fields` may hold a status: not allowed either
            return True
    for arg in values.args:
        if isinstance(arg, ast.Dict):
            for key in arg.keys:
                if isinstance(key, ast.Constant) and key.value == "status":
                    return True
                if isinstance(key, ast.Attribute) and key.attr == "status":
                    return True
    return False


def violations(source: str) -> list[str]:
    """What in `source` writes `tasks.status`, one line each."""
    tree = ast.parse(source)
    found: list[str] = []
    for line, value in _strings(tree):
        for match in _SQL_UPDATE.finditer(value):
            if _SET_STATUS.search(match.group("set")):
                found.append(f"line {line}: SQL `UPDATE tasks … SET status`")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("values", "ordered_values")
                and _is_update_of_task(_root_call(node.func.value)) and _writes_status(node)):
            found.append(f"line {node.lineno}: update(Task).values(status=…)")
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if (isinstance(target, ast.Attribute) and target.attr == "status" and isinstance(target.value, ast.Name)
                    and "task" in target.value.id.lower()):
                found.append(f"line {node.lineno}: ORM assignment {target.value.id}.status = …")
    return found


def _modules() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))


def test_only_the_transitions_module_writes_task_status() -> None:
    offenders = {str(path.relative_to(ROOT)): found for path in _modules() if path != OWNER
                 if (found := violations(path.read_text(encoding="utf-8")))}
    assert offenders == {}


def test_the_scan_sees_the_real_statements() -> None:
    found = violations(OWNER.read_text(encoding="utf-8"))
    # every transition of the module: a scan that missed them would pass on anything
    assert len(found) >= 14, found
    assert len(_modules()) > 50


PLANTED = {
    "sql, one literal": 'q = text("UPDATE tasks SET status = \'failed\' WHERE id = :id")',
    "sql, alias, later column":
        'q = text("UPDATE tasks AS t SET error = NULL, status = v.status FROM v WHERE t.id = v.id")',
    "sql, in pieces":
        'q = ("UPDATE tasks t SET updated_at = now(), "\n     "t.status = \'queued\' "\n     "WHERE id = :id")',
    "sql, joined with +": 'q = "UPDATE tasks SET " + "status = \'cancelled\'" + " WHERE id = :id"',
    "sql, CTE": 'q = "WITH moved AS (UPDATE tasks AS t SET status = v.status FROM v WHERE t.id = v.id) SELECT 1"',
    "core keyword": "session.execute(update(Task).where(Task.id == i).values(status=TaskStatus.FAILED))",
    "core dict": "session.execute(update(Task).values({Task.status: TaskStatus.FAILED}))",
    "core splat": "session.execute(update(Task).where(Task.id == i).values(**fields))",
    "orm": "task.status = TaskStatus.CANCELLED",
    "orm, other name": "shadow_task.status = 'failed'",
}
ALLOWED = {
    "sql, other column": 'q = text("UPDATE tasks AS o SET cost_usd = o.cost_usd + 1 WHERE o.status = \'succeeded\'")',
    "sql, other table": 'q = text("UPDATE classifications SET status = \'failed\' WHERE id = :id")',
    "core, other column": "session.execute(update(Task).where(Task.status == s).values(dispatched_at=func.now()))",
    "core, other model": "session.execute(update(ClientBatch).values(status='expired'))",
    "orm, other object": "batch.status = 'cancelling'",
    "comparison": "done = task.status == TaskStatus.SUCCEEDED",
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_a_planted_write_is_caught(name: str) -> None:
    assert violations(PLANTED[name]), name


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_other_writes_are_not_flagged(name: str) -> None:
    assert violations(ALLOWED[name]) == [], name
