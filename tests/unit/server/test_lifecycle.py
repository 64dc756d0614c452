"""vzkit.server.lifecycle: misplaced calls fail with a message that reads as a sentence."""

from __future__ import annotations

import pytest

from vzkit.api.instances import InstanceState
from vzkit.errors import StateError
from vzkit.server import lifecycle


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ("file", "cannot copy files to or from 'web': it is stopped"),  # was "cannot file"
        ("console", "cannot attach to 'web': it is stopped"),
        ("pause", "cannot pause 'web': it is stopped"),
    ],
)
def test_state_error_messages(op: str, message: str) -> None:
    with pytest.raises(StateError) as err:
        lifecycle.check(op, "web", InstanceState.STOPPED)
    assert err.value.message == message
    assert err.value.hint == "start it first: vz start web"
