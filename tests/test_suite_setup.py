"""The test suite's own set-up: what setup.cfg's addopts and conftest.py promise holds in the run itself."""

import pytest
from conftest import SHARED_COSTLY_FIXTURES


@pytest.mark.xdist_group("suite_setup_check")
def test_xdist_groups_keep_their_tests_on_one_worker(request):
    """setup.cfg runs the suite with --dist loadgroup: tests marked with one xdist_group (the inductor compile tests,
    and conftest's users of a costly module fixture) run on one worker. pytest 9.2 with pytest-xdist 3.8 dropped
    every group without a word (pytest-xdist issue 1386): xdist marks a grouped test by its node id's `@group`
    suffix, which pytest 9.2 no longer lets it set. The suite still passed, only slower; this test fails instead."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup (e.g. -n 0)")
    assert request.node.nodeid.endswith("@suite_setup_check"), (
        f"{request.node.nodeid}: no @group suffix: this pytest ({pytest.__version__}) and pytest-xdist do not group "
        "tests; see setup.cfg's pin of pytest")
    costly = [item for item in request.session.items
              if any(name in getattr(item, "fixturenames", ()) for name in SHARED_COSTLY_FIXTURES)]
    assert all("@" in item.nodeid for item in costly), [item.nodeid for item in costly if "@" not in item.nodeid]
