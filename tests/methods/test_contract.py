"""The method contract (`dpimages.testing.check_method`) for every registered method, with no test code per method.

See `dpimages.testing` for what is checked: fit/sample/reload/report/ledger, accounting (no noise outside a
release, the ledger equals the releases), sensitivity on neighbours with a worst-case image added first, in the
middle and last, other data through the same releases, kill-and-resume, and a bad config key.
"""

from __future__ import annotations

import pytest

from dpimages.api import methods
from dpimages.testing import check_method


@pytest.mark.parametrize("method", methods())
def test_every_registered_method_keeps_the_contract(method, tmp_path):
    check_method(method, workdir=tmp_path)
