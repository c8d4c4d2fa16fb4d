"""The core needs no extra; a missing extra is an ImportError that names it."""

import subprocess
import sys
import textwrap

import pytest

from sparsejax.harness._extras import EXTRAS, require

# The packages of the extras (and importlib_resources, which the data extra brings for
# TFDS). ``sys.modules[name] = None`` makes ``import name`` raise ModuleNotFoundError.
BLOCKED = ("tensorflow_datasets", "importlib_resources", "mnist1d", "matplotlib", "tqdm",
           "tensorboardX")

CORE_WITHOUT_EXTRAS = textwrap.dedent(f"""
    import sys
    for name in {BLOCKED!r}:
        sys.modules[name] = None

    import jax, jax.numpy as jnp, optax
    import sparsejax, sparsejax.linen, sparsejax.nnx, sparsejax.integrations.optax_form

    params = {{"hidden": {{"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}},
               "out": {{"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}}}

    def loss(params, x):
        h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
        return jnp.sum((h @ params["out"]["kernel"] + params["out"]["bias"]) ** 2)

    tx = sparsejax.sparse_tx("rigl", optax.sgd(0.1), sparsity=0.5, update_every=1,
                             end_step=10, distribution="uniform")
    opt_state = tx.init(params)
    params = sparsejax.zero_pruned(params, opt_state)

    @jax.jit
    def step(params, opt_state, x):
        updates, opt_state = tx.update(jax.grad(loss)(params, x), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = step(params, opt_state, jnp.ones((3, 4)))
    masks = sparsejax.masks_of(opt_state)
    assert int(masks["hidden"]["kernel"].sum()) == 16, masks
    assert bool(jnp.all(jnp.where(masks["hidden"]["kernel"], 0.0,
                                  params["hidden"]["kernel"]) == 0))
    print("core ok")
""")


def test_core_imports_and_trains_without_any_extra():
    result = subprocess.run([sys.executable, "-c", CORE_WITHOUT_EXTRAS], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core ok" in result.stdout


def test_loading_mnist1d_without_the_data_extra_names_it(monkeypatch, tmp_path):
    from sparsejax.harness.data import load_dataset
    from sparsejax.harness.data.mnist1d import _generated_mnist1d

    # a seed not generated yet: neither in this process nor kept on disk
    monkeypatch.setenv("SPARSEJAX_CACHE_DIR", str(tmp_path))
    _generated_mnist1d.cache_clear()
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.delitem(sys.modules, "mnist1d.data", raising=False)
    with pytest.raises(ImportError, match=r"sparsejax\[data\]") as info:
        load_dataset("mnist1d", seed=0)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_loading_tfds_without_the_data_extra_names_it(monkeypatch, tmp_path):
    from sparsejax.harness.data import load_dataset

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'sparsejax\[data\]'"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_require_names_the_extra_of_a_missing_package(monkeypatch, module):
    extra = EXTRAS[module][0]
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"pip install 'sparsejax\[{extra}\]'"):
        require(module)


def test_require_reraises_a_missing_module_that_no_extra_installs():
    with pytest.raises(ModuleNotFoundError) as info:
        require("sparsejax_no_such_module")
    assert info.value.name == "sparsejax_no_such_module"
    assert "sparsejax[" not in str(info.value)


def test_require_reraises_a_missing_dependency_inside_an_extra(monkeypatch):
    # An extra that is installed but broken (a dependency of its own missing) is not
    # reported as the extra missing: the original error goes through.
    for name in [n for n in sys.modules if n == "mnist1d" or n.startswith("mnist1d.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "requests", None)
    with pytest.raises(ModuleNotFoundError) as info:
        require("mnist1d.data")
    assert info.value.name == "requests"
    assert "sparsejax[" not in str(info.value)


def test_training_without_tqdm_warns_and_goes_on(monkeypatch):
    from sparsejax.harness.training.run_output import ProgressBar

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.delitem(sys.modules, "tqdm.auto", raising=False)
    with pytest.warns(UserWarning, match=r"sparsejax\[progress\]"):
        bar = ProgressBar(True, total=10, start=0)
    bar.update(5, {"loss": 1.0})
    bar.close()
    assert bar.bar is None


def test_tensorboard_writer_is_none_without_its_extra(monkeypatch, tmp_path):
    from sparsejax.harness.training.run_output import tensorboard_writer

    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    assert tensorboard_writer(tmp_path / "tensorboard") is None
