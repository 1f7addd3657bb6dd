"""Suite-wide fixtures: one ``Backend`` parametrisation drives every namespace test.

* ``PEFTCORE_TEST_BACKENDS=numpy,torch`` picks a subset (default: all).
* Locally a backend whose library is missing is skipped; with ``CI`` set every
  backend must import, and any skipped test fails the run.
* A test that cannot run on a backend (NumPy has no bfloat16) declares it with
  ``@pytest.mark.unsupported_on(Backend.NUMPY, reason=...)``: that combination is
  never generated, so it is neither run nor counted as a skip.
* ``call(fn, *arrays, **static)`` runs a core function, and under
  ``Backend.JAX_JIT`` runs it through ``jax.jit`` with the keywords static, so a
  core function that branches on array values fails here, not in a user's
  training loop.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

from peftcore.testing import Backend

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IN_CI = bool(os.environ.get("CI"))


def _selected_backends() -> list[Backend]:
    names = os.environ.get("PEFTCORE_TEST_BACKENDS")
    if not names:
        return list(Backend)
    chosen = [b for b in Backend if b.value in names.split(",") or b.framework in names.split(",")]
    if not chosen:
        raise pytest.UsageError(f"PEFTCORE_TEST_BACKENDS={names!r} names no backend; known: {[b.value for b in Backend]}")
    return chosen


def _available(backend: Backend) -> bool:
    return importlib.util.find_spec(backend.framework) is not None


def pytest_configure(config: pytest.Config) -> None:
    if importlib.util.find_spec("jax") is not None:
        import jax

        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_default_matmul_precision", "highest")
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_default_dtype(torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = False
    if IN_CI:
        missing = [b.value for b in Backend if not _available(b)]
        if missing:
            raise pytest.UsageError(f"CI is set but these array backends cannot be imported: {missing}")


def _backend_params() -> list:
    params = []
    for b in _selected_backends():
        marks = [] if _available(b) else [pytest.mark.skip(reason=f"{b.framework} is not installed")]
        params.append(pytest.param(b, id=b.value, marks=marks))
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    excluded = set()
    for marker in metafunc.definition.iter_markers("unsupported_on"):
        reason = marker.kwargs.get("reason")
        if not marker.args or not all(isinstance(b, Backend) for b in marker.args) or not reason:
            raise TypeError(f"{metafunc.definition.nodeid}: unsupported_on needs Backend members and a reason")
        excluded.update(marker.args)
    params = [p for p in _backend_params() if p.values[0] not in excluded]
    metafunc.parametrize("backend", params, indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


@pytest.fixture(scope="session")
def xp(backend: Backend):
    """The array-api-compat namespace of the backend under test."""
    return backend.namespace()


@pytest.fixture(scope="session")
def call(backend: Backend):
    """``call(fn, *arrays, **static)``: plain call, or ``jax.jit`` with ``static`` closed over."""
    if backend is not Backend.JAX_JIT:
        return lambda fn, *arrays, **static: fn(*arrays, **static)
    import jax

    def jitted(fn, *arrays, **static):
        return jax.jit(functools.partial(fn, **static))(*arrays)

    return jitted


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if IN_CI and _skipped:
        terminalreporter.write_line(
            f"CI is set and {len(_skipped)} test(s) were skipped; skips fail a CI run: " + ", ".join(_skipped[:10]),
            red=True,
        )
