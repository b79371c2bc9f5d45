"""Root conftest: the namespace every docstring example runs in (``--doctest-modules``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np)


@pytest.fixture(autouse=True)
def _no_global_x64_change(request):
    """A test may use float64 only in a scope (``jax.enable_x64``), never switch it on for the process."""
    before = bool(jax.config.jax_enable_x64)
    yield
    if bool(jax.config.jax_enable_x64) != before:
        jax.config.update("jax_enable_x64", before)
        pytest.fail(f"{request.node.nodeid} changed jax_enable_x64 for the whole process")
