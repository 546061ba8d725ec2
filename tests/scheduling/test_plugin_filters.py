from __future__ import annotations

import pytest

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.plugins.role_filter import ROLE_LABEL, DecodeFilter, PrefillFilter
from tests.scheduling.utils import endpoint, request

CASES = [
    pytest.param(endpoint(labels={ROLE_LABEL: "decode"}), True, False, id="label-decode"),
    pytest.param(endpoint(labels={ROLE_LABEL: "prefill"}), False, True, id="label-prefill"),
    pytest.param(endpoint(labels={ROLE_LABEL: "both"}), True, True, id="label-both"),
    pytest.param(endpoint(), True, True, id="unlabelled-counts-as-both"),
    pytest.param(endpoint(role="prefill"), False, True, id="discovered-role-without-label"),
    pytest.param(
        endpoint(role="prefill", labels={ROLE_LABEL: "decode"}), True, False, id="label-wins"
    ),
    pytest.param(endpoint(labels={ROLE_LABEL: "encode"}), False, False, id="unknown-role-neither"),
]


@pytest.mark.parametrize(("ep", "decodes", "prefills"), CASES)
def test_role_filters(ep: Endpoint, decodes: bool, prefills: bool) -> None:
    assert (DecodeFilter("d").filter(request(), [ep]) == [ep]) is decodes
    assert (PrefillFilter("p").filter(request(), [ep]) == [ep]) is prefills


def test_role_filters_keep_the_input_order() -> None:
    eps = [
        endpoint(f"10.0.0.{i}:1", labels={ROLE_LABEL: role})
        for i, role in enumerate(["decode", "prefill", "both", "decode"])
    ]
    assert DecodeFilter("d").filter(request(), eps) == [eps[0], eps[2], eps[3]]
    assert PrefillFilter("p").filter(request(), eps) == [eps[1], eps[2]]
