"""The copy guard: a summary may reuse short phrases of its source, never a run of n source tokens."""

import pytest

from engine.copying import CopyGuard


def test_only_the_token_that_completes_a_copied_run_is_ruled_out():
    source = [5, 6, 7, 8, 9, 10, 5, 6, 7, 11]
    guard = CopyGuard(source, n=4)
    assert guard.banned([1, 5, 6, 7]) == {8, 11}  # "5 6 7" is followed by 8 and by 11 in the source
    assert guard.banned([6, 7, 8]) == {9}
    assert guard.banned([7, 8]) == set()  # fewer than n - 1 tokens written: nothing is a copy yet
    assert guard.banned([1, 2, 3, 4]) == set()  # not a run of the source
    assert guard.banned([8, 9, 10, 5, 6, 7, 12]) == set()  # only the last n - 1 tokens count


def test_a_run_shorter_than_n_stays_allowed_and_n_is_checked():
    guard = CopyGuard([1, 2, 3], n=4)  # a source shorter than a run rules out nothing
    assert guard.banned([1, 2, 3]) == set()
    with pytest.raises(ValueError):
        CopyGuard([1, 2, 3], n=1)
