"""``remove_tree`` removes read-only trees and never changes anything outside the tree."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sidecar.prewarm import remove_tree


def test_read_only_tree_is_removed_and_its_parent_is_untouched(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    tree = parent / "run"
    (tree / "mod" / "cache").mkdir(parents=True)
    (tree / "mod" / "cache" / "f.go").write_text("x")
    os.chmod(tree / "mod" / "cache", 0o555)  # like Go's module cache
    os.chmod(tree / "mod", 0o555)
    os.chmod(parent, 0o1777)
    remove_tree(str(tree))
    assert not tree.exists()
    assert stat.S_IMODE(os.stat(parent).st_mode) == 0o1777


def test_a_tree_that_cannot_be_removed_leaves_its_parent_alone(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    os.chmod(parent, 0o1777)
    remove_tree(str(parent / "missing"))  # an error on the top entry itself
    assert stat.S_IMODE(os.stat(parent).st_mode) == 0o1777
