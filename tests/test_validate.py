import numpy as np
import pytest
import torch

from models.data import load_array
from models.validate import as_data, integer, positive


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.array([[1.0, np.nan]]), "data: contains NaN"),
        (np.array([[1.0, np.inf]]), "data: contains inf"),
        (np.zeros((0, 2)), "data: expected at least 1 row"),
        (np.zeros((2, 2, 2)), "data: expected 2 dimensions"),
        (None, "data: got None"),
    ],
)
def test_bad_data_is_named(x, match):
    with pytest.raises(ValueError, match=match):
        as_data(x)


def test_strings_rejected():
    with pytest.raises(TypeError, match="data: expected numeric"):
        as_data(np.array([["a", "b"]]))


def test_dtype_and_device_follow_input():
    t = torch.ones(3, 2, dtype=torch.float64)
    assert as_data(t).dtype == torch.float64
    assert as_data(np.ones((3, 2))).dtype == torch.float64
    assert as_data(np.ones((3, 2), dtype=np.float32)).dtype == torch.float32
    assert as_data(torch.ones(3, 2, dtype=torch.int64)).is_floating_point()


def test_scalar_checks():
    with pytest.raises(ValueError, match="prior_var: must be a positive"):
        positive(0.0, "prior_var")
    with pytest.raises(ValueError, match="prior_var: is NaN"):
        positive(float("nan"), "prior_var")
    with pytest.raises(ValueError, match="K: must be >= 1"):
        integer(0, "K")
    with pytest.raises(TypeError, match="K: must be an integer"):
        integer(2.5, "K")


def test_load_array_csv_npy_npz(tmp_path):
    a = np.arange(6, dtype=float).reshape(3, 2)
    (tmp_path / "a.csv").write_text("u,v\n0,1\n2,3\n4,5\n")
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "a.npz", a=a)
    for name in ("a.csv", "a.npy", "a.npz"):
        np.testing.assert_array_equal(load_array(tmp_path / name), a)
    (tmp_path / "bad.csv").write_text("u,v\n0,x\n")
    with pytest.raises(ValueError, match="non-numeric column"):
        load_array(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="data: no such file"):
        load_array(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_array(tmp_path / "a.json")


def test_engine_and_tool_settings_name_the_field():
    import torch as _t

    from inference import mcmc, svi
    from inference.impute import rmse

    with pytest.raises(ValueError, match="^val_particles"):
        svi.Settings(val_particles=0)
    with pytest.raises(ValueError, match="^rhat_max"):
        mcmc.Settings(rhat_max=0.9)
    with pytest.raises(ValueError, match="^truth|^mask|^imputed"):
        rmse(_t.zeros(3, 2), _t.zeros(2, 2), _t.ones(3, 2, dtype=_t.bool))


def test_gmm_script_rejects_empty_simulation(tmp_path):
    from experiments import gmm_engines

    with pytest.raises(SystemExit, match="n"):
        gmm_engines.main(["--n", "0", "--out", str(tmp_path), "--quick"])
