# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The mutation check (``python tests/mutants.py``) stays applicable: every mutant's text occurs exactly once in its
file, so a refactor that moves a component cannot silently turn its mutant into "not applied"."""

from __future__ import annotations

import os

import pytest
from mutants import MUTANTS, REPO


@pytest.mark.parametrize("mutant", MUTANTS, ids=[f"{m.method}: {m.component}" for m in MUTANTS])
def test_every_mutant_applies(mutant):
    with open(os.path.join(REPO, mutant.path)) as f:
        assert f.read().count(mutant.old) == 1, f"{mutant.path}: the mutant's text must occur exactly once"
    for test in mutant.tests:
        assert os.path.isfile(os.path.join(REPO, test.split("::")[0])), test
