"""The contract suite catches the wrong storages a backend author could write.

Each mutant is a storage that passed the suite before it learnt to catch
it (found by writing a third-party backend from the docs alone). The suite
runs on it in a child pytest, and the named contract test must fail.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MUTANTS = {
    # Keeps everything in the object's memory: nothing is stored anywhere.
    "keeps-nothing": (
        """
        class Mutant(MemoryStorage):
            pass

        class TestMutant(StorageContract):
            async def reopened(self, storage):
                other = Mutant()  # "the same data", but there is none
                await other.open()
                return other

            @pytest.fixture
            async def storage(self):
                backend = Mutant()
                await backend.open()
                yield backend
                await backend.close()
        """,
        "test_data_survives_closing_and_reopening",
    ),
    # Answers the sweep natively and forgets its limit.
    "sweep-ignores-limit": (
        """
        class Mutant(MemoryStorage):
            async def apply(self, op):
                if isinstance(op, ledger.Sweep):
                    op = ledger.Sweep(op.now, op.pending_before, 1_000_000)
                return await super().apply(op)

        class TestMutant(StorageContract):
            keeps_data = False

            @pytest.fixture
            async def storage(self):
                backend = Mutant()
                await backend.open()
                yield backend
                await backend.close()
        """,
        "test_stale_items_keeps_to_its_limit",
    ),
}

HEADER = """
import pytest
from csvimg import ledger
from csvimg.backends.memory import MemoryStorage
from csvimg.testing import StorageContract
"""


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_the_contract_suite_fails_the_mutant(name: str, tmp_path: Path) -> None:
    code, expected = MUTANTS[name]
    test = tmp_path / "test_mutant.py"
    test.write_text(HEADER + textwrap.dedent(code), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", expected,
         "-p", "anyio", str(test)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"FAILED test_mutant.py::TestMutant::{expected}" in output, output
